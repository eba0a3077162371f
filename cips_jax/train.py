"""Training: the state, the jitted GAN step over a device mesh, and the loop.

One training step (the reference's iteration order, `docs/reference.md`
section 3.4):
1. D step: fake = G(coords of the real patch, z); loss
   softplus(-D(real)) + softplus(D(fake)).
2. Every `r1_every` steps (step 0 included), a separate R1 step on D:
   (gamma / 2) * r1_every * mean ||grad_x D(real)||^2.
3. G step: a new z at the same coordinates; loss softplus(-D(G(z))).
4. EMA of G's parameters with a fixed per-step decay.

Everything random derives from the config's seed: step i uses
`fold_in(PRNGKey(seed), i)`, and the input pipeline is a pure function of
(seed, step), so a resumed run repeats exactly what an uninterrupted one does.
The state (G, D, EMA, both optimizer states, step) is a plain pytree replicated
over a one-axis mesh ('data'); batches are sharded along it; the step is jitted
with the state donated.
"""

from __future__ import annotations

import functools
import math
import os
import signal
import time
from typing import Any, Callable, Optional

from absl import logging
from clu import metrics as clu_metrics
from clu import parameter_overview
import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from cips_jax import checkpoints
from cips_jax import config_validation
from cips_jax import convert
from cips_jax import data as data_lib
from cips_jax import evaluation
from cips_jax import generator as generator_lib
from cips_jax import images as images_lib
from cips_jax import loading
from cips_jax import losses
from cips_jax import models
from cips_jax import parallel
from cips_jax import sampling
from cips_jax import summary
from cips_jax.metrics import inception
from cips_jax.metrics import swd as swd_lib


@flax.struct.dataclass
class TrainState:
  """Everything a run needs to continue: a pytree of arrays."""

  step: jax.Array  # int32 scalar: the number of steps completed
  g_params: Any
  d_params: Any
  ema_params: Any
  g_opt_state: Any
  d_opt_state: Any


# Averages over the steps between two logs (R1 only over the steps that ran it).
TrainMetrics = clu_metrics.Collection.create(
  **{
    name: clu_metrics.Average.from_output(name)
    for name in ('d_loss', 'g_loss', 'real_score', 'fake_score')
  }
)
R1Metrics = clu_metrics.Collection.create(
  r1_penalty=clu_metrics.Average.from_output('r1_penalty')
)


# ------------------------------------------------------------------------------
# Models, optimizers, state.


def build_models(config: ml_collections.ConfigDict):
  """The generator and discriminator modules a config describes."""
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
    input_channels=5 if config.train.d_input_coords else 3,
    n_first_layers=m.d_n_first_layers,
    max_channels=m.d_max_channels,
    dtype=dtype,
  )
  return gen, disc


def make_optimizers(config: ml_collections.ConfigDict):
  """Adam for G and D with the reference's lazy-regularisation corrections.

  The corrections are set in the config.
  """
  t = config.train
  g_tx = optax.adam(t.g_lr, b1=t.g_betas[0], b2=t.g_betas[1], eps=1e-8)
  d_tx = optax.adam(t.d_lr, b1=t.d_betas[0], b2=t.d_betas[1], eps=1e-8)
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


