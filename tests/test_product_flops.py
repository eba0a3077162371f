"""The project's own FLOP count (benchmarks/product_flops.py) against
hand-derived values and XLA:CPU's cost analysis of the same programs."""

from __future__ import annotations

import sys

import jax
from jax.experimental import pallas as pl
import jax.numpy as jnp
import numpy as np

import support

sys.path.insert(0, str(support.REPO / 'benchmarks'))
import product_flops  # noqa: E402


def count(fn, *args, platform='tpu'):
  return product_flops.count(jax.make_jaxpr(fn)(*args), platform)


def xla_cpu_flops(fn, *args):
  return jax.jit(fn).lower(*args).compile().cost_analysis()['flops']


def test_a_matrix_product_and_its_gradient():
  x, w = jnp.ones((4, 8)), jnp.ones((8, 16))
  assert count(lambda x, w: x @ w, x, w) == 2 * 4 * 8 * 16
  # Forward, then both cotangents: three products of the same size.
  grads = jax.grad(lambda x, w: jnp.sum(jax.nn.relu(x @ w)), argnums=(0, 1))
  assert count(grads, x, w) == 3 * 2 * 4 * 8 * 16


def test_a_padded_convolution_counts_the_taps_on_the_input():
  x, w = jnp.ones((2, 4, 4, 8)), jnp.ones((3, 3, 8, 16))

  def conv(x, w, stride=1):
    return jax.lax.conv_general_dilated(
      x,
      w,
      (stride, stride),
      ((1, 1), (1, 1)),
      dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
    )

  # A 3-tap window over 4 positions with one pad each side reaches
  # 3 * 4 - 2 = 10 inputs per axis.
  assert count(conv, x, w) == 2 * 2 * 16 * 8 * 10 * 10
  assert count(conv, x, w) == xla_cpu_flops(conv, x, w)
  strided = lambda x, w: conv(x, w, 2)  # noqa: E731
  assert count(strided, x, w) == xla_cpu_flops(strided, x, w)
  depthwise = lambda x, w: jax.lax.conv_general_dilated(  # noqa: E731
    x,
    w,
    (1, 1),
    'SAME',
    dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
    feature_group_count=8,
  )
  w1 = jnp.ones((3, 3, 1, 8))
  assert count(depthwise, x, w1) == xla_cpu_flops(depthwise, x, w1)


def test_a_platform_choice_counts_the_platforms_branch():
  x = jnp.ones((4, 4))

  def per_platform(x):
    return jax.lax.platform_dependent(
      x, cpu=lambda x: x @ x @ x, tpu=lambda x: x @ x, default=lambda x: x
    )

  assert count(per_platform, x, platform='tpu') == 2 * 64
  assert count(per_platform, x, platform='cpu') == 2 * 2 * 64
  assert count(per_platform, x, platform='cuda') == 0


def test_nested_programs_are_multiplied_out():
  x, w = jnp.ones((8, 16)), jnp.ones((16, 16))
  one = 2 * 8 * 16 * 16

  def scanned(x, w):
    return jax.lax.scan(lambda c, _: (c @ w, None), x, None, length=5)[0]

  assert count(scanned, x, w) == 5 * one
  assert count(jax.checkpoint(lambda x, w: x @ w), x, w) == one

  def kernel(x_ref, w_ref, o_ref):
    o_ref[...] = x_ref[...] @ w_ref[...]

  def blocked(x, w):
    return pl.pallas_call(
      kernel,
      out_shape=jax.ShapeDtypeStruct((8, 16), jnp.float32),
      grid=(2,),
      in_specs=[
        pl.BlockSpec((4, 16), lambda i: (i, 0)),
        pl.BlockSpec((16, 16), lambda i: (0, 0)),
      ],
      out_specs=pl.BlockSpec((4, 16), lambda i: (i, 0)),
      interpret=True,
    )(x, w)

  # Two blocks of 4 rows: the kernel body's product twice.
  assert count(blocked, x, w) == one
  np.testing.assert_allclose(blocked(x, w), x @ w)
