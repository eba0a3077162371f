"""Training runs shared with the official PyTorch trainer, both ways.

    # a reference training checkpoint -> our train state, at its step
    state = reference_run.continue_reference_run(
        config, 'run.pt', gen, disc, g_tx, d_tx, abstract_state
    )
    # our train state -> what `convert.training_checkpoint` writes
    run = reference_run.training_run(config, state)

The tensors are converted by `cips_jax.convert`; this module maps them onto the
train state (`train_state.TrainState`) and optax's Adam state, and checks that
the file's recipe fits the config's.
"""

from __future__ import annotations

import os

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np
import optax

from cips_jax import convert
from cips_jax import train_state as train_state_lib


def _with_adam_state(opt_state, adam: convert.AdamState):
  """`opt_state` of `optax.adam` with its count and moments replaced."""
  replaced = [
    part._replace(
      count=jnp.asarray(adam.count, jnp.int32), mu=adam.mu, nu=adam.nu
    )
    if isinstance(part, optax.ScaleByAdamState)
    else part
    for part in opt_state
  ]
  if replaced == list(opt_state):
    raise TypeError('the optimizer state holds no optax.ScaleByAdamState')
  return type(opt_state)(replaced)


def _config_adam(lr, betas) -> dict:
  """The Adam settings a config gives, as a torch param_group names them."""
  return {'lr': lr, 'betas': tuple(betas), 'eps': train_state_lib.ADAM_EPS}


def _warn_about_hyperparameters(config, run: convert.TrainingRun) -> None:
  """Logs where the config's Adam settings differ from the checkpoint's."""
  t = config.train
  for name, adam, lr, betas in (
    ('G', run.g_adam, t.g_lr, t.g_betas),
    ('D', run.d_adam, t.d_lr, t.d_betas),
  ):
    theirs = adam.hyperparameters
    ours = _config_adam(lr, betas)
    differ = {
      k: (theirs[k], ours[k])
      for k in ours
      if theirs.get(k) is not None and not np.allclose(theirs[k], ours[k])
    }
    if differ:
      logging.warning(
        "%s's Adam settings differ from the checkpoint's (checkpoint, "
        'config): %s; training continues with the config',
        name,
        differ,
      )


def continue_reference_run(
  config, path: str, gen, disc, g_tx, d_tx, abstract_state
) -> train_state_lib.TrainState:
  """The train state of a reference (PyTorch) training checkpoint.

  G, D, the EMA, both Adam states (moments and step counts) and the step come
  from the .pt file `path`, so training continues at the step where the
  PyTorch run stopped, with the same R1 schedule. Returns host arrays shaped
  like `abstract_state`; raises `convert.CheckpointMismatchError` naming the
  keys when the checkpoint does not fit the config's models.
  """
  run = convert.load_training_run(os.path.expanduser(path), gen, disc)
  _warn_about_hyperparameters(config, run)
  state = train_state_lib.TrainState(
    step=np.asarray(run.step, np.int32),
    g_params=run.g,
    d_params=run.d,
    ema_params=run.g_ema,
    g_opt_state=_with_adam_state(g_tx.init(run.g), run.g_adam),
    d_opt_state=_with_adam_state(d_tx.init(run.d), run.d_adam),
  )
  state = jax.tree_util.tree_map(np.asarray, state)
  expected = jax.tree_util.tree_structure(abstract_state)
  if jax.tree_util.tree_structure(state) != expected:
    raise convert.CheckpointMismatchError(
      f'{path}: the converted state does not have the structure of this '
      "config's train state"
    )
  # D takes one Adam step per training step plus one per R1 step (steps 0,
  # r1_every, ...), so its count tells whether the R1 schedules agree.
  r1_steps = -(-run.step // config.train.r1_every)
  if run.d_adam.count != run.step + r1_steps:
    logging.warning(
      "%s: D's Adam count %d is not step %d + %d R1 steps "
      '(r1_every=%d): the run used another R1 schedule',
      path,
      run.d_adam.count,
      run.step,
      r1_steps,
      config.train.r1_every,
    )
  logging.info(
    'continuing the reference run %s at step %d (Adam counts: G %d, D %d)',
    path,
    run.step,
    run.g_adam.count,
    run.d_adam.count,
  )
  return state


def training_run(config, state) -> convert.TrainingRun:
  """A train state as a `convert.TrainingRun` (host arrays).

  The Adam hyperparameters recorded with it are the config's.
  """
  host = jax.device_get(state)
  t = config.train

  def adam(opt_state, lr, betas):
    (part,) = [s for s in opt_state if isinstance(s, optax.ScaleByAdamState)]
    return convert.AdamState(
      count=int(part.count),
      mu=part.mu,
      nu=part.nu,
      hyperparameters=_config_adam(lr, betas),
    )

  return convert.TrainingRun(
    step=int(host.step),
    g=host.g_params,
    d=host.d_params,
    g_ema=host.ema_params,
    g_adam=adam(host.g_opt_state, t.g_lr, t.g_betas),
    d_adam=adam(host.d_opt_state, t.d_lr, t.d_betas),
  )
