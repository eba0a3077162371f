"""Coordinate grids. Every grid is an array of (x, y) points of shape (..., 2).

Convention (the reference's): `[..., 0]` = x varies along the width (columns), `[..., 1]` = y
varies along the height (rows), and the training grid spans [-1, 1] with the border pixel
centres exactly at +-1.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np


def uniform(height: int, width: int) -> jnp.ndarray:
  """The reference's training/evaluation grid: (height, width, 2), both axes linspace(-1, 1).

  Unlike the reference's `convert_to_coord_format`, non-square grids work.
  """
  if height < 1 or width < 1:
    raise ValueError(f'grid size must be positive, got {height}x{width}')
  xs = np.linspace(-1.0, 1.0, width, dtype=np.float32)
  ys = np.linspace(-1.0, 1.0, height, dtype=np.float32)
  x, y = np.meshgrid(xs, ys, indexing='xy')
  return jnp.asarray(np.stack([x, y], axis=-1))
