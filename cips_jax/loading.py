"""Opens a generator from whatever a user has.

A training workdir, an export, or a reference .pt:

    # a training workdir
    gen, variables = loading.open_generator('/tmp/run')
    # one of its steps
    gen, variables = loading.open_generator('/tmp/run/checkpoints/1300')
    # written by checkpoints.export_generator
    gen, variables = loading.open_generator('/tmp/exported')
    # an official checkpoint
    gen, variables = loading.open_generator('churches.pt')

The commands (`cips_jax.sample`, `cips_jax.evaluate`) take any of these as
--checkpoint.
"""

from __future__ import annotations

import os
import time
from typing import Any

from absl import logging
import ml_collections
import orbax.checkpoint as ocp

from cips_jax import checkpoints
from cips_jax import configs
from cips_jax import convert
from cips_jax import errors
from cips_jax import models
from cips_jax import networks

# The path exists but holds nothing this package can read as a generator.
NotAGeneratorError = errors.NotAGeneratorError


def _is_export(path: str) -> bool:
  # Either part marks an export: one without the other is a damaged export.
  return any(
    os.path.isdir(os.path.join(path, item)) for item in ('model', 'params')
  )


def _is_step_dir(path: str) -> bool:
  return os.path.basename(
    os.path.normpath(path)
  ).isdigit() and _is_export_of_state(path)


def _is_export_of_state(path: str) -> bool:
  return all(
    os.path.isdir(os.path.join(path, item)) for item in ('state', 'config')
  )


def _restore_step(manager_dir: str, step: int, **items) -> dict:
  """The orbax `items` of step directory MANAGER_DIR/STEP, read directly.

  No orbax CheckpointManager: constructing one lists and inspects every step,
  which fails when a live run prunes one meanwhile. Nothing is written.
  """
  checkpointer = ocp.Checkpointer(ocp.CompositeCheckpointHandler())
  return checkpointer.restore(
    os.path.join(manager_dir, str(step)), ocp.args.Composite(**items)
  )


def _restore(manager_dir: str, step: int, **items) -> dict:
  """The orbax `items` of checkpoint `step` in `manager_dir`.

  Raises DamagedCheckpointError, naming the newest intact checkpoint to use
  instead, when `step` cannot be read.
  """
  try:
    return _restore_step(manager_dir, step, **items)
  except Exception as error:  # orbax raises many types; all mean damage
    raise _damaged(manager_dir, step, error) from None


# A reader beside a live run retries this many times when the step it reads is
# pruned under it (a run keeping one checkpoint prunes one per save).
_VANISHED_RETRIES = 20
_RETRY_PAUSE_S = 0.5


def _vanished(workdir: str) -> errors.CheckpointError:
  """The error of a reader whose every step was pruned while it read."""
  return errors.CheckpointError(
    f'every checkpoint of {workdir} vanished while it was read, '
    f'{_VANISHED_RETRIES} times: is a run pruning faster than it saves?'
  )


def restore_newest(manager_dir: str, **items) -> tuple[int, dict]:
  """(step, the orbax `items`) of the newest checkpoint in `manager_dir`.

  Safe beside a live training run: it writes nothing, and a step that the run
  prunes while it is being read is skipped for the next newest (the listing is
  read again). A step is called damaged (DamagedCheckpointError, naming the
  newest intact one) only if it is still there, complete, and cannot be read
  twice in a row.
  """
  workdir = os.path.dirname(manager_dir)
  for _ in range(_VANISHED_RETRIES):
    steps = _checkpoint_steps(workdir)
    if not steps:
      raise errors.MissingInputError(
        f'the training workdir {workdir} has no checkpoint yet'
      )
    step = steps[-1]
    for attempt in range(2):
      try:
        return step, _restore_step(manager_dir, step, **items)
      except Exception as error:  # orbax raises many types
        if not _is_export_of_state(os.path.join(manager_dir, str(step))):
          break  # pruned under us: list again
        if attempt == 1:  # still there, and unreadable twice: damaged
          raise _damaged(manager_dir, step, error) from None
        # A deletion caught half-way finishes meanwhile.
        time.sleep(_RETRY_PAUSE_S)
  raise _vanished(workdir)


def _damaged(manager_dir: str, step: int, error: Exception):
  """The DamagedCheckpointError of `step`, naming the newest intact step."""
  intact = None
  for older in sorted(
    (s for s in _checkpoint_steps(os.path.dirname(manager_dir)) if s < step),
    reverse=True,
  ):
    try:
      _restore_step(
        manager_dir,
        older,
        state=ocp.args.StandardRestore(),
        config=ocp.args.JsonRestore(),
      )
    except Exception:  # damaged too: look further back
      continue
    intact = older
    break
  advice = (
    f'the newest intact one is step {intact}: use '
    f'--checkpoint={os.path.join(manager_dir, str(intact))}'
    if intact is not None
    else 'no older checkpoint is intact'
  )
  return errors.DamagedCheckpointError(
    f'the checkpoint at step {step} in {manager_dir} is damaged '
    f'({checkpoints.describe_damage(error)}); {advice}. Nothing was changed'
  )


