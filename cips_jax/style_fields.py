"""Per-pixel style fields: which of K latents each pixel takes.

The fields have soft borders. A style field is a (..., K) array of non-negative
weights summing to 1 over K; with K styles ws (B, K, D),
`sampling.synthesize(gen, variables, ws, coords, mix=field[None])` renders every
pixel with the mixture sum_k field_k ws_k. The generator blends styles inside
each layer (per-pixel modulation), so this never builds a copy of the model per
style.

    # (H, W, 2)
    field = style_fields.from_masks([sky_mask, ground_mask], softness=4.0)
    # (H, W, 3)
    field = style_fields.from_labels(label_map, num_styles=3, softness=2.0)
    # left | right
    field = style_fields.halves(256, 256, softness=8.0)
    # panorama A -> B
    field = style_fields.around_cylinder(64, 512, width_fraction=0.25)
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from cips_jax import errors


def _gaussian_kernel(sigma: float) -> np.ndarray:
  # 3 sigma holds 99.7% of the mass; renormalised below so that a field summing
  # to 1 over K still does after the blur.
  radius = max(1, int(math.ceil(3.0 * sigma)))
  x = np.arange(-radius, radius + 1, dtype=np.float64)
  kernel = np.exp(-0.5 * (x / sigma) ** 2)
  return kernel / kernel.sum()


def _blur(field: np.ndarray, sigma: float, wrap_x: bool) -> np.ndarray:
  """Separable Gaussian blur of (H, W, K) over H and W.

  The edges are replicated, or wrapped in x.
  """
  kernel = _gaussian_kernel(sigma)
  radius = len(kernel) // 2
  for axis in (0, 1):
    mode = 'wrap' if (wrap_x and axis == 1) else 'edge'
    pad = [(0, 0)] * field.ndim
    pad[axis] = (radius, radius)
    padded = np.pad(field, pad, mode=mode)
    length = field.shape[axis]
    # One shifted view per tap: a vectorised 1-D convolution along `axis`.
    field = sum(
      k * np.take(padded, np.arange(i, i + length), axis=axis)
      for i, k in enumerate(kernel)
    )
  return field


def from_masks(
  masks: Sequence[np.ndarray] | np.ndarray,
  softness: float = 0.0,
  wrap_x: bool = False,
) -> np.ndarray:
  """K region masks (K, H, W) -> a style field (H, W, K).

  Masks may be boolean or soft and may overlap or leave holes: each pixel's
  weights are normalised to sum to 1, and a pixel no mask covers takes the
  styles equally. softness is the standard deviation, in pixels, of a Gaussian
  blur that feathers the borders (0: hard borders); wrap_x blurs across the
  left/right edge, for panoramas.
  """
  masks = np.asarray(masks, np.float64)
  if masks.ndim != 3 or masks.shape[0] < 1:
    raise errors.InputError(f'masks must be (K, H, W), got shape {masks.shape}')
  if np.any(masks < 0) or not np.all(np.isfinite(masks)):
    raise errors.InputError('masks must be finite and non-negative')
  if softness < 0:
    raise errors.InputError(f'softness must be >= 0, got {softness}')
  field = np.moveaxis(masks, 0, -1)
  if softness > 0:
    field = _blur(field, softness, wrap_x)
  total = field.sum(axis=-1, keepdims=True)
  uncovered = total <= 1e-12
  # Dividing by 1 where uncovered keeps the discarded branch of `where` finite.
  field = np.where(
    uncovered, 1.0 / field.shape[-1], field / np.where(uncovered, 1.0, total)
  )
  return field.astype(np.float32)


def from_labels(
  labels: np.ndarray,
  num_styles: int,
  softness: float = 0.0,
  wrap_x: bool = False,
) -> np.ndarray:
  """An integer label map (H, W) -> a style field (H, W, K).

  The labels are in [0, num_styles).
  """
  labels = np.asarray(labels)
  if not np.issubdtype(labels.dtype, np.integer):
    raise errors.InputError(f'labels must be integers, got {labels.dtype}')
  if labels.size and (labels.min() < 0 or labels.max() >= num_styles):
    raise errors.InputError(
      f'labels must lie in [0, {num_styles}), got [{labels.min()}, '
      f'{labels.max()}]'
    )
  # One-hot masks (K, H, W): a label map is a set of disjoint regions.
  masks = labels[None] == np.arange(num_styles)[:, None, None]
  return from_masks(masks, softness, wrap_x)


def halves(height: int, width: int, softness: float = 0.0) -> np.ndarray:
  """Left half style 0, right half style 1: (H, W, 2).

  The border is feathered by `softness` pixels.
  """
  left = np.zeros((height, width), bool)
  left[:, : width // 2] = True
  return from_masks([left, ~left], softness)


def around_cylinder(
  height: int, width: int, width_fraction: float = 0.25, start: float = -1.0
) -> np.ndarray:
  """Two styles around a 360-degree panorama: (H, W, 2).

  For `grids.cylindrical(H, W, start)`. Style 0 holds around the angle
  x = start, style 1 on the opposite side, and the weight changes smoothly in
  between, twice (once on each way round). width_fraction is the part of the
  circle each transition takes. The field is periodic in x, so the blended
  panorama still closes without a seam.
  """
  if not 0.0 < width_fraction <= 0.5:
    raise errors.InputError(
      f'width_fraction must be in (0, 0.5], got {width_fraction}'
    )
  # The columns of grids.cylindrical(height, width, start).
  x = start + 2.0 * np.arange(width) / width
  # The distance (in turns, 0..0.5) of each column from the start angle, around
  # the circle.
  turns = np.abs(((x - start) / 2.0 + 0.5) % 1.0 - 0.5)
  # 0 at distance <= 0.25 - f/2, 1 at distance >= 0.25 + f/2, a cosine ramp in
  # between.
  ramp = np.clip(
    (turns - (0.25 - width_fraction / 2)) / width_fraction, 0.0, 1.0
  )
  weight = 0.5 - 0.5 * np.cos(np.pi * ramp)
  field = np.stack([1.0 - weight, weight], axis=-1)
  return np.broadcast_to(field[None], (height, width, 2)).astype(np.float32)
