"""Tests of cips_jax.metrics.swd: behaviour on image sets and independent 1-D
checks.
"""

from __future__ import annotations

import numpy as np
import pytest

from cips_jax.metrics import sliced_wasserstein
from cips_jax.metrics import swd

# Cheaper than the defaults, still far from the noise floor in the comparisons
# below.
FAST = dict(patches_per_image=64, num_projections=256)


def smooth_images(n: int, size: int = 32, seed: int = 0) -> np.ndarray:
  """(n, size, size, 3) float32 in [-1, 1]: sums of random coloured sine
  gratings.
  """
  rng = np.random.default_rng(seed)
  yy, xx = np.meshgrid(np.arange(size), np.arange(size), indexing='ij')
  xx, yy = xx[None, :, :, None], yy[None, :, :, None]
  img = np.zeros((n, size, size, 3), np.float32)
  for _ in range(4):
    freq = rng.uniform(0.5, 4.0, (n, 1, 1, 1)) * 2 * np.pi / size
    theta = rng.uniform(0, 2 * np.pi, (n, 1, 1, 1))
    phase = rng.uniform(0, 2 * np.pi, (n, 1, 1, 1))
    amp = rng.uniform(0.0, 0.5, (n, 1, 1, 3))
    img += amp * np.sin(
      freq * (np.cos(theta) * xx + np.sin(theta) * yy) + phase
    )
  return np.tanh(img + rng.uniform(-0.3, 0.3, (n, 1, 1, 3))).astype(np.float32)


@pytest.fixture(scope='module')
def halves():
  images = smooth_images(256)
  return images[:128], images[128:]


@pytest.fixture(scope='module')
def same_score(halves):
  real, fake = halves
  return sliced_wasserstein(real, fake, **FAST)


def wasserstein_1d_cdf(x: np.ndarray, y: np.ndarray) -> float:
  """W1 of two 1-D empirical distributions as the integral of |F_x - F_y| (no
  pairing).
  """
  points = np.sort(np.concatenate([x, y]))
  cdf_x = np.searchsorted(np.sort(x), points[:-1], side='right') / len(x)
  cdf_y = np.searchsorted(np.sort(y), points[:-1], side='right') / len(y)
  return float(np.sum(np.abs(cdf_x - cdf_y) * np.diff(points)))


def test_keys_and_levels(same_score):
  assert list(same_score) == ['swd_32', 'swd_16', 'swd_mean']
  assert same_score['swd_mean'] == pytest.approx(
    (same_score['swd_32'] + same_score['swd_16']) / 2
  )
  assert all(np.isfinite(v) and v > 0 for v in same_score.values())


def test_pyramid_resolutions():
  assert swd.pyramid_resolutions(128) == [128, 64, 32, 16]
  assert swd.pyramid_resolutions(16) == [16]
  assert swd.pyramid_resolutions(8) == [8]
  assert swd.pyramid_resolutions(64, min_resolution=32) == [64, 32]
  assert swd.pyramid_resolutions(32, min_resolution=4, patch_size=7) == [
    32,
    16,
    8,
  ]
  with pytest.raises(ValueError):
    swd.pyramid_resolutions(48)
  with pytest.raises(ValueError):
    swd.pyramid_resolutions(4)


def test_laplacian_pyramid_reconstructs():
  x = (
    np.random.default_rng(0).standard_normal((2, 32, 32, 3)).astype(np.float32)
  )
  levels = swd._laplacian_pyramid(x, 3)
  assert [level.shape for level in levels] == [
    (2, 32, 32, 3),
    (2, 16, 16, 3),
    (2, 8, 8, 3),
  ]
  recon = levels[-1]
  for level in levels[-2::-1]:
    recon = level + swd._upsample(recon)
  np.testing.assert_allclose(recon, x, atol=1e-5)
  # A constant image is all low-pass: band-pass levels vanish, the residual
  # keeps the value.
  const = np.full((1, 16, 16, 3), 0.25, np.float32)
  band, low = swd._laplacian_pyramid(const, 2)
  np.testing.assert_allclose(band, 0.0, atol=1e-6)
  np.testing.assert_allclose(low, 0.25, atol=1e-6)