def start_from_generator(
  state: TrainState, path: str, g_tx, sharding
) -> TrainState:
  """Replaces G and its EMA by a pretrained generator.

  The generator is a reference .pt or an exported dir. Used to fine-tune, e.g.
  the 256 architecture on patches of a 1024 grid. The shapes must match the
  config's generator exactly; the generator's optimizer state starts afresh.
  """
  path = os.path.expanduser(path)
  if os.path.isdir(path):
    _, variables = checkpoints.load_generator(path)
  else:
    _, variables = convert.load_torch_checkpoint(path)
  expected = jax.tree_util.tree_map(lambda x: x.shape, state.g_params)
  found = jax.tree_util.tree_map(lambda x: np.shape(x), variables['params'])
  if expected != found:
    raise ValueError(
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


def with_adam_state(opt_state, adam: convert.AdamState):
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


def _warn_about_hyperparameters(config, run: convert.TrainingRun) -> None:
  """Logs where the config's Adam settings differ from the checkpoint's."""
  t = config.train
  for name, adam, lr, betas in (
    ('G', run.g_adam, t.g_lr, t.g_betas),
    ('D', run.d_adam, t.d_lr, t.d_betas),
  ):
    theirs = adam.hyperparameters
    ours = {'lr': lr, 'betas': tuple(betas), 'eps': 1e-8}
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
  config, path: str, gen, disc, g_tx, d_tx, abstract_state: TrainState
) -> TrainState:
  """The train state of a reference (PyTorch) training checkpoint.

  G, D, the EMA, both Adam states (moments and step counts) and the step come
  from the .pt file `path`, so training continues at the step where the
  PyTorch run stopped, with the same R1 schedule. Returns host arrays shaped
  like `abstract_state`; raises `convert.CheckpointMismatchError` naming the
  keys when the checkpoint does not fit the config's models.
  """
  run = convert.load_training_run(os.path.expanduser(path), gen, disc)
  _warn_about_hyperparameters(config, run)
  state = TrainState(
    step=np.asarray(run.step, np.int32),
    g_params=run.g,
    d_params=run.d,
    ema_params=run.g_ema,
    g_opt_state=with_adam_state(g_tx.init(run.g), run.g_adam),
    d_opt_state=with_adam_state(d_tx.init(run.d), run.d_adam),
  )
  state = jax.tree_util.tree_map(np.asarray, state)
  expected = jax.tree_util.tree_structure(abstract_state)
  if jax.tree_util.tree_structure(state) != expected:
    raise convert.CheckpointMismatchError(
      f'{path}: the converted state does not have the structure of this '
      "config's train state"
    )
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


def training_run(config, state: TrainState) -> convert.TrainingRun:
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
      hyperparameters={'lr': lr, 'betas': tuple(betas), 'eps': 1e-8},
    )

  return convert.TrainingRun(
    step=int(host.step),
    g=host.g_params,
    d=host.d_params,
    g_ema=host.ema_params,
    g_adam=adam(host.g_opt_state, t.g_lr, t.g_betas),
    d_adam=adam(host.d_opt_state, t.d_lr, t.d_betas),
  )


def restore_run(workdir: str):
  """The latest checkpoint of a training workdir.

  Returns (config, generator, discriminator, train state on this host's
  devices), the models built from the config saved with the checkpoint.
  """
  config = loading.workdir_config(workdir)
  gen, disc = build_models(config)
  g_tx, d_tx = make_optimizers(config)
  abstract = jax.eval_shape(
    lambda: create_state(gen, disc, g_tx, d_tx, config.train.seed)
  )
  manager = checkpoints.TrainCheckpoints(
    os.path.join(os.path.abspath(os.path.expanduser(workdir)), 'checkpoints'),
    keep=config.logging.keep_checkpoints,
    config=config,
  )
  state = manager.restore_latest(
    abstract, parallel.replicated(parallel.make_mesh())
  )
  return config, gen, disc, state


def train_embedding_mode(config: ml_collections.ConfigDict) -> str:
  """How G reads its embedding while training.

  'reference': like the reference, the direct table on the full size x size grid
  and bilinear (align_corners=False) on patches and other grids; 'aligned' or
  'bilinear': always.
  """
  mode = config.train.embedding_mode
  if mode != 'reference':
    return mode
  full_grid = config.data.crop == config.model.size == config.data.resolution
  return 'table' if full_grid else 'bilinear'


# ------------------------------------------------------------------------------
# The step.


@flax.struct.dataclass
class StepInputs:
  """Everything random in one training step, drawn or given explicitly.

  real: (B, H, W, 3) the pixels D sees; coords: (B, H, W, 2) their grid, for
  both G steps; d_z, g_z: (B, style_dim) latents of the D and G steps' fakes;
  d_noise_key, g_noise_key: keys of G's per-pixel noise in those steps, or
  None for zero noise.
  """

  real: jax.Array
  coords: jax.Array
  d_z: jax.Array
  g_z: jax.Array
  d_noise_key: Optional[jax.Array] = None
  g_noise_key: Optional[jax.Array] = None


