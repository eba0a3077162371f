"""DiffAugment and the EMA ramp-up (train.augment, train.ema_rampup).

Each augmentation against an oracle written from its definition (numpy), its
gradients against finite differences, and the training step: every batch D
sees goes through the same policy, R1 through the reals' draws, and the EMA
follows StyleGAN2-ADA's ramp. With both options off the step is the
reference's: test_continue_reference_run and the resume tests cover that.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from cips_jax import augment
from cips_jax import config_validation
from cips_jax import configs
from cips_jax import grids
from cips_jax import train
from cips_jax import train_state
import support

SIDE = 16


def _images(batch, seed=0, side=SIDE):
  rng = np.random.default_rng(seed)
  return rng.uniform(-1, 1, (batch, side, side, 3)).astype(np.float32)


def _coords(batch, side=SIDE):
  grid = np.asarray(grids.uniform(side, side), np.float32)
  return np.ascontiguousarray(np.broadcast_to(grid, (batch, side, side, 2)))


def test_policies_parse_and_bad_names_are_refused():
  assert augment.parse_policy('') == ()
  assert augment.parse_policy(' color, cutout ') == ('color', 'cutout')
  with pytest.raises(ValueError, match="unknown augmentation 'colour'"):
    augment.parse_policy('colour,translation')
  with pytest.raises(ValueError, match='named twice'):
    augment.parse_policy('cutout,cutout')


def test_color_is_brightness_then_saturation_then_contrast():
  x = _images(6)
  key = jax.random.PRNGKey(3)
  got = np.asarray(augment.color(jnp.asarray(x), key))
  # The draws, per image; the arithmetic below is DiffAugment's definition.
  kb, ks, kc = jax.random.split(key, 3)
  b, s, c = (
    np.asarray(jax.random.uniform(k, (6, 1, 1, 1), minval=lo, maxval=hi))
    for k, lo, hi in ((kb, -0.5, 0.5), (ks, 0.0, 2.0), (kc, 0.5, 1.5))
  )
  y = x.astype(np.float64) + b
  y = (y - y.mean(-1, keepdims=True)) * s + y.mean(-1, keepdims=True)
  y = (y - y.mean((1, 2, 3), keepdims=True)) * c + y.mean(
    (1, 2, 3), keepdims=True
  )
  np.testing.assert_allclose(got, y, atol=2e-6)
  assert np.ptp(b) > 0.1 and np.ptp(s) > 0.1  # drawn per image


def _numbered(batch, side=SIDE):
  """Images whose every pixel says where it came from: (image, row, column)
  + 1 in the three channels, so zero means 'nothing moved in'."""
  b, r, c = np.meshgrid(
    np.arange(batch), np.arange(side), np.arange(side), indexing='ij'
  )
  return np.stack([b, r, c], -1).astype(np.float32) + 1


def test_translation_moves_pixels_and_their_coordinates():
  batch, shift = 64, augment.max_shift(SIDE)
  assert shift == 2  # 16 / 8
  x, coords = _numbered(batch), _coords(batch)
  pixels, moved = augment.translation(
    jnp.asarray(x), jnp.asarray(coords), jax.random.PRNGKey(0)
  )
  pixels, moved = np.asarray(pixels), np.asarray(moved)
  # The grid is affine in (row, column): the oracle extends it exactly.
  origin = coords[0, 0, 0]
  right = coords[0, 0, 1] - coords[0, 0, 0]
  down = coords[0, 1, 0] - coords[0, 0, 0]
  rows, cols = np.meshgrid(np.arange(SIDE), np.arange(SIDE), indexing='ij')
  shifts = set()
  for i in range(batch):
    kept = pixels[i, ..., 0] > 0
    # Any kept pixel names the shift: it shows (row - dy, col - dx).
    r, c = np.argwhere(kept)[0]
    dy = int(r - (pixels[i, r, c, 1] - 1))
    dx = int(c - (pixels[i, r, c, 2] - 1))
    shifts.add((dy, dx))
    src_r, src_c = rows - dy, cols - dx
    inside = (0 <= src_r) & (src_r < SIDE) & (0 <= src_c) & (src_c < SIDE)
    expected = np.where(
      inside[..., None],
      x[i, np.clip(src_r, 0, SIDE - 1), np.clip(src_c, 0, SIDE - 1)],
      0,
    )
    np.testing.assert_array_equal(pixels[i], expected)
    np.testing.assert_allclose(
      moved[i],
      origin + src_r[..., None] * down + src_c[..., None] * right,
      atol=1e-5,
    )
  # Whole pixels, at most 1/8 of the side each way, and every such shift.
  assert {s for pair in shifts for s in pair} == set(range(-shift, shift + 1))


def test_cutout_zeroes_one_square_per_image():
  batch, side = 64, augment.cutout_side(SIDE)
  assert side == 8
  x = _numbered(batch)
  got = np.asarray(augment.cutout(jnp.asarray(x), jax.random.PRNGKey(1)))
  centres = set()
  for i in range(batch):
    cut = np.all(got[i] == 0, -1)
    np.testing.assert_array_equal(got[i][~cut], x[i][~cut])  # the rest kept
    rows, cols = np.nonzero(cut.any(1))[0], np.nonzero(cut.any(0))[0]
    # A full rectangle: the square, cut by the image's edges.
    assert cut.sum() == len(rows) * len(cols)
    assert 0 < len(rows) <= side and 0 < len(cols) <= side
    assert len(rows) == side or rows[0] == 0 or rows[-1] == SIDE - 1
    centres.add((rows[0], cols[0]))
  assert len(centres) > 20  # drawn per image, over the whole image


@pytest.mark.parametrize(
  'policy', [*augment.POLICIES, ','.join(augment.POLICIES)]
)
def test_each_policy_is_differentiable(policy):
  x, coords = jnp.asarray(_images(2, side=8)), jnp.asarray(_coords(2, side=8))
  key = jax.random.PRNGKey(7)

  def augmented(pixels):
    out, _ = augment.diff_augment(
      pixels, coords, key, augment.parse_policy(policy)
    )
    return out

  # The VJP against central differences along random directions (every
  # policy is piecewise linear or smooth in the pixels).
  rng = np.random.default_rng(0)
  cotangent = jnp.asarray(rng.normal(size=x.shape), jnp.float32)
  _, vjp = jax.vjp(augmented, x)
  (grad,) = vjp(cotangent)
  assert np.all(np.isfinite(grad)) and np.abs(grad).max() > 0
  for _ in range(3):
    direction = jnp.asarray(rng.normal(size=x.shape), jnp.float32)
    eps = 1e-2
    numeric = (
      jnp.vdot(cotangent, augmented(x + eps * direction))
      - jnp.vdot(cotangent, augmented(x - eps * direction))
    ) / (2 * eps)
    np.testing.assert_allclose(
      jnp.vdot(grad, direction), numeric, rtol=2e-3, atol=2e-3
    )


# ------------------------------------------------------------------------------
# The training step: one step with every option on, compiled once.

POLICY = ('color', 'translation', 'cutout')


def _logits(models, d_params, pixels, coords, key):
  """D's logits of the augmented batch, from the public pieces."""
  pixels, coords = augment.diff_augment(pixels, coords, key, models.augment)
  if models.d_input_coords:
    pixels = jnp.concatenate([pixels, coords], -1)
  return models.disc.apply({'params': d_params}, pixels)


