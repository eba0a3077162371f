"""FID and KID of a generator against its training data (or any data set).

    extractor = inception.InceptionFeatures(mesh=mesh)  # loads the weights
    evaluator = evaluation.Evaluator.create(
        extractor, source, 'lsun/church_outdoor', 256,
        grids.uniform(256, 256), f'{workdir}/fid_stats', num_real=50_000,
    )
    # {'fid': ..., 'kid': ...}
    scores = evaluator.evaluate(gen, params, num_samples=50_000)

Real statistics (mean, covariance and up to `KID_FEATURES` feature vectors for
KID) are computed once per dataset, resolution, image count and seed, and
cached: a training run's under `WORKDIR/fid_stats/`; in any other folder
(`evaluator_for_data`, e.g. the evaluate command's DATA_DIR/fid_stats/) the
file name also holds the prepared data set's fingerprint (`data_fingerprint`),
so a data set prepared anew under the same name never reuses them.

Generated images are rendered in batches sharded over the devices of the mesh,
like training batches, and their Inception features streamed into float64
statistics, so memory does not grow with the number of samples.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import math
import os
from typing import Any, Callable, Iterator, Optional

import jax
import numpy as np

from cips_jax import errors
from cips_jax import grids
from cips_jax import images as images_lib
from cips_jax import parallel
from cips_jax import sampling
from cips_jax.metrics import fid as fid_lib
from cips_jax.metrics import inception
from cips_jax.metrics import swd as swd_lib

# Feature vectors kept for KID (its subsets draw 1000 at a time).
KID_FEATURES = 10_000
FEATURE_DIM = 2048

# Uint8 (B, H, W, 3) -> (B, 2048)
Extractor = Callable[[np.ndarray], np.ndarray]


def real_image_batches(
  source, count: int, resolution: int, batch_size: int, seed: int = 0
) -> Iterator[np.ndarray]:
  """`count` real images as uint8 batches.

  The images are a seeded choice, centre crops of resolution^2.
  """
  if count > len(source):
    raise errors.InputError(
      f'asked for {count} real images; the dataset has {len(source)}'
    )
  # A seeded choice, not the first `count` records: the subset is fixed per
  # seed (the cache key) and unbiased by the source's order.
  indices = np.random.default_rng(seed).choice(
    len(source), size=count, replace=False
  )
  for start in range(0, count, batch_size):
    images = []
    for i in indices[start : start + batch_size]:
      image = np.asarray(source[int(i)]['image'])
      if min(image.shape[:2]) < resolution:
        raise errors.DataError(
          f'real image {int(i)} is {image.shape[0]}x{image.shape[1]}, smaller '
          f'than the {resolution}x{resolution} frames compared: prepare the '
          f'data set at resolution >= {resolution}'
        )
      # Centre crops, not training's random crops: real statistics must be
      # deterministic to be cached.
      top = (image.shape[0] - resolution) // 2
      left = (image.shape[1] - resolution) // 2
      images.append(image[top : top + resolution, left : left + resolution])
    yield np.stack(images)


def real_images(source, count: int, resolution: int, seed: int) -> np.ndarray:
  """`count` real images (all, if fewer), centre crops of resolution^2.

  Returns uint8 (N, R, R, 3), the seeded choice of `real_image_batches`.
  """
  count = min(count, len(source))
  return next(
    real_image_batches(source, count, resolution, batch_size=count, seed=seed)
  )


def _statistics_of(
  batches: Iterator[np.ndarray],
  extractor: Extractor,
  total: int,
  progress: Optional[Callable[[int, int], None]] = None,
  keep: int = KID_FEATURES,
) -> tuple[fid_lib.Statistics, np.ndarray]:
  """Streams image batches through the extractor.

  Returns (statistics, the first `keep` features).
  """
  running = fid_lib.RunningStatistics(FEATURE_DIM)
  kept, done = [], 0
  for images in batches:
    features = np.asarray(extractor(images))
    # Mean and covariance stream in float64 (fid.RunningStatistics); only the
    # first `keep` feature vectors are stored, for KID, bounding memory.
    running.update(features)
    if done < keep:
      kept.append(features[: keep - done].astype(np.float32))
    done += len(images)
    if progress is not None:
      progress(done, total)
  return running.result(), np.concatenate(kept)


def scores(
  real: fid_lib.Statistics,
  real_features: np.ndarray,
  fake: fid_lib.Statistics,
  fake_features: np.ndarray,
  seed: int = 0,
) -> dict[str, float]:
  """{'fid', 'kid', 'kid_std', 'num_real', 'num_fake'}.

  KID is computed on the kept features.
  """
  kid, kid_std = fid_lib.kernel_inception_distance(
    real_features, fake_features, seed=seed
  )
  return {
    'fid': fid_lib.frechet_distance(real, fake),
    'kid': kid,
    'kid_std': kid_std,
    'num_real': real.count,
    'num_fake': fake.count,
  }


def render_grids(
  resolution: int, cylindrical: bool, source
) -> tuple[np.ndarray, np.ndarray]:
  """(the grid samples are rendered on, the grid compared with reals).

  Each is (H, W, 2). Ordinary data: both are the R x R training grid.
  Cylindrical models: samples show the whole 360-degree panorama (as wide as the
  stored panoramas, x = -1 + 2c / W), and evaluation uses an R x R window of
  it, like the training windows.
  """
  if not cylindrical:
    grid = np.asarray(grids.uniform(resolution, resolution))
    return grid, grid
  # The stored panoramas' width: their x = -1 + 2c / W is what training saw.
  width = np.asarray(source[0]['image']).shape[1]
  panorama = np.asarray(grids.cylindrical(resolution, width))
  return panorama, panorama[:, :resolution]


def data_fingerprint(source) -> str:
  """8 hex digits that change when a prepared data set is prepared anew.

  The SHA-256 of its tfds `dataset_info` (version, configuration, split sizes
  and bytes); '' for a source without one (e.g. a list of records).
  """
  info = getattr(source, 'dataset_info', None)
  if info is None:
    return ''
  return hashlib.sha256(info.as_json.encode()).hexdigest()[:8]


def stats_cache_dir(workdir: str) -> str:
  """The folder of a run's workdir that caches real-image statistics.

  `Evaluator.create` writes and reads them there (WORKDIR/fid_stats).
  """
  return os.path.join(workdir, 'fid_stats')


@dataclasses.dataclass
class Evaluator:
  """Inception features, cached real statistics, sharded rendering of fakes."""

  extractor: Extractor
  real: fid_lib.Statistics
  real_features: np.ndarray
  coords: np.ndarray  # the grid fakes are rendered on, (H, W, 2)
  mesh: Any
  batch_size: int
  seed: int = 0

  @classmethod
  def create(
    cls,
    extractor: Extractor,
    source,
    dataset_name: str,
    resolution: int,
    coords: np.ndarray,
    cache_dir: str,
    num_real: int,
    mesh=None,
    batch_size: int = 64,
    seed: int = 0,
    progress: Optional[Callable[[int, int], None]] = None,
    fingerprint: str = '',
  ) -> 'Evaluator':
    """Loads (or computes and caches) the real statistics.

    The statistics are of `num_real` images (all, if the source has fewer),
    centre crops of resolution^2, cached in `cache_dir` under a name holding
    the dataset name, resolution, count, seed and `fingerprint` (if any; see
    `data_fingerprint`). `coords` (H, W, 2) is the grid fakes are rendered on.
    """
    mesh = parallel.make_mesh() if mesh is None else mesh
    # Every device renders an equal share of each batch.
    batch_size = parallel.divisible_by_devices(batch_size, mesh)
    num_real = min(num_real, len(source))
    # Everything the statistics depend on is in the name, so a cached file is
    # never reused for another choice of images.
    name = (
      f'{dataset_name.replace("/", "_")}_{resolution}px'
      f'_{num_real}_seed{seed}{"_" + fingerprint if fingerprint else ""}.npz'
    )
    path = os.path.join(cache_dir, name)
    if os.path.exists(path):
      real, real_features = fid_lib.Statistics.load(path)
    else:
      real, real_features = _statistics_of(
        real_image_batches(source, num_real, resolution, batch_size, seed),
        extractor,
        num_real,
        progress,
      )
      # Every process computes (the extractor is one sharded program); one
      # writes.
      if jax.process_index() == 0:
        real.save(path, features=real_features)
    return cls(
      extractor=extractor,
      real=real,
      real_features=real_features,
      coords=np.asarray(coords),
      mesh=mesh,
      batch_size=batch_size,
      seed=seed,
    )

  def fake_batches(self, gen, params, num_samples: int) -> Iterator[np.ndarray]:
    """uint8 renders of N(0, I) latents (seeded).

    Each batch is sharded over the mesh.
    """
    # remat only matters for gradients; rendering does without it.
    render = _sharded_renderer(
      gen.clone(remat=False), self.batch_size, self.mesh
    )
    # The same latents at every evaluation of a run, so scores along a run
    # differ by the model only.
    key = jax.random.PRNGKey(self.seed + 10_000)
    for index in range(math.ceil(num_samples / self.batch_size)):
      images = parallel.to_host(
        render(params, jax.random.fold_in(key, index), self.coords)
      )
      # Every batch is full size (one compiled program); the last is trimmed.
      count = min(self.batch_size, num_samples - index * self.batch_size)
      # Quantised to 8 bits like the real images before Inception sees them.
      yield images_lib.to_uint8(images[:count])

  def evaluate(
    self,
    gen,
    params,
    num_samples: int,
    progress: Optional[Callable[[int, int], None]] = None,
  ) -> dict[str, float]:
    """FID and KID of `num_samples` generated images.

    They compare against the cached real statistics.
    """
    fake, fake_features = _statistics_of(
      self.fake_batches(gen, params, num_samples),
      self.extractor,
      num_samples,
      progress,
    )
    return scores(
      self.real, self.real_features, fake, fake_features, seed=self.seed
    )


@functools.lru_cache(maxsize=8)
def _sharded_renderer(gen, batch_size: int, mesh):
  """jit(params, key, coords -> images (B, H, W, 3)).

  The batch is split over the mesh. Latents are drawn inside the program from a
  replicated key, so every process of a multi-host run takes the same inputs and
  holds its own rows of the output.
  """

  def render(params, key, coords):
    z = jax.random.normal(key, (batch_size, gen.style_dim))
    with parallel.tracing_over(mesh):  # the fused kernel splits itself
      return sampling.generate(gen, {'params': params}, z, coords)

  replicated = parallel.replicated(mesh)
  return jax.jit(
    render,
    in_shardings=(replicated, replicated, replicated),
    out_shardings=parallel.batch_sharded(mesh),
  )


def evaluator_for_data(
  source,
  dataset_name: str,
  resolution: int,
  *,
  cylindrical: bool,
  cache_dir: str,
  num_real: int,
  batch_size: int,
  seed: int,
  inception_weights: Optional[str] = None,
  mesh=None,
  coords: Optional[np.ndarray] = None,
  progress: Optional[Callable[[int, int], None]] = None,
  fingerprint: str = '',
) -> Evaluator:
  """An `Evaluator` against any data set: the Inception network and statistics.

  Reals are centre crops of resolution^2 of `source`'s images; fakes are
  rendered on `coords` (H, W, 2), by default the second grid of `render_grids`
  (resolution^2; an R x R window of the panorama for cylindrical models). Real
  statistics are cached in `cache_dir` (see `Evaluator.create` for the key and
  `fingerprint`). Raises FileNotFoundError, with where to get them, without the
  Inception weights.
  """
  extractor = inception.InceptionFeatures(
    path=inception_weights or None, mesh=mesh, batch_size=batch_size
  )
  if coords is None:
    _, coords = render_grids(resolution, cylindrical, source)
  return Evaluator.create(
    extractor,
    source,
    dataset_name,
    resolution,
    coords,
    cache_dir=cache_dir,
    num_real=num_real,
    mesh=mesh,
    batch_size=batch_size,
    seed=seed,
    progress=progress,
    fingerprint=fingerprint,
  )


def evaluator_for_run(
  config,
  workdir: str,
  source,
  *,
  num_real: int,
  batch_size: int,
  seed: int,
  inception_weights: Optional[str] = None,
  mesh=None,
  coords: Optional[np.ndarray] = None,
  progress: Optional[Callable[[int, int], None]] = None,
) -> Evaluator:
  """The `Evaluator` of a training run: its data, grid and cached statistics.

  Used by training (`config.logging.eval_*`; the evaluate command resolves the
  same values from a workdir's config and its flags). `evaluator_for_data` with
  the config's data set, resolution and cylindrical setting; fakes are
  rendered on `coords` (default the second of `render_grids`, which a run
  computes once); real statistics are cached in `stats_cache_dir(workdir)`.
  Raises FileNotFoundError, with where to get them, without the Inception
  weights.
  """
  return evaluator_for_data(
    source,
    config.data.name,
    config.data.resolution,
    cylindrical=config.model.cylindrical,
    cache_dir=stats_cache_dir(workdir),
    num_real=num_real,
    batch_size=batch_size,
    seed=seed,
    inception_weights=inception_weights,
    mesh=mesh,
    coords=coords,
    progress=progress,
  )


def render_samples(gen, params, z, coords) -> np.ndarray:
  """Samples of latents z (N, D) at coords (H, W, 2): (N, H, W, 3) float32.

  Unclamped, roughly in [-1, 1]; training's remat setting is dropped (it only
  matters for gradients).
  """
  return np.asarray(
    sampling.generate(gen.clone(remat=False), {'params': params}, z, coords)
  )


def sliced_wasserstein_of_samples(
  gen, params, reals: np.ndarray, coords: np.ndarray, seed: int
) -> dict[str, float]:
  """SWD between `reals` (N, H, W, 3) uint8 and N samples rendered at coords.

  The samples' latents are drawn from `seed + 2`, the same at every call, so
  scores at the start and end of a run compare the same latents.
  """
  z = jax.random.normal(
    jax.random.PRNGKey(seed + 2), (len(reals), gen.style_dim)
  )
  fakes = render_samples(gen, params, z, coords)
  return swd_lib.sliced_wasserstein(reals, fakes, seed=seed)
