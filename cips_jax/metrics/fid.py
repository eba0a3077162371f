"""FID and KID from Inception features, computed the standard way in float64.

    stats = fid.Statistics.from_features(features)  # features (N, 2048)
    score = fid.frechet_distance(real_stats, fake_stats)  # FID
    # KID
    mean, std = fid.kernel_inception_distance(real_features, fake_features)

FID (Heusel et al. 2017) is the Frechet distance between Gaussians fitted to the
features: |mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2)). The trace of
the matrix square root is computed from symmetric eigendecompositions,
tr((S1 S2)^(1/2)) = sum sqrt(eig(A S2 A)) with A = S1^(1/2), which is real and
stable for covariance matrices (no complex `sqrtm`, no "imaginary component"
failures). Statistics of at most D vectors keep their centred features F
(S = F^T F); then tr((S1 S2)^(1/2)) = sum sqrt(eig(F S2 F^T)), an N x N
problem instead of two D x D eigendecompositions (about 3 s in float64 on a
2-core CPU for D = 2048): the same number, to rounding. KID (Binkowski et
al. 2018) is the unbiased MMD^2 with the polynomial kernel
k(x, y) = (x.y / d + 1)^3, averaged over random subsets.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Optional

import numpy as np

from cips_jax import errors


@dataclasses.dataclass
class Statistics:
  """Mean (D,) and covariance (D, D) of N feature vectors, in float64.

  `factor` (N, D), kept when N <= D: the centred features over sqrt(N - 1),
  so that cov = factor.T @ factor; the Frechet distance then needs no D x D
  eigendecomposition. Not saved (`save` writes mean, cov and count).
  """

  mean: np.ndarray
  cov: np.ndarray
  count: int
  factor: Optional[np.ndarray] = None

  @classmethod
  def from_features(cls, features) -> 'Statistics':
    accumulator = RunningStatistics(np.shape(features)[-1])
    accumulator.update(features)
    return accumulator.result()

  def save(
    self, path: str | os.PathLike, features: Optional[np.ndarray] = None
  ) -> None:
    """Writes an .npz of mean, cov, count and, optionally, features for KID."""
    arrays = {
      'mean': self.mean,
      'cov': self.cov,
      'count': np.asarray(self.count),
    }
    if features is not None:
      # Stored in float32, half the size; KID computes in float64 anyway.
      arrays['features'] = np.asarray(features, np.float32)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    # Ends in .npz, or np.savez would append one and the rename would miss it.
    temporary = f'{os.fspath(path)}.tmp.npz'
    np.savez(temporary, **arrays)
    # A killed write never leaves a half file under `path`.
    os.replace(temporary, path)

  @classmethod
  def load(
    cls, path: str | os.PathLike
  ) -> tuple['Statistics', Optional[np.ndarray]]:
    """Reads what `save` wrote: (statistics, features or None)."""
    with np.load(path) as data:
      stats = cls(mean=data['mean'], cov=data['cov'], count=int(data['count']))
      features = data['features'] if 'features' in data else None
    return stats, features


class RunningStatistics:
  """Accumulates the sum and the sum of outer products of features.

  Batch by batch.

  The covariance is formed from sums shifted by the first batch's mean, which
  keeps float64 cancellation small even for features with a large common offset.
  """

  def __init__(self, dim: int):
    self.dim = dim
    self.count = 0
    self._shift = None
    self._sum = np.zeros(dim, np.float64)
    self._outer = np.zeros((dim, dim), np.float64)
    # The shifted rows themselves while there are no more than `dim` of them:
    # the covariance's low-rank factor (Statistics.factor).
    self._rows = []

  def update(self, features) -> None:
    # float64, like np.cov in the standard FID code: float32 sums over tens of
    # thousands of outer products would lose digits.
    x = np.asarray(features, np.float64).reshape(-1, self.dim)
    if not np.all(np.isfinite(x)):
      raise FloatingPointError(
        'non-finite Inception features (are the images finite?)'
      )
    if not len(x):
      return
    # Fixed after the first batch: every later batch is shifted by the same
    # vector, so the sums stay consistent.
    if self._shift is None:
      self._shift = x.mean(axis=0)
    x = x - self._shift
    self.count += len(x)
    self._sum += x.sum(axis=0)
    self._outer += x.T @ x
    if self._rows is not None:
      self._rows.append(x)
      if self.count > self.dim:
        self._rows = None

  def result(self) -> Statistics:
    if self.count < 2:
      raise errors.InputError(
        f'statistics need at least 2 feature vectors, got {self.count}'
      )
    centred_mean = self._sum / self.count
    # The unbiased (N - 1) covariance, as numpy's np.cov used by the standard
    # FID code.
    cov = (self._outer - self.count * np.outer(centred_mean, centred_mean)) / (
      self.count - 1
    )
    factor = None
    if self._rows is not None:
      factor = (np.concatenate(self._rows) - centred_mean) / np.sqrt(
        self.count - 1
      )
    # Symmetrised: rounding leaves cov and cov.T a few ulp apart, and eigh
    # reads only one triangle.
    return Statistics(
      mean=centred_mean + self._shift,
      cov=(cov + cov.T) / 2,
      count=self.count,
      factor=factor,
    )


def _psd_sqrt(matrix: np.ndarray) -> np.ndarray:
  """The symmetric square root of a symmetric positive semi-definite matrix."""
  values, vectors = np.linalg.eigh((matrix + matrix.T) / 2)
  # Rounding can leave tiny negative eigenvalues on a singular covariance (fewer
  # samples than 2048 dimensions): clipped to 0 rather than NaN.
  return (vectors * np.sqrt(np.clip(values, 0.0, None))) @ vectors.T


def _trace_sqrt_product(stats1: Statistics, stats2: Statistics) -> float:
  """tr((cov1 cov2)^(1/2)) for covariance matrices.

  Computed via sqrt(cov1) cov2 sqrt(cov1): cov1 cov2 is similar to the symmetric
  PSD matrix A cov2 A (A = cov1^(1/2)), so their eigenvalues agree and are real
  and non-negative. Where one side has a factor F (cov = F^T F, N rows), the
  non-zero eigenvalues of cov1 cov2 are those of the N x N matrix F cov2 F^T
  (the product's order does not change them).
  """
  if stats1.factor is None and stats2.factor is not None:
    stats1, stats2 = stats2, stats1
  if stats1.factor is not None:
    factor = stats1.factor
    product = factor @ stats2.cov @ factor.T
  else:
    root = _psd_sqrt(stats1.cov)
    product = root @ stats2.cov @ root
  values = np.linalg.eigvalsh((product + product.T) / 2)
  return float(np.sum(np.sqrt(np.clip(values, 0.0, None))))


def frechet_distance(stats1: Statistics, stats2: Statistics) -> float:
  """Frechet distance between Gaussians N(mean1, cov1) and N(mean2, cov2)."""
  if stats1.mean.shape != stats2.mean.shape:
    raise errors.InputError(
      f'feature sizes differ: {stats1.mean.shape} vs {stats2.mean.shape}'
    )
  diff = stats1.mean - stats2.mean
  value = (
    diff @ diff
    + np.trace(stats1.cov)
    + np.trace(stats2.cov)
    - 2.0 * _trace_sqrt_product(stats1, stats2)
  )
  return float(max(value, 0.0))  # rounding can leave -1e-12 for identical sets


def _polynomial_kernel(x: np.ndarray, y: np.ndarray) -> np.ndarray:
  # (x.y / d + 1)^3, d the feature size: the kernel of Binkowski et al.
  return (x @ y.T / x.shape[1] + 1.0) ** 3


def kernel_inception_distance(
  features1,
  features2,
  num_subsets: int = 100,
  subset_size: int = 1000,
  seed: int = 0,
) -> tuple[float, float]:
  """KID: the unbiased MMD^2 (polynomial kernel) over random subsets.

  Returns (mean, std).

  Each subset draws min(subset_size, N1, N2) vectors from each set without
  replacement.
  """
  x = np.asarray(features1, np.float64)
  y = np.asarray(features2, np.float64)
  m = min(subset_size, len(x), len(y))
  if m < 2:
    raise errors.InputError(
      f'KID needs at least 2 feature vectors per set, got {len(x)} and {len(y)}'
    )
  # Seeded subsets: the same features give the same KID.
  rng = np.random.default_rng(seed)
  estimates = []
  for _ in range(num_subsets):
    a = x[rng.choice(len(x), m, replace=False)]
    b = y[rng.choice(len(y), m, replace=False)]
    k_aa, k_bb, k_ab = (
      _polynomial_kernel(a, a),
      _polynomial_kernel(b, b),
      _polynomial_kernel(a, b),
    )
    # Unbiased MMD^2: the within-set means leave out the diagonal k(x, x).
    within = (k_aa.sum() - np.trace(k_aa) + k_bb.sum() - np.trace(k_bb)) / (
      m * (m - 1)
    )
    estimates.append(within - 2.0 * k_ab.mean())
  estimates = np.asarray(estimates)
  return float(estimates.mean()), float(estimates.std())
