"""Training: the jitted GAN step over a device mesh, and the loop.

One training step (the reference's iteration order, `docs/reference.md`
section 3.4):
1. D step: fake = G(coords of the real patch, z); loss
   softplus(-D(real)) + softplus(D(fake)).
2. Every `r1_every` steps (step 0 included), a separate R1 step on D:
   (gamma / 2) * r1_every * mean ||grad_x D(real)||^2.
3. G step: a new z at the same coordinates; loss softplus(-D(G(z))).
4. EMA of G's parameters with a fixed per-step decay.

Two options for small data sets, off in every reference recipe (the step is
then the reference's, bit for bit): `train.augment`, DiffAugment's policies
(`augment.py`) applied to everything D sees, reals and fakes, in D's, R1's
and G's losses; and `train.ema_rampup`, StyleGAN2-ADA's EMA ramp-up
(`ema_decay_at`).

Everything random derives from the config's seed: step i uses
`fold_in(PRNGKey(seed), i)`, and the input pipeline is a pure function of
(seed, step), so a resumed run repeats exactly what an uninterrupted one does.
The state (`train_state.TrainState`) is replicated over a one-axis mesh
('data'), or its embedding tables split by rows; batches are sharded along it;
the step is jitted with the state donated.

`train_and_evaluate` runs in four phases: `_set_up` (mesh, models, data,
checkpoints, writer), `_initial_state` (resume, continue a PyTorch run, or
start afresh), `_train_loop` (steps, and the periodic work of `_periodic_work`:
metrics, samples, FID, checkpoints, a profiler trace) and the end (SWD, the
last checkpoint written to disk).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import shutil
from typing import Any, Callable, Optional

from absl import logging
from clu import parameter_overview
import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax

from cips_jax import augment as augment_lib
from cips_jax import checkpoints
from cips_jax import config_validation
from cips_jax import data as data_lib
from cips_jax import errors
from cips_jax import evaluation
from cips_jax import generator as generator_lib
from cips_jax import images as images_lib
from cips_jax import losses
from cips_jax import parallel
from cips_jax import periodic
from cips_jax import progress as progress_lib
from cips_jax import reference_run
from cips_jax import summary
from cips_jax import train_state as train_state_lib
from cips_jax import workdir_lock
from cips_jax.train_state import TrainState

# A profiler trace (config.logging.profile_steps) starts after this many steps
# of the process, which compile the step programs.
PROFILE_AFTER_STEPS = 2


def train_embedding_mode(config: ml_collections.ConfigDict) -> str:
  """How G reads its embedding while training.

  'table_on_full_grid': as the reference reads it, the direct table on the
  full size x size grid and bilinear (align_corners=False) on patches and
  other grids; 'aligned', 'bilinear' or 'table': always.
  """
  mode = config.train.embedding_mode
  if mode != 'table_on_full_grid':
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
  None for zero noise; augment_key: the key of the augmentations' draws
  (`augment_keys`), needed only when the run augments.
  """

  real: jax.Array
  coords: jax.Array
  d_z: jax.Array
  g_z: jax.Array
  d_noise_key: Optional[jax.Array] = None
  g_noise_key: Optional[jax.Array] = None
  augment_key: Optional[jax.Array] = None


def _draw_step_inputs(
  seed: int, step, batch, style_dim: int, augmenting: bool
) -> StepInputs:
  """The inputs of step `step`: latents and noise keys from (seed, step)."""
  step_key = jax.random.fold_in(jax.random.PRNGKey(seed), step)
  keys = jax.random.split(step_key, 4)
  batch_size = batch['image'].shape[0]
  return StepInputs(
    real=batch['image'],
    coords=batch['coords'],
    d_z=jax.random.normal(keys[0], (batch_size, style_dim)),
    g_z=jax.random.normal(keys[2], (batch_size, style_dim)),
    d_noise_key=keys[1],
    g_noise_key=keys[3],
    # Its own stream: the other draws stay those of a run without it.
    augment_key=jax.random.fold_in(step_key, 1) if augmenting else None,
  )


def augment_keys(augment_key: jax.Array) -> tuple[jax.Array, ...]:
  """(reals, the D step's fakes, the G step's fakes): each batch D sees
  gets its own draws from StepInputs.augment_key. R1 sees the reals' draws."""
  return tuple(jax.random.split(augment_key, 3))


