"""Reading reference (PyTorch) checkpoints into cips_jax.

Checkpoints are read with `torch_pickle`, which rebuilds tensors and plain
containers only and runs no other pickled code; torch is not needed.
`load_torch_checkpoint` gives one network as (module, variables);
`load_training_run` gives a whole training run (networks, Adam states, step).

A checkpoint is untrusted: anything in it that does not fit (a tensor of the
wrong rank, an optimizer state of the wrong types) is a
`errors.CheckpointError` whose message names the file and quotes no value at
length.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Optional

import numpy as np

from cips_jax import discriminator as discriminator_lib
from cips_jax import errors
from cips_jax import generator as generator_lib
from cips_jax import networks
from cips_jax import torch_pickle
from cips_jax.convert import inference
from cips_jax.convert import layouts
from cips_jax.convert import runs

# The largest step count: the train state counts steps in int32.
_MAX_STEP = 2**31 - 1


def _in_file(path: Any, err: errors.CheckpointError) -> errors.CheckpointError:
  """`err` with its message naming the file `path`, if it does not yet."""
  if str(path) in str(err):
    return err
  return type(err)(f'{path}: {err}')


# ------------------------------------------------------------------------------
# One network.


def _is_state_dict(obj: Any) -> bool:
  return (
    isinstance(obj, Mapping)
    and bool(obj)
    and all(
      isinstance(k, str) and isinstance(v, np.ndarray) for k, v in obj.items()
    )
  )


def _looks_like_discriminator(state_dict: layouts.StateDict) -> bool:
  return (
    'convs.0.0.weight' in state_dict or 'final_linear.0.weight' in state_dict
  )


def select_state_dict(
  checkpoint: Any, which: str, source: str = 'checkpoint'
) -> layouts.StateDict:
  """Picks g_ema / g / d from a training checkpoint.

  A bare state dict is returned once its kind is checked.
  """
  if which not in networks.NETWORKS:
    raise errors.CheckpointError(
      f'which must be one of {tuple(networks.NETWORKS)}, got {which!r}'
    )
  if (
    isinstance(checkpoint, Mapping)
    and which in checkpoint
    and _is_state_dict(checkpoint[which])
  ):
    return checkpoint[which]
  if _is_state_dict(checkpoint):
    is_disc = _looks_like_discriminator(checkpoint)
    if is_disc != (which == 'd'):
      kind = 'a discriminator' if is_disc else 'a generator'
      raise layouts.CheckpointMismatchError(
        f'{source} is a bare state dict of {kind}; '
        f'which={which!r} does not fit it'
      )
    return checkpoint
  found = (
    layouts.listing(sorted(map(layouts.key_text, checkpoint)))
    if isinstance(checkpoint, Mapping)
    else type(checkpoint)
  )
  raise layouts.CheckpointMismatchError(
    f'{source} has no {which!r} state dict (found: {found})'
  )


def from_state_dict(
  state_dict: layouts.StateDict,
  which: str = 'g_ema',
  activation: Optional[str] = None,
  **overrides,
) -> tuple[Any, dict[str, Any]]:
  """A reference state dict -> (module, variables).

  The architecture is inferred from the state dict; one that cannot work (e.g.
  a size that is no power of two) is a CheckpointMismatchError.
  """
  try:
    if which == 'd':
      module = inference.infer_discriminator(state_dict, **overrides)
      return module, layouts.discriminator_params(state_dict, module)
    module = inference.infer_generator(
      state_dict, activation=activation, **overrides
    )
    return module, layouts.generator_params(state_dict, module)
  except errors.CheckpointError:
    raise
  except errors.InputError as err:
    raise layouts.CheckpointMismatchError(
      f'the state dict describes an architecture that cannot work: {err}'
    ) from None


def load_torch_checkpoint(
  path: str, which: str = 'g_ema', activation: Optional[str] = None, **overrides
) -> tuple[Any, dict[str, Any]]:
  """Reads a reference `.pt` file (safely) and returns `(module, variables)`.

  Args:
    path: a torch zip checkpoint: the reference's training checkpoint or a bare
      state dict.
    which: 'g_ema' (the EMA generator, what the released files hold), 'g' or
      'd'.
    activation: for sine models only (see `inference.infer_generator`).
    **overrides: module attributes to force, e.g. `dtype=jnp.bfloat16`.
  Returns:
    A Flax module (CIPSskip, CIPSres or Discriminator) and its variables
    `{'params': ...}`.
  """
  checkpoint = torch_pickle.load(path)
  try:
    state_dict = select_state_dict(checkpoint, which, source=str(path))
    return from_state_dict(
      state_dict, which, activation=activation, **overrides
    )
  except errors.CheckpointError as err:
    raise _in_file(path, err) from None


# ------------------------------------------------------------------------------
# Training checkpoints: networks, Adam states and the step.


def reference_parameter_names(
  state_dict: layouts.StateDict, buffers: frozenset[str] = frozenset()
) -> list[str]:
  """The reference module's `named_parameters()` order.

  That is the order torch's optimizer numbers the parameters in: the state
  dict's order without its buffers.
  """
  return [key for key in state_dict if key not in buffers]


def _param_groups(optimizer: Any, what: str) -> list[Mapping[str, Any]]:
  """The param_groups of a torch optimizer state dict, their types checked."""
  if not (
    isinstance(optimizer, Mapping)
    and isinstance(optimizer.get('state'), Mapping)
    and isinstance(optimizer.get('param_groups'), (list, tuple))
  ):
    raise layouts.CheckpointMismatchError(
      f'{what} is not a torch optimizer state dict (expected the keys '
      "'state' and 'param_groups')"
    )
  groups = optimizer['param_groups']
  for i, group in enumerate(groups):
    params = group.get('params', ()) if isinstance(group, Mapping) else None
    if not isinstance(params, (list, tuple)) or not all(
      isinstance(p, int) and not isinstance(p, bool) for p in params
    ):
      raise layouts.CheckpointMismatchError(
        f"{what}: param_groups[{i}] is not a dict with a list of 'params' "
        f'indices (got {errors.bounded_repr(group, 100)})'
      )
  return list(groups)


def _hyperparameters(groups: list[Mapping[str, Any]], what: str) -> dict:
  """lr, betas and eps of the first param group (None where absent)."""
  group = groups[0] if groups else {}
  found = {k: group.get(k) for k in ('lr', 'betas', 'eps')}

  def number(x: Any) -> bool:  # newer torch may keep lr as a 0-d tensor
    if isinstance(x, np.ndarray):
      return x.size == 1 and x.dtype.kind in 'fiu'
    return isinstance(x, (int, float)) and not isinstance(x, bool)

  fits = {
    'lr': found['lr'] is None or number(found['lr']),
    'eps': found['eps'] is None or number(found['eps']),
    'betas': found['betas'] is None
    or (
      isinstance(found['betas'], (list, tuple))
      and len(found['betas']) == 2
      and all(number(b) for b in found['betas'])
    ),
  }
  for key, ok in fits.items():
    if not ok:
      raise layouts.CheckpointMismatchError(
        f'{what}: param_groups[0] {key} is '
        f'{errors.bounded_repr(found[key], 100)}, not '
        + ('a pair of numbers' if key == 'betas' else 'a number')
      )
  return found


def _step_count(step: Any) -> Optional[float]:
  """An Adam entry's step (a one-element tensor or a number), or None."""
  if isinstance(step, np.ndarray):
    if step.size != 1 or step.dtype.kind not in 'fiu':
      return None
    step = step.reshape(-1)[0].item()
  if not isinstance(step, (int, float)) or isinstance(step, bool):
    return None
  step = float(step)
  return step if math.isfinite(step) and 0 <= step <= _MAX_STEP else None


