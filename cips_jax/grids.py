"""Coordinate grids. Every grid is an array of (x, y) points of shape (..., 2).

Convention (the reference's): `[..., 0]` = x varies along the width (columns),
`[..., 1]` = y varies along the height (rows), and the training grid spans
[-1, 1] with the border pixel centres exactly at +-1. Because a CIPS generator
renders each point on its own, any array of points is a valid "image": denser
grids are super-resolution, grids beyond [-1, 1] extrapolate, a block of a big
grid is a patch of it, and a point cloud is a foveated render.

    # the training grid
    grids.uniform(256, 256)
    # 4x super-resolution of the same square
    grids.scaled(1024, 1024)
    # zoom into a region
    grids.scaled(256, 256, scale=0.25, center=(0.5, -0.5))
    # extrapolate sideways beyond [-1, 1]
    grids.scaled(256, 512, scale=(2.0, 1.0))
    # a block of a big grid
    grids.patch(4096, 4096, top=0, left=1024, height=512, width=512)
    # a 360-degree panorama (cylindrical models)
    grids.cylindrical(256, 1024)
    # (N, 2) points, densest at the fixation point
    points = grids.foveated(20_000, fixation=(0.3, 0.0))
    # back to a viewable image
    image = grids.points_to_image(points, rgb, 256, 256)
"""

from __future__ import annotations

import math
from typing import Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from cips_jax import errors

Pair = Union[float, Sequence[float]]


def _check_size(height: int, width: int) -> None:
  if int(height) != height or int(width) != width or height < 1 or width < 1:
    raise errors.InputError(
      f'grid size must be positive integers, got {height}x{width}'
    )


def _mesh(xs: np.ndarray, ys: np.ndarray) -> jnp.ndarray:
  # indexing='xy': (len(ys), len(xs)) arrays, x varying along the columns.
  x, y = np.meshgrid(
    xs.astype(np.float32), ys.astype(np.float32), indexing='xy'
  )
  return jnp.asarray(np.stack([x, y], axis=-1))


def uniform(height: int, width: int) -> jnp.ndarray:
  """The reference's training/evaluation grid (height, width, 2).

  Both axes are linspace(-1, 1). Unlike the reference's
  `convert_to_coord_format`, non-square grids work.
  """
  _check_size(height, width)
  # float32 linspace, as `data.pipeline.coordinate_grid` (bit-identical), which
  # gives the training batches their coordinates.
  return _mesh(
    np.linspace(-1.0, 1.0, width, dtype=np.float32),
    np.linspace(-1.0, 1.0, height, dtype=np.float32),
  )


def _pair(value: Pair, name: str) -> tuple[float, float]:
  values = (value, value) if np.ndim(value) == 0 else tuple(value)
  if len(values) != 2:
    raise errors.InputError(
      f'{name} must be a number or an (x, y) pair, got {value!r}'
    )
  return float(values[0]), float(values[1])


def scaled(
  height: int, width: int, scale: Pair = 1.0, center: Pair = (0.0, 0.0)
) -> jnp.ndarray:
  """A (height, width, 2) grid over the rectangle center +- scale.

  The border pixel centres lie on the rectangle's edges. scale = 1, center = 0
  is `uniform` at any density (height, width larger than the training size
  render super-resolution); scale < 1 zooms into a region; scale > 1
  extrapolates beyond the square the model was trained on. `scale` and `center`
  are numbers or (x, y).
  """
  _check_size(height, width)
  (sx, sy), (cx, cy) = _pair(scale, 'scale'), _pair(center, 'center')
  if sx <= 0 or sy <= 0:
    raise errors.InputError(f'scale must be positive, got {scale!r}')
  # float64 up to _mesh's one cast, as numpy's float32 linspace computes too:
  # scale 1, center 0 gives `uniform`'s points exactly.
  xs = cx + sx * np.linspace(-1.0, 1.0, width, dtype=np.float64)
  ys = cy + sy * np.linspace(-1.0, 1.0, height, dtype=np.float64)
  return _mesh(xs, ys)


def patch(
  full_height: int,
  full_width: int,
  top: int,
  left: int,
  height: int,
  width: int,
) -> jnp.ndarray:
  """A block of `uniform(full_height, full_width)`.

  Rows top..top+height, columns left..left+width. The points are bit-identical
  to that block of the full grid, so patches rendered one by one tile the full
  render exactly; the full grid itself is never built.
  """
  _check_size(full_height, full_width)
  _check_size(height, width)
  if (
    top < 0
    or left < 0
    or top + height > full_height
    or left + width > full_width
  ):
    raise errors.InputError(
      f'patch rows {top}:{top + height}, columns {left}:{left + width} lie '
      f'outside the {full_height}x{full_width} grid'
    )
  # Slices of the full grid's linspace: a linspace over the block's own range
  # could round differently.
  xs = np.linspace(-1.0, 1.0, full_width, dtype=np.float32)[left : left + width]
  ys = np.linspace(-1.0, 1.0, full_height, dtype=np.float32)[top : top + height]
  return _mesh(xs, ys)


