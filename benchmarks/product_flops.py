"""The project's own FLOP count of a program: its products, from the jaxpr.

    flops = product_flops.count(jax.make_jaxpr(fn)(*args))

Independent of any compiler's cost model: every dot_general and convolution of
the program as JAX traced it (forward and backward alike), 2 FLOPs per
multiply-add, walking into nested programs (jit, remat, custom derivatives,
shard_map bodies times their devices, Pallas kernels times their grid, scan
bodies times their length; a cond's largest branch, or, for a choice by
platform (`lax.platform_dependent`), the branch of `platform`). Elementwise
work is left out: in CIPS it is a few percent of the products.
"""

from __future__ import annotations

import math
from typing import Any

from jax.extend import core


def count(jaxpr: Any, platform: str = 'tpu') -> int:
  """FLOPs of the products of a (Closed)Jaxpr, summed over nested programs,
  as the program runs on `platform`."""
  jaxpr = getattr(jaxpr, 'jaxpr', jaxpr)
  total = 0
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name == 'dot_general':
      total += _dot_flops(eqn)
    elif name == 'conv_general_dilated':
      total += _conv_flops(eqn)
    else:
      total += _nested_flops(eqn, platform)
  return total


def _dot_flops(eqn) -> int:
  (lhs_contracting, _), _ = eqn.params['dimension_numbers']
  lhs = eqn.invars[0].aval.shape
  contraction = math.prod(lhs[axis] for axis in lhs_contracting)
  return 2 * math.prod(eqn.outvars[0].aval.shape) * contraction


def _conv_flops(eqn) -> int:
  # Each output element sums over the kernel's input features and those
  # window taps that fall on the input, not on its padding or its dilation's
  # holes (as XLA counts): a 3x3 window on a 4x4 map reaches 69% of its taps.
  params = eqn.params
  numbers = params['dimension_numbers']
  lhs = eqn.invars[0].aval.shape
  rhs = eqn.invars[1].aval.shape
  out = eqn.outvars[0].aval.shape
  taps = 1
  for d, (low, _) in enumerate(params['padding']):
    taps *= _valid_taps(
      size=lhs[numbers.lhs_spec[2 + d]],
      window=rhs[numbers.rhs_spec[2 + d]],
      outputs=out[numbers.out_spec[2 + d]],
      stride=params['window_strides'][d],
      low=low,
      lhs_dilation=params['lhs_dilation'][d],
      rhs_dilation=params['rhs_dilation'][d],
    )
  per_tap = out[numbers.out_spec[0]] * out[numbers.out_spec[1]]
  return 2 * per_tap * rhs[numbers.rhs_spec[1]] * taps


def _valid_taps(
  size, window, outputs, stride, low, lhs_dilation, rhs_dilation
) -> int:
  """(output position, window tap) pairs of one axis that read an input."""
  dilated = (size - 1) * lhs_dilation + 1
  valid = 0
  for o in range(outputs):
    for k in range(window):
      position = o * stride - low + k * rhs_dilation
      if 0 <= position < dilated and position % lhs_dilation == 0:
        valid += 1
  return valid


def _nested_flops(eqn, platform: str) -> int:
  """FLOPs of the programs an equation runs (0 for a plain operation)."""
  name, params = eqn.primitive.name, eqn.params
  if name == 'cond':
    branches = params['branches']
    platforms = params.get('branches_platforms')
    if platforms:
      chosen = [
        b
        for b, names in zip(branches, platforms)
        if names and platform in names
      ] or [b for b, names in zip(branches, platforms) if names is None]
      return count(chosen[0], platform)
    return max(count(branch, platform) for branch in branches)
  inner = [v for v in params.values() if _is_jaxpr(v)]
  if not inner:
    return 0
  # The first nested program is the one that runs (custom_vjp's forward; a
  # custom_jvp's rule is only traced when differentiated, into the outer one).
  flops = count(inner[0], platform)
  if name == 'scan':
    flops *= params['length']
  elif name == 'shard_map':
    flops *= math.prod(params['mesh'].shape.values())
  elif name == 'pallas_call':
    flops *= math.prod(params['grid_mapping'].grid)
  return flops


def _is_jaxpr(value) -> bool:
  return isinstance(value, (core.Jaxpr, core.ClosedJaxpr))
