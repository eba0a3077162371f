"""The generators against the reference: fixtures, parameter counts, and an
explicit oracle.
"""

from __future__ import annotations

import functools
import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cips_jax import convert
from cips_jax import generator as generator_lib
from cips_jax import grids
from cips_jax import layers
from cips_jax import models
from cips_jax import sampling
from reference_fixtures import reference_outputs
from reference_fixtures import reference_state_dict
from reference_fixtures import relative_error
import support

GENERATOR_FIXTURES = ['cips_skip_s8', 'cips_res_s8', 'cips_skip_s4']
PARITY_ATOL = 1e-4


@pytest.fixture(scope='module', params=GENERATOR_FIXTURES)
def fixture(request):
  spec, state_dict = reference_state_dict(request.param)
  gen = convert.infer_generator(state_dict)
  variables = convert.generator_params(state_dict, gen)
  return request.param, spec, gen, variables, reference_outputs(request.param)


def test_architecture_is_inferred(fixture):
  _, spec, gen, _, _ = fixture
  assert type(gen).__name__ == spec['arch']
  for key, value in spec['kwargs'].items():
    assert getattr(gen, key) == value, key


def test_mapping_matches_reference(fixture):
  _, _, gen, variables, out = fixture
  np.testing.assert_allclose(
    sampling.mapping(gen, variables, out['z']),
    out['w'],
    atol=PARITY_ATOL,
    rtol=0,
  )


def test_evaluation_grids_match_reference(fixture):
  """Every stored evaluation grid (size, 5 and 2 x size pixels): bilinear
  embedding path.
  """
  _, spec, gen, variables, out = fixture
  render = jax.jit(lambda v, c, w: sampling.synthesize(gen, v, w, c))
  grids_checked = [key for key in out if key.startswith('coords_')]
  assert len(grids_checked) == 3
  for key in grids_checked:
    side = key.split('_')[1]
    # The stored grid is the reference's linspace grid, which grids.uniform
    # reproduces.
    np.testing.assert_allclose(
      grids.uniform(int(side), int(side)), out[key][0], atol=1e-7
    )
    img = render(variables, out[key], out['w'])
    np.testing.assert_allclose(
      img, out[f'eval_img_{side}'], atol=PARITY_ATOL, rtol=0, err_msg=key
    )


def test_point_set_outside_the_square_matches_reference(fixture):
  _, _, gen, variables, out = fixture
  # Partly outside [-1, 1]: border clamp matters.
  assert np.abs(out['points']).max() > 1.0
  img = sampling.synthesize(gen, variables, out['w'], out['points'])
  np.testing.assert_allclose(
    img, out['eval_img_points'], atol=PARITY_ATOL, rtol=0
  )


def test_truncation_in_w_matches_reference(fixture):
  _, spec, gen, variables, out = fixture
  size = spec['kwargs']['size']
  img = sampling.generate(
    gen,
    variables,
    out['z'],
    grids.uniform(size, size),
    truncation_psi=0.6,
    w_avg=out['w_avg'],
  )
  np.testing.assert_allclose(img, out['trunc06_img'], atol=PARITY_ATOL, rtol=0)


def test_training_path_reads_the_table(fixture):
  _, spec, gen, variables, out = fixture
  size = spec['kwargs']['size']
  img = sampling.synthesize(
    gen, variables, out['w'], grids.uniform(size, size), embedding_mode='table'
  )
  np.testing.assert_allclose(img, out['train_img'], atol=PARITY_ATOL, rtol=0)
  # The training and evaluation paths of the reference really differ
  # (docs/reference.md, quirk 6.1).
  assert np.abs(out['train_img'] - out[f'eval_img_{size}']).max() > 1e-2


def test_aligned_mode_equals_table_on_the_training_grid(fixture):
  _, spec, gen, variables, out = fixture
  size = spec['kwargs']['size']
  coords = grids.uniform(size, size)
  aligned = sampling.synthesize(
    gen, variables, out['w'], coords, embedding_mode='aligned'
  )
  np.testing.assert_allclose(
    aligned, out['train_img'], atol=PARITY_ATOL, rtol=0
  )


