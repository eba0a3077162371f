"""FID and KID against independent float64 computations."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from cips_jax.metrics import fid


def random_covariance(rng, dim, scale=1.0):
  a = rng.standard_normal((dim, dim))
  return scale * (a @ a.T) / dim + 1e-3 * np.eye(dim)


def sqrtm_by_schur(matrix):
  """An independent matrix square root (scipy's Schur method), the classic FID
  code's path.
  """
  scipy_linalg = pytest.importorskip('scipy.linalg')
  root = scipy_linalg.sqrtm(matrix)
  return np.real(root)


def test_frechet_distance_matches_a_float64_reference_on_random_gaussians():
  rng = np.random.default_rng(0)
  for dim in (2, 16, 64):
    mean1, mean2 = rng.standard_normal(dim), rng.standard_normal(dim)
    cov1, cov2 = (
      random_covariance(rng, dim),
      random_covariance(rng, dim, scale=2.0),
    )
    expected = (
      np.sum((mean1 - mean2) ** 2)
      + np.trace(cov1)
      + np.trace(cov2)
      - 2 * np.trace(sqrtm_by_schur(cov1 @ cov2))
    )
    got = fid.frechet_distance(
      fid.Statistics(mean1, cov1, 10), fid.Statistics(mean2, cov2, 10)
    )
    assert got == pytest.approx(expected, rel=1e-9)


def test_frechet_distance_by_hand_for_commuting_covariances():
  # Same eigenvectors: FID = |dmu|^2 + sum (sqrt(a_i) - sqrt(b_i))^2.
  rng = np.random.default_rng(1)
  q, _ = np.linalg.qr(rng.standard_normal((5, 5)))
  a, b = (
    np.array([1.0, 4.0, 9.0, 0.25, 2.0]),
    np.array([4.0, 1.0, 9.0, 1.0, 0.5]),
  )
  stats1 = fid.Statistics(np.zeros(5), q @ np.diag(a) @ q.T, 10)
  stats2 = fid.Statistics(np.full(5, 0.5), q @ np.diag(b) @ q.T, 10)
  expected = 5 * 0.25 + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
  assert fid.frechet_distance(stats1, stats2) == pytest.approx(
    expected, rel=1e-10
  )


def test_few_samples_take_the_low_rank_route_to_the_same_distance():
  """N <= D vectors keep their centred features; the distance through them
  equals the D x D route and a hand-derived oracle: for cov_i = F_i^T F_i,
  tr((cov1 cov2)^(1/2)) is the sum of the singular values of F1 F2^T.
  """
  rng = np.random.default_rng(5)
  dim = 32
  features1 = 3.0 + rng.standard_normal((6, dim)) @ rng.standard_normal(
    (dim, dim)
  )
  features2 = rng.standard_normal((9, dim))
  stats = []
  for features in (features1, features2):
    running = fid.RunningStatistics(dim)
    for chunk in np.array_split(features, 3):
      running.update(chunk)
    stats.append(running.result())
  for s, features in zip(stats, (features1, features2)):
    assert s.factor.shape == features.shape
    np.testing.assert_allclose(s.factor.T @ s.factor, s.cov, atol=1e-9)
  centred = [
    (f - f.mean(0)) / np.sqrt(len(f) - 1) for f in (features1, features2)
  ]
  oracle = (
    np.sum((features1.mean(0) - features2.mean(0)) ** 2)
    + np.sum(centred[0] ** 2)
    + np.sum(centred[1] ** 2)
    - 2 * np.linalg.svd(centred[0] @ centred[1].T, compute_uv=False).sum()
  )
  full = [dataclasses.replace(s, factor=None) for s in stats]
  for pair in (stats, (stats[0], full[1]), (full[0], stats[1])):
    assert fid.frechet_distance(*pair) == pytest.approx(oracle, rel=1e-8)
  # Both routes take square roots of eigenvalues that rounding leaves near 0
  # instead of 0 (centred rows are rank-deficient; the D x D route has many
  # more of them): close to the oracle, not to the last digit.
  assert fid.frechet_distance(*full) == pytest.approx(oracle, rel=1e-7)
  # More vectors than dimensions: no factor is kept.
  running = fid.RunningStatistics(dim)
  for chunk in np.array_split(rng.standard_normal((40, dim)), 4):
    running.update(chunk)
  assert running.result().factor is None


def test_statistics_stream_like_numpy():
  rng = np.random.default_rng(2)
  features = 1000.0 + rng.standard_normal((500, 8)) @ rng.standard_normal(
    (8, 8)
  )
  running = fid.RunningStatistics(8)
  for chunk in np.array_split(features, 7):
    running.update(chunk.astype(np.float32))
  stats = running.result()
  f32 = features.astype(np.float32).astype(np.float64)
  np.testing.assert_allclose(stats.mean, f32.mean(0), rtol=1e-12)
  np.testing.assert_allclose(
    stats.cov, np.cov(f32, rowvar=False), rtol=1e-9, atol=1e-9
  )
  with pytest.raises(FloatingPointError):
    running.update(np.full((1, 8), np.nan))


def test_fid_of_a_set_with_itself_is_zero_and_grows_with_perturbation():
  rng = np.random.default_rng(3)
  features = rng.standard_normal((2000, 32)) @ rng.standard_normal((32, 32))
  base = fid.Statistics.from_features(features)
  assert fid.frechet_distance(base, base) == pytest.approx(0.0, abs=1e-8)
  scores = [
    fid.frechet_distance(
      base,
      fid.Statistics.from_features(
        features + sigma * rng.standard_normal(features.shape)
      ),
    )
    for sigma in (0.1, 0.5, 1.0, 2.0)
  ]
  assert all(a < b for a, b in zip(scores, scores[1:])), scores
  shifted = [
    fid.frechet_distance(base, fid.Statistics.from_features(features + shift))
    for shift in (0.1, 1.0)
  ]
  assert shifted[0] == pytest.approx(32 * 0.01, rel=1e-6)  # |dmu|^2 only
  assert shifted[1] == pytest.approx(32 * 1.0, rel=1e-6)


def kid_by_loops(x, y):
  """Unbiased MMD^2 with k(a, b) = (a.b / d + 1)^3, written out pair by pair."""
  d, m = x.shape[1], len(x)

  def k(a, b):
    return (np.dot(a, b) / d + 1.0) ** 3

  xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (
    m * (m - 1)
  )
  yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (
    m * (m - 1)
  )
  xy = sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / (m * m)
  return xx + yy - 2 * xy


def test_kid_equals_the_pairwise_formula_and_grows_with_perturbation():
  rng = np.random.default_rng(4)
  x, y = rng.standard_normal((12, 6)), rng.standard_normal((12, 6)) + 0.3
  mean, std = fid.kernel_inception_distance(x, y, num_subsets=3, subset_size=12)
  assert mean == pytest.approx(
    kid_by_loops(x, y), rel=1e-10
  ) and std == pytest.approx(0, abs=1e-12)
  features = rng.standard_normal((600, 16))
  other = rng.standard_normal((600, 16))
  same, _ = fid.kernel_inception_distance(
    features, other, num_subsets=20, subset_size=300
  )
  assert abs(same) < 0.01
  kids = [
    fid.kernel_inception_distance(
      features, other + s, num_subsets=20, subset_size=300
    )[0]
    for s in (0.2, 0.5, 1.0)
  ]
  assert same < kids[0] < kids[1] < kids[2]


def test_statistics_round_trip(tmp_path):
  rng = np.random.default_rng(5)
  features = rng.standard_normal((50, 4))
  stats = fid.Statistics.from_features(features)
  stats.save(tmp_path / 'real.npz', features=features)
  loaded, kept = fid.Statistics.load(tmp_path / 'real.npz')
  np.testing.assert_array_equal(loaded.cov, stats.cov)
  assert loaded.count == 50 and kept.shape == (50, 4)
  assert not list(tmp_path.glob('*.tmp*'))
