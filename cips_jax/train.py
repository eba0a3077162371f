"""Training: the jitted GAN step over a device mesh, and the loop.

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
The state (`train_state.TrainState`) is replicated over a one-axis mesh
('data'), or its embedding tables split by rows; batches are sharded along it;
the step is jitted with the state donated.

`train_and_evaluate` runs in four phases: `set_up` (mesh, models, data,
checkpoints, writer), `initial_state` (resume, continue a PyTorch run, or
start afresh), `train_loop` (steps, and the periodic work of `periodic_work`:
metrics, samples, FID, checkpoints, a profiler trace) and the end (SWD, the
last checkpoint written to disk).
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, Callable, Optional

from absl import logging
from clu import parameter_overview
import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax

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
  # The lazy regulariser runs every r1_every steps, so it is weighted by
  # r1_every to keep its average strength (StyleGAN2's lazy regularisation).
  r1_weight = t.r1_gamma / 2 * t.r1_every

  def d_inputs(pixels, coords):
    return jnp.concatenate([pixels, coords], -1) if t.d_input_coords else pixels

  def render(g_params, z, coords, noise_key):
    # Without a noise key the generator injects zero noise.
    rngs = {} if noise_key is None else {'noise': noise_key}
    # 'auto' forms (G's per-image style form, D's convolutions) follow the
    # platform the step is lowered for, not the machine tracing it.
    return generator_lib.apply_per_platform(
      gen,
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
    # Lazy R1: its own gradient and Adam step, after the main D step (as the
    # reference does; D's Adam count advances twice on these steps).
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
  the state, default replicated (see `parallel.state_shardings`). The state is
  donated: each step updates it in place.
  """
  state_sharding = (
    parallel.replicated(mesh) if state_sharding is None else state_sharding
  )

  def step_fn(with_r1):
    def step(state, batch):
      # The fused kernel splits itself over the mesh (XLA cannot).
      with parallel.tracing_over(mesh):
        return train_step(state, batch, with_r1)

    return step

  return {
    with_r1: jax.jit(
      step_fn(with_r1),
      in_shardings=(state_sharding, parallel.batch_sharded(mesh)),
      out_shardings=(state_sharding, parallel.replicated(mesh)),
      donate_argnames='state',
    )
    for with_r1 in (False, True)
  }


# ------------------------------------------------------------------------------
# The loop, phase by phase.


@dataclasses.dataclass
class Run:
  """What the phases of one training run share (built by `set_up`)."""

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


def set_up(config: ml_collections.ConfigDict, workdir: str) -> Run:
  """Phase 1: the mesh, models, data and outputs of a checked config."""
  is_chief = jax.process_index() == 0
  mesh = parallel.make_mesh()
  gen, disc, g_tx, d_tx, abstract = train_state_lib.abstract_state(config)
  t = config.train
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
  )


def initial_state(run: Run) -> TrainState:
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
      progress=summary.ProgressBar(
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


def check_state_finite(step: int, state: TrainState, newest_saved) -> None:
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


def periodic_work(
  run: Run, metrics: summary.TrainingReport, start_step: int
) -> tuple[list[Any], periodic.Every, periodic.Profile]:
  """The loop's periodic actions, in the order they run after a step.

  Metrics every `log_every`; an EMA sample grid every `sample_every`; FID/KID
  every `eval_every_steps`; a checkpoint every `checkpoint_every`; all of them
  after the last step. Returns (actions, the checkpoint action, the profiler).
  The checkpoint first reports the metrics not yet written, so no checkpoint
  of a diverged state is saved.
  """
  config, gen = run.config, run.gen
  t, log = config.train, config.logging
  last = {t.num_steps}
  sample_z = jax.random.normal(
    jax.random.PRNGKey(t.seed + 1), (log.num_samples, gen.style_dim)
  )
  sample_coords, _ = evaluation.render_grids(
    config.data.resolution, config.model.cylindrical, run.source
  )

  def write_samples(step, state):
    samples = evaluation.render_samples(
      gen, state.ema_params, sample_z, sample_coords
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
    check_state_finite(step, state, run.manager.latest_step())
    run.manager.save(step, state)

  checkpoint = periodic.Every(
    log.checkpoint_every, save_checkpoint, at_steps=last
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
  return [*actions, profile], checkpoint, profile


def train_loop(run: Run, state: TrainState) -> TrainState:
  """Phase 3: steps up to `train.num_steps`, with the periodic work.

  A SIGTERM ends the loop after the current step, with a checkpoint.
  """
  t = run.config.train
  start_step = int(state.step)
  steps = jit_train_steps(
    make_train_step(run.config, run.gen, run.disc, run.g_tx, run.d_tx),
    run.mesh,
    run.shardings,
  )
  metrics = summary.TrainingReport(
    run.writer, t.num_steps, start_step, t.global_batch_size
  )
  actions, checkpoint, profile = periodic_work(run, metrics, start_step)
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
        state, out = steps[step % t.r1_every == 0](state, batch)
      metrics.add(out)
      for action in actions:
        action(step + 1, state)
      if preemption.requested:
        checkpoint.force(step + 1, state)
        logging.warning(
          'stopped by SIGTERM at step %d; run the same command to resume',
          step + 1,
        )
        break
  profile.stop(state)
  return state


def _log_swd(run: Run, state: TrainState, reals, label: str) -> None:
  """SWD of EMA samples against `reals` (uint8), logged and written."""
  _, coords = evaluation.render_grids(
    run.config.data.resolution, run.config.model.cylindrical, run.source
  )
  step = int(state.step)
  scores = evaluation.sliced_wasserstein_of_samples(
    run.gen, state.ema_params, reals, coords, run.config.train.seed
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
  SWD, FID/KID, a profiler trace), `workdir/samples/*.png`. The config is
  checked before anything is created, and the run holds the workdir's lock
  (`workdir_lock`) from start to end: a second run on it is refused.
  """
  config_validation.validate(
    config, num_devices=jax.device_count(), num_processes=jax.process_count()
  )
  workdir = os.path.abspath(workdir)
  os.makedirs(workdir, exist_ok=True)
  with workdir_lock.hold(workdir):
    return _train_and_evaluate(config, workdir)


def _train_and_evaluate(config, workdir: str) -> TrainState:
  """`train_and_evaluate` once the config is checked and the lock held."""
  run = set_up(config, workdir)
  state = initial_state(run)
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

  state = train_loop(run, state)

  # Phase 4: the end.
  if reals is not None and int(state.step) == t.num_steps:
    _log_swd(run, state, reals, 'end')
  run.manager.wait()
  run.writer.close()
  return state