def _fakes(models, g_params, z, coords):
  return models.gen.apply(
    {'params': g_params},
    z,
    coords,
    embedding_mode=models.embedding_mode,
    method=type(models.gen).generate,
  )


@pytest.fixture(scope='module')
def step():
  """One R1 step from a fresh state of the tiny config with D seeing the
  coordinates, every augmentation and the EMA ramp-up on; the policies each
  call of diff_augment got while the step was traced."""
  config = support.tiny_config(
    '/unused',
    **{
      'train.augment': ','.join(POLICY),
      'train.d_input_coords': True,
      'train.ema_rampup': 0.05,
    },
  )
  gen, disc = train_state.build_models(config)
  g_tx, d_tx = train_state.make_optimizers(config)
  # Jitted: eager, the initialisation runs op by op.
  state = jax.jit(lambda: train_state.create_state(gen, disc, g_tx, d_tx, 0))()
  models = train.step_models(config, gen, disc, g_tx, d_tx)
  batch = support.fake_batch(config)
  b = config.train.global_batch_size
  inputs = train.StepInputs(
    real=jnp.asarray(batch['image']),
    coords=jnp.asarray(batch['coords']),
    d_z=jax.random.normal(jax.random.PRNGKey(1), (b, gen.style_dim)),
    g_z=jax.random.normal(jax.random.PRNGKey(2), (b, gen.style_dim)),
    augment_key=jax.random.PRNGKey(9),
  )
  seen = []
  original = augment.diff_augment

  def recording(pixels, coords, key, policy):
    seen.append((pixels.shape, policy))
    return original(pixels, coords, key, policy)

  # A function of its own, so that its trace runs here, not from a cache.
  def fresh_step(state, inputs, models, with_r1):
    return train.gan_step(state, inputs, models=models, with_r1=with_r1)

  jitted = jax.jit(fresh_step, static_argnames=train.STEP_STATIC_ARGNAMES)
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(augment, 'diff_augment', recording)
    new_state, metrics = jitted(state, inputs, models=models, with_r1=True)
  return dict(
    config=config,
    models=models,
    state=state,
    inputs=inputs,
    new_state=new_state,
    metrics=metrics,
    seen=seen,
  )


