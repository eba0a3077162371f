"""The fused Pallas styled layer against the unfused reference and a float64
numpy oracle, in interpret mode (the CPU backend; no GPU or TPU here).

Every case uses shapes the blocks do not divide (P = 37, OUT = 40 with blocks
of 16, IN = 48 in three chunks), except one that needs no padding and does its
product in one chunk. jax.grad works: the kernel has a custom VJP whose
backward pass is the VJP of the plain-jnp reference, and the gradient is
checked against the reference's own.

Interpret mode compiles slowly, so the shapes are tiny and each (dtype,
demodulation, noise, activation) combination is compiled once.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cips_jax import layers
from cips_jax.kernels import modulated_dense as pm

SHAPE = (2, 37, 48, 40)  # B, P, IN, OUT
BLOCKS = {'block_pixels': 16, 'block_out': 16}
F32_RTOL = 1e-5
# bfloat16 x: the product's inputs carry a relative rounding of 2**-9 each (x
# is given in bfloat16, the kernel rounds scale * W, the reference x * scale)
# and the result is rounded to bfloat16; errors are measured against the
# largest output.
BF16_TOL = 1e-2


def make_inputs(shape, dtype=jnp.float32, seed=0):
  """Inputs of a modulated layer, with a real demodulation."""
  batch, pixels, in_features, out_features = shape
  rng = np.random.default_rng(seed)
  kernel = rng.standard_normal((in_features, out_features)) / np.sqrt(
    in_features
  )
  scale = 1.0 + 0.5 * rng.standard_normal((batch, in_features))
  inv_norm = 1.0 / np.sqrt(
    np.square(scale) @ np.square(kernel) + layers.DEMODULATION_EPS
  )
  f32 = functools.partial(jnp.asarray, dtype=jnp.float32)
  return dict(
    x=jnp.asarray(rng.standard_normal((batch, pixels, in_features)), dtype),
    kernel=f32(kernel),
    scale=f32(scale),
    inv_norm=f32(inv_norm),
    bias=f32(0.2 * rng.standard_normal(out_features)),
    noise=f32(rng.standard_normal((batch, pixels))),
    noise_strength=f32(0.3),
  )


def oracle(x, kernel, scale, inv_norm, bias, noise, noise_strength, act):
  """The layer in float64 numpy, from the inputs as given (bf16-rounded x)."""

  def f64(a):
    return np.asarray(jnp.asarray(a, jnp.float32), np.float64)

  y = np.einsum('bpi,io->bpo', f64(x) * f64(scale)[:, None, :], f64(kernel))
  if inv_norm is not None:
    y = y * f64(inv_norm)[:, None, :]
  if noise is not None:
    y = y + f64(noise_strength) * f64(noise)[..., None]
  y = y + f64(bias)
  if act == 'lrelu':
    y = np.where(y >= 0, y, 0.2 * y) * np.sqrt(2.0)
  return y


def select(inputs, demodulate, with_noise):
  inputs = dict(inputs)
  if not demodulate:
    inputs['inv_norm'] = None
  if not with_noise:
    inputs['noise'] = inputs['noise_strength'] = None
  return inputs


def run_both(inputs, activation, **blocks):
  """(fused, reference) outputs, each jitted."""
  args = [inputs[k] for k in ('x', 'kernel', 'scale', 'inv_norm', 'bias')]
  extra = dict(noise=inputs['noise'], noise_strength=inputs['noise_strength'])
  fused = jax.jit(
    lambda *a: pm.fused_styled_dense(
      *a, **extra, activation=activation, interpret=True, **blocks
    )
  )
  reference = jax.jit(
    lambda *a: pm.styled_dense_reference(*a, **extra, activation=activation)
  )
  return fused(*args), reference(*args)


def relative_error(y, expected):
  """max |y - expected| / max |expected|."""
  y = np.asarray(jnp.asarray(y, jnp.float32), np.float64)
  return float(np.max(np.abs(y - expected)) / np.max(np.abs(expected)))


# Each of demodulation, noise and activation on and off, in four cases.
CASES = [
  (True, True, 'lrelu'),
  (False, False, None),
  (True, False, None),
  (False, True, 'lrelu'),
]


@pytest.mark.parametrize('demodulate,with_noise,activation', CASES)
def test_float32_matches_reference_and_oracle(
  demodulate, with_noise, activation
):
  inputs = select(make_inputs(SHAPE), demodulate, with_noise)
  fused, reference = run_both(inputs, activation, **BLOCKS)
  expected = oracle(**inputs, act=activation)
  assert fused.shape == SHAPE[:2] + SHAPE[3:] and fused.dtype == jnp.float32
  atol = F32_RTOL * np.max(np.abs(expected))
  np.testing.assert_allclose(fused, expected, rtol=F32_RTOL, atol=atol)
  np.testing.assert_allclose(fused, reference, rtol=F32_RTOL, atol=atol)


@pytest.mark.parametrize('demodulate,with_noise,activation', CASES[:2])
def test_bfloat16_x_matches_reference_and_oracle(
  demodulate, with_noise, activation
):
  inputs = select(make_inputs(SHAPE, jnp.bfloat16), demodulate, with_noise)
  fused, reference = run_both(inputs, activation, **BLOCKS)
  assert fused.dtype == jnp.bfloat16 and reference.dtype == jnp.bfloat16
  expected = oracle(**inputs, act=activation)
  assert relative_error(fused, expected) < BF16_TOL
  assert relative_error(reference, expected) < BF16_TOL
  assert relative_error(fused, np.asarray(reference, np.float64)) < BF16_TOL


def test_divisible_shapes_default_blocks_and_float32_output():
  # P and OUT divide into blocks (no padding), IN = 64 is one chunk, and a
  # bfloat16 x gives a float32 result when asked.
  shape = (1, 32, 64, 32)
  inputs = make_inputs(shape, jnp.bfloat16, seed=1)
  args = [inputs[k] for k in ('x', 'kernel', 'scale', 'inv_norm', 'bias')]
  fused = jax.jit(
    lambda *a: pm.fused_styled_dense(
      *a,
      noise=inputs['noise'],
      noise_strength=inputs['noise_strength'],
      out_dtype=jnp.float32,
    )
  )(*args)
  assert fused.shape == (1, 32, 32) and fused.dtype == jnp.float32
  assert relative_error(fused, oracle(**inputs, act='lrelu')) < BF16_TOL / 4


def test_grad_matches_the_reference():
  inputs = make_inputs(SHAPE)
  names = list(inputs)
  target = np.random.default_rng(2).standard_normal(SHAPE[:2] + SHAPE[3:])

  def loss(function, values, **kwargs):
    kw = dict(zip(names, values))
    y = function(
      kw['x'],
      kw['kernel'],
      kw['scale'],
      kw['inv_norm'],
      kw['bias'],
      noise=kw['noise'],
      noise_strength=kw['noise_strength'],
      **kwargs,
    )
    return jnp.sum(jnp.square(y - target))

  values = [inputs[k] for k in names]
  fused_loss, fused = jax.jit(
    jax.value_and_grad(
      lambda v: loss(pm.fused_styled_dense, v, interpret=True, **BLOCKS)
    )
  )(values)
  ref_loss, reference = jax.jit(
    jax.value_and_grad(lambda v: loss(pm.styled_dense_reference, v))
  )(values)
  np.testing.assert_allclose(fused_loss, ref_loss, rtol=1e-5)
  for name, got, want in zip(names, fused, reference):
    scale = np.max(np.abs(want))
    np.testing.assert_allclose(
      got, want, rtol=1e-5, atol=1e-5 * scale, err_msg=name
    )


def test_leaky_relu_is_the_layers_one():
  y = jnp.linspace(-3.0, 3.0, 13)
  np.testing.assert_allclose(
    pm.styled_dense_reference(
      y[None, :, None],
      jnp.ones((1, 1)),
      jnp.ones((1, 1)),
      None,
      jnp.zeros((1,)),
    )[0, :, 0],
    layers.leaky_relu_gain(y),
    rtol=1e-6,
  )


def test_block_plans_are_legal_for_each_backend():
  for pixels, in_features, out_features in [
    (37, 48, 40),
    (65536, 1024, 512),
    (4096, 512, 3),
    (100, 512, 256),
  ]:
    for backend in ('gpu', 'interpret', 'tpu'):
      plan = pm._plan(
        (2, pixels, in_features), out_features, 128, 128, backend=backend
      )
      assert plan.padded_pixels % plan.block_pixels == 0
      assert plan.padded_out % plan.block_out == 0
      assert plan.padded_in % plan.block_in == 0
      assert plan.padded_pixels - pixels < plan.block_pixels
      assert plan.block_pixels >= 16 and plan.block_pixels % 8 == 0
      if backend == 'tpu':  # Mosaic: lanes a multiple of 128 or the full dim
        assert plan.block_out % 128 == 0 or plan.block_out == plan.padded_out
        assert plan.block_in == plan.padded_in == in_features
      else:  # Triton: powers of two, >= 16
        for size in (plan.block_pixels, plan.block_out, plan.block_in):
          assert size >= 16 and size & (size - 1) == 0
        if backend == 'gpu':
          assert plan.padded_in & (plan.padded_in - 1) == 0
  # H * W grids need no padding at all.
  plan = pm._plan((2, 65536, 1024), 512, 128, 128, backend='gpu')
  assert (plan.padded_pixels, plan.padded_in, plan.padded_out) == (
    65536,
    1024,
    512,
  )


def test_bad_arguments_raise():
  inputs = make_inputs((1, 16, 16, 16))
  args = [inputs[k] for k in ('x', 'kernel', 'scale', 'inv_norm', 'bias')]
  with pytest.raises(ValueError, match='activation'):
    pm.fused_styled_dense(*args, activation='sin')
  with pytest.raises(ValueError, match='block_out'):
    pm.fused_styled_dense(*args, block_out=24)
  with pytest.raises(ValueError, match='noise_strength'):
    pm.fused_styled_dense(*args, noise=inputs['noise'])
  with pytest.raises(ValueError, match='scale'):
    pm.fused_styled_dense(args[0], args[1], args[2][:, :8], *args[3:])