def draw_step_inputs(seed: int, step, batch, style_dim: int) -> StepInputs:
  """The inputs of step `step`: latents and noise keys from (seed, step)."""
  keys = jax.random.split(jax.random.fold_in(jax.random.PRNGKey(seed), step), 4)
  batch_size = batch['image'].shape[0]
  return StepInputs(
    real=batch['image'],
    coords=batch['coords'],
    d_z=jax.random.normal(keys[0], (batch_size, style_dim)),
    g_z=jax.random.normal(keys[2], (batch_size, style_dim)),
    d_noise_key=keys[1],
    g_noise_key=keys[3],
  )


def make_gan_step(config, gen, disc, g_tx, d_tx) -> Callable:
  """Returns `gan_step(state, inputs: StepInputs, with_r1) -> (state, metrics)`.

  The reference trainer's arithmetic on explicit inputs; not yet jitted.
  """
  t = config.train
  embedding_mode = train_embedding_mode(config)
  r1_weight = t.r1_gamma / 2 * t.r1_every

  def d_inputs(pixels, coords):
    return jnp.concatenate([pixels, coords], -1) if t.d_input_coords else pixels

  def render(g_params, z, coords, noise_key):
    # Without a noise key the generator injects zero noise.
    rngs = {} if noise_key is None else {'noise': noise_key}
    return gen.apply(
      {'params': g_params},
      z,
      coords,
      embedding_mode=embedding_mode,
      method=type(gen).generate,
      rngs=rngs,
    )

  def discriminate(d_params, inputs):
    return disc.apply({'params': d_params}, inputs)

  def gan_step(state: TrainState, inputs: StepInputs, with_r1: bool):
    real, coords = inputs.real, inputs.coords

    # D step: G frozen.
    fake = jax.lax.stop_gradient(
      render(state.g_params, inputs.d_z, coords, inputs.d_noise_key)
    )

    def d_loss_fn(d_params):
      real_logits = discriminate(d_params, d_inputs(real, coords))
      fake_logits = discriminate(d_params, d_inputs(fake, coords))
      return losses.discriminator_loss(real_logits, fake_logits), (
        real_logits,
        fake_logits,
      )

    (d_loss, (real_logits, fake_logits)), d_grads = jax.value_and_grad(
      d_loss_fn, has_aux=True
    )(state.d_params)
    updates, d_opt_state = d_tx.update(
      d_grads, state.d_opt_state, state.d_params
    )
    d_params = optax.apply_updates(state.d_params, updates)

    out = {
      'd_loss': d_loss,
      'real_score': jnp.mean(real_logits),
      'fake_score': jnp.mean(fake_logits),
    }
    # Lazy R1: its own gradient and Adam step, after the main D step.
    if with_r1:

      def r1_loss_fn(d_params):
        penalty = losses.r1_penalty(
          functools.partial(discriminate, d_params), d_inputs(real, coords)
        )
        return r1_weight * penalty, penalty

      (_, penalty), r1_grads = jax.value_and_grad(r1_loss_fn, has_aux=True)(
        d_params
      )
      updates, d_opt_state = d_tx.update(r1_grads, d_opt_state, d_params)
      d_params = optax.apply_updates(d_params, updates)
      out['r1_penalty'] = penalty

    # G step: D frozen, new z, same coordinates.
    def g_loss_fn(g_params):
      fake = render(g_params, inputs.g_z, coords, inputs.g_noise_key)
      return losses.generator_loss(
        discriminate(d_params, d_inputs(fake, coords))
      )

    g_loss, g_grads = jax.value_and_grad(g_loss_fn)(state.g_params)
    updates, g_opt_state = g_tx.update(
      g_grads, state.g_opt_state, state.g_params
    )
    g_params = optax.apply_updates(state.g_params, updates)
    ema_params = jax.tree_util.tree_map(
      lambda e, p: t.ema_decay * e + (1.0 - t.ema_decay) * p,
      state.ema_params,
      g_params,
    )
    out['g_loss'] = g_loss
    new_state = TrainState(
      step=state.step + 1,
      g_params=g_params,
      d_params=d_params,
      ema_params=ema_params,
      g_opt_state=g_opt_state,
      d_opt_state=d_opt_state,
    )
    return new_state, out

  return gan_step


