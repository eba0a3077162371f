"""Differentiable augmentation of what D sees (DiffAugment, Zhao et al. 2020).

    pixels, coords = augment.diff_augment(pixels, coords, key, ('color',))

The training step applies the same policy to the real images and to G's
images, in D's loss and in G's, each batch with its own random draws; every
operation is differentiable in the pixels, so G's gradient flows through it.
Three policies, each drawn per image:

- 'color': brightness + U(-0.5, 0.5); saturation, the deviation from the
  pixel's channel mean scaled by U(0, 2); contrast, the deviation from the
  image's mean scaled by U(0.5, 1.5). Pixels in [-1, 1] as the data gives them.
  Coordinates unchanged.
- 'translation': the image moved by a whole number of pixels, up to 1/8 of
  its side each way (rounded), zeros where nothing moved in. Coordinates move
  with their pixels; where zeros moved in, the grid continues linearly past its
  edge, so every position keeps the coordinate of the point it shows.
- 'cutout': a square of half the side (rounded) set to zero, its centre
  uniform over the image (it may hang over an edge). Coordinates unchanged: the
  hidden pixels are still where they were.

The ratios (1/8, 1/2) and ranges are DiffAugment's published defaults.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp

Array = jax.Array

POLICIES = ('color', 'translation', 'cutout')
TRANSLATION_RATIO = 1 / 8
CUTOUT_RATIO = 1 / 2


def parse_policy(text: str) -> tuple[str, ...]:
  """'color,translation' -> ('color', 'translation'); '' -> () (off).

  Raises ValueError naming an unknown or repeated policy.
  """
  names = tuple(name.strip() for name in text.split(',') if name.strip())
  unknown = [name for name in names if name not in POLICIES]
  if unknown:
    raise ValueError(
      f'unknown augmentation {", ".join(map(repr, unknown))}: the policies '
      f'are {", ".join(POLICIES)}, comma-separated'
    )
  if len(set(names)) != len(names):
    raise ValueError(f'an augmentation is named twice in {text!r}')
  return names


def diff_augment(
  pixels: Array, coords: Array, key: Array, policy: Sequence[str]
) -> tuple[Array, Array]:
  """The images augmented by `policy`, in its order, with draws from `key`.

  Args:
    pixels: (B, H, W, 3) in [-1, 1].
    coords: (B, H, W, 2), the pixels' coordinates.
    key: a PRNG key; each policy folds in its own index.
    policy: names from POLICIES (`parse_policy`); () returns the inputs.
  Returns:
    (pixels, coords) of the same shapes and dtypes.
  """
  for index, name in enumerate(policy):
    step_key = jax.random.fold_in(key, index)
    if name == 'color':
      pixels = color(pixels, step_key)
    elif name == 'translation':
      pixels, coords = translation(pixels, coords, step_key)
    elif name == 'cutout':
      pixels = cutout(pixels, step_key)
    else:
      raise ValueError(f'unknown augmentation {name!r}')
  return pixels, coords


def _per_image(key: Array, batch: int, low: float, high: float, dtype):
  """(B, 1, 1, 1) uniform draws in [low, high)."""
  draws = jax.random.uniform(key, (batch, 1, 1, 1), minval=low, maxval=high)
  return draws.astype(dtype)


def color(pixels: Array, key: Array) -> Array:
  """Brightness, saturation and contrast, each drawn per image (B, H, W, 3)."""
  batch = pixels.shape[0]
  brightness, saturation, contrast = jax.random.split(key, 3)
  pixels = pixels + _per_image(brightness, batch, -0.5, 0.5, pixels.dtype)
  mean = jnp.mean(pixels, axis=-1, keepdims=True)
  pixels = (pixels - mean) * _per_image(
    saturation, batch, 0.0, 2.0, pixels.dtype
  ) + mean
  mean = jnp.mean(pixels, axis=(1, 2, 3), keepdims=True)
  return (pixels - mean) * _per_image(
    contrast, batch, 0.5, 1.5, pixels.dtype
  ) + mean


def max_shift(side: int) -> int:
  """The largest translation, in pixels, of an image `side` pixels across."""
  return int(side * TRANSLATION_RATIO + 0.5)


def _extended(coords: Array, pad: int, axis: int) -> Array:
  """`coords` with `pad` positions more on both ends of `axis`, continuing
  the first and the last step linearly."""
  n = coords.shape[axis]
  first = jax.lax.slice_in_dim(coords, 0, 1, axis=axis)
  last = jax.lax.slice_in_dim(coords, n - 1, n, axis=axis)
  if n > 1:
    step_in = jax.lax.slice_in_dim(coords, 1, 2, axis=axis) - first
    step_out = last - jax.lax.slice_in_dim(coords, n - 2, n - 1, axis=axis)
  else:
    step_in = step_out = jnp.zeros_like(first)
  shape = [1] * coords.ndim
  shape[axis] = pad
  ramp = jnp.arange(1, pad + 1, dtype=coords.dtype).reshape(shape)
  before = first - jnp.flip(ramp, axis) * step_in
  after = last + ramp * step_out
  return jnp.concatenate([before, coords, after], axis=axis)


def translation(
  pixels: Array, coords: Array, key: Array
) -> tuple[Array, Array]:
  """Each image moved by (dy, dx) whole pixels, |d| <= max_shift(side).

  Output position p shows input position p - (dy, dx): its pixel, or zeros
  where that lies outside, and that point's coordinate (the grid continued
  linearly outside).
  """
  batch, height, width, _ = pixels.shape
  pad_y, pad_x = max_shift(height), max_shift(width)
  key_y, key_x = jax.random.split(key)
  dy = jax.random.randint(key_y, (batch,), -pad_y, pad_y + 1)
  dx = jax.random.randint(key_x, (batch,), -pad_x, pad_x + 1)
  padded_pixels = jnp.pad(
    pixels, ((0, 0), (pad_y, pad_y), (pad_x, pad_x), (0, 0))
  )
  padded_coords = _extended(_extended(coords, pad_y, 1), pad_x, 2)

  def window(image, y, x):
    # Output row r reads padded row r + pad_y - dy.
    start = (pad_y - y, pad_x - x, 0)
    return jax.lax.dynamic_slice(image, start, (height, width, image.shape[-1]))

  moved = jax.vmap(window)
  return moved(padded_pixels, dy, dx), moved(padded_coords, dy, dx)


def cutout_side(side: int) -> int:
  """The side of the cut-out square of an image `side` pixels across."""
  return int(side * CUTOUT_RATIO + 0.5)


def cutout(pixels: Array, key: Array) -> Array:
  """Each image with a zeroed square of cutout_side(H) x cutout_side(W)."""
  batch, height, width, _ = pixels.shape
  cut_h, cut_w = cutout_side(height), cutout_side(width)
  key_y, key_x = jax.random.split(key)
  # The square's centre, uniform over the image (DiffAugment's range).
  cy = jax.random.randint(key_y, (batch, 1, 1), 0, height + 1 - cut_h % 2)
  cx = jax.random.randint(key_x, (batch, 1, 1), 0, width + 1 - cut_w % 2)
  rows = jnp.arange(height)[None, :, None]
  cols = jnp.arange(width)[None, None, :]
  top, left = cy - cut_h // 2, cx - cut_w // 2
  inside = (
    (rows >= top)
    & (rows < top + cut_h)
    & (cols >= left)
    & (cols < left + cut_w)
  )
  return jnp.where(inside[..., None], jnp.zeros((), pixels.dtype), pixels)
