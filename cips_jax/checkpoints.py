"""Orbax checkpoints: exported generators, and the checkpoints of training runs.

An exported generator is a directory with two orbax items: `params` (the
variables) and `model` (JSON: the class name and its constructor arguments), so
it can be rebuilt without knowing the architecture in advance.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from absl import logging
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from cips_jax import errors
from cips_jax import models

_SKIPPED_FIELDS = ('parent', 'name')


def _module_config(module) -> dict[str, Any]:
  """The constructor arguments of a generator as JSON-friendly values.

  A dtype is given as its name.
  """
  config = {}
  for field in dataclasses.fields(module):
    if field.name in _SKIPPED_FIELDS:
      continue
    value = getattr(module, field.name)
    config[field.name] = (
      jnp.dtype(value).name if field.name == 'dtype' else value
    )
  return {'class': type(module).__name__, 'kwargs': config}


def _module_from_config(config: dict[str, Any]):
  """Inverse of `_module_config`; checks every field first.

  Raises errors.CheckpointError naming the field when `config` is not what
  `_module_config` writes: an unknown class or field, a value of the wrong type,
  an integer out of bounds, a non-finite float.
  """
  if not isinstance(config, dict) or not isinstance(config.get('kwargs'), dict):
    raise errors.CheckpointError(
      'not a generator description (expected {"class": ..., "kwargs": '
      f'{{...}}}}, got {errors.bounded_repr(config)})'
    )
  name = config.get('class')
  if name not in models.GENERATORS:
    raise errors.CheckpointError(
      f'unknown generator class {errors.bounded_repr(name)}; expected one of '
      f'{sorted(models.GENERATORS)}'
    )
  cls = models.GENERATORS[name]
  fields = {
    f.name: f.default
    for f in dataclasses.fields(cls)
    if f.name not in _SKIPPED_FIELDS
  }
  kwargs = dict(config['kwargs'])
  for key, value in kwargs.items():
    if key not in fields:
      raise errors.CheckpointError(
        f'{name} has no field {errors.bounded_repr(key)}'
      )
    problem = _field_problem(key, value, fields[key])
    if problem:
      raise errors.CheckpointError(
        f'{name}.{key} = {errors.bounded_repr(value)}: {problem}'
      )
  if 'dtype' in kwargs:
    kwargs['dtype'] = jnp.dtype(kwargs['dtype'])
  return cls(**kwargs)


# Integer fields of a generator and their bounds: far beyond any model that
# fits a device, so a value outside them is damage, not a choice.
_INT_BOUNDS = {
  'size': (1, 1 << 16),
  'hidden_size': (1, 1 << 14),
  'style_dim': (1, 1 << 14),
  'n_mlp': (0, 64),
  'channel_multiplier': (1, 64),
  'max_channels': (1, 1 << 14),
}
_DTYPES = ('float32', 'bfloat16', 'float16')


def _field_problem(key: str, value, default) -> str | None:
  """Why `value` cannot be generator field `key` (whose default is `default`),
  or None.
  """
  if key == 'dtype':
    return None if value in _DTYPES else f'must be one of {_DTYPES}'
  if isinstance(default, bool):
    return None if isinstance(value, bool) else 'must be true or false'
  if isinstance(default, int):
    low, high = _INT_BOUNDS.get(key, (0, 1 << 14))
    if isinstance(value, bool) or not isinstance(value, int):
      return 'must be an integer'
    return None if low <= value <= high else f'must be in [{low}, {high}]'
  if isinstance(default, float):
    if isinstance(value, bool) or not isinstance(value, (int, float)):
      return 'must be a number'
    return None if 0 < value < float('inf') else 'must be finite and positive'
  if value is None or (isinstance(value, str) and len(value) <= 64):
    return None
  return 'must be a short string'


def export_generator(directory: str, module, variables: dict[str, Any]) -> None:
  """Writes `variables` and `module`'s configuration as an orbax checkpoint.

  The checkpoint goes to `directory`. Refuses to overwrite an existing
  directory, so nothing already saved is lost.
  """
  directory = os.path.abspath(directory)
  if os.path.exists(directory):
    raise errors.OutputExistsError(
      f'{directory} exists; choose a new output directory'
    )
  checkpointer = ocp.Checkpointer(ocp.CompositeCheckpointHandler())
  checkpointer.save(
    directory,
    ocp.args.Composite(
      params=ocp.args.StandardSave({'params': variables['params']}),
      model=ocp.args.JsonSave(_module_config(module)),
    ),
  )


def load_generator(directory: str):
  """Reads an exported generator: returns `(module, variables)`.

  Read as a training checkpoint is: the model JSON is checked (fields, types,
  bounds) before anything is built, and the parameters' shapes against the
  architecture it describes. Raises MissingInputError without a directory,
  DamagedCheckpointError for an unreadable part (named), and
  CheckpointMismatchError for parameters of another architecture.
  """
  directory = os.path.abspath(directory)
  if not os.path.isdir(directory):
    raise errors.MissingInputError(f'no exported generator at {directory}')
  checkpointer = ocp.Checkpointer(ocp.CompositeCheckpointHandler())
  model_path = os.path.join(directory, 'model')
  try:
    model_config = checkpointer.restore(
      directory, ocp.args.Composite(model=ocp.args.JsonRestore())
    )['model']
  except Exception as error:  # orbax raises many types; all mean damage
    raise errors.DamagedCheckpointError(
      f'the model description {model_path} cannot be read '
      f'({describe_damage(error)})'
    ) from None
  try:
    module = _module_from_config(model_config)
    expected = jax.eval_shape(lambda: models.init(module, jax.random.key(0)))
  except errors.CheckpointError as error:
    raise errors.CheckpointError(f'{model_path}: {error}') from None
  except Exception as error:  # the module refused its own fields
    raise errors.CheckpointError(
      f'{model_path} does not describe a generator that can be built '
      f'({describe_damage(error)})'
    ) from None
  params_path = os.path.join(directory, 'params')
  try:
    params = checkpointer.restore(
      directory, ocp.args.Composite(params=ocp.args.StandardRestore())
    )['params']['params']
  except Exception as error:  # as above
    raise errors.DamagedCheckpointError(
      f'the parameters {params_path} cannot be read ({describe_damage(error)})'
    ) from None
  _check_shapes(params, expected['params'], params_path, model_path)
  return module, {'params': params}


def _check_shapes(params, expected, params_path: str, model_path: str):
  """Raises CheckpointMismatchError unless `params` has `expected`'s tree and
  shapes, naming the first differences."""
  flat = lambda tree: {  # noqa: E731
    jax.tree_util.keystr(path): tuple(np.shape(leaf))
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
  }
  saved, wanted = flat(params), flat(expected)
  differences = [
    f'{key}: saved {saved.get(key)}, model {wanted.get(key)}'
    for key in sorted(set(saved) | set(wanted))
    if saved.get(key) != wanted.get(key)
  ]
  if differences:
    raise errors.CheckpointMismatchError(
      f'the parameters {params_path} do not match the architecture '
      f'{model_path} describes ({len(differences)} differences; '
      + '; '.join(differences[:3])
      + ')'
    )


def restore_target(abstract_state, sharding):
  """`abstract_state`'s leaves as ShapeDtypeStructs placed by `sharding`.

  `sharding` is one sharding for every leaf, or a tree of them like the state.
  What orbax's StandardRestore restores into.
  """
  if isinstance(sharding, jax.sharding.Sharding):  # one for every leaf
    sharding = jax.tree_util.tree_map(lambda _: sharding, abstract_state)
  return jax.tree_util.tree_map(
    lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
    abstract_state,
    sharding,
  )


class TrainCheckpoints:
  """Training checkpoints under one directory.

  Saves every N steps, keeps the last K, and resumes. Each checkpoint holds the
  train state and the run's config. Restoring refuses, with the differing fields
  named, a checkpoint whose model or data shapes differ from the config's, and
  never deletes or overwrites what is saved.
  """

  # Config fields that change the shapes or meaning of the saved state.
  ARCHITECTURE_FIELDS = ('model', 'data.crop', 'train.d_input_coords')

  def __init__(self, directory: str, keep: int, config):
    self.directory = os.path.abspath(directory)
    self.config = config
    self._manager = ocp.CheckpointManager(
      self.directory,
      options=ocp.CheckpointManagerOptions(
        max_to_keep=keep, create=True, enable_async_checkpointing=False
      ),
    )

  def save(self, step: int, state) -> None:
    """Writes `state` as checkpoint `step`, atomically.

    A killed save leaves no checkpoint.
    """
    self._manager.save(
      step,
      args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        config=ocp.args.JsonSave(self.config.to_dict()),
      ),
    )

  def latest_step(self):
    return self._manager.latest_step()

  def restore_latest(self, abstract_state, sharding):
    """The latest intact checkpoint restored into `sharding`; None if none.

    `sharding` is one sharding, or a tree of them like the state. A checkpoint
    that cannot be read (truncated, corrupt) is named in a warning and moved,
    untouched, to `damaged_checkpoints/` beside this directory, and the newest
    intact one is restored instead: training repeats the steps in between.
    Older checkpoints are never deleted. Raises DamagedCheckpointError when no
    checkpoint is intact, and CheckpointMismatchError for another
    architecture's (neither moves anything).
    """
    steps = sorted(self._manager.all_steps(), reverse=True)
    if not steps:
      return None
    target = restore_target(abstract_state, sharding)
    damaged = {}
    for step in steps:
      try:
        saved = self._manager.restore(
          step, args=ocp.args.Composite(config=ocp.args.JsonRestore())
        )['config']
      except Exception as error:  # orbax raises many types; all mean damage
        damaged[step] = error
        continue
      self._check_compatible(saved, step)
      try:
        state = self._manager.restore(
          step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target))
        )['state']
      except Exception as error:  # as above
        damaged[step] = error
        continue
      if damaged:
        self._set_aside(damaged, step)
      return state
    raise errors.DamagedCheckpointError(
      f'every checkpoint in {self.directory} is damaged (steps '
      f'{", ".join(map(str, steps))}; step {steps[0]}: '
      f'{describe_damage(damaged[steps[0]])}). Nothing was moved or deleted; '
      'train in a new --workdir'
    )

  def _set_aside(self, damaged: dict[int, Exception], intact: int) -> None:
    """Moves damaged steps out of the manager's sight; resumes at `intact`."""
    aside = os.path.join(os.path.dirname(self.directory), 'damaged_checkpoints')
    for step, error in sorted(damaged.items()):
      target = os.path.join(aside, str(step))
      if jax.process_index() == 0:
        os.makedirs(aside, exist_ok=True)
        # A step damaged again after a resume keeps both copies.
        suffix = 1
        while os.path.exists(target):
          target = os.path.join(aside, f'{step}.{suffix}')
          suffix += 1
        os.rename(os.path.join(self.directory, str(step)), target)
      logging.warning(
        'THE CHECKPOINT AT STEP %d IS DAMAGED (%s). It was moved, untouched, '
        'to %s; resuming from step %d, the newest intact checkpoint.',
        step,
        describe_damage(error),
        target,
        intact,
      )
    if jax.process_count() > 1:
      # The others list the steps only once process 0 has moved them.
      multihost_utils.sync_global_devices('damaged checkpoints set aside')
    self._manager.reload()

  def _check_compatible(self, saved: dict[str, Any], step: int) -> None:
    current = self.config.to_dict()
    differences = []
    for field in self.ARCHITECTURE_FIELDS:
      old, new = _lookup(saved, field), _lookup(current, field)
      if isinstance(old, dict) and isinstance(new, dict):
        differences += [
          f'{field}.{k}: checkpoint {old.get(k)!r}, config {new.get(k)!r}'
          for k in sorted(set(old) | set(new))
          if old.get(k) != new.get(k)
        ]
      elif old != new:
        differences.append(f'{field}: checkpoint {old!r}, config {new!r}')
    if differences:
      raise errors.CheckpointMismatchError(
        f'the checkpoint at step {step} in {self.directory} was written by a '
        'different architecture; it was not modified. Use a new --workdir, or '
        'restore the config. '
        'Differences: ' + '; '.join(differences)
      )

  def wait(self) -> None:
    self._manager.wait_until_finished()


def describe_damage(error: BaseException) -> str:
  """A one-line cause of a failed restore (orbax's messages run to pages)."""
  lines = [line.strip() for line in str(error).splitlines() if line.strip()]
  first = lines[0] if lines else ''
  text = f'{type(error).__name__}: {first}' if first else type(error).__name__
  return text if len(text) <= 160 else text[:157] + '...'


def _lookup(tree: dict[str, Any], dotted: str):
  for key in dotted.split('.'):
    if not isinstance(tree, dict) or key not in tree:
      return None
    tree = tree[key]
  return tree