@pytest.mark.parametrize(
  'cls, expected', [(models.CIPSskip, 44_317_092), (models.CIPSres, 43_027_858)]
)
def test_parameter_counts_equal_the_reference(cls, expected):
  shapes = jax.eval_shape(lambda: models.init(cls(), jax.random.key(0)))
  assert models.param_count(shapes) == expected


def test_discriminator_parameter_count_through_models_init():
  shapes = jax.eval_shape(
    lambda: models.init(models.Discriminator(size=256), jax.random.key(0))
  )
  assert models.param_count(shapes) == 28_864_129


def test_reference_initialisation():
  """Fresh parameters follow the reference's init (the Fourier layer is not
  equalized).
  """
  gen = models.CIPSskip(size=8, hidden_size=512, style_dim=32, n_mlp=2)
  params = models.init(gen, jax.random.key(3))['params']
  fourier = params['fourier']['kernel']
  assert (
    2.0 < np.abs(fourier).max() <= np.sqrt(4.5)
    and abs(float(fourier.std()) - 1.2247) < 0.1
  )
  assert 0.6 < np.abs(params['fourier']['bias']).max() <= np.sqrt(0.5)
  assert float(params['conv1']['noise_strength']) == 0.0
  np.testing.assert_array_equal(
    params['conv1']['modulated']['modulation']['bias'], 1.0
  )
  mapping_kernel = params['mapping']['dense_0']['kernel']
  assert abs(float(mapping_kernel.std()) - 100.0) < 5.0  # N(0, 1) / lr_mul


# ----------------------------------------------------------------------------
# An explicit oracle: the reference's maths in float64 numpy, building every
# per-style weight.


def _oracle_modulated(state_dict, prefix, x, w, demodulate=True):
  """x (P, in), w (P, D) -> (P, out): builds W'[p] = c W s[p] (and demodulates)
  per pixel.
  """
  # (out, in)
  weight = state_dict[f'{prefix}.weight'][0, :, :, 0, 0].astype(np.float64)
  a = state_dict[f'{prefix}.modulation.weight'].astype(np.float64)  # (in, D)
  b = state_dict[f'{prefix}.modulation.bias'].astype(np.float64)
  s = w @ (a / np.sqrt(a.shape[1])).T + b  # (P, in)
  # (P, out, in)
  modulated = weight[None] / np.sqrt(weight.shape[1]) * s[:, None, :]
  if demodulate:
    modulated = modulated / np.sqrt(
      (modulated**2).sum(-1, keepdims=True) + 1e-8
    )
  return np.einsum('poi,pi->po', modulated, x)


def _oracle_styled(state_dict, prefix, x, w):
  y = (
    _oracle_modulated(state_dict, f'{prefix}.conv', x, w)
    + state_dict[f'{prefix}.activate.bias']
  )
  return np.where(y > 0, y, 0.2 * y) * np.sqrt(2)


def _oracle_grid_sample(table, xy):
  """grid_sample(bilinear, border, align_corners=False) of table (C, S, S) at xy
  (P, 2).
  """
  size = table.shape[-1]
  pos = np.clip(((xy + 1) * size - 1) / 2, 0, size - 1)
  out = []
  for px, py in pos:
    x0, y0 = int(np.floor(px)), int(np.floor(py))
    x1, y1 = min(x0 + 1, size - 1), min(y0 + 1, size - 1)
    fx, fy = px - x0, py - y0
    out.append(
      table[:, y0, x0] * (1 - fx) * (1 - fy)
      + table[:, y0, x1] * fx * (1 - fy)
      + table[:, y1, x0] * (1 - fx) * fy
      + table[:, y1, x1] * fx * fy
    )
  return np.array(out)