@dataclasses.dataclass(frozen=True)
class StepModels:
  """What the training step reads besides the state and the batch: static
  under jit (hashable), built once per run by `step_models`.

  gen, disc: the networks; g_tx, d_tx: their optimisers; mesh: the mesh the
  step is jitted over, or None; seed: step i's latents and noise come from
  (seed, i); embedding_mode: how G reads its embedding (`train_embedding_mode`);
  r1_weight: the lazy R1 penalty's weight, gamma / 2 * r1_every (StyleGAN2's
  lazy regularisation keeps the average strength); ema_decay: per step;
  d_input_coords: D sees the coordinates beside the pixels; augment: the
  DiffAugment policy (`augment.parse_policy`), () for none; ema_rampup: 0 for
  a fixed EMA decay, else `ema_decay_at`'s ramp; images_per_step: the global
  batch, for the ramp.
  """

  gen: Any
  disc: Any
  g_tx: Any
  d_tx: Any
  mesh: Any
  seed: int
  embedding_mode: str
  r1_weight: float
  ema_decay: float
  d_input_coords: bool
  augment: tuple[str, ...] = ()
  ema_rampup: float = 0.0
  images_per_step: int = 0


def step_models(
  config: ml_collections.ConfigDict, gen, disc, g_tx, d_tx, mesh=None
) -> StepModels:
  """The `StepModels` of a config's run."""
  t = config.train
  return StepModels(
    gen=gen,
    disc=disc,
    g_tx=g_tx,
    d_tx=d_tx,
    mesh=mesh,
    seed=t.seed,
    embedding_mode=train_embedding_mode(config),
    r1_weight=t.r1_gamma / 2 * t.r1_every,
    ema_decay=t.ema_decay,
    d_input_coords=t.d_input_coords,
    augment=augment_lib.parse_policy(t.augment),
    ema_rampup=t.ema_rampup,
    images_per_step=t.global_batch_size,
  )


def _render(models: StepModels, g_params, z, coords, noise_key):
  # Without a noise key the generator injects zero noise. 'auto' forms (G's
  # per-image style form, D's convolutions) follow the platform the step is
  # lowered for, not the machine tracing it.
  rngs = {} if noise_key is None else {'noise': noise_key}
  return generator_lib.apply_per_platform(
    models.gen,
    {'params': g_params},
    z,
    coords,
    embedding_mode=models.embedding_mode,
    method=type(models.gen).generate,
    rngs=rngs,
  )


def _d_inputs(models: StepModels, pixels, coords):
  if models.d_input_coords:
    return jnp.concatenate([pixels, coords], -1)
  return pixels


def _discriminate(models: StepModels, d_params, inputs):
  return models.disc.apply({'params': d_params}, inputs)


def _augmented_logits(models: StepModels, d_params, pixels, coords, key):
  """D's logits of `pixels` at `coords`, augmented by the run's policy with
  draws from `key` (as given without a policy)."""
  if models.augment:
    pixels, coords = augment_lib.diff_augment(
      pixels, coords, key, models.augment
    )
  return _discriminate(models, d_params, _d_inputs(models, pixels, coords))


def ema_half_life_images(ema_decay: float, images_per_step: int) -> float:
  """The EMA's half-life in images: decay = 0.5 ** (batch / half-life)."""
  if ema_decay <= 0:
    return 0.0
  if ema_decay >= 1:
    return math.inf
  return images_per_step * math.log(0.5) / math.log(ema_decay)


def ema_decay_at(models: StepModels, step) -> Any:
  """The EMA decay of step `step` (0-based: the images seen before it are
  step x images_per_step).

  Without a ramp (ema_rampup 0), the fixed models.ema_decay. With one,
  StyleGAN2-ADA's: the half-life grows as ema_rampup x the images seen until it
  reaches the configured one, so early EMA weights follow G closely instead of
  averaging its random start (step 0 copies G).
  """
  if not models.ema_rampup:
    return models.ema_decay
  half_life = ema_half_life_images(models.ema_decay, models.images_per_step)
  seen = jnp.asarray(step, jnp.float32) * models.images_per_step
  ramped = jnp.minimum(half_life, seen * models.ema_rampup)
  return 0.5 ** (models.images_per_step / jnp.maximum(ramped, 1e-8))