def _restore_training_step(manager_dir: str, step: int, which: str):
  saved = _restore(
    manager_dir,
    step,
    state=ocp.args.StandardRestore(),
    config=ocp.args.JsonRestore(),
  )
  return _generator_of(saved, which)


def _generator_of(saved: dict, which: str):
  """(generator, variables) of a restored training checkpoint."""
  gen = models.generator_from_config(saved['config']['model'])
  return gen, {'params': saved['state'][networks.NETWORKS[which]]}


def _checkpoint_steps(workdir: str) -> list[int]:
  """The steps of the complete checkpoints in WORKDIR/checkpoints, ascending."""
  manager_dir = os.path.join(
    os.path.abspath(os.path.expanduser(workdir)), 'checkpoints'
  )
  if not os.path.isdir(manager_dir):
    raise errors.MissingInputError(
      f'{workdir} is not a training workdir (no checkpoints/ inside)'
    )
  return sorted(
    int(name)
    for name in os.listdir(manager_dir)
    if name.isdigit() and _is_export_of_state(os.path.join(manager_dir, name))
  )


def latest_checkpoint_step(workdir: str) -> int:
  """The step of the latest complete checkpoint in WORKDIR/checkpoints."""
  steps = _checkpoint_steps(workdir)
  if not steps:
    raise errors.MissingInputError(
      f'the training workdir {workdir} has no checkpoint yet'
    )
  return steps[-1]


def workdir_config(workdir: str):
  """The training config saved with the latest checkpoint.

  An ml_collections.ConfigDict. If the latest checkpoint's copy cannot be read,
  the newest readable one's (a warning names the damaged step): every
  checkpoint of a run holds the same config.
  """
  manager_dir = os.path.join(
    os.path.abspath(os.path.expanduser(workdir)), 'checkpoints'
  )
  for _ in range(_VANISHED_RETRIES):
    steps = _checkpoint_steps(workdir)
    if not steps:
      raise errors.MissingInputError(
        f'the training workdir {workdir} has no checkpoint yet'
      )
    for step in reversed(steps):
      try:
        saved = _restore(manager_dir, step, config=ocp.args.JsonRestore())
      except errors.DamagedCheckpointError as error:
        if not _is_export_of_state(os.path.join(manager_dir, str(step))):
          break  # pruned by a live run while read: list the steps again
        logging.warning('%s', error)
        continue
      return configs.upgraded(ml_collections.ConfigDict(saved['config']))
    else:
      raise errors.DamagedCheckpointError(
        f'no checkpoint in {manager_dir} holds a readable config (steps '
        f'{", ".join(map(str, steps))})'
      )
  raise _vanished(workdir)


def open_generator(
  path: str, which: str = 'g_ema'
) -> tuple[Any, dict[str, Any]]:
  """Returns `(generator module, variables)` read from `path`.

  Args:
    path: a training workdir (its latest checkpoint), one step directory of it
      (WORKDIR/checkpoints/STEP), a generator written by
      `checkpoints.export_generator` or `python -m cips_jax.convert`, or a
      reference PyTorch checkpoint (.pt, read safely).
    which: 'g_ema' (the EMA generator, the one to sample from) or 'g'.
  Raises:
    FileNotFoundError: nothing at `path`, or a workdir without checkpoints.
    NotAGeneratorError: `path` is none of the above.
  """
  if which not in networks.GENERATOR_NETWORKS:
    raise errors.CheckpointError(
      f'which must be one of {networks.GENERATOR_NETWORKS} (a generator),'
      f' got {which!r}'
    )
  path = os.path.abspath(os.path.expanduser(path))
  if not os.path.exists(path):
    raise errors.MissingInputError(f'no checkpoint at {path}')
  if os.path.isfile(path):
    try:
      gen, variables = convert.load_torch_checkpoint(path, which=which)
    except (ValueError, KeyError, OSError) as error:
      raise NotAGeneratorError(
        f'{path} is not a readable CIPS PyTorch checkpoint: {error}'
      )
    return gen, variables
  if _is_export(path):
    return checkpoints.load_generator(path)
  if _is_step_dir(path):
    return _restore_training_step(
      os.path.dirname(path), int(os.path.basename(path)), which
    )
  manager_dir = os.path.join(path, 'checkpoints')
  if os.path.isdir(manager_dir):
    _, saved = restore_newest(
      manager_dir,
      state=ocp.args.StandardRestore(),
      config=ocp.args.JsonRestore(),
    )
    return _generator_of(saved, which)
  raise NotAGeneratorError(
    f'{path} is not a training workdir (no checkpoints/ inside), an exported '
    'generator (no model/ and params/ inside), a training step directory, or a '
    '.pt file'
  )