def oracle_cips_skip(state_dict, xy, w):
  """CIPSskip in float64 for pixels xy (P, 2) with one w per pixel (P, D) -> (P,
  3).
  """
  sd = {k: v.astype(np.float64) for k, v in state_dict.items()}
  fourier = np.sin(
    xy @ sd['lff.ffm.conv.weight'][:, :, 0, 0].T + sd['lff.ffm.conv.bias']
  )
  h = np.concatenate(
    [fourier, _oracle_grid_sample(sd['emb.input'][0], xy)], axis=1
  )
  h = _oracle_styled(sd, 'conv1', h, w)
  rgb = 0.0
  num_pairs = len([k for k in sd if re.fullmatch(r'to_rgbs\.\d+\.bias', k)])
  for i in range(num_pairs):
    h = _oracle_styled(sd, f'linears.{2 * i}', h, w)
    h = _oracle_styled(sd, f'linears.{2 * i + 1}', h, w)
    rgb = (
      rgb
      + _oracle_modulated(sd, f'to_rgbs.{i}.conv', h, w, demodulate=False)
      + sd[f'to_rgbs.{i}.bias'].reshape(3)
    )
  return rgb


@pytest.fixture(scope='module')
def oracle_setup():
  _, state_dict = reference_state_dict('cips_skip_s4')
  gen = convert.infer_generator(state_dict)
  variables = convert.generator_params(state_dict, gen)
  rng = np.random.default_rng(0)
  coords = np.asarray(grids.uniform(5, 6))  # non-square on purpose
  ws = rng.standard_normal((2, 3, gen.style_dim)).astype(np.float32)
  return state_dict, gen, variables, coords, ws


def _oracle_images(state_dict, coords, w_per_pixel):
  """Runs the oracle image by image; w_per_pixel (B, H, W, D)."""
  xy = coords.reshape(-1, 2).astype(np.float64)
  return np.stack(
    [
      oracle_cips_skip(
        state_dict, xy, w.reshape(-1, w.shape[-1]).astype(np.float64)
      ).reshape(*coords.shape[:-1], 3)
      for w in w_per_pixel
    ]
  )


def test_per_image_styles_equal_the_oracle(oracle_setup):
  state_dict, gen, variables, coords, ws = oracle_setup
  w = ws[:, 0]
  img = sampling.synthesize(gen, variables, w, coords)
  expected = _oracle_images(
    state_dict,
    coords,
    np.broadcast_to(w[:, None, None], (2, *coords.shape[:-1], w.shape[-1])),
  )
  assert relative_error(img, expected) <= 1e-5


def test_per_pixel_styles_equal_the_oracle(oracle_setup):
  state_dict, gen, variables, coords, _ = oracle_setup
  w = np.random.default_rng(1).standard_normal(
    (2, *coords.shape[:-1], gen.style_dim)
  )
  img = sampling.synthesize(gen, variables, w.astype(np.float32), coords)
  assert relative_error(img, _oracle_images(state_dict, coords, w)) <= 1e-5


def test_style_mixtures_equal_the_oracle(oracle_setup):
  state_dict, gen, variables, coords, ws = oracle_setup
  logits = np.random.default_rng(2).standard_normal((2, *coords.shape[:-1], 3))
  mix = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
  img = sampling.synthesize(
    gen, variables, ws, coords, mix=mix.astype(np.float32)
  )
  w_per_pixel = np.einsum('bhwk,bkd->bhwd', mix, ws.astype(np.float64))
  assert (
    relative_error(img, _oracle_images(state_dict, coords, w_per_pixel)) <= 1e-5
  )


