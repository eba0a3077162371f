"""Per-pixel input encodings of CIPS.

Learned Fourier features and the coordinate embedding.

Both are written for one pixel `xy = (x, y)` (x along the width, y along the
height, the training grid spanning [-1, 1] with the border pixel centres at
+-1).

Coordinate-embedding lookup modes (the table is `(size, size, C)`, indexed
`[row=y, col=x]`):
- 'bilinear': the reference's evaluation path,
  `F.grid_sample(..., mode='bilinear', padding_mode='border',
  align_corners=False)`. Pixel position `((c + 1) * size - 1) / 2`, clamped to
  the border. Every released checkpoint's FID was measured this way.
- 'table': the reference's training path on the full grid, which reads the table
  directly. Written per pixel it is the nearest table entry at
  `(c + 1) / 2 * (size - 1)`; on the training grid that is exactly the entry of
  the pixel.
- 'aligned': bilinear with `align_corners=True` semantics: equal to 'table' on
  the training grid and smooth in between, for models trained to be consistent
  between the two.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from cips_jax import errors

Array = jax.Array

EMBEDDING_MODES = ('bilinear', 'table', 'aligned')


def _uniform_init(bound: float):
  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


class FourierFeatures(nn.Module):
  """Learned Fourier features sin(xy @ B + c) (the reference's LFF).

  Not an equalized layer: B ~ U(-sqrt(9/n), sqrt(9/n)) for n inputs (SIREN's
  first-layer init) and c ~ U(-1/sqrt(n), 1/sqrt(n)) (PyTorch's default Conv2d
  bias), both trained at the raw learning rate, as in the reference.

  With `cylindrical`, x is an angle (x = -1 and x = 1 are the same place, 360
  degrees apart) and the features see (cos(pi x), sin(pi x), y): every learned
  frequency is then periodic in x, so a panorama closes without a seam.
  """

  features: int
  cylindrical: bool = False

  @nn.compact
  def __call__(self, xy: Array) -> Array:
    """xy: (..., 2) -> (..., features)."""
    if self.cylindrical:
      # cos and sin of the angle are continuous where x jumps from 1 to -1.
      angle = jnp.pi * xy[..., 0]
      xy = jnp.stack([jnp.cos(angle), jnp.sin(angle), xy[..., 1]], axis=-1)
    # 2, or 3 with the cylindrical input: the init bounds follow it.
    fan_in = xy.shape[-1]
    # (in, out): the reference's (out, in, 1, 1) `lff.ffm.conv.weight`,
    # squeezed and transposed.
    kernel = self.param(
      'kernel', _uniform_init(math.sqrt(9.0 / fan_in)), (fan_in, self.features)
    )
    bias = self.param(
      'bias', _uniform_init(1.0 / math.sqrt(fan_in)), (self.features,)
    )
    # No cosine branch: the learned phase can make one (docs/reference.md 1.1).
    return jnp.sin(xy @ kernel + bias)


def _grid_position(
  coord: Array, size: int, align_corners: bool, periodic: bool = False
) -> Array:
  """Continuous table position of a coordinate in [-1, 1] (not clamped).

  `periodic`: [-1, 1) covers the table once around a cylinder (period `size`),
  so aligned positions are c = (x + 1) / 2 * size (pixel centres at
  x = -1 + 2c / size) and the reference-like ones are shifted by half a cell, as
  align_corners=False is.
  """
  if periodic:
    # x + 2 lands `size` further on: the same entry once wrapped.
    return (coord + 1.0) * 0.5 * size - (0.0 if align_corners else 0.5)
  if align_corners:
    # -1 and 1 are the centres of the first and last entries.
    return (coord + 1.0) * 0.5 * (size - 1)
  # PyTorch's unnormalisation for align_corners=False: entry k's centre is at
  # c = (2k + 1) / size - 1, so -1 and 1 are the table's outer edges.
  return ((coord + 1.0) * size - 1.0) * 0.5


def _wrapped_or_clamped(index: Array, size: int, wrap: bool) -> Array:
  return jnp.mod(index, size) if wrap else jnp.clip(index, 0, size - 1)


def _bilinear_lookup(
  table: Array, xy: Array, align_corners: bool = False, wrap_x: bool = False
) -> Array:
  """Bilinear read of `table` (H, W, C) at one point `xy` (2,) -> (C,).

  Positions are clamped to the border (grid_sample's padding_mode='border');
  with `wrap_x` the x axis is periodic instead (for tables that close into a
  cylinder).
  """
  table = jnp.asarray(table)
  height, width = table.shape[0], table.shape[1]
  px = _grid_position(xy[0], width, align_corners, periodic=wrap_x)
  py = _grid_position(xy[1], height, align_corners)
  # Clamping the position, not the indices, is grid_sample's 'border' padding:
  # points beyond the border read the border entry (docs/reference.md 2).
  if not wrap_x:
    px = jnp.clip(px, 0.0, width - 1)
  py = jnp.clip(py, 0.0, height - 1)
  # floor, not truncation: wrapped positions below 0 still get weights in
  # [0, 1).
  x0f, y0f = jnp.floor(px), jnp.floor(py)
  wx, wy = px - x0f, py - y0f
  col, row = x0f.astype(jnp.int32), y0f.astype(jnp.int32)
  x0 = _wrapped_or_clamped(col, width, wrap_x)
  # At px = width - 1 the clamped x1 repeats x0, with weight wx = 0.
  x1 = _wrapped_or_clamped(col + 1, width, wrap_x)
  # y never wraps: a cylinder closes along x only.
  y0 = _wrapped_or_clamped(row, height, False)
  y1 = _wrapped_or_clamped(row + 1, height, False)
  top = table[y0, x0] * (1.0 - wx) + table[y0, x1] * wx
  bottom = table[y1, x0] * (1.0 - wx) + table[y1, x1] * wx
  return top * (1.0 - wy) + bottom * wy


def _nearest_lookup(table: Array, xy: Array, wrap_x: bool = False) -> Array:
  """The table entry nearest to `xy` on the align_corners=True grid.

  Returns `table[row, col]` (C,).
  """
  table = jnp.asarray(table)
  height, width = table.shape[0], table.shape[1]
  # round, not floor: on the training grid the positions are integers up to
  # float32 error, and each pixel must get its own entry (docs/reference.md 2).
  col = jnp.round(_grid_position(xy[0], width, True, periodic=wrap_x)).astype(
    jnp.int32
  )
  row = jnp.round(_grid_position(xy[1], height, True)).astype(jnp.int32)
  return table[
    _wrapped_or_clamped(row, height, False),
    _wrapped_or_clamped(col, width, wrap_x),
  ]


def lookup_embedding(
  table: Array, xy: Array, mode: str, wrap_x: bool = False
) -> Array:
  """Reads the coordinate embedding of one pixel in a mode of `EMBEDDING_MODES`.

  The modes are described in the module docstring.
  """
  if mode == 'bilinear':
    return _bilinear_lookup(table, xy, align_corners=False, wrap_x=wrap_x)
  if mode == 'aligned':
    return _bilinear_lookup(table, xy, align_corners=True, wrap_x=wrap_x)
  if mode == 'table':
    return _nearest_lookup(table, xy, wrap_x=wrap_x)
  raise errors.InputError(
    f'embedding_mode must be one of {EMBEDDING_MODES}, got {mode!r}'
  )