def adam_state(
  optimizer: Any,
  names: list[str],
  layout: Mapping[str, layouts.Entry],
  what: str,
) -> runs.AdamState:
  """A torch Adam `state_dict()` -> AdamState in our layout.

  Args:
    optimizer: {'state': {i: {'step', 'exp_avg', 'exp_avg_sq'}}, 'param_groups':
      [{'params': [i, ...], 'lr', 'betas', 'eps', ...}]}; state i belongs to
      parameter names[i].
    names: the reference parameter names in optimizer order
      (`reference_parameter_names`).
    layout: the module's reference layout (`layouts.generator_layout`, ...).
    what: names the optimizer in errors, e.g. "g_optim".
  Raises:
    CheckpointMismatchError naming every parameter whose state is missing,
    mis-shaped or of the wrong type, or whose step count differs from the
    others; or naming what is wrong with the state dict's structure.
  """
  groups = _param_groups(optimizer, what)
  indices = [i for group in groups for i in group.get('params', ())]
  if len(indices) != len(names):
    detail = (
      'no Adam state for '
      + layouts.listing([layouts.key_text(n) for n in names[len(indices) :]])
      if len(indices) < len(names)
      else f'{len(indices) - len(names)} entries more than the parameters'
    )
    raise layouts.CheckpointMismatchError(
      f'{what} optimises {len(indices)} parameters, the model has '
      f'{len(names)}: {detail}'
    )
  problems, moments, counts = [], {'exp_avg': {}, 'exp_avg_sq': {}}, {}
  for index, name in zip(indices, names):
    entry = optimizer['state'].get(index)
    label = layouts.key_text(name)
    if name not in layout:
      problems.append(f'{label}: not a parameter of the model')
      continue
    shape = layout[name][1]
    if not isinstance(entry, Mapping) or not {
      'step',
      'exp_avg',
      'exp_avg_sq',
    } <= set(entry):
      problems.append(f'{label}: no Adam state')
      continue
    for moment in ('exp_avg', 'exp_avg_sq'):
      if not isinstance(entry[moment], np.ndarray):
        problems.append(
          f'{label}: {moment} is {layouts.shape_text(entry[moment])}, not a '
          'tensor'
        )
        continue
      found = entry[moment].shape
      if found != shape:
        problems.append(f'{label}: {moment} {found}, parameter {shape}')
      moments[moment][name] = entry[moment]
    count = _step_count(entry['step'])
    if count is None:
      problems.append(
        f'{label}: step {errors.bounded_repr(entry["step"], 60)} is '
        f'not a count from 0 to {_MAX_STEP}'
      )
    else:
      counts[name] = count
  if problems:
    raise layouts.CheckpointMismatchError(
      f'{what} does not fit the model ({len(problems)} parameters): '
      + layouts.listing(problems)
    )
  distinct = sorted(set(counts.values()))
  if len(distinct) != 1 or distinct[0] != int(distinct[0]):
    raise layouts.CheckpointMismatchError(
      f'{what}: the parameters have different step counts '
      f'[{layouts.listing([str(c) for c in distinct], 200)}] '
      '(optax keeps one count per optimizer)'
    )
  mu, nu = (
    layouts.params_from_layout(moments[m], layout, f'{what} {m}')['params']
    for m in ('exp_avg', 'exp_avg_sq')
  )
  return runs.AdamState(
    count=int(distinct[0]),
    mu=mu,
    nu=nu,
    hyperparameters=_hyperparameters(groups, what),
  )