def test_cips_res_per_pixel_equals_per_image_when_constant(fixture):
  """All three style forms agree when they describe the same styles (both
  architectures).
  """
  _, _, gen, variables, out = fixture
  coords = out['coords_5'][0]
  w = out['w']
  per_image = sampling.synthesize(gen, variables, w, coords)
  per_pixel = sampling.synthesize(
    gen,
    variables,
    np.broadcast_to(w[:, None, None], (3, 5, 5, w.shape[-1])),
    coords,
  )
  ws = np.stack([w, np.roll(w, 1, axis=0)], axis=1)
  one_hot = np.zeros((3, 5, 5, 2), np.float32)
  one_hot[..., 0] = 1.0
  mixture = sampling.synthesize(gen, variables, ws, coords, mix=one_hot)
  np.testing.assert_allclose(per_pixel, per_image, atol=1e-5, rtol=0)
  np.testing.assert_allclose(mixture, per_image, atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------
# Shapes, transforms, noise.


@pytest.fixture(scope='module')
def tiny():
  gen = models.CIPSskip(
    size=8, hidden_size=16, style_dim=16, n_mlp=2, max_channels=32
  )
  return gen, models.init(gen, jax.random.key(0))


@pytest.mark.parametrize(
  'shape', [(2,), (7, 2), (4, 6, 2), (3, 2, 5, 2), (3, 2, 2, 3, 2)]
)
def test_coordinates_of_any_leading_shape(tiny, shape):
  gen, variables = tiny
  coords = np.random.default_rng(0).uniform(-1, 1, shape).astype(np.float32)
  w = np.random.default_rng(1).standard_normal((3, 16)).astype(np.float32)
  img = sampling.synthesize(gen, variables, w, coords)
  shared = len(shape) <= 3
  expected_shape = (3, *shape[:-1], 3) if shared else (*shape[:-1], 3)
  assert img.shape == expected_shape
  # The same points laid out flat give the same pixels.
  flat = coords.reshape(-1, 2) if shared else coords.reshape(3, 1, -1, 2)
  np.testing.assert_allclose(
    np.asarray(img).reshape(-1),
    np.asarray(sampling.synthesize(gen, variables, w, flat)).reshape(-1),
    atol=1e-5,
  )


def test_jit_and_grad(tiny):
  gen, variables = tiny
  coords = grids.uniform(8, 8)
  z = jax.random.normal(jax.random.key(1), (2, 16))

  def loss(params):
    return jnp.mean(sampling.generate(gen, {'params': params}, z, coords) ** 2)

  value, grads = jax.jit(jax.value_and_grad(loss))(variables['params'])
  assert np.isfinite(value)
  leaves = jax.tree_util.tree_leaves(grads)
  assert all(np.all(np.isfinite(g)) for g in leaves)
  # Gradients reach the embedding table, the Fourier features and the mapping
  # network.
  for path in (
    ('embedding',),
    ('fourier', 'kernel'),
    ('mapping', 'dense_0', 'kernel'),
  ):
    grad = grads
    for key in path:
      grad = grad[key]
    assert np.abs(grad).max() > 0, path
  # A finite difference along the gradient agrees with it (first order).
  eps = 1e-3
  direction = jax.tree_util.tree_map(
    lambda g: g / (jnp.linalg.norm(g.ravel()) + 1e-12), grads
  )
  shifted = jax.tree_util.tree_map(
    lambda p, d: p + eps * d, variables['params'], direction
  )
  slope = (loss(shifted) - value) / eps
  expected = sum(
    float(jnp.vdot(g, d))
    for g, d in zip(leaves, jax.tree_util.tree_leaves(direction))
  )
  assert abs(float(slope) - expected) <= 0.05 * abs(expected)


def test_noise_is_zero_without_rng_and_fresh_with_it(tiny):
  gen, variables = tiny
  params = jax.tree_util.tree_map(lambda x: x, variables['params'])
  params['conv1']['noise_strength'] = jnp.asarray(0.5)  # make the noise visible
  v = {'params': params}
  coords, z = grids.uniform(8, 8), jax.random.normal(jax.random.key(2), (2, 16))
  a = sampling.generate(gen, v, z, coords)
  np.testing.assert_array_equal(a, sampling.generate(gen, v, z, coords))
  b = sampling.generate(gen, v, z, coords, rng=jax.random.key(5))
  c = sampling.generate(gen, v, z, coords, rng=jax.random.key(6))
  assert np.abs(b - a).max() > 1e-3 and np.abs(b - c).max() > 1e-3
  np.testing.assert_array_equal(
    b, sampling.generate(gen, v, z, coords, rng=jax.random.key(5))
  )
  # With strength 0 (the reference's init), noise changes nothing.
  np.testing.assert_allclose(
    sampling.generate(gen, variables, z, coords, rng=jax.random.key(5)),
    sampling.generate(gen, variables, z, coords),
    atol=0,
  )


def test_chunked_rendering_matches_unchunked(tiny):
  gen, variables = tiny
  coords, z = grids.uniform(9, 7), jax.random.normal(jax.random.key(2), (2, 16))
  full = sampling.generate(gen, variables, z, coords)
  chunked = sampling.generate(gen, variables, z, coords, chunk_size=10)
  np.testing.assert_allclose(chunked, full, atol=1e-5)


@pytest.mark.parametrize('activation', ['sin', 'sinrelu'])
def test_sine_activations(activation):
  from cips_jax import layers

  y = jnp.arange(6.0) - 2.5
  out = layers.apply_activation(y, activation)
  if activation == 'sin':
    np.testing.assert_allclose(out, np.sin(y))
  # even channels through leaky ReLU first, then odd channels through sin, times
  # sqrt 2
  else:
    even, odd = np.asarray(y[0::2]), np.asarray(y[1::2])
    expected = np.concatenate(
      [np.where(even > 0, even, 0.2 * even), np.sin(odd)]
    ) * np.sqrt(2)
    np.testing.assert_allclose(out, expected, rtol=1e-6)
  gen = models.CIPSres(
    size=4,
    hidden_size=8,
    style_dim=8,
    n_mlp=1,
    max_channels=16,
    activation=activation,
  )
  variables = models.init(gen, jax.random.key(0))
  img = sampling.generate(gen, variables, jnp.ones((1, 8)), grids.uniform(4, 4))
  assert img.shape == (1, 4, 4, 3) and np.all(np.isfinite(img))


def test_bad_inputs_name_the_problem(tiny):
  gen, variables = tiny
  w = jnp.zeros((2, 16))
  with pytest.raises(ValueError, match='coords must end in 2'):
    sampling.synthesize(gen, variables, w, jnp.zeros((4, 4, 3)))
  with pytest.raises(ValueError, match='style_dim=16'):
    sampling.synthesize(gen, variables, jnp.zeros((2, 8)), grids.uniform(4, 4))
  with pytest.raises(ValueError, match='mix must have shape'):
    sampling.synthesize(
      gen,
      variables,
      jnp.zeros((2, 2, 16)),
      grids.uniform(4, 4),
      mix=jnp.ones((2, 4, 5, 2)),
    )
  with pytest.raises(ValueError, match='embedding_mode'):
    sampling.synthesize(
      gen, variables, w, grids.uniform(4, 4), embedding_mode='nearest'
    )
  with pytest.raises(ValueError, match='w_avg'):
    sampling.generate(
      gen, variables, w, grids.uniform(4, 4), truncation_psi=0.5
    )
  with pytest.raises(ValueError, match='power of two'):
    models.init(models.CIPSskip(size=12), jax.random.key(0))


def test_gradients_through_per_pixel_styles_and_mixtures(tiny):
  """Inversion needs d(image)/d(w) for per-pixel w and mixtures; check them
  against per-image.
  """
  gen, variables = tiny
  coords = grids.uniform(5, 6)
  w = jax.random.normal(jax.random.key(4), (2, 16))
  target = jax.random.normal(jax.random.key(5), (2, 5, 6, 3))

  def loss_per_image(w):
    return jnp.sum(
      (sampling.synthesize(gen, variables, w, coords) - target) ** 2
    )

  def loss_per_pixel(w_pixels):
    return jnp.sum(
      (sampling.synthesize(gen, variables, w_pixels, coords) - target) ** 2
    )

  def loss_mixture(ws):
    mix = jnp.broadcast_to(jnp.array([0.25, 0.75]), (2, 5, 6, 2))
    return jnp.sum(
      (sampling.synthesize(gen, variables, ws, coords, mix=mix) - target) ** 2
    )

  expected = jax.jit(jax.grad(loss_per_image))(w)
  per_pixel = jax.jit(jax.grad(loss_per_pixel))(
    jnp.broadcast_to(w[:, None, None], (2, 5, 6, 16))
  )
  np.testing.assert_allclose(
    per_pixel.sum(axis=(1, 2)), expected, rtol=1e-4, atol=1e-4
  )
  # Both styles equal to w.
  mixture = jax.jit(jax.grad(loss_mixture))(jnp.stack([w, w], axis=1))
  np.testing.assert_allclose(
    mixture[:, 0], 0.25 * expected, rtol=1e-4, atol=1e-4
  )
  np.testing.assert_allclose(
    mixture[:, 1], 0.75 * expected, rtol=1e-4, atol=1e-4
  )


@pytest.mark.parametrize('arch', [models.CIPSskip, models.CIPSres])
def test_per_image_path_parameter_gradients_equal_the_per_pixel_path(arch):
  """Per-image styles take their own path (style terms once per image, one flat
  vmap); its parameter gradients must equal those of the nested per-pixel path
  given the same w everywhere."""
  gen = arch(
    size=8,
    hidden_size=16,
    style_dim=16,
    n_mlp=2,
    max_channels=32,
    channel_multiplier=1,
  )
  variables = models.init(gen, jax.random.key(0))
  # Per-image grids.
  coords = np.stack([grids.uniform(5, 6), grids.scaled(5, 6, scale=0.5)])
  w = jax.random.normal(jax.random.key(6), (2, 16))
  target = jax.random.normal(jax.random.key(7), (2, 5, 6, 3))

  def loss(params, styles):
    out = gen.apply(
      {'params': params}, styles, coords, rngs={'noise': jax.random.key(8)}
    )
    return jnp.sum((out - target) ** 2)

  grad = jax.jit(jax.grad(loss))  # compiled once per shape, not per operation
  per_image = grad(variables['params'], w)
  per_pixel = grad(
    variables['params'], jnp.broadcast_to(w[:, None, None], (2, 5, 6, 16))
  )
  for path, expected in jax.tree_util.tree_leaves_with_path(per_pixel):
    got = functools.reduce(lambda tree, key: tree[key.key], path, per_image)
    np.testing.assert_allclose(
      got,
      expected,
      rtol=1e-4,
      atol=1e-5 * np.abs(expected).max(),
      err_msg=jax.tree_util.keystr(path),
    )
  assert (
    np.abs(per_image['conv1']['modulated']['modulation']['kernel']).max() > 0
  )
  assert np.abs(per_image['conv1']['noise_strength']) > 0


# ------------------------------------------------------------------------------
# The per-image style forms and bfloat16 activations.


# activations, weights, fused (interpreted on a CPU): every exact form.
EXACT_FORMS = generator_lib.PER_IMAGE_FORMS[:3]


@pytest.mark.parametrize('form', EXACT_FORMS)
def test_every_per_image_form_equals_the_oracle(oracle_setup, form):
  state_dict, gen, variables, coords, ws = oracle_setup
  w = ws[:, 0]
  img = sampling.synthesize(
    gen.clone(per_image_form=form), variables, w, coords
  )
  expected = _oracle_images(
    state_dict,
    coords,
    np.broadcast_to(w[:, None, None], (2, *coords.shape[:-1], w.shape[-1])),
  )
  assert relative_error(img, expected) <= 1e-5


@pytest.mark.parametrize(
  'form', [generator_lib.FOLDED_WEIGHTS, generator_lib.FUSED]
)
def test_other_forms_match_the_reference_fixtures(fixture, form):
  name, spec, gen, variables, out = fixture
  size = spec['kwargs']['size']
  other = gen.clone(per_image_form=form)
  img = sampling.synthesize(other, variables, out['w'], out[f'coords_{size}'])
  np.testing.assert_allclose(
    img, out[f'eval_img_{size}'], atol=PARITY_ATOL, rtol=0
  )


@pytest.mark.parametrize('arch', [models.CIPSskip, models.CIPSres])
def test_every_form_gives_the_same_parameter_gradients(arch):
  gen = arch(size=8, hidden_size=16, style_dim=16, n_mlp=1, max_channels=16)
  variables = models.init(gen, jax.random.PRNGKey(0))
  z = jax.random.normal(jax.random.PRNGKey(1), (3, 16))
  coords = grids.uniform(8, 8)

  def loss(params, form):
    rgb = gen.clone(per_image_form=form).apply(
      {'params': params}, z, coords, method=type(gen).generate
    )
    return jnp.sum(jnp.sin(rgb))

  # Jitted: one compilation per form instead of one per operation.
  grad = jax.jit(jax.grad(loss), static_argnames='form')
  grads = [grad(variables['params'], form=form) for form in EXACT_FORMS]
  for other in grads[1:]:
    for a, b in zip(*map(jax.tree_util.tree_leaves, (grads[0], other))):
      assert jnp.max(jnp.abs(a - b)) <= 1e-5 * (jnp.max(jnp.abs(a)) + 1e-6)


def test_auto_picks_the_measured_form_per_backend():
  resolve = generator_lib.resolve_per_image_form
  for backend, form in generator_lib.PER_IMAGE_FORM_BY_BACKEND.items():
    assert resolve('auto', backend) == form
  assert resolve('weights', 'cpu') == 'weights'
  assert resolve('fused', 'cpu') == 'fused'  # opt-in, never 'auto''s pick
  assert 'fused' not in generator_lib.PER_IMAGE_FORM_BY_BACKEND.values()
  with pytest.raises(ValueError, match='per_image_form must be one of'):
    resolve('folded', 'cpu')


def test_bfloat16_activations_between_layers():
  # Stored activations are bfloat16; style terms, accumulation and RGB float32.
  layer = layers.StyledDense(16, 8, dtype=jnp.bfloat16)
  x = jnp.ones((16,), jnp.bfloat16)
  style = jnp.ones((4,))
  params = layer.init(jax.random.PRNGKey(0), x, styled=layers.PixelStyle(style))
  assert (
    layer.apply(params, x, styled=layers.PixelStyle(style)).dtype
    == jnp.bfloat16
  )
  modulation = layer.apply(params, style, method=layer.modulation_for)
  assert modulation.scale.dtype == modulation.inv_norm.dtype == jnp.float32
  block = layers.StyledResBlock(16, 8, dtype=jnp.bfloat16)
  params = block.init(jax.random.PRNGKey(0), x, styled=layers.PixelStyle(style))
  assert (
    block.apply(params, x, styled=layers.PixelStyle(style)).dtype
    == jnp.bfloat16
  )
  rgb = layers.ToRGB(16, dtype=jnp.bfloat16)
  params = rgb.init(jax.random.PRNGKey(0), x, styled=layers.PixelStyle(style))
  assert (
    rgb.apply(params, x, styled=layers.PixelStyle(style)).dtype == jnp.float32
  )


@pytest.mark.parametrize('form', EXACT_FORMS)
def test_bfloat16_generation_stays_close_to_float32(oracle_setup, form):
  _, gen, variables, coords, ws = oracle_setup
  w = ws[:, 0]
  full = sampling.synthesize(gen, variables, w, coords)
  half = sampling.synthesize(
    gen.clone(dtype=jnp.bfloat16, per_image_form=form), variables, w, coords
  )
  assert half.dtype == jnp.float32
  # bfloat16 keeps 8 bits of mantissa: ~0.4% per rounding, over a few layers.
  assert relative_error(half, full) <= 3e-2
  assert relative_error(half, full) > 0  # it really ran in bfloat16


def test_the_fused_form_splits_itself_over_the_devices_of_a_jit():
  # Mosaic calls cannot be partitioned by XLA (a TPU pod refused the fused
  # form under the sharded jit); the script's program must hold the kernel's
  # shard_maps and equal the activations form on one device.
  result = support.run_python(
    support.TESTS / 'scripts' / 'fused_over_devices.py',
    env=support.environment_with_devices(4),
  )
  assert result.returncode == 0, result.stderr[-3000:]
  report = json.loads(result.stdout.strip().splitlines()[-1])
  assert report['devices'] == 4
  assert report['fused_shard_maps'] > 0
  assert report['activations_shard_maps'] == 0
  assert report['images'] < 1e-5 and report['grads'] < 1e-5
