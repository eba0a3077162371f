"""Training: one step against hand-derived maths, config validation, R1 against
the reference.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cips_jax import checkpoints
from cips_jax import config_validation
from cips_jax import configs
from cips_jax import convert
from cips_jax import errors
from cips_jax import losses
from cips_jax import memory_plan
from cips_jax import parallel
from cips_jax import periodic
from cips_jax import train
from cips_jax import train_state
from reference_fixtures import reference_outputs
from reference_fixtures import reference_state_dict
from reference_fixtures import relative_error
import support
from support import fake_batch


def tiny_config():
  """tests/configs/tiny.py: an 8x8 CIPSskip with 16-wide layers, batch 4 (reads
  no data).
  """
  return support.tiny_config('data-dir-unused')


@pytest.fixture(scope='module')
def setup():
  config = tiny_config()
  gen, disc = train_state.build_models(config)
  g_tx, d_tx = train_state.make_optimizers(config)
  state = train_state.create_state(gen, disc, g_tx, d_tx, config.train.seed)
  models = train.step_models(config, gen, disc, g_tx, d_tx)
  jitted = jax.jit(train.train_step, static_argnames=train.STEP_STATIC_ARGNAMES)

  def step(state, batch, with_r1):
    return jitted(state, batch, models=models, with_r1=with_r1)

  return config, gen, disc, state, step


def _first_adam_update(grads, lr, eps=1e-8):
  """Adam's first step with b1 = 0 from zero moments, derived by hand: -lr g /
  (|g| + eps).
  """
  return jax.tree_util.tree_map(lambda g: -lr * g / (jnp.abs(g) + eps), grads)


def test_one_step_moves_g_d_and_ema_as_the_maths_says(setup):
  config, gen, disc, state, step = setup
  t = config.train
  batch = fake_batch(config)
  state = state.replace(step=jnp.asarray(1, jnp.int32))  # a step without R1
  new_state, out = step(state, batch, False)

  # Recompute the step independently: the same keys, explicit losses,
  # hand-derived Adam.
  keys = jax.random.split(jax.random.fold_in(jax.random.PRNGKey(t.seed), 1), 4)
  z_d = jax.random.normal(keys[0], (4, gen.style_dim))
  z_g = jax.random.normal(keys[2], (4, gen.style_dim))
  coords, real = jnp.asarray(batch['coords']), jnp.asarray(batch['image'])

  def generate(g_params, z, key):
    return gen.apply(
      {'params': g_params},
      z,
      coords,
      embedding_mode='table',
      method=type(gen).generate,
      rngs={'noise': key},
    )

  # Jitted only to compile once instead of op by op; the maths is written here.
  fake = jax.jit(generate)(state.g_params, z_d, keys[1])

  def d_loss(d_params):
    real_logits = disc.apply({'params': d_params}, real)
    fake_logits = disc.apply({'params': d_params}, fake)
    return jnp.mean(jax.nn.softplus(-real_logits)) + jnp.mean(
      jax.nn.softplus(fake_logits)
    )

  d_value, d_grads = jax.jit(jax.value_and_grad(d_loss))(state.d_params)
  expected_d = optax.apply_updates(
    state.d_params, _first_adam_update(d_grads, t.d_lr)
  )
  np.testing.assert_allclose(out['d_loss'], d_value, rtol=1e-5)
  for got, want in zip(
    jax.tree_util.tree_leaves(new_state.d_params),
    jax.tree_util.tree_leaves(expected_d),
  ):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)

  def g_loss(g_params):
    logits = disc.apply(
      {'params': expected_d}, generate(g_params, z_g, keys[3])
    )
    return jnp.mean(jax.nn.softplus(-logits))

  g_value, g_grads = jax.jit(jax.value_and_grad(g_loss))(state.g_params)
  expected_g = optax.apply_updates(
    state.g_params, _first_adam_update(g_grads, t.g_lr)
  )
  np.testing.assert_allclose(out['g_loss'], g_value, rtol=1e-5)
  moved = 0
  for got, want, old in zip(
    jax.tree_util.tree_leaves(new_state.g_params),
    jax.tree_util.tree_leaves(expected_g),
    jax.tree_util.tree_leaves(state.g_params),
  ):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    moved += int(np.any(np.asarray(got) != np.asarray(old)))
  assert moved > 10  # G really moved (nearly every parameter gets a gradient)

  # EMA: decay * (EMA before = G before) + (1 - decay) * G after.
  for ema, old, new in zip(
    jax.tree_util.tree_leaves(new_state.ema_params),
    jax.tree_util.tree_leaves(state.g_params),
    jax.tree_util.tree_leaves(new_state.g_params),
  ):
    np.testing.assert_allclose(
      ema, t.ema_decay * old + (1 - t.ema_decay) * new, rtol=1e-6, atol=1e-7
    )
  assert int(new_state.step) == 2


def test_r1_step_adds_a_second_d_update(setup):
  config, _, _, state, step = setup
  batch = fake_batch(config)
  without, _ = step(state, batch, False)
  with_r1, out = step(state, batch, True)
  assert float(out['r1_penalty']) > 0
  # G and EMA are computed after D, so they differ too, but the D difference is
  # the R1 update.
  diffs = [
    float(jnp.abs(a - b).max())
    for a, b in zip(
      jax.tree_util.tree_leaves(with_r1.d_params),
      jax.tree_util.tree_leaves(without.d_params),
    )
  ]
  assert max(diffs) > 0


def test_r1_penalty_matches_the_reference_fixture():
  _, state_dict = reference_state_dict('disc_s16')
  disc, variables = convert.from_state_dict(state_dict, which='d')
  out = reference_outputs('disc_s16')
  penalty = losses.r1_penalty(
    lambda x: disc.apply(variables, x), jnp.asarray(out['images'])
  )
  assert relative_error(penalty, out['r1_penalty']) <= 1e-4


def test_reference_recipe_values():
  config = configs.reference_config()
  t = config.train
  assert t.g_lr == pytest.approx(0.0016) and t.g_betas[1] == pytest.approx(
    0.991992, abs=1e-6
  )
  assert t.d_lr == pytest.approx(0.00188235, abs=1e-8)
  assert t.d_betas[1] == pytest.approx(0.990585, abs=1e-6)
  assert t.g_betas[0] == t.d_betas[0] == 0.0
  assert t.ema_decay == pytest.approx(0.997784, abs=1e-6)
  assert (t.r1_gamma, t.r1_every, t.global_batch_size, t.num_steps) == (
    10.0,
    16,
    32,
    1_200_000,
  )


def test_embedding_mode_follows_the_reference():
  config = tiny_config()
  assert train.train_embedding_mode(config) == 'table'  # full 8x8 grid
  config.data.resolution, config.data.crop = 16, 8
  assert train.train_embedding_mode(config) == 'bilinear'  # patches
  config.train.embedding_mode = 'aligned'
  assert train.train_embedding_mode(config) == 'aligned'


@pytest.mark.parametrize(
  'field, value, message',
  [
    ('data.crop', 12, 'config.data.crop = 12: must be a power of two'),
    (
      'data.crop',
      16,
      'config.data.crop = 16: must be <= config.data.resolution',
    ),
    ('model.size', 48, 'config.model.size = 48'),
    ('train.global_batch_size', 6, 'divisible by the number of devices'),
    ('model.arch', 'CIPS', 'config.model.arch'),
    ('train.compute_dtype', 'float16', 'config.train.compute_dtype'),
    ('data.source', 'imagenet', 'config.data.source'),
    ('logging.checkpoint_every', 0, 'config.logging.checkpoint_every'),
  ],
)
def test_config_validation_names_the_field(field, value, message):
  config = tiny_config()
  section, key = field.split('.')
  config[section][key] = value
  with pytest.raises(
    config_validation.ConfigError, match=message.replace('(', r'\(')
  ):
    config_validation.validate(config, num_devices=4)


@pytest.mark.parametrize(
  'fields, message',
  [
    # The reference's table lookup reads the table at the training grid.
    (
      {'train.embedding_mode': 'table', 'model.size': 16},
      'config.model.size = 16: must equal config.data.resolution = 8',
    ),
    # A cylindrical model trains on windows of panoramas, not on the R x R grid.
    (
      {'model.cylindrical': True},
      "config.train.embedding_mode = 'table_on_full_grid': must be 'bilinear'",
    ),
    # Fields that were removed are named, with what replaced them.
    ({'data.to_crop': True}, 'config.data.to_crop: not a field'),
    ({'data.cylindrical': True}, 'model.cylindrical says whether'),
  ],
)
def test_config_validation_names_contradictions_and_stale_fields(
  fields, message
):
  config = tiny_config()
  config.unlock()
  for field, value in fields.items():
    section, key = field.split('.')
    config[section][key] = value
  with pytest.raises(config_validation.ConfigError, match=re.escape(message)):
    config_validation.validate(config, num_devices=4)
  config = tiny_config()
  config.model.cylindrical = True
  config.train.embedding_mode = 'bilinear'
  config_validation.validate(config, num_devices=4)  # consistent: accepted


def test_global_batches_are_sharded_over_the_mesh():
  mesh = parallel.make_mesh()
  batch = parallel.global_batch({'x': np.arange(8.0).reshape(4, 2)}, mesh)
  assert batch['x'].shape == (4, 2)
  np.testing.assert_array_equal(batch['x'], np.arange(8.0).reshape(4, 2))


def test_bfloat16_compute_and_remat_step():
  """bfloat16 matmuls/convolutions with float32 parameters, and per-layer remat,
  train.
  """
  config = tiny_config()
  config.train.compute_dtype, config.train.remat = 'bfloat16', True
  gen, disc = train_state.build_models(config)
  g_tx, d_tx = train_state.make_optimizers(config)
  state = train_state.create_state(gen, disc, g_tx, d_tx, 0)
  step = jax.jit(train.train_step, static_argnames=train.STEP_STATIC_ARGNAMES)
  models = train.step_models(config, gen, disc, g_tx, d_tx)
  new_state, out = step(state, fake_batch(config), models=models, with_r1=True)
  assert all(np.isfinite(float(v)) for v in out.values())
  leaves = jax.tree_util.tree_leaves(new_state.g_params)
  assert all(leaf.dtype == jnp.float32 for leaf in leaves)
  # Same step in float32 without remat: close, not equal (bfloat16 rounding).
  config32 = tiny_config()
  gen32, disc32 = train_state.build_models(config32)
  models32 = train.step_models(config32, gen32, disc32, g_tx, d_tx)
  _, out32 = step(state, fake_batch(config), models=models32, with_r1=True)
  assert float(out['d_loss']) == pytest.approx(float(out32['d_loss']), rel=0.05)


def test_on_a_tpu_the_memory_check_leaves_room_for_xlas_remat():
  # XLA:TPU rematerializes what does not fit (the churches step in float32,
  # planned at 29.4 GiB, compiles into 14.3 GiB of a v4 TensorCore): a TPU
  # refuses a run only when even the remat plan exceeds it.
  config = tiny_config()
  config.train.global_batch_size = 64
  plain = memory_plan.plan(config, num_devices=1).total_bytes
  least = memory_plan.plan(config, num_devices=1, least=True).total_bytes
  between = (plain + least) // 2
  config_validation.check_fits(config, 1, memory_bytes=between, backend='tpu')
  with pytest.raises(config_validation.ConfigError):
    config_validation.check_fits(config, 1, memory_bytes=between, backend='gpu')
  with pytest.raises(config_validation.ConfigError) as refused:
    config_validation.check_fits(
      config, 1, memory_bytes=least // 2, backend='tpu'
    )
  # The figure is the remat plan's, and remat is no remedy there.
  assert memory_plan.describe(least) in str(refused.value)
  assert 'remat' not in str(refused.value)


def test_the_memory_check_plans_the_run_as_configured():
  # Before, the check used the remat plan whatever the config said: a run
  # needing more than the device without remat was let through.
  config = tiny_config()
  config.train.global_batch_size = 64
  plain = memory_plan.plan(config, num_devices=1).total_bytes
  config.train.remat = True
  with_remat = memory_plan.plan(config, num_devices=1).total_bytes
  assert with_remat < plain
  between = (plain + with_remat) // 2
  config_validation.check_fits(config, 1, memory_bytes=between)  # fits
  config.train.remat = False
  with pytest.raises(config_validation.ConfigError) as refused:
    config_validation.check_fits(config, 1, memory_bytes=between)
  assert 'set train.remat=True' in str(refused.value)
  assert "set train.compute_dtype='bfloat16'" in str(refused.value)
  # Advice only for what is not already set.
  config.train.remat, config.train.compute_dtype = True, 'bfloat16'
  with pytest.raises(config_validation.ConfigError) as refused:
    config_validation.check_fits(config, 1, memory_bytes=1000)
  assert 'remat' not in str(refused.value).split('. ')[-1]
  assert 'bfloat16' not in str(refused.value)


def _advice(refusal) -> str:
  """The remedies that end a memory refusal ('... per device). Lower ...')."""
  return str(refusal.value).rpartition('). ')[2]


def test_the_memory_refusal_advises_only_what_would_help():
  config = tiny_config()
  config.train.global_batch_size = 64
  needs = memory_plan.plan(config, num_devices=1)
  between = needs.state_bytes + needs.activations // 2
  # The batch overflows on a GPU: every remedy, and how much batch fits.
  with pytest.raises(config_validation.ConfigError) as refused:
    config_validation.check_fits(config, 1, between, backend='gpu')
  assert _advice(refused) == (
    f'Lower the batch (at most {needs.max_batch(between)} images per device '
    'fit); lower data.crop; lower the widths (model.hidden_size, style_dim, '
    'max_channels or d_max_channels); use more devices (the batch is split '
    "over them); set train.remat=True; set train.compute_dtype='bfloat16'"
  )
  assert 0 < needs.max_batch(between) < 64
  # CPU devices share the host's memory; what is set is not advised again.
  config.train.remat, config.train.compute_dtype = True, 'bfloat16'
  needs = memory_plan.plan(config, num_devices=1)
  between = needs.state_bytes + needs.activations // 2
  with pytest.raises(config_validation.ConfigError) as refused:
    config_validation.check_fits(config, 1, between, backend='cpu')
  assert _advice(refused) == (
    f'Lower the batch (at most {needs.max_batch(between)} images per device '
    'fit); lower data.crop; lower the widths (model.hidden_size, style_dim, '
    'max_channels or d_max_channels)'
  )
  # One image per device, at the smallest crop: neither can go lower.
  config.train.global_batch_size, config.data.crop = 1, 4
  needs = memory_plan.plan(config, num_devices=1)
  with pytest.raises(config_validation.ConfigError) as refused:
    config_validation.check_fits(
      config, 1, needs.total_bytes - 1, backend='gpu'
    )
  assert _advice(refused) == (
    'Lower the widths (model.hidden_size, style_dim, max_channels or '
    'd_max_channels)'
  )
  # The state alone overflows: the batch, crop, remat and dtype leave it as it
  # is (float32 parameters, moments and EMA); only the widths shrink it.
  config = tiny_config()
  with pytest.raises(config_validation.ConfigError) as refused:
    config_validation.check_fits(config, 1, 1000, backend='gpu')
  assert str(refused.value).startswith('config.model: the run needs')
  assert _advice(refused) == (
    'Lower the widths (model.hidden_size, style_dim, max_channels or '
    'd_max_channels)'
  )


def test_the_sample_grid_is_bounded():
  config = tiny_config()
  config.logging.num_samples = 1_000_000
  with pytest.raises(
    config_validation.ConfigError, match=r'logging.num_samples.*\[1, 1024\]'
  ):
    config_validation.validate(config, num_devices=1, num_processes=1)


def test_finish_runs_what_asks_for_it_once_and_stops_the_trace(tmp_path):
  calls = []
  checkpoint = periodic.Every(
    10, lambda step, _: calls.append(step), at_steps={30}, at_finish=True
  )
  samples = periodic.Every(10, lambda step, _: calls.append(-step))
  for step in range(1, 8):  # a run stopped (preempted) after step 7
    checkpoint(step, None)
    samples(step, None)
  assert calls == []
  assert checkpoint.finish(7, None) and not samples.finish(7, None)
  assert calls == [7]
  # A finish right after the work ran at that step does not repeat it.
  assert checkpoint(10, None) and not checkpoint.finish(10, None)
  assert calls == [7, 10]
  profile = periodic.Profile(str(tmp_path), first_step=1, num_steps=100)
  state = jnp.ones(3)
  assert profile(1, state) and profile.tracing
  assert profile.finish(2, state) and not profile.tracing
  assert not profile.finish(3, state)
  assert list(tmp_path.rglob('*.xplane.pb'))


def test_a_run_can_start_from_a_pretrained_generator(tmp_path):
  config = tiny_config()
  gen, disc = train_state.build_models(config)
  g_tx, d_tx = train_state.make_optimizers(config)
  state = train_state.create_state(gen, disc, g_tx, d_tx, seed=0)
  pretrained = train_state.create_state(gen, disc, g_tx, d_tx, seed=7)
  export = tmp_path / 'export'
  checkpoints.export_generator(
    str(export), gen, {'params': pretrained.ema_params}
  )
  started = train_state.start_from_generator(
    state, str(export), g_tx, parallel.replicated(parallel.make_mesh())
  )
  for field in ('g_params', 'ema_params'):
    for got, want in zip(
      jax.tree_util.tree_leaves(getattr(started, field)),
      jax.tree_util.tree_leaves(pretrained.ema_params),
    ):
      np.testing.assert_array_equal(got, want)
  # D is untouched and G's Adam moments start afresh (zero).
  for got, want in zip(
    jax.tree_util.tree_leaves(started.d_params),
    jax.tree_util.tree_leaves(state.d_params),
  ):
    np.testing.assert_array_equal(got, want)
  adam = started.g_opt_state[0]
  assert all(not np.any(m) for m in jax.tree_util.tree_leaves(adam.mu))
  # Another architecture is named, not loaded.
  wider = config.copy_and_resolve_references()
  wider.model.hidden_size = 32
  gen32, disc32 = train_state.build_models(wider)
  other = train_state.create_state(gen32, disc32, g_tx, d_tx, seed=0)
  with pytest.raises(errors.CheckpointError, match='does not match'):
    train_state.start_from_generator(
      other, str(export), g_tx, parallel.replicated(parallel.make_mesh())
    )


def test_a_config_saved_with_the_old_embedding_mode_name_still_reads():
  config = tiny_config()
  config.train.embedding_mode = 'reference'  # what earlier versions saved
  with pytest.raises(config_validation.ConfigError, match='must be one of'):
    config_validation.validate(config, num_devices=1)
  upgraded = configs.upgraded(config)
  assert upgraded.train.embedding_mode == 'table_on_full_grid'
  config_validation.validate(upgraded, num_devices=1)
  full_grid = upgraded.data.crop == upgraded.model.size
  assert train.train_embedding_mode(upgraded) == (
    'table' if full_grid else 'bilinear'
  )