def test_the_step_shows_d_every_batch_through_the_same_policy(step):
  models, state, inputs = step['models'], step['state'], step['inputs']
  # Reals and the D step's fakes (D step), the reals again (R1, inside its
  # gradient), the G step's fakes: one policy for all.
  assert step['seen'] == [((4, 8, 8, 3), POLICY)] * 4
  # The scores are D's on augmented batches, with the draws augment_keys
  # gives each: computed here from the public pieces.
  real_key, fake_key, _ = train.augment_keys(inputs.augment_key)

  @jax.jit
  def scores(d_params, g_params):
    real = _logits(models, d_params, inputs.real, inputs.coords, real_key)
    fake = _fakes(models, g_params, inputs.d_z, inputs.coords)
    fake = _logits(models, d_params, fake, inputs.coords, fake_key)
    plain = models.disc.apply(
      {'params': d_params}, jnp.concatenate([inputs.real, inputs.coords], -1)
    )
    return real.mean(), fake.mean(), plain.mean()

  real, fake, plain = scores(state.d_params, state.g_params)
  metrics = step['metrics']
  np.testing.assert_allclose(metrics['real_score'], real, rtol=1e-5)
  np.testing.assert_allclose(metrics['fake_score'], fake, rtol=1e-5)
  # Unaugmented, the score differs: the policy did act.
  assert abs(float(plain - real)) > 1e-4
  assert int(step['new_state'].step) == 1


def test_r1_is_taken_before_the_augmentation_through_the_reals_draws(step):
  models, state, inputs = step['models'], step['state'], step['inputs']
  real_key, fake_key, _ = train.augment_keys(inputs.augment_key)

  def before_augmentation(d_params, x):
    # D's input as the data gives it: the pixels, then their coordinates.
    return _logits(models, d_params, x[..., :3], x[..., 3:], real_key)

  @jax.jit
  def penalty_and_gradient():
    # R1 follows the D step: first that step, as gan_step takes it.
    fake = _fakes(models, state.g_params, inputs.d_z, inputs.coords)
    x = jnp.concatenate([inputs.real, inputs.coords], -1)

    def d_loss(d_params):
      real = before_augmentation(d_params, x)
      fake_logits = _logits(models, d_params, fake, inputs.coords, fake_key)
      return jnp.mean(jax.nn.softplus(-real)) + jnp.mean(
        jax.nn.softplus(fake_logits)
      )

    grads = jax.grad(d_loss)(state.d_params)
    updates, _ = models.d_tx.update(grads, state.d_opt_state, state.d_params)
    d_params = jax.tree_util.tree_map(jnp.add, state.d_params, updates)

    # The penalty's definition: the squared gradient norm at the real inputs.
    def penalty(discriminate, at):
      gradient = jax.grad(lambda x: discriminate(x).sum())(at)
      return jnp.mean(jnp.sum(jnp.square(gradient), axis=(1, 2, 3)))

    # The other reading: the gradient at the augmented inputs D saw.
    pixels, coords = augment.diff_augment(
      inputs.real, inputs.coords, real_key, models.augment
    )
    seen = jnp.concatenate([pixels, coords], -1)
    return (
      penalty(functools.partial(before_augmentation, d_params), x),
      penalty(lambda y: models.disc.apply({'params': d_params}, y), seen),
    )

  before, after = penalty_and_gradient()
  np.testing.assert_allclose(step['metrics']['r1_penalty'], before, rtol=1e-4)
  assert abs(float(after / before) - 1) > 1e-3  # the readings differ


def test_the_ema_ramps_up_as_stylegan2_ada(step):
  config, models = step['config'], step['models']
  b = config.train.global_batch_size
  half_life = train.ema_half_life_images(config.train.ema_decay, b)
  np.testing.assert_allclose(
    0.5 ** (b / half_life), config.train.ema_decay, rtol=1e-12
  )
  for at in (0, 3, 10, 10**6):
    seen_half_life = min(half_life, at * b * 0.05)
    expected = 0.5 ** (b / seen_half_life) if seen_half_life else 0.0
    np.testing.assert_allclose(
      train.ema_decay_at(models, at), expected, rtol=1e-5
    )
  # Step 0 copies G: the EMA leaves the step equal to G.
  new_state = step['new_state']
  for ema, g in zip(
    jax.tree_util.tree_leaves(new_state.ema_params),
    jax.tree_util.tree_leaves(new_state.g_params),
  ):
    np.testing.assert_array_equal(ema, g)
  # Without the ramp, the fixed decay.
  fixed = train.step_models(
    support.tiny_config('/unused'),
    models.gen,
    models.disc,
    models.g_tx,
    models.d_tx,
  )
  assert train.ema_decay_at(fixed, 0) == config.train.ema_decay


def test_the_options_are_validated_and_old_configs_read_as_off():
  config = support.tiny_config('/unused', **{'train.augment': 'colour'})
  with pytest.raises(config_validation.ConfigError, match='train.augment'):
    config_validation.validate(config, num_devices=1)
  config = support.tiny_config('/unused', **{'train.ema_rampup': -1.0})
  with pytest.raises(config_validation.ConfigError, match='train.ema_rampup'):
    config_validation.validate(config, num_devices=1)
  saved = configs.reference_config().to_dict()
  del saved['train']['augment'], saved['train']['ema_rampup']
  upgraded = configs.upgraded(ml_collections.ConfigDict(saved))
  assert upgraded.train.augment == '' and upgraded.train.ema_rampup == 0.0
