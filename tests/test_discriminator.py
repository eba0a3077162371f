"""Tests of cips_jax.discriminator against the reference fixture and independent
formulas.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cips_jax.convert import discriminator_params
from cips_jax.convert import reference_flatten_order
from cips_jax.discriminator import Discriminator
from cips_jax.discriminator import minibatch_stddev
from reference_fixtures import reference_outputs
from reference_fixtures import reference_state_dict
from reference_fixtures import relative_error


def params_from_reference(state_dict, **kwargs):
  return discriminator_params(state_dict, Discriminator(**kwargs))


FIXTURE_KWARGS = dict(size=16, channel_multiplier=2, input_channels=3)


@pytest.fixture(scope='module')
def disc_s16():
  meta, state = reference_state_dict('disc_s16')
  arrays = reference_outputs('disc_s16')
  return meta, state, arrays


def test_fixture_parity(disc_s16):
  meta, state, arrays = disc_s16
  assert meta['kwargs']['size'] == 16 and meta['kwargs']['input_size'] == 3
  model = Discriminator(**FIXTURE_KWARGS)
  variables = params_from_reference(state, **FIXTURE_KWARGS)

  def logits_fn(images):
    return model.apply(variables, images)

  @jax.jit
  def run(images):
    logits = logits_fn(images)
    grad = jax.grad(lambda im: jnp.sum(logits_fn(im)))(images)
    r1 = jnp.mean(jnp.sum(jnp.square(grad), axis=(1, 2, 3)))
    return logits, grad, r1

  logits, grad, r1 = run(jnp.asarray(arrays['images']))
  errs = {
    'logits': relative_error(logits, arrays['logits']),
    'grad_images': relative_error(grad, arrays['grad_images']),
    'r1_penalty': relative_error(r1, arrays['r1_penalty']),
  }
  print('disc_s16 max relative errors:', errs)
  assert logits.shape == (4, 1)
  for name, err in errs.items():
    assert err <= 1e-4, (name, err)


def test_param_count_256():
  model = Discriminator(size=256, channel_multiplier=2)
  shapes = jax.eval_shape(
    model.init,
    jax.random.PRNGKey(0),
    jax.ShapeDtypeStruct((1, 256, 256, 3), jnp.float32),
  )
  count = sum(
    math.prod(leaf.shape) for leaf in jax.tree_util.tree_leaves(shapes)
  )
  assert count == 28_864_129


def _numpy_reference_stddev(x_nchw: np.ndarray, group_size: int) -> np.ndarray:
  """The reference's formula, written over NCHW with view/var, independently of
  the module.
  """
  b, c, h, w = x_nchw.shape
  g = min(b, group_size)
  y = x_nchw.astype(np.float64).reshape(g, b // g, 1, c, h, w)
  y = y - y.mean(axis=0, keepdims=True)
  y = np.sqrt((y**2).mean(axis=0) + 1e-8)  # (B/G, 1, C, H, W)
  y = y.mean(axis=(2, 3, 4), keepdims=True).squeeze(2)  # (B/G, 1, 1, 1)
  y = np.tile(y, (g, 1, h, w))  # repeat(group, 1, H, W)
  return np.concatenate([x_nchw, y], axis=1)


def test_minibatch_stddev_grouping():
  rng = np.random.default_rng(0)
  # Very different scales per sample so a wrong grouping gives different
  # numbers.
  x = rng.standard_normal((8, 5, 3, 4)).astype(np.float32)  # NHWC
  x = x * (1.0 + np.arange(8, dtype=np.float32) ** 2)[:, None, None, None]
  ours = np.asarray(minibatch_stddev(jnp.asarray(x), 4))
  ref = _numpy_reference_stddev(x.transpose(0, 3, 1, 2), 4).transpose(
    0, 2, 3, 1
  )
  assert ours.shape == (8, 5, 3, 5)
  np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-6)
  # The wrong (inner) grouping would differ: samples 0 and 1 differ in the
  # reference.
  assert not np.allclose(ref[0, 0, 0, -1], ref[1, 0, 0, -1])


def _tiny(**kw):
  return Discriminator(**{'size': 8, 'max_channels': 8, **kw})


def test_batch_not_divisible_raises():
  model = _tiny()
  with pytest.raises(ValueError, match=r'6.*4'):
    jax.eval_shape(
      model.init,
      jax.random.PRNGKey(0),
      jax.ShapeDtypeStruct((6, 8, 8, 3), jnp.float32),
    )


def test_params_from_reference_errors(disc_s16):
  _, state, _ = disc_s16
  missing = dict(state)
  del missing['convs.1.conv2.1.weight']
  with pytest.raises(ValueError, match=r'missing.*convs\.1\.conv2\.1\.weight'):
    params_from_reference(missing, **FIXTURE_KWARGS)

  wrong = dict(state)
  wrong['final_linear.0.weight'] = wrong['final_linear.0.weight'][:, :100]
  with pytest.raises(ValueError, match=r'mis-shaped.*final_linear\.0\.weight'):
    params_from_reference(wrong, **FIXTURE_KWARGS)

  extra = dict(state)
  extra['convs.3.conv1.0.weight'] = np.zeros((512, 512, 3, 3), np.float32)
  with pytest.raises(
    ValueError, match=r'unexpected.*convs\.3\.conv1\.0\.weight'
  ):
    params_from_reference(extra, **FIXTURE_KWARGS)

  # Blur buffers are accepted and ignored.
  with_buffers = dict(
    state, **{'convs.1.skip.0.kernel': np.ones((4, 4), np.float32)}
  )
  params_from_reference(with_buffers, **FIXTURE_KWARGS)


def test_reference_flatten_order():
  c, h, w = 3, 4, 4
  feat = np.random.default_rng(1).standard_normal((c, h, w))
  ours_flat = feat.transpose(1, 2, 0).reshape(-1)  # NHWC flatten
  ref_flat = feat.reshape(-1)  # NCHW flatten
  np.testing.assert_array_equal(
    ours_flat, ref_flat[reference_flatten_order(c, h, w)]
  )


@pytest.mark.parametrize(
  'kwargs',
  [
    dict(n_first_layers=1),
    dict(input_channels=5),
    dict(n_first_layers=1, input_channels=5),
  ],
)
def test_variants(kwargs):
  model = _tiny(**kwargs)
  cin = kwargs.get('input_channels', 3)
  images = jax.random.normal(jax.random.PRNGKey(1), (4, 8, 8, cin))
  variables = model.init(jax.random.PRNGKey(0), images)
  out = jax.jit(model.apply)(variables, images)
  assert out.shape == (4, 1)
  assert bool(jnp.all(jnp.isfinite(out)))
  assert variables['params']['from_rgb']['conv']['kernel'].shape == (
    1,
    1,
    cin,
    8,
  )
  assert ('first_layers_0' in variables['params']) == bool(
    kwargs.get('n_first_layers')
  )


@pytest.mark.parametrize(
  'kernel_size, stride, padding', [(3, 1, 1), (3, 2, 0), (1, 2, 0), (1, 1, 0)]
)
def test_im2col_convolution_equals_xla_convolution(
  kernel_size, stride, padding
):
  from cips_jax import discriminator

  x = jax.random.normal(jax.random.PRNGKey(0), (2, 9, 9, 5))
  kernel = jax.random.normal(
    jax.random.PRNGKey(1), (kernel_size, kernel_size, 5, 7)
  )

  def loss(impl):
    return lambda x, k: jnp.sum(
      jnp.sin(discriminator.conv2d(x, k, stride, padding, impl=impl))
    )

  np.testing.assert_allclose(
    discriminator.conv2d(x, kernel, stride, padding, impl='im2col'),
    discriminator.conv2d(x, kernel, stride, padding, impl='xla'),
    rtol=1e-5,
    atol=1e-5,
  )
  for got, want in zip(
    jax.grad(loss('im2col'), argnums=(0, 1))(x, kernel),
    jax.grad(loss('xla'), argnums=(0, 1))(x, kernel),
  ):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
  with pytest.raises(ValueError, match='conv_impl'):
    discriminator.resolve_conv_impl('fft')
