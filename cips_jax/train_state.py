"""The train state: what a run needs to continue, how to build and restore it.

    gen, disc = train_state.build_models(config)
    g_tx, d_tx = train_state.make_optimizers(config)
    state = train_state.create_state(gen, disc, g_tx, d_tx, seed=0)
    config, gen, disc, state = train_state.restore_run(workdir)

The state (G, D, the EMA of G, both optimizer states, the step) is a plain
pytree of arrays: the training step is a pure function of it, orbax saves it
as it is, and `parallel.state_shardings` places it on a mesh.
"""

from __future__ import annotations

import os
from typing import Any

from absl import logging
import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp

from cips_jax import checkpoints
from cips_jax import errors
from cips_jax import loading
from cips_jax import models
from cips_jax import parallel

# Adam's epsilon: torch's default, which the reference trainer keeps.
ADAM_EPS = 1e-8


@flax.struct.dataclass
class TrainState:
  """Everything a run needs to continue: a pytree of arrays."""

  step: jax.Array  # int32 scalar: the number of steps completed
  g_params: Any
  d_params: Any
  ema_params: Any
  g_opt_state: Any
  d_opt_state: Any


def build_models(config: ml_collections.ConfigDict):
  """The (generator, discriminator) modules a training config describes."""
  m = config.model
  dtype = jnp.dtype(config.train.compute_dtype)
  gen = models.generator_from_config(
    m,
    dtype=dtype,
    remat=config.train.remat,
    per_image_form=config.train.per_image_form,
  )
  disc = models.Discriminator(
    size=config.data.crop,
    channel_multiplier=m.channel_multiplier,
    # --img2dis in the reference: D may also see the patch's coordinates.
    input_channels=5 if config.train.d_input_coords else 3,
    n_first_layers=m.d_n_first_layers,
    max_channels=m.d_max_channels,
    dtype=dtype,
  )
  return gen, disc


def make_optimizers(config: ml_collections.ConfigDict):
  """(G's, D's) Adam, with the config's learning rates and betas.

  The reference's lazy-regularisation corrections are already in those values
  (`configs.lazy_regularisation_adam`).
  """
  t = config.train
  g_tx = optax.adam(t.g_lr, b1=t.g_betas[0], b2=t.g_betas[1], eps=ADAM_EPS)
  d_tx = optax.adam(t.d_lr, b1=t.d_betas[0], b2=t.d_betas[1], eps=ADAM_EPS)
  return g_tx, d_tx


def create_state(gen, disc, g_tx, d_tx, seed: int) -> TrainState:
  """Fresh parameters (EMA = a copy of G) and optimizer states, step 0."""
  # Step i draws from fold_in(seed key, i); initialisation uses a stream no step
  # reaches.
  g_key, d_key = jax.random.split(
    jax.random.fold_in(jax.random.PRNGKey(seed), 2**32 - 1)
  )
  g_params = models.init(gen, g_key)['params']
  d_params = models.init(disc, d_key)['params']
  return TrainState(
    step=jnp.zeros((), jnp.int32),
    g_params=g_params,
    d_params=d_params,
    ema_params=jax.tree_util.tree_map(jnp.array, g_params),
    g_opt_state=g_tx.init(g_params),
    d_opt_state=d_tx.init(d_params),
  )


def abstract_state(config: ml_collections.ConfigDict):
  """(gen, disc, g_tx, d_tx, the state's shapes and dtypes) of a config.

  Nothing is allocated: the state is traced with `jax.eval_shape`. Built once
  per config: a run asks for it while validating (the memory plan) and again
  while setting up; the models, optimisers and shapes are immutable, so the
  callers share them.
  """
  key = config.to_json_best_effort(sort_keys=True)
  if key not in _ABSTRACT_STATES:
    _ABSTRACT_STATES.clear()  # one config at a time: a run's
    _ABSTRACT_STATES[key] = _build_abstract_state(config)
  return _ABSTRACT_STATES[key]


_ABSTRACT_STATES: dict[str, tuple] = {}


def _build_abstract_state(config: ml_collections.ConfigDict) -> tuple:
  gen, disc = build_models(config)
  g_tx, d_tx = make_optimizers(config)
  shapes = jax.eval_shape(
    lambda: create_state(gen, disc, g_tx, d_tx, config.train.seed)
  )
  return gen, disc, g_tx, d_tx, shapes


def start_from_generator(
  state: TrainState, path: str, g_tx, sharding
) -> TrainState:
  """Replaces G and its EMA by a pretrained generator.

  The generator is anything `loading.open_generator` reads (a reference .pt,
  an export, a training workdir's EMA generator). Used to fine-tune, e.g. the
  256 architecture on patches of a 1024 grid. The shapes must match the
  config's generator exactly; the generator's optimizer state starts afresh.
  """
  _, variables = loading.open_generator(path)
  expected = jax.tree_util.tree_map(lambda x: x.shape, state.g_params)
  found = jax.tree_util.tree_map(lambda x: np.shape(x), variables['params'])
  if expected != found:
    raise errors.CheckpointError(
      f'config.train.init_generator_from={path!r}: its generator does not '
      "match the config's model (different parameter shapes)"
    )
  params = jax.device_put(
    jax.tree_util.tree_map(jnp.asarray, variables['params']), sharding
  )
  logging.info('generator and EMA initialised from %s', path)
  return state.replace(
    g_params=params, ema_params=params, g_opt_state=g_tx.init(params)
  )


def restore_run(workdir: str):
  """The latest checkpoint of a training workdir.

  Returns (config, generator, discriminator, train state on this host's
  devices), the models built from the config saved with the checkpoint.
  """
  config = loading.workdir_config(workdir)
  gen, disc, _, _, abstract = abstract_state(config)
  target = checkpoints.restore_target(
    abstract, parallel.replicated(parallel.make_mesh())
  )
  # A reader: it never moves a damaged step aside (only the run holding the
  # workdir's lock does), and a step pruned under it is skipped.
  _, saved = loading.restore_newest(
    os.path.join(os.path.abspath(os.path.expanduser(workdir)), 'checkpoints'),
    state=ocp.args.StandardRestore(target),
  )
  return config, gen, disc, saved['state']