def test_same_distribution_much_smaller_than_different(halves, same_score):
  real, fake = halves
  blurred = fake
  for _ in range(4):
    blurred = swd._blur(blurred)
  shifted = np.clip(fake + np.array([0.3, 0.0, -0.3], np.float32), -1, 1)
  noisy = np.clip(
    fake + 0.2 * np.random.default_rng(1).standard_normal(fake.shape), -1, 1
  )
  uniform = (
    np.random.default_rng(2).uniform(-1, 1, fake.shape).astype(np.float32)
  )
  base = same_score['swd_mean']
  for name, other in [
    ('blurred', blurred),
    ('shifted', shifted),
    ('noisy', noisy),
    ('uniform noise', uniform),
  ]:
    score = sliced_wasserstein(real, other, **FAST)['swd_mean']
    assert score > 3 * base, (name, score, base)


def test_grows_monotonically_with_noise(halves, same_score):
  real, fake = halves
  noise = (
    np.random.default_rng(3).standard_normal(fake.shape).astype(np.float32)
  )
  means, finest = [same_score['swd_mean']], [same_score['swd_32']]
  for sigma in (0.05, 0.1, 0.2):
    score = sliced_wasserstein(
      real, np.clip(fake + sigma * noise, -1, 1), **FAST
    )
    means.append(score['swd_mean'])
    finest.append(score['swd_32'])
  assert np.all(np.diff(means) > 0), means
  assert np.all(np.diff(finest) > 0), finest


def test_deterministic_for_a_seed(halves, same_score):
  real, fake = halves
  again = sliced_wasserstein(real, fake, **FAST)
  assert again == same_score
  other_seed = sliced_wasserstein(real, fake, seed=1, **FAST)
  assert other_seed != same_score
  # ... but only sampling noise apart.
  assert other_seed['swd_mean'] == pytest.approx(
    same_score['swd_mean'], rel=0.3
  )


def test_uint8_and_float_conventions_agree():
  images = smooth_images(24, size=16, seed=5)
  as_uint8 = np.round((images + 1) * 127.5).astype(np.uint8)
  as_float = as_uint8.astype(np.float32) / 127.5 - 1
  other = np.round((smooth_images(24, size=16, seed=6) + 1) * 127.5).astype(
    np.uint8
  )
  kwargs = dict(patches_per_image=16, num_projections=64)
  a = sliced_wasserstein(as_uint8, other, **kwargs)
  b = sliced_wasserstein(
    as_float, other.astype(np.float32) / 127.5 - 1, **kwargs
  )
  c = sliced_wasserstein(
    as_uint8.astype(np.float32),
    other.astype(np.float32),
    value_range=(0, 255),
    **kwargs,
  )
  for key in a:
    assert b[key] == pytest.approx(a[key], rel=1e-4)
    assert c[key] == pytest.approx(a[key], rel=1e-4)


def test_small_and_large_images_and_unequal_counts():
  rng = np.random.default_rng(0)
  tiny = sliced_wasserstein(
    rng.uniform(-1, 1, (10, 8, 8, 3)),
    rng.uniform(-1, 1, (6, 8, 8, 3)),
    patches_per_image=8,
    num_projections=32,
  )
  assert (
    list(tiny) == ['swd_8', 'swd_mean'] and tiny['swd_8'] == tiny['swd_mean']
  )
  big = sliced_wasserstein(
    smooth_images(3, 64),
    smooth_images(5, 64, seed=1),
    patches_per_image=8,
    num_projections=32,
  )
  assert list(big) == ['swd_64', 'swd_32', 'swd_16', 'swd_mean']
  with pytest.raises(ValueError):
    sliced_wasserstein(smooth_images(2, 32), smooth_images(2, 16))
  with pytest.raises(ValueError):
    sliced_wasserstein(np.zeros((2, 32, 16, 3)), np.zeros((2, 32, 16, 3)))