def gan_step(
  state: TrainState, inputs: StepInputs, *, models: StepModels, with_r1: bool
) -> tuple[TrainState, dict[str, jax.Array]]:
  """One step of the reference trainer's arithmetic on explicit inputs.

  Returns (the new state, {'d_loss', 'real_score', 'fake_score', 'g_loss'},
  with 'r1_penalty' when `with_r1`). Not jitted: `train_step` draws the inputs
  and is what the loop jits. With `models.augment`, every batch D sees is
  augmented (`augment_keys` gives each its draws); R1 is then the gradient
  with respect to the real pixels (and coordinates) before augmentation,
  through the reals' augmentation, as StyleGAN2-ADA takes it.
  """
  coords = inputs.coords
  real_inputs = _d_inputs(models, inputs.real, coords)
  real_key = d_fake_key = g_fake_key = None
  if models.augment:
    real_key, d_fake_key, g_fake_key = augment_keys(inputs.augment_key)

  # D step: G frozen.
  fake = jax.lax.stop_gradient(
    _render(models, state.g_params, inputs.d_z, coords, inputs.d_noise_key)
  )

  def d_loss_fn(d_params):
    real_logits = _augmented_logits(
      models, d_params, inputs.real, coords, real_key
    )
    fake_logits = _augmented_logits(models, d_params, fake, coords, d_fake_key)
    return losses.discriminator_loss(real_logits, fake_logits), (
      real_logits,
      fake_logits,
    )

  (d_loss, (real_logits, fake_logits)), d_grads = jax.value_and_grad(
    d_loss_fn, has_aux=True
  )(state.d_params)
  updates, d_opt_state = models.d_tx.update(
    d_grads, state.d_opt_state, state.d_params
  )
  d_params = optax.apply_updates(state.d_params, updates)

  out = {
    'd_loss': d_loss,
    'real_score': jnp.mean(real_logits),
    'fake_score': jnp.mean(fake_logits),
  }
  # Lazy R1: its own gradient and Adam step, after the main D step (as the
  # reference does; D's Adam count advances twice on these steps).
  if with_r1:

    def r1_loss_fn(d_params):
      if models.augment:

        def discriminate(inputs):  # D's input before augmentation
          pixels = inputs[..., :3]
          at = inputs[..., 3:] if models.d_input_coords else coords
          return _augmented_logits(models, d_params, pixels, at, real_key)

      else:
        discriminate = functools.partial(_discriminate, models, d_params)
      penalty = losses.r1_penalty(discriminate, real_inputs)
      return models.r1_weight * penalty, penalty

    (_, penalty), r1_grads = jax.value_and_grad(r1_loss_fn, has_aux=True)(
      d_params
    )
    updates, d_opt_state = models.d_tx.update(r1_grads, d_opt_state, d_params)
    d_params = optax.apply_updates(d_params, updates)
    out['r1_penalty'] = penalty

  # G step: D frozen, new z, same coordinates.
  def g_loss_fn(g_params):
    fake = _render(models, g_params, inputs.g_z, coords, inputs.g_noise_key)
    return losses.generator_loss(
      _augmented_logits(models, d_params, fake, coords, g_fake_key)
    )

  g_loss, g_grads = jax.value_and_grad(g_loss_fn)(state.g_params)
  updates, g_opt_state = models.g_tx.update(
    g_grads, state.g_opt_state, state.g_params
  )
  g_params = optax.apply_updates(state.g_params, updates)
  decay = ema_decay_at(models, state.step)
  ema_params = jax.tree_util.tree_map(
    lambda e, p: decay * e + (1.0 - decay) * p, state.ema_params, g_params
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


def train_step(
  state: TrainState, batch, *, models: StepModels, with_r1: bool
) -> tuple[TrainState, dict[str, jax.Array]]:
  """One training step: the inputs of step `state.step`, then `gan_step`.

  `batch` holds 'image' (B, H, W, 3) and 'coords' (B, H, W, 2); the latents
  and noise come from (models.seed, state.step). Jit it with
  `static_argnames=STEP_STATIC_ARGNAMES` (`jit_train_step` also places it on
  `models.mesh`).
  """
  inputs = _draw_step_inputs(
    models.seed, state.step, batch, models.gen.style_dim, bool(models.augment)
  )
  if models.mesh is None:
    return gan_step(state, inputs, models=models, with_r1=with_r1)
  # The fused kernel splits itself over the mesh (XLA cannot), and the
  # per-platform choices are the mesh's platform's.
  with parallel.tracing_over(models.mesh):
    return gan_step(state, inputs, models=models, with_r1=with_r1)


STEP_STATIC_ARGNAMES = ('models', 'with_r1')


def jit_train_step(models: StepModels, state_sharding=None) -> Callable:
  """`train_step` jitted over `models.mesh`, the state donated.

  Call it as `step(state, batch, models=models, with_r1=...)`. The state and
  the batch keep the placements they come with (`parallel.state_shardings`,
  `parallel.global_batch`); the new state leaves with `state_sharding`
  (default replicated), the metrics replicated.
  """
  mesh = models.mesh
  state_sharding = (
    parallel.replicated(mesh) if state_sharding is None else state_sharding
  )
  return jax.jit(
    train_step,
    static_argnames=STEP_STATIC_ARGNAMES,
    donate_argnames='state',
    out_shardings=(state_sharding, parallel.replicated(mesh)),
  )


def abstract_step(
  config: ml_collections.ConfigDict, mesh, global_batch_size: int
) -> tuple[StepModels, TrainState, dict[str, jax.ShapeDtypeStruct], Any]:
  """What lowering the step of `config` over `mesh` takes, allocating nothing.

  Returns (models, the state's and a batch's `jax.ShapeDtypeStruct`s placed
  as a run places them, the state's shardings): `jit_train_step(models,
  shardings).lower(state, batch, models=models, with_r1=...)`.
  """
  gen, disc, g_tx, d_tx, shapes = train_state_lib.abstract_state(config)
  shardings = parallel.state_shardings(
    shapes, mesh, config.train.shard_embedding
  )
  state = jax.tree_util.tree_map(
    lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
    shapes,
    shardings,
  )
  side, split = config.data.crop, parallel.batch_sharded(mesh)
  batch = {
    name: jax.ShapeDtypeStruct(
      (global_batch_size, side, side, channels), jnp.float32, sharding=split
    )
    for name, channels in (('image', 3), ('coords', 2))
  }
  models = step_models(config, gen, disc, g_tx, d_tx, mesh)
  return models, state, batch, shardings


# ------------------------------------------------------------------------------
# The loop, phase by phase.


@dataclasses.dataclass
class Run:
  """What the phases of one training run share (built by `_set_up`)."""

  config: ml_collections.ConfigDict
  workdir: str
  mesh: Any
  gen: Any
  disc: Any
  g_tx: Any
  d_tx: Any
  source: Any  # the training data set (random access)
  batches: data_lib.TrainBatches
  manager: checkpoints.TrainCheckpoints
  abstract_state: TrainState
  shardings: Any  # a sharding per state leaf
  writer: summary.MetricWriter
  is_chief: bool
  # (H, W, 2) grids: samples are rendered on the first, compared with reals
  # (FID, SWD) on the second (`evaluation.render_grids`).
  sample_grid: Any
  eval_grid: Any


def _set_up(config: ml_collections.ConfigDict, workdir: str) -> Run:
  """Phase 1: the mesh, models, data and outputs of a checked config."""
  is_chief = jax.process_index() == 0
  mesh = parallel.make_mesh()
  gen, disc, g_tx, d_tx, abstract = train_state_lib.abstract_state(config)
  t = config.train
  source = data_lib.open_source(
    config.data.data_dir, config.data.name, resolution=config.data.resolution
  )
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
  sample_grid, eval_grid = evaluation.render_grids(
    config.data.resolution, config.model.cylindrical, source
  )
  return Run(
    config=config,
    workdir=workdir,
    mesh=mesh,
    gen=gen,
    disc=disc,
    g_tx=g_tx,
    d_tx=d_tx,
    source=source,
    batches=batches,
    manager=checkpoints.TrainCheckpoints(
      os.path.join(workdir, 'checkpoints'),
      keep=config.logging.keep_checkpoints,
      config=config,
    ),
    abstract_state=abstract,
    shardings=parallel.state_shardings(abstract, mesh, t.shard_embedding),
    writer=summary.MetricWriter(
      os.path.join(workdir, 'tensorboard'), enabled=is_chief
    ),
    is_chief=is_chief,
    sample_grid=sample_grid,
    eval_grid=eval_grid,
  )


def _initial_state(run: Run) -> TrainState:
  """Phase 2: the state to start from, placed on the mesh.

  The workdir's latest checkpoint if it has one; else the reference run of
  `train.continue_from`, or fresh parameters; then, for a new run, G and its
  EMA from `train.init_generator_from`.
  """
  t = run.config.train
  state = run.manager.restore_latest(run.abstract_state, run.shardings)
  if state is not None:
    if t.continue_from:
      logging.info(
        '%s holds its own checkpoint: resuming from it, not from '
        'train.continue_from=%s',
        run.workdir,
        t.continue_from,
      )
    return state
  if t.continue_from:
    state = jax.device_put(
      reference_run.continue_reference_run(
        run.config,
        t.continue_from,
        run.gen,
        run.disc,
        run.g_tx,
        run.d_tx,
        run.abstract_state,
      ),
      run.shardings,
    )
  else:
    create = functools.partial(
      train_state_lib.create_state,
      run.gen,
      run.disc,
      run.g_tx,
      run.d_tx,
      t.seed,
    )
    # Created in place on the mesh: no host copy of the parameters.
    state = jax.jit(create, out_shardings=run.shardings)()
    logging.info('starting a new run in %s', run.workdir)
  if t.init_generator_from:
    state = train_state_lib.start_from_generator(
      state, t.init_generator_from, run.g_tx, run.shardings.g_params
    )
  return state


def _training_evaluator(run: Run) -> Optional[evaluation.Evaluator]:
  """FID/KID during training, or None (`logging.eval_every_steps` 0)."""
  log = run.config.logging
  if not log.eval_every_steps:
    return None
  try:
    return evaluation.evaluator_for_run(
      run.config,
      run.workdir,
      run.source,
      num_real=log.eval_num_real,
      batch_size=min(64, log.eval_num_samples),
      seed=run.config.train.seed,
      inception_weights=log.inception_weights,
      mesh=run.mesh,
      coords=run.eval_grid,
      progress=progress_lib.ProgressBar(
        'Inception features of real images', unit='images'
      )
      if run.is_chief
      else None,
    )
  except FileNotFoundError as error:
    raise errors.MissingInputError(
      f'{error}\nOr train without FID: --config.logging.eval_every_steps=0'
    ) from None


@jax.jit
def _non_finite_parts(state: TrainState) -> dict[str, jax.Array]:
  """{field: True if any of its values is NaN or infinite} of a train state."""
  return {
    field.name: jnp.any(
      jnp.array(
        [
          ~jnp.all(jnp.isfinite(leaf))
          for leaf in jax.tree_util.tree_leaves(getattr(state, field.name))
          if jnp.issubdtype(leaf.dtype, jnp.inexact)
        ]
        or [False]
      )
    )
    for field in dataclasses.fields(state)
  }


def _check_state_finite(step: int, state: TrainState, newest_saved) -> None:
  """Raises errors.DivergedError if any value of `state` is not finite.

  The loop calls it before every checkpoint, so no checkpoint ever holds a
  diverged state. `newest_saved`: the newest checkpoint's step (None if none),
  which the message names.
  """
  bad = [name for name, is_bad in _non_finite_parts(state).items() if is_bad]
  if not bad:
    return
  resume = (
    f'the newest checkpoint, step {newest_saved}, holds a finite state'
    if newest_saved is not None
    else 'no checkpoint was written'
  )
  raise errors.DivergedError(
    f'the train state after step {step} holds non-finite values (in '
    f'{", ".join(bad)}); it was not saved and training stopped: {resume}. '
    'Lower the learning rates (train.g_lr, train.d_lr), or check the data.'
  )


def _periodic_work(
  run: Run, metrics: summary.TrainingReport, start_step: int
) -> list[Any]:
  """The loop's periodic actions, in the order they run after a step.

  Metrics every `log_every`; an EMA sample grid every `sample_every`; FID/KID
  every `eval_every_steps`; a checkpoint every `checkpoint_every` and when the
  loop finishes (a preemption stop); all of them after the last step; a
  profiler trace. The checkpoint first reports the metrics not yet written,
  so no checkpoint of a diverged state is saved.
  """
  config, gen = run.config, run.gen
  t, log = config.train, config.logging
  last = {t.num_steps}
  sample_z = jax.random.normal(
    jax.random.PRNGKey(t.seed + 1), (log.num_samples, gen.style_dim)
  )

  def write_samples(step, state):
    samples = evaluation.render_samples(
      gen, state.ema_params, sample_z, run.sample_grid
    )
    if run.is_chief:
      grid = images_lib.image_grid(samples)
      images_lib.save_png(
        os.path.join(run.workdir, 'samples', f'step_{step:07d}.png'), grid
      )
      run.writer.write_images(step, {'samples/ema': grid})

  evaluator = _training_evaluator(run)

  def write_fid(step, state):
    scores = evaluator.evaluate(gen, state.ema_params, log.eval_num_samples)
    logging.info(
      'FID %.3f, KID %.5f +- %.5f (step %d, %d samples)',
      scores['fid'],
      scores['kid'],
      scores['kid_std'],
      step,
      scores['num_fake'],
    )
    run.writer.write_scalars(
      step, {'eval/fid': scores['fid'], 'eval/kid': scores['kid']}
    )

  report = periodic.Every(log.log_every, metrics.write, at_steps=last)

  def save_checkpoint(step, state):
    report.force(step, state)
    # The losses are computed before the step's update: the updated state
    # itself (Adam's step, the EMA) is checked before it is written.
    _check_state_finite(step, state, run.manager.latest_step())
    run.manager.save(step, state)

  checkpoint = periodic.Every(
    log.checkpoint_every, save_checkpoint, at_steps=last, at_finish=True
  )
  actions = [
    report,
    periodic.Every(log.sample_every, write_samples, at_steps=last),
  ]
  if evaluator is not None:
    actions.append(
      periodic.Every(log.eval_every_steps, write_fid, at_steps=last)
    )
  actions.append(checkpoint)
  profile = periodic.Profile(
    os.path.join(run.workdir, 'tensorboard'),
    first_step=start_step + PROFILE_AFTER_STEPS,
    num_steps=log.profile_steps,
  )
  return [*actions, profile]


def _train_loop(run: Run, state: TrainState) -> TrainState:
  """Phase 3: steps up to `train.num_steps`, with the periodic work.

  A SIGTERM ends the loop after the current step, with a checkpoint.
  """
  t = run.config.train
  start_step = int(state.step)
  models = step_models(
    run.config, run.gen, run.disc, run.g_tx, run.d_tx, run.mesh
  )
  step_fn = jit_train_step(models, run.shardings)
  metrics = summary.TrainingReport(
    run.writer, t.num_steps, start_step, t.global_batch_size
  )
  actions = _periodic_work(run, metrics, start_step)
  done = start_step
  # Read ahead on grain's threads; the stream equals batch_at(step), step by
  # step.
  local_batches = run.batches.iterate(start_step)
  with periodic.Preemption() as preemption:
    for step in range(start_step, t.num_steps):
      local = next(local_batches)
      batch = parallel.global_batch(
        {k: local[k] for k in ('image', 'coords')}, run.mesh
      )
      with jax.profiler.StepTraceAnnotation('train', step_num=step):
        state, out = step_fn(
          state, batch, models=models, with_r1=step % t.r1_every == 0
        )
      metrics.add(out)
      done = step + 1
      for action in actions:
        action(done, state)
      if preemption.requested:
        break
  for action in actions:
    action.finish(done, state)
  if preemption.requested:
    logging.warning(
      'stopped by SIGTERM at step %d; run the same command to resume', done
    )
  return state


def _log_swd(run: Run, state: TrainState, reals, label: str) -> None:
  """SWD of EMA samples against `reals` (uint8), logged and written."""
  step = int(state.step)
  scores = evaluation.sliced_wasserstein_of_samples(
    run.gen, state.ema_params, reals, run.eval_grid, run.config.train.seed
  )
  logging.info(
    'SWD (%s, step %d): %s',
    label,
    step,
    ', '.join(f'{k} {v:.2f}' for k, v in scores.items()),
  )
  run.writer.write_scalars(step, {f'swd/{k}': v for k, v in scores.items()})


def _describe_start(run: Run, state: TrainState) -> None:
  """Logs where the run starts and what it trains; writes hparams once."""
  t = run.config.train
  start_step = int(state.step)
  if start_step:
    logging.info('resuming %s from step %d', run.workdir, start_step)
  else:
    run.writer.write_hparams(run.config.to_dict())
  logging.info(
    'per-image styles: %s form (train.per_image_form=%r on %s)',
    generator_lib.resolve_per_image_form(t.per_image_form),
    t.per_image_form,
    jax.default_backend(),
  )
  if run.is_chief:
    parameter_overview.log_parameter_overview(
      state.g_params, msg='generator parameters'
    )
    parameter_overview.log_parameter_overview(
      state.d_params, msg='discriminator parameters'
    )


def train_and_evaluate(
  config: ml_collections.ConfigDict, workdir: str
) -> TrainState:
  """Trains (or resumes) the run in `workdir`; returns the final state.

  Writes `workdir/checkpoints` (orbax, the last `keep_checkpoints`),
  `workdir/tensorboard` (losses, R1, scores, steps/s, images/s, sample grids,
  SWD, FID/KID, a profiler trace), `workdir/samples/*.png`. The config, the
  data set's presence and the memory plan are checked before anything is
  created, and the run holds the workdir's lock (`workdir_lock`) from start to
  end: a second run on it is refused. A run refused before it trains leaves
  the workdir as it found it: what it made there is removed, and a workdir it
  created is removed with it.
  """
  config_validation.validate(
    config,
    num_devices=jax.device_count(),
    num_processes=jax.process_count(),
    check_data=True,
  )
  workdir = os.path.abspath(workdir)
  created = not os.path.lexists(workdir)
  os.makedirs(workdir, exist_ok=True)
  with workdir_lock.hold(workdir, remove_if_empty=created):
    return _train_and_evaluate(config, workdir)


# The folders a run writes into, made when it starts (`_set_up`).
_OUTPUT_FOLDERS = ('checkpoints', 'tensorboard', 'samples')


def _set_up_and_start(config, workdir: str) -> tuple[Run, TrainState]:
  """Phases 1 and 2; the output folders they made are removed if they fail.

  Before the first step, a new `checkpoints` folder is empty and a new
  `tensorboard` one holds an empty log (the lock is held: no other run writes
  there). Folders that were there before are never touched, nor is any other
  folder (`damaged_checkpoints`). On several processes the others may still
  be writing: nothing is removed.
  """
  made = [
    os.path.join(workdir, name)
    for name in _OUTPUT_FOLDERS
    if not os.path.lexists(os.path.join(workdir, name))
  ]
  run = None
  try:
    run = _set_up(config, workdir)
    return run, _initial_state(run)
  except BaseException:
    if run is not None:
      run.writer.close()
    if jax.process_count() == 1:
      for path in made:
        if os.path.isdir(path) and not os.path.islink(path):
          shutil.rmtree(path, ignore_errors=True)
    raise


def _train_and_evaluate(config, workdir: str) -> TrainState:
  """`train_and_evaluate` once the config is checked and the lock held."""
  run, state = _set_up_and_start(config, workdir)
  t, log = config.train, config.logging
  start_step = int(state.step)
  if start_step >= t.num_steps:
    # A finished run: say so rather than appear to resume.
    logging.warning(
      '%s already holds step %d >= train.num_steps = %d: nothing to train '
      '(raise --config.train.num_steps to continue)',
      run.workdir,
      start_step,
      t.num_steps,
    )
    run.writer.close()
    return state
  _describe_start(run, state)
  reals = None
  if log.swd_num_images and run.is_chief:
    reals = evaluation.real_images(
      run.source, log.swd_num_images, config.data.resolution, t.seed
    )
    if start_step == 0:
      _log_swd(run, state, reals, 'start')

  state = _train_loop(run, state)

  # Phase 4: the end.
  if reals is not None and int(state.step) == t.num_steps:
    _log_swd(run, state, reals, 'end')
  run.manager.wait()
  run.writer.close()
  return state