def make_train_step(config, gen, disc, g_tx, d_tx) -> Callable:
  """Returns `train_step(state, batch, with_r1) -> (state, metrics)`.

  `batch` holds 'image' (B, H, W, 3) and 'coords' (B, H, W, 2); the latents
  and noise come from (config.train.seed, state.step). Not yet jitted.
  """
  gan_step = make_gan_step(config, gen, disc, g_tx, d_tx)

  def train_step(state: TrainState, batch, with_r1: bool):
    inputs = draw_step_inputs(
      config.train.seed, state.step, batch, gen.style_dim
    )
    return gan_step(state, inputs, with_r1)

  return train_step


def jit_train_steps(
  train_step, mesh, state_sharding=None
) -> dict[bool, Callable]:
  """The step jitted over the mesh, with and without R1.

  Returns {with_r1: fn(state, batch)}. `state_sharding`: a sharding (tree) for
  the state, default replicated (see `parallel.state_shardings`).
  """
  state_sharding = (
    parallel.replicated(mesh) if state_sharding is None else state_sharding
  )
  return {
    with_r1: jax.jit(
      functools.partial(train_step, with_r1=with_r1),
      in_shardings=(state_sharding, parallel.batch_sharded(mesh)),
      out_shardings=(state_sharding, parallel.replicated(mesh)),
      donate_argnums=0,
    )
    for with_r1 in (False, True)
  }


# ------------------------------------------------------------------------------
# The loop.


class _Preemption:
  """Remembers a SIGTERM so the loop can checkpoint and stop.

  It stops at the end of the current step.
  """

  def __init__(self):
    self.requested = False
    self._previous = None

  def __enter__(self):
    try:
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    except ValueError:
      # Not the main thread: no handler, runs are not preemptible.
      self._previous = None
    return self

  def _handle(self, signum, frame):
    del signum, frame
    logging.warning(
      'SIGTERM received: saving a checkpoint and stopping after this step'
    )
    self.requested = True

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


def _check_finite(values: dict[str, float], step: int) -> None:
  bad = {k: v for k, v in values.items() if not math.isfinite(v)}
  if bad:
    raise FloatingPointError(
      f'non-finite training metrics at step {step}: {bad}. Training stopped; '
      'the last checkpoint written before this point is intact (lower the '
      'learning rates, or check the data).'
    )


def _render_samples(gen, params, z, coords):
  """EMA samples of latents z (N, D) at coords (H, W, 2): (N, H, W, 3).

  The samples are roughly in [-1, 1].
  """
  return sampling.generate(
    gen.clone(remat=False), {'params': params}, z, coords
  )


def real_images_for_evaluation(
  source, count: int, resolution: int, seed: int
) -> np.ndarray:
  """`count` real images centre-cropped to resolution x resolution.

  Returns uint8 (N, R, R, 3).
  """
  count = min(count, len(source))
  return next(
    evaluation.real_image_batches(
      source, count, resolution, batch_size=count, seed=seed
    )
  )


def make_evaluator(
  config, source, coords, workdir: str, mesh
) -> evaluation.Evaluator:
  """FID/KID of EMA samples rendered on `coords`.

  The real statistics are cached in the workdir.
  """
  log = config.logging
  batch_size = min(64, log.eval_num_samples)
  try:
    extractor = inception.InceptionFeatures(
      path=log.inception_weights or None, mesh=mesh, batch_size=batch_size
    )
  except FileNotFoundError as error:
    raise FileNotFoundError(
      f'{error}\nOr train without FID: --config.logging.eval_every_steps=0'
    ) from None
  progress = summary.ProgressBar(
    'Inception features of real images', unit='images'
  )
  return evaluation.Evaluator.create(
    extractor,
    source,
    config.data.name,
    config.data.resolution,
    coords,
    cache_dir=evaluation.stats_cache_dir(workdir),
    num_real=log.eval_num_real,
    mesh=mesh,
    batch_size=batch_size,
    seed=config.train.seed,
    progress=progress if jax.process_index() == 0 else None,
  )


