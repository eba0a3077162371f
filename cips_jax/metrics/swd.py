"""Multi-scale sliced Wasserstein distance (SWD) between two sets of images.

A metric in the spirit of Karras et al., "Progressive Growing of GANs" (2018),
Appendix D, that needs no pretrained network:

  1. each image set is decomposed into a Laplacian pyramid (5-tap binomial
     [1, 4, 6, 4, 1] / 16 blur, 2x decimation), from the full resolution down
     to `min_resolution` (the coarsest level is the low-pass residual, the
     others are band-pass);
  2. at every level, `patches_per_image` random `patch_size` x `patch_size`
     patches are cut from every image (positions from a seeded numpy RNG) and
     flattened into descriptors;
  3. the descriptors of a level are normalised per colour channel by the mean
     and standard deviation of that level's pixels over the union of both sets
     (the population the patches are drawn from; shared by both sets, so a
     global colour shift still counts);
  4. both descriptor sets (subsampled to equal size) are projected onto
     `num_projections` random unit directions; per direction the two projected
     samples are sorted and the mean absolute difference of the sorted values is
     the 1-D Wasserstein-1 distance; the level's SWD is the mean over
     directions.

Scores are reported x 1e3, as in the literature: one per pyramid level
('swd_32', 'swd_16', ...) and their mean ('swd_mean'). Lower is better; the same
seed gives the same numbers.

    scores = sliced_wasserstein(real, fake, seed=0)
"""

from __future__ import annotations

import concurrent.futures
import os
from typing import Sequence

import numpy as np

from cips_jax import errors

# The 5-tap binomial filter of the Burt-Adelson pyramid (separable; sums to 1).
_BINOMIAL_5 = np.array([1.0, 4.0, 6.0, 4.0, 1.0], np.float32) / 16.0

# Directions are projected in groups of at most this many projected values per
# set, bounding the two (group, M) float32 arrays of projections (32 MiB each).
_GROUP_ELEMENTS = 1 << 23

# Threads sorting projected rows at once (numpy's sort releases the GIL).
_MAX_THREADS = 4

SCALE = 1e3


def _to_float(images: np.ndarray, value_range: Sequence[float]) -> np.ndarray:
  """Images (N, H, W, C) -> float32 in [-1, 1].

  The images are uint8 in [0, 255] or float in `value_range`.
  """
  x = np.asarray(images)
  if x.ndim != 4:
    raise errors.InputError(
      f'expected images of shape (N, H, W, C), got shape {x.shape}'
    )
  if x.dtype == np.uint8:
    return x.astype(np.float32) * np.float32(2.0 / 255.0) - np.float32(1.0)
  lo, hi = (float(v) for v in value_range)
  if not hi > lo:
    raise errors.InputError(
      f'value_range must be (low, high) with high > low, got {value_range}'
    )
  x = x.astype(np.float32)
  return (x - np.float32(lo)) * np.float32(2.0 / (hi - lo)) - np.float32(1.0)


def _blur(x: np.ndarray) -> np.ndarray:
  """Separable 5-tap binomial blur of (N, H, W, C) over H and W.

  Reflect padding; the shape is kept.
  """
  for axis in (1, 2):
    pad = [(0, 0)] * x.ndim
    pad[axis] = (2, 2)
    # numpy's 'reflect' is scipy's mode='mirror', the border of ProGAN's SWD
    # pyramid (and cv2.pyrDown's default).
    xp = np.pad(x, pad, mode='reflect')
    n = x.shape[axis]
    out = np.zeros_like(x)
    for i, w in enumerate(_BINOMIAL_5):
      index = [slice(None)] * x.ndim
      index[axis] = slice(i, i + n)
      out += w * xp[tuple(index)]
    x = out
  return x


def _downsample(x: np.ndarray) -> np.ndarray:
  """Blur then keep every other pixel: (N, H, W, C) -> (N, H/2, W/2, C)."""
  return _blur(x)[:, ::2, ::2]


def _upsample(x: np.ndarray) -> np.ndarray:
  """Zero-insertion then blur: (N, H, W, C) -> (N, 2H, 2W, C).

  The blur is scaled x4 to keep the mean.
  """
  n, h, w, c = x.shape
  y = np.zeros((n, 2 * h, 2 * w, c), x.dtype)
  y[:, ::2, ::2] = x
  return _blur(y) * np.float32(4.0)


def _laplacian_pyramid(x: np.ndarray, num_levels: int) -> list[np.ndarray]:
  """(N, R, R, C) -> [(N, R, R, C), (N, R/2, R/2, C), ...], `num_levels` arrays.

  All but the last are band-pass (x - upsample(downsample(x))); the last is the
  low-pass residual. Summing the upsampled levels back reconstructs x exactly.
  """
  levels = []
  for _ in range(num_levels - 1):
    small = _downsample(x)
    levels.append(x - _upsample(small))
    x = small
  levels.append(x)
  return levels