def cylindrical(height: int, width: int, start: float = -1.0) -> jnp.ndarray:
  """A 360-degree panorama grid (height, width, 2).

  For models built with cylindrical=True. x is an angle in units of pi: column c
  sits at x = start + 2c / width, so the columns cover the circle once and the
  last column's right-hand neighbour is the first column (x + 2 is the same
  place). y = linspace(-1, 1, height). Any width renders the same panorama at a
  different horizontal density; `start` turns the view.
  """
  _check_size(height, width)
  # arange / width, not linspace: the last column stops one step short of
  # start + 2, the first column's twin. y matches `uniform`'s rows.
  xs = start + 2.0 * np.arange(width, dtype=np.float64) / width
  return _mesh(xs, np.linspace(-1.0, 1.0, height, dtype=np.float32))


def foveated(
  num_points: int, fixation: Pair = (0.0, 0.0), falloff: float = 1.0
) -> jnp.ndarray:
  """About num_points (x, y) points in [-1, 1]^2, densest at `fixation`.

  Returns (N, 2), N <= num_points. The points follow a golden-angle (Vogel)
  spiral around the fixation point whose radius is warped so that the density of
  points falls off as r^-falloff with the distance r from it (falloff 0:
  uniform; 1: a density ~ 1 / r, as in a retina; must be < 2). The spiral covers
  the disc that contains the whole square; points outside the square are
  dropped. Deterministic: the same arguments give the same points.
  """
  if num_points < 1:
    raise errors.InputError(f'num_points must be positive, got {num_points}')
  if not 0.0 <= falloff < 2.0:
    raise errors.InputError(f'falloff must be in [0, 2), got {falloff}')
  fx, fy = _pair(fixation, 'fixation')
  if abs(fx) > 1 or abs(fy) > 1:
    raise errors.InputError(f'fixation must lie in [-1, 1]^2, got {fixation!r}')
  # The farthest corner: the spiral's disc then covers the whole square.
  radius = max(math.hypot(cx - fx, cy - fy) for cx in (-1, 1) for cy in (-1, 1))
  i = np.arange(num_points, dtype=np.float64)
  # N(r) ~ r^(2 - falloff) points within radius r gives a density ~ r^-falloff.
  r = radius * ((i + 0.5) / num_points) ** (1.0 / (2.0 - falloff))
  # The golden angle, pi (3 - sqrt 5): no two points share a direction.
  theta = i * math.pi * (3.0 - math.sqrt(5.0))
  points = np.stack([fx + r * np.cos(theta), fy + r * np.sin(theta)], axis=-1)
  inside = np.all(np.abs(points) <= 1.0, axis=-1)
  return jnp.asarray(points[inside].astype(np.float32))


def points_to_image(
  points, values, height: int, width: int, chunk_size: int = 4096
) -> np.ndarray:
  """Fills a (height, width) image from values at scattered points.

  The nearest point wins.

  Args:
    points: (N, 2) coordinates in the `uniform` convention.
    values: (N, C) or (B, N, C) values at the points (e.g. rendered RGB).
    height, width: the output grid, `uniform(height, width)`.
  Returns:
    (height, width, C) or (B, height, width, C) numpy array: every pixel takes
    the value of the nearest point (a Voronoi mosaic), so sparse regions show as
    larger cells.
  """
  points = jnp.asarray(points, jnp.float32)
  values = np.asarray(values)
  if points.ndim != 2 or points.shape[-1] != 2:
    raise errors.InputError(f'points must be (N, 2), got {points.shape}')
  if values.shape[-2] != points.shape[0]:
    raise errors.InputError(
      f'values {values.shape} do not match {points.shape[0]} points'
    )
  pixels = np.asarray(uniform(height, width)).reshape(-1, 2)
  # Squared distances suffice for the argmin; chunks bound the (chunk, N)
  # distance matrix.
  nearest = jax.jit(
    lambda p: jnp.argmin(
      jnp.sum((p[:, None, :] - points[None, :, :]) ** 2, axis=-1), axis=1
    )
  )
  index = np.concatenate(
    [
      np.asarray(nearest(pixels[i : i + chunk_size]))
      for i in range(0, len(pixels), chunk_size)
    ]
  )
  # Axis -2 is the point axis of both (N, C) and (B, N, C).
  out = np.take(values, index, axis=-2)
  return out.reshape(*values.shape[:-2], height, width, values.shape[-1])