def train_and_evaluate(
  config: ml_collections.ConfigDict, workdir: str
) -> TrainState:
  """Trains (or resumes) the run in `workdir`; returns the final state.

  Writes `workdir/checkpoints` (orbax, the last `keep_checkpoints`),
  `workdir/tensorboard` (losses, R1, scores, steps/s, images/s, sample grids,
  SWD), `workdir/samples/*.png`.
  """
  config_validation.validate(
    config, num_devices=jax.device_count(), num_processes=jax.process_count()
  )
  workdir = os.path.abspath(workdir)
  os.makedirs(workdir, exist_ok=True)
  is_chief = jax.process_index() == 0
  mesh = parallel.make_mesh()
  gen, disc = build_models(config)
  g_tx, d_tx = make_optimizers(config)
  t, log = config.train, config.logging

  source = data_lib.open_source(config.data.data_dir, config.data.name)
  batches = data_lib.TrainBatches(
    source,
    global_batch_size=t.global_batch_size,
    process_index=jax.process_index(),
    process_count=jax.process_count(),
    resolution=config.data.resolution,
    crop=config.data.crop,
    flip=config.data.flip,
    seed=t.seed,
    cylindrical=config.model.cylindrical,
  )

  manager = checkpoints.TrainCheckpoints(
    os.path.join(workdir, 'checkpoints'),
    keep=log.keep_checkpoints,
    config=config,
  )
  new_state = functools.partial(create_state, gen, disc, g_tx, d_tx, t.seed)
  abstract_state = jax.eval_shape(new_state)
  shardings = parallel.state_shardings(abstract_state, mesh, t.shard_embedding)
  create = jax.jit(new_state, out_shardings=shardings)
  state = manager.restore_latest(abstract_state, shardings)
  if state is None:
    if t.continue_from:
      state = jax.device_put(
        continue_reference_run(
          config, t.continue_from, gen, disc, g_tx, d_tx, abstract_state
        ),
        shardings,
      )
    else:
      state = create()
      logging.info('starting a new run in %s', workdir)
    if t.init_generator_from:
      state = start_from_generator(
        state, t.init_generator_from, g_tx, shardings.g_params
      )
  elif t.continue_from:
    logging.info(
      '%s holds its own checkpoint: resuming from it, not from '
      'train.continue_from=%s',
      workdir,
      t.continue_from,
    )
  start_step = int(state.step)
  if start_step >= t.num_steps:
    # A finished run: say so rather than appear to resume (raise num_steps to go
    # on).
    logging.warning(
      '%s already holds step %d >= train.num_steps = %d: nothing to train '
      '(raise --config.train.num_steps to continue)',
      workdir,
      start_step,
      t.num_steps,
    )
    return state
  if start_step:
    logging.info('resuming %s from step %d', workdir, start_step)
  logging.info(
    'per-image styles: %s form (train.per_image_form=%r on %s)',
    generator_lib.resolve_per_image_form(t.per_image_form),
    t.per_image_form,
    jax.default_backend(),
  )
  if is_chief:
    parameter_overview.log_parameter_overview(
      state.g_params, msg='generator parameters'
    )
    parameter_overview.log_parameter_overview(
      state.d_params, msg='discriminator parameters'
    )

  steps = jit_train_steps(
    make_train_step(config, gen, disc, g_tx, d_tx), mesh, shardings
  )
  writer = summary.MetricWriter(
    os.path.join(workdir, 'tensorboard'), enabled=is_chief
  )
  if start_step == 0:
    writer.write_hparams(config.to_dict())
  sample_z = jax.random.normal(
    jax.random.PRNGKey(t.seed + 1), (log.num_samples, gen.style_dim)
  )
  progress = summary.ProgressLogger(t.num_steps, start_step)

  sample_coords, evaluation_coords = evaluation.render_grids(
    config.data.resolution, config.model.cylindrical, source
  )
  evaluation_reals = None
  if log.swd_num_images:
    evaluation_reals = real_images_for_evaluation(
      source, log.swd_num_images, config.data.resolution, t.seed
    )

  def log_swd(step, params, label):
    if evaluation_reals is None or not is_chief:
      return
    z = jax.random.normal(
      jax.random.PRNGKey(t.seed + 2), (len(evaluation_reals), gen.style_dim)
    )
    fakes = np.asarray(_render_samples(gen, params, z, evaluation_coords))
    scores = swd_lib.sliced_wasserstein(evaluation_reals, fakes, seed=t.seed)
    logging.info(
      'SWD (%s, step %d): %s',
      label,
      step,
      ', '.join(f'{k} {v:.2f}' for k, v in scores.items()),
    )
    writer.write_scalars(step, {f'swd/{k}': v for k, v in scores.items()})

  if start_step == 0:
    log_swd(0, state.ema_params, 'start')

  evaluator = None
  # Load Inception and the real statistics before training starts.
  if log.eval_every_steps:
    evaluator = make_evaluator(config, source, evaluation_coords, workdir, mesh)

  def log_fid(step, params):
    scores = evaluator.evaluate(gen, params, log.eval_num_samples)
    logging.info(
      'FID %.3f, KID %.5f +- %.5f (step %d, %d samples)',
      scores['fid'],
      scores['kid'],
      scores['kid_std'],
      step,
      scores['num_fake'],
    )
    writer.write_scalars(
      step, {'eval/fid': scores['fid'], 'eval/kid': scores['kid']}
    )

  metrics, r1_metrics = None, None
  last_log_time, last_log_step = time.perf_counter(), start_step
  # Read ahead on grain's threads; the stream equals batch_at(step), step by
  # step.
  local_batches = batches.iterate(start_step)
  with _Preemption() as preemption:
    for step in range(start_step, t.num_steps):
      local = next(local_batches)
      batch = parallel.global_batch(
        {k: local[k] for k in ('image', 'coords')}, mesh
      )
      with_r1 = step % t.r1_every == 0
      state, out = steps[with_r1](state, batch)
      r1_out = {'r1_penalty': out.pop('r1_penalty')} if with_r1 else None
      update = TrainMetrics.single_from_model_output(**out)
      metrics = update if metrics is None else metrics.merge(update)
      if r1_out is not None:
        update = R1Metrics.single_from_model_output(**r1_out)
        r1_metrics = update if r1_metrics is None else r1_metrics.merge(update)

      done = step + 1
      last = done == t.num_steps
      checkpoint_now = (
        done % log.checkpoint_every == 0 or last or preemption.requested
      )
      if done % log.log_every == 0 or checkpoint_now:
        values = {k: float(v) for k, v in metrics.compute().items()}
        if r1_metrics is not None:
          values.update({k: float(v) for k, v in r1_metrics.compute().items()})
        # Before any checkpoint of this state is written.
        _check_finite(values, done)
        now = time.perf_counter()
        rate = (done - last_log_step) / max(now - last_log_time, 1e-9)
        # The progress line shows its own steps/s and ETA.
        progress.update(done, values)
        values.update(
          {'steps_per_s': rate, 'images_per_s': rate * t.global_batch_size}
        )
        writer.write_scalars(done, values)
        metrics, r1_metrics = None, None
        last_log_time, last_log_step = now, done
      if done % log.sample_every == 0 or last:
        samples = np.asarray(
          _render_samples(gen, state.ema_params, sample_z, sample_coords)
        )
        if is_chief:
          grid = images_lib.image_grid(samples)
          images_lib.save_png(
            os.path.join(workdir, 'samples', f'step_{done:07d}.png'), grid
          )
          writer.write_images(done, {'samples/ema': grid})
      if evaluator is not None and (done % log.eval_every_steps == 0 or last):
        log_fid(done, state.ema_params)
      if checkpoint_now:
        manager.save(done, state)
      if preemption.requested:
        logging.warning(
          'stopped by SIGTERM at step %d; run the same command to resume', done
        )
        break

  if int(state.step) == t.num_steps:
    log_swd(t.num_steps, state.ema_params, 'end')
  manager.wait()
  writer.close()
  return state