def test_sliced_distance_hand_example():
  a = np.array([[0.0], [1.0], [2.0]])
  b = np.array([[3.0], [2.0], [1.0]])
  # Sorted: [0, 1, 2] vs [1, 2, 3]: every pair is 1 apart.
  assert swd._sliced_distance(a, b, np.array([[1.0]])) == pytest.approx(1.0)
  # In 2-D along the axes: x-coordinates {0, 4} vs {1, 1} -> (1 + 3) / 2 = 2;
  # y-coordinates {0, 0} vs {0, 2} -> (0 + 2) / 2 = 1; the mean over the two
  # directions is 1.5.
  a2 = np.array([[0.0, 0.0], [4.0, 0.0]])
  b2 = np.array([[1.0, 2.0], [1.0, 0.0]])
  assert swd._sliced_distance(a2, b2, np.eye(2)) == pytest.approx(1.5)


@pytest.mark.parametrize('seed', [0, 1, 2])
def test_sliced_distance_matches_cdf_integral(seed):
  rng = np.random.default_rng(seed)
  m, d = 200, 5
  a = rng.standard_normal((m, d))
  b = 0.5 * rng.standard_normal((m, d)) + 0.3
  direction = rng.standard_normal(d)
  direction /= np.linalg.norm(direction)
  expected = wasserstein_1d_cdf(a @ direction, b @ direction)
  got = swd._sliced_distance(a, b, direction[None])
  assert got == pytest.approx(expected, rel=1e-5)
  # Several directions (more than one chunk): the mean of the single-direction
  # distances.
  directions = swd._random_directions(rng, 300, d).astype(np.float64)
  expected = np.mean([wasserstein_1d_cdf(a @ p, b @ p) for p in directions])
  assert swd._sliced_distance(a, b, directions) == pytest.approx(
    expected, rel=1e-5
  )
  # Order of the points does not matter; the distance is symmetric.
  assert swd._sliced_distance(a[::-1], b, directions) == pytest.approx(
    swd._sliced_distance(b, a, directions), rel=1e-6
  )


def test_random_directions_are_unit():
  d = swd._random_directions(np.random.default_rng(0), 64, 147)
  assert d.shape == (64, 147)
  np.testing.assert_allclose(np.linalg.norm(d, axis=1), 1.0, rtol=1e-5)


def test_channel_stats_of_union():
  rng = np.random.default_rng(0)
  a = (rng.standard_normal((5, 8, 8, 3)) * [1, 2, 3] + [0, 1, 2]).astype(
    np.float32
  )
  b = (rng.standard_normal((3, 8, 8, 3)) * 0.5 - 1).astype(np.float32)
  mean, std = swd._channel_stats(a, b)
  union = np.concatenate([a, b]).reshape(-1, 3).astype(np.float64)
  np.testing.assert_allclose(mean, union.mean(axis=0), rtol=1e-10, atol=1e-12)
  np.testing.assert_allclose(std, union.std(axis=0), rtol=1e-10)
  _, std = swd._channel_stats(np.ones((2, 8, 8, 3), np.float32))
  assert np.all(std > 0)  # a flat channel does not divide by 0


def test_extract_patches_layout():
  rng = np.random.default_rng(0)
  level = rng.standard_normal((3, 16, 16, 2)).astype(np.float32)
  patches = swd._extract_patches(level, 5, 7, np.random.default_rng(1))
  assert patches.shape == (15, 2 * 7 * 7)
  # The same positions, cut by hand: channel-major, then rows, then columns.
  check = np.random.default_rng(1)
  ys = check.integers(0, 10, size=(3, 5))
  xs = check.integers(0, 10, size=(3, 5))
  for i in range(3):
    for j in range(5):
      cut = level[i, ys[i, j] : ys[i, j] + 7, xs[i, j] : xs[i, j] + 7]
      np.testing.assert_array_equal(
        patches[5 * i + j], cut.transpose(2, 0, 1).ravel()
      )