def load_training_run(
  path: str,
  generator: generator_lib.CIPS,
  discriminator: discriminator_lib.Discriminator,
) -> runs.TrainingRun:
  """Reads a reference training checkpoint for these two modules.

  The checkpoint is the dict the reference's train.py saves (g, d, g_ema,
  g_optim, d_optim), optionally with 'step', the number of completed steps;
  without it, the step is the generator's Adam count (G takes one Adam step
  per training step). Every state dict is checked strictly against the
  modules: a checkpoint of another architecture is refused with the keys that
  differ.
  """
  checkpoint = torch_pickle.load(path)
  try:
    return _training_run(checkpoint, path, generator, discriminator)
  except errors.CheckpointError as err:
    raise _in_file(path, err) from None


def _training_run(
  checkpoint: Any,
  path: str,
  generator: generator_lib.CIPS,
  discriminator: discriminator_lib.Discriminator,
) -> runs.TrainingRun:
  missing = [
    k
    for k in runs.TRAINING_KEYS
    if not isinstance(checkpoint, Mapping) or k not in checkpoint
  ]
  if missing:
    found = (
      layouts.listing(sorted(map(layouts.key_text, checkpoint)))
      if isinstance(checkpoint, Mapping)
      else type(checkpoint).__name__
    )
    raise layouts.CheckpointMismatchError(
      f'{path} is not a reference training checkpoint: it lacks '
      f'{", ".join(missing)} (found: {found}). A generator alone starts a '
      'run with config.train.init_generator_from instead.'
    )
  for key in ('g', 'g_ema', 'd'):
    if not _is_state_dict(checkpoint[key]):
      raise layouts.CheckpointMismatchError(
        f"{path}: '{key}' is not a state dict (names -> tensors)"
      )
  g_layout = layouts.generator_layout(generator)
  d_layout, d_buffers = layouts.discriminator_layout(discriminator)
  g = layouts.generator_params(checkpoint['g'], generator)['params']
  g_ema = layouts.generator_params(checkpoint['g_ema'], generator)['params']
  d = layouts.discriminator_params(checkpoint['d'], discriminator)['params']
  g_adam = adam_state(
    checkpoint['g_optim'],
    reference_parameter_names(checkpoint['g']),
    g_layout,
    'g_optim',
  )
  d_adam = adam_state(
    checkpoint['d_optim'],
    reference_parameter_names(checkpoint['d'], d_buffers),
    d_layout,
    'd_optim',
  )
  step = checkpoint.get('step', g_adam.count)
  if (
    not isinstance(step, int)
    or isinstance(step, bool)
    or not 0 <= step <= _MAX_STEP
  ):
    raise layouts.CheckpointMismatchError(
      f"{path}: 'step' must be an int from 0 to {_MAX_STEP}, got "
      f'{errors.bounded_repr(step, 100)}'
    )
  return runs.TrainingRun(
    step=step, g=g, d=d, g_ema=g_ema, g_adam=g_adam, d_adam=d_adam
  )