def _extract_patches(
  level: np.ndarray,
  patches_per_image: int,
  patch_size: int,
  rng: np.random.Generator,
) -> np.ndarray:
  """Random square patches, flattened.

  (N, H, W, C) -> (N * patches_per_image, C * k * k) with k = patch_size
  (entries channel-major, then patch rows, then columns).
  """
  n, h, w, c = level.shape
  ys = rng.integers(0, h - patch_size + 1, size=(n, patches_per_image))
  xs = rng.integers(0, w - patch_size + 1, size=(n, patches_per_image))
  # A strided view, (N, H-k+1, W-k+1, C, k, k): indexing it copies only the
  # chosen patches.
  windows = np.lib.stride_tricks.sliding_window_view(
    level, (patch_size, patch_size), axis=(1, 2)
  )
  patches = windows[np.arange(n)[:, None], ys, xs]  # (N, P, C, k, k)
  return patches.reshape(n * patches_per_image, c * patch_size * patch_size)


def _channel_stats(*levels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Per-channel mean and standard deviation of the pixels of several arrays.

  The statistics are of the union of the pixels of the (N_i, H, W, C) arrays:
  two (C,) float64 arrays (the std floored at 1e-8).
  """
  c = levels[0].shape[-1]
  total = np.zeros(c, np.float64)
  total_sq = np.zeros(c, np.float64)
  count = 0
  for x in levels:
    # Channel-major float64 copies: the sums run along contiguous rows (pairwise
    # summation).
    x = np.moveaxis(x, -1, 0).reshape(c, -1).astype(np.float64)
    total += x.sum(axis=1)
    total_sq += np.square(x).sum(axis=1)
    count += x.shape[1]
  mean = total / count
  # E[x^2] - E[x]^2 can round below 0 for a near-constant channel.
  std = np.sqrt(np.maximum(total_sq / count - mean * mean, 0.0))
  return mean, np.maximum(std, 1e-8)


def _random_directions(
  rng: np.random.Generator, num: int, dim: int
) -> np.ndarray:
  """`num` directions uniform on the unit sphere in R^dim.

  Returns (num, dim) float32.
  """
  # An isotropic Gaussian, normalised, is uniform on the sphere.
  d = rng.standard_normal((num, dim)).astype(np.float32)
  return d / np.linalg.norm(d, axis=1, keepdims=True)


def _sorted_abs_diff_means(pa: np.ndarray, pb: np.ndarray) -> np.ndarray:
  """(p, M), (p, M) -> (p,): mean |sort(pa_i) - sort(pb_i)| of each row.

  Sorts in place.
  """
  # In place, so a group needs no (p, M) arrays beyond its two projections.
  pa.sort(axis=1)
  pb.sort(axis=1)
  np.subtract(pa, pb, out=pa)
  np.abs(pa, out=pa)
  # Pairwise float32 sums along each row.
  return pa.mean(axis=1).astype(np.float64)


def _sliced_distance(
  a: np.ndarray, b: np.ndarray, projections: np.ndarray
) -> float:
  """Sliced Wasserstein-1 distance of two equal-size point sets (unscaled).

  Args:
    a, b: (M, D) point sets with the same M.
    projections: (P, D) directions (unit rows for a true sliced distance).

  Returns:
    mean over the P directions p of mean_i |sort(a @ p)_i - sort(b @ p)_i|.
  """
  a = np.asarray(a, np.float32)
  b = np.asarray(b, np.float32)
  projections = np.asarray(projections, np.float32)
  if a.shape != b.shape or a.ndim != 2:
    raise errors.InputError(
      f'point sets must both be (M, D), got {a.shape} and {b.shape}'
    )
  if projections.ndim != 2 or projections.shape[1] != a.shape[1]:
    raise errors.InputError(
      f'projections must be (P, {a.shape[1]}), got {projections.shape}'
    )
  num = projections.shape[0]
  # Directions per group, so that group * M stays within _GROUP_ELEMENTS.
  group = max(1, min(num, _GROUP_ELEMENTS // max(a.shape[0], 1)))
  workers = min(os.cpu_count() or 1, _MAX_THREADS)
  pool = (
    concurrent.futures.ThreadPoolExecutor(workers)
    if workers > 1 and num > 1
    else None
  )
  try:
    row_means = []
    for start in range(0, num, group):
      p = projections[start : start + group]
      # Project in this thread (BLAS runs its own threads), then sort rows in
      # worker threads: numpy's sort, the bulk of the cost, releases the GIL.
      pa = p @ a.T  # (group, M)
      pb = p @ b.T
      if pool is None:
        row_means.append(_sorted_abs_diff_means(pa, pb))
      else:
        # About 4 blocks per worker, so that uneven blocks still balance.
        bounds = np.linspace(
          0, p.shape[0], min(p.shape[0], 4 * workers) + 1
        ).astype(int)
        blocks = [
          (pa[lo:hi], pb[lo:hi]) for lo, hi in zip(bounds[:-1], bounds[1:])
        ]
        row_means.extend(
          pool.map(lambda block: _sorted_abs_diff_means(*block), blocks)
        )
  finally:
    if pool is not None:
      pool.shutdown()
  # The mean over all directions, whatever the grouping.
  return float(np.concatenate(row_means).sum()) / num


def pyramid_resolutions(
  resolution: int, min_resolution: int = 16, patch_size: int = 7
) -> list[int]:
  """The pyramid levels used for `resolution`-pixel images, finest first.

  For example 64 -> [64, 32, 16]. Levels halve down to `min_resolution`, never
  below `patch_size`; images smaller than `min_resolution` (e.g. 8 px) use a
  single level at their own resolution.
  """
  if resolution < 1 or resolution & (resolution - 1):
    raise errors.InputError(
      f'image size must be a power of two, got {resolution}'
    )
  if resolution < patch_size:
    raise errors.InputError(
      f'image size {resolution} is smaller than patch_size {patch_size}'
    )
  floor = max(min_resolution, patch_size)
  resolutions = [resolution]
  while resolutions[-1] // 2 >= floor:
    resolutions.append(resolutions[-1] // 2)
  return resolutions


def sliced_wasserstein(
  real: np.ndarray,
  fake: np.ndarray,
  *,
  seed: int = 0,
  patches_per_image: int = 128,
  patch_size: int = 7,
  num_projections: int = 512,
  min_resolution: int = 16,
  value_range: Sequence[float] = (-1.0, 1.0),
) -> dict[str, float]:
  """Multi-scale patch sliced Wasserstein distance of two image sets (x 1e3).

  Args:
    real: (N, H, W, C) images, C = 3 usually; uint8 in [0, 255], or float in
      `value_range` (default [-1, 1]; pass value_range=(0, 255) for float images
      in [0, 255]). H = W, a power of two >= patch_size.
    fake: (M, H, W, C) images, same H, W, C and conventions as `real`; M may
      differ from N.
    seed: seeds the patch positions, projection directions and subsampling; a
      given seed always gives the same result, and the real set's patches and
      the directions do not depend on `fake`.
    patches_per_image: random patches cut from every image at every level.
    patch_size: side of the square patches (7 in ProGAN).
    num_projections: random unit directions per level (ProGAN: 4 repeats x 128).
    min_resolution: coarsest pyramid level; images smaller than this use one
      level.
    value_range: (low, high) of float inputs, mapped to [-1, 1]; ignored for
      uint8.

  Returns:
    {'swd_<res>': float for each pyramid level, finest first, ...,
    'swd_mean': float}, each the level's SWD x 1e3; 'swd_mean' is the mean over
    levels.
  """
  real = _to_float(real, value_range)
  fake = _to_float(fake, value_range)
  if real.shape[1:] != fake.shape[1:]:
    raise errors.InputError(
      f'real and fake images differ in shape: {real.shape} vs {fake.shape}'
    )
  if real.shape[0] == 0 or fake.shape[0] == 0:
    raise errors.InputError('both image sets must be non-empty')
  _, h, w, _ = real.shape
  if h != w:
    raise errors.InputError(f'images must be square, got {h}x{w}')
  if patches_per_image < 1 or num_projections < 1:
    raise errors.InputError(
      'patches_per_image and num_projections must be positive'
    )
  resolutions = pyramid_resolutions(h, min_resolution, patch_size)

  # One independent stream per purpose: the real patches and the directions
  # do not change with the fake set.
  real_ss, fake_ss, proj_ss, sub_ss = np.random.SeedSequence(seed).spawn(4)
  real_rng, fake_rng = (
    np.random.default_rng(real_ss),
    np.random.default_rng(fake_ss),
  )
  proj_rng, sub_rng = (
    np.random.default_rng(proj_ss),
    np.random.default_rng(sub_ss),
  )

  real_levels = _laplacian_pyramid(real, len(resolutions))
  fake_levels = _laplacian_pyramid(fake, len(resolutions))
  scores = {}
  for res, real_level, fake_level in zip(resolutions, real_levels, fake_levels):
    # Standardise both sets' pixels per channel by the statistics of their union
    # at this level (what the patches are drawn from), then cut the patch
    # descriptors.
    # ProGAN standardises each set by its own statistics, which hides a global
    # colour shift; one shared standardisation keeps it in the score.
    mean, std = _channel_stats(real_level, fake_level)
    scale = (1.0 / std).astype(np.float32)
    shift = (-mean / std).astype(np.float32)
    a = _extract_patches(
      real_level * scale + shift, patches_per_image, patch_size, real_rng
    )
    b = _extract_patches(
      fake_level * scale + shift, patches_per_image, patch_size, fake_rng
    )
    # Sorting-based W1 pairs the i-th smallest values of the two sets, so both
    # need the same size.
    count = min(a.shape[0], b.shape[0])
    if a.shape[0] > count:
      a = a[np.sort(sub_rng.choice(a.shape[0], count, replace=False))]
    if b.shape[0] > count:
      b = b[np.sort(sub_rng.choice(b.shape[0], count, replace=False))]
    directions = _random_directions(proj_rng, num_projections, a.shape[1])
    scores[f'swd_{res}'] = SCALE * _sliced_distance(a, b, directions)
  scores['swd_mean'] = float(np.mean(list(scores.values())))
  return scores
