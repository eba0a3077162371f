"""The training input pipeline: random access, a pure function of (seed, step).

`TrainBatches(source, ...).batch_at(step)` is this host's slice of the global
batch of training step `step`. Nothing depends on how many batches were drawn
before, so training resumes exactly from a checkpointed step, on any number of
hosts.

Per element (the reference's MultiScaleDataset, `docs/reference.md` section 4):
1. the R x R training frame: a random R x R crop if the stored image is larger
   than R (`--to_crop`); for `cylindrical=True` panoramas the horizontal offset
   is any column and the crop wraps around;
2. a random horizontal flip (p = 0.5) of the pixels only: coordinates are
   attached after it;
3. the coordinate grid of the full R x R frame, `cips_jax.grids.uniform(R, R)`:
   channel 0 = x = linspace(-1, 1, R) along the width, channel 1 = y along the
   height;
4. multi-scale patches when crop c < R: n_scales = log2(R / c) + 1 and ONE scale
   s per step, shared by the whole global batch. s = 0: a random c x c window of
   the frame. s >= 1: the frame subsampled with stride 2^s from a random offset
   in [0, R - 2^s c + 2^s) per axis, then a random c x c window of that. Pixels
   and coordinates are taken with the same indices.
Images become float32 in [-1, 1] (x / 127.5 - 1, the reference's ToTensor +
Normalize(0.5)).

Randomness: the epoch permutation comes from `default_rng([seed, 0, epoch])`,
the scale of a step from `default_rng([seed, 1, step])` and every choice for the
element in row `row` of the global batch from
`default_rng([seed, 2, step, row])`; never from global state.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
import functools
import io
import math
from typing import Any

import grain
import numpy as np
from PIL import Image

from cips_jax import errors

# Domain tags that keep the three kinds of random streams apart.
_PERMUTATION, _SCALE, _ELEMENT = 0, 1, 2
# "infinite" number of elements for grain's random-access range.
_FOREVER = 2**62


def coordinate_grid(height: int, width: int) -> np.ndarray:
  """The float32 (height, width, 2) grid: x in [..., 0], y in [..., 1].

  x = linspace(-1, 1, width). The numpy twin of `cips_jax.grids.uniform`
  (bit-identical), so that data loading does not touch JAX.
  """
  xs = np.linspace(-1.0, 1.0, width, dtype=np.float32)
  ys = np.linspace(-1.0, 1.0, height, dtype=np.float32)
  return np.stack(np.meshgrid(xs, ys, indexing='xy'), axis=-1)


def _as_rgb_uint8(image: Any) -> np.ndarray:
  """uint8 (H, W, 3) from a gray or RGB array or from encoded image bytes."""
  if isinstance(image, (bytes, bytearray)):
    with Image.open(io.BytesIO(image)) as pil:
      image = np.asarray(pil.convert('RGB'))
  image = np.asarray(image)
  if image.dtype != np.uint8:
    raise TypeError(f'expected uint8 images, got {image.dtype}')
  # Gray images: a (H, W, 1) view broadcast to RGB below, without a copy.
  if image.ndim == 2:
    image = image[..., None]
  if image.ndim != 3 or image.shape[-1] not in (1, 3):
    raise errors.DataError(
      f'expected an (H, W, 3) or (H, W, 1) image, got shape {image.shape}'
    )
  return np.broadcast_to(image, image.shape[:2] + (3,))


def _stack(elements: Sequence[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
  return {k: np.stack([e[k] for e in elements]) for k in elements[0]}


class TrainBatches:
  """Training batches of patches with their coordinates.

  They are a pure function of the step. Output of `batch_at(step)`, with
  b = global_batch_size / process_count and c = crop:
    'image':  float32 (b, c, c, 3) in [-1, 1];
    'coords': float32 (b, c, c, 2), (x, y) of every pixel in the R x R frame's
              grid;
    'scale':  int32 (b,), the patch scale s of this step (the same in every
              row);
    'phase':  float32 (b,), only when cylindrical: the crop's first column /
              panorama width.

  Global batch `step` holds the records at positions step*B .. step*B + B-1 of
  an endless stream that visits the data set in a fresh seeded permutation every
  epoch (epoch = position // len(source)); host i takes rows [i*b, (i+1)*b) of
  it.

  Cylindrical panoramas (`cylindrical=True`): the source images are full 360
  degree panoramas H x W (H >= R; W is the full circle). The frame is R rows (a
  random vertical crop if H > R) by R columns starting at ANY column col0 in
  [0, W), wrapping around the right edge. Its x coordinate is the angle, the
  convention of cylindrical generators (`CIPSskip(cylindrical=True)`): [-1, 1)
  covers the full circle once,
      x_j = -1 + 2 * (col0 + j) / W,   j = 0 .. R-1,   y = linspace(-1, 1, R),
  measured from the panorama's column 0 and NOT wrapped (x grows monotonically
  across the seam; x and x + 2 are the same place for the periodic model), so
  the angle of a pixel is theta = pi (x + 1) (mod 2 pi).
  'phase' = col0 / W in [0, 1) gives the crop's angular offset directly. A flip
  mirrors the pixels of the crop only (coordinates and phase unchanged, as for
  ordinary images); pass flip=False where the pixel <-> angle correspondence
  matters.
  """

  def __init__(
    self,
    source: Sequence[Any],
    *,
    global_batch_size: int,
    resolution: int,
    crop: int | None = None,
    flip: bool = True,
    seed: int = 0,
    process_index: int = 0,
    process_count: int = 1,
    cylindrical: bool = False,
    image_key: str = 'image',
  ):
    """Sets up the stream; nothing is read until a batch is asked for.

    Args:
      source: random-access records (`len`, `[i]`, optionally `__getitems__`):
        dicts with `image_key` or bare images; images uint8 (H, W, 3|1) or
        encoded bytes, H, W >= R. E.g. `sources.load_source(...)`.
      global_batch_size: B, the batch of one step summed over all processes.
      resolution: R, the side of the training frame and of its coordinate grid.
      crop: c, the side of the patches (default R: whole frames). R / c must be
        a power of 2.
      flip: random horizontal flips (p = 0.5) of the pixels.
      seed: the seed of every random choice.
      process_index, process_count: this host and the number of hosts;
        B % count == 0.
      cylindrical: the images are 360 degree panoramas (see the class
        docstring).
      image_key: the image's key in dict records.
    """
    crop = resolution if crop is None else crop
    if resolution < 1 or crop < 1 or resolution % crop:
      raise errors.DataError(
        f'crop ({crop}) must divide resolution ({resolution})'
      )
    ratio = resolution // crop
    if ratio & (ratio - 1):
      raise errors.DataError(
        f'resolution / crop must be a power of 2, got {resolution}/{crop}'
      )
    if global_batch_size < 1 or global_batch_size % process_count:
      raise errors.DataError(
        f'global_batch_size {global_batch_size} must be a positive multiple of '
        f'process_count {process_count}'
      )
    if not 0 <= process_index < process_count:
      raise errors.DataError(
        f'process_index {process_index} not in [0, {process_count})'
      )
    if len(source) == 0:
      raise errors.DataError('the data source is empty')
    if seed < 0:
      raise errors.DataError(f'seed must be non-negative, got {seed}')
    self.source = source
    self.global_batch_size = global_batch_size
    self.local_batch_size = global_batch_size // process_count
    self.process_index, self.process_count = process_index, process_count
    self.resolution, self.crop = resolution, crop
    self.flip, self.cylindrical = flip, cylindrical
    self.seed, self.image_key = seed, image_key
    self.n_scales = int(math.log2(ratio)) + 1
    # Grids.uniform's axes; the frame is square, so x and y share one.
    self._ys = np.linspace(-1.0, 1.0, resolution, dtype=np.float32)
    self._xs = self._ys
    # A couple of epochs' permutations: consecutive steps straddle at most two
    # epochs.
    self._permutation = functools.lru_cache(maxsize=4)(self._make_permutation)

  # -- the stream
  # ---------------------------------------------------------------------------

  @property
  def steps_per_epoch(self) -> float:
    """Global batches per pass over the data set.

    Fractional: epochs do not align with steps.
    """
    return len(self.source) / self.global_batch_size

  def _make_permutation(self, epoch: int) -> np.ndarray:
    rng = np.random.default_rng([self.seed, _PERMUTATION, epoch])
    return rng.permutation(len(self.source))

  def record_index(self, step: int, row: int) -> int:
    """Index into `source` of row `row` (of the GLOBAL batch) of step `step`."""
    # The position in the endless stream says both the epoch and the place in
    # its permutation: no state carried between steps.
    epoch, position = divmod(
      step * self.global_batch_size + row, len(self.source)
    )
    return int(self._permutation(epoch)[position])

  def scale_at(self, step: int) -> int:
    """The patch scale s in [0, n_scales) of step `step`.

    Drawn uniformly, one per step.
    """
    if self.n_scales == 1:
      return 0
    # Keyed by step only, so every host and row of the step gets the same scale
    # (docs/reference.md 4.3).
    return int(
      np.random.default_rng([self.seed, _SCALE, step]).integers(self.n_scales)
    )

  def _record_image(self, record: Any) -> Any:
    return record[self.image_key] if isinstance(record, dict) else record

  def element_at(self, step: int, row: int) -> dict[str, np.ndarray]:
    """Row `row` of the global batch of step `step`, unbatched.

    For example 'image' is (c, c, 3).
    """
    self._check_position(step, row)
    record = self.source[self.record_index(step, row)]
    return self.transform(self._record_image(record), step, row)

  def batch_at(self, step: int) -> dict[str, np.ndarray]:
    """This host's rows [i*b, (i+1)*b) of the global batch of step `step`.

    See the class docstring.
    """
    self._check_position(step, 0)
    rows = range(
      self.process_index * self.local_batch_size,
      (self.process_index + 1) * self.local_batch_size,
    )
    indices = [self.record_index(step, row) for row in rows]
    # One batched read (ArrayRecord sources).
    if hasattr(self.source, '__getitems__'):
      records = self.source.__getitems__(indices)
    else:
      records = [self.source[i] for i in indices]
    return _stack(
      [
        self.transform(self._record_image(r), step, row)
        for r, row in zip(records, rows)
      ]
    )

  def iterate(
    self,
    start_step: int = 0,
    *,
    num_threads: int = 4,
    prefetch_buffer_size: int | None = None,
  ) -> Iterator[dict[str, np.ndarray]]:
    """Batches `batch_at(start_step)`, `batch_at(start_step + 1)`, ... forever.

    Elements are read and transformed ahead of time by grain's thread pool
    (decoding and resizing in pillow and numpy release the GIL); the batches are
    identical to `batch_at`.

    Args:
      start_step: the first step, e.g. the step of the restored checkpoint.
      num_threads: reader threads (0: read in the consuming thread).
      prefetch_buffer_size: elements read ahead (default: two local batches).
    """
    self._check_position(start_step, 0)
    b, first_row = (
      self.local_batch_size,
      self.process_index * self.local_batch_size,
    )
    # Element k is row k % b of this host's share of step k // b, so grain's
    # batches of b consecutive elements are exactly `batch_at`'s.
    elements = grain.MapDataset.range(start_step * b, _FOREVER).map(
      lambda k: self.element_at(k // b, first_row + k % b)
    )
    options = grain.ReadOptions(
      num_threads=num_threads,
      prefetch_buffer_size=prefetch_buffer_size or 2 * b,
    )
    return iter(elements.to_iter_dataset(options).batch(b, batch_fn=_stack))

  def _check_position(self, step: int, row: int) -> None:
    if step < 0 or not 0 <= row < self.global_batch_size:
      raise errors.DataError(
        f'invalid step {step} / row {row} (batch {self.global_batch_size})'
      )

  # -- one element
  # --------------------------------------------------------------------------

  def transform(self, image: Any, step: int, row: int) -> dict[str, np.ndarray]:
    """The training element made from `image` for row `row` of step `step`.

    Args:
      image: uint8 (H, W, 3|1) or encoded bytes, with H, W >= R (W any for
        panoramas).
    Returns:
      {'image': float32 (c, c, 3), 'coords': float32 (c, c, 2),
      'scale': int32 ()} and, when cylindrical, 'phase': float32 ().
    """
    image = _as_rgb_uint8(image)
    # Keyed by the global row, so an element does not depend on the number of
    # hosts. The draws below come in a fixed order: reordering them changes
    # every batch of a seed.
    rng = np.random.default_rng([self.seed, _ELEMENT, step, row])
    scale = self.scale_at(step)
    r = self.resolution
    height, width = image.shape[:2]
    if height < r or (width < r and not self.cylindrical):
      raise errors.DataError(
        f'stored image {height}x{width} is smaller than the training '
        f'resolution {r}: prepare the data set at resolution >= {r}'
      )

    # 1. The R x R frame: a random crop of a larger stored image (the
    # reference's --to_crop; the reference fails on larger images without it, so
    # here it is always on).
    row0 = int(rng.integers(height - r + 1))
    col0 = (
      int(rng.integers(width))
      if self.cylindrical
      else int(rng.integers(width - r + 1))
    )
    # 2. The flip mirrors the frame's pixels; the coordinates stay put.
    flipped = self.flip and rng.random() < 0.5
    # 3+4. The patch as frame indices: pixels and coordinates both follow them.
    rows, cols = self._patch_indices(rng, scale)

    # Column j of the flipped frame is column r - 1 - j of the frame: the flip
    # is an index map, no flipped copy is made.
    pixel_cols = (r - 1 - cols) if flipped else cols
    src_rows, src_cols = row0 + rows, col0 + pixel_cols
    if self.cylindrical:
      src_cols = src_cols % width  # the crop wraps around the 360 degree seam
    # Gathers only the c x c patch from the stored image; the frame is never
    # materialised.
    pixels = image[src_rows[:, None], src_cols[None, :]]
    pixels = pixels.astype(np.float32) / np.float32(127.5) - np.float32(1.0)

    if self.cylindrical:
      xs = (-1.0 + 2.0 * (col0 + cols) / width).astype(np.float32)
    else:
      # The unflipped `cols`: coordinates stay put under a flip
      # (docs/reference.md 4.2).
      xs = self._xs[cols]
    ys = self._ys[rows]
    coords = np.stack(np.meshgrid(xs, ys, indexing='xy'), axis=-1)
    out = {'image': pixels, 'coords': coords, 'scale': np.int32(scale)}
    if self.cylindrical:
      out['phase'] = np.float32(col0 / width)
    return out

  def _patch_indices(
    self, rng: np.random.Generator, scale: int
  ) -> tuple[np.ndarray, np.ndarray]:
    """Row and column indices (c,) of the patch at `scale`.

    They index the R x R frame.
    """
    r, c = self.resolution, self.crop
    if scale == 0:  # a c x c window at full resolution
      top, left = rng.integers(r - c + 1, size=2)
      return top + np.arange(c), left + np.arange(c)
    stride = 2**scale
    # Offsets of the strided grid in [0, R - stride*c + stride), as the
    # reference draws them; the strided frame frame[off::stride] then has
    # ceil((R - off) / stride) >= c samples.
    offsets = rng.integers(r - stride * c + stride, size=2)
    # Ceiling division: the samples of frame[off::stride] along each axis.
    lengths = -(-(r - offsets) // stride)
    # The random c x c window of the strided frame.
    starts = rng.integers(lengths - c + 1)
    rows = offsets[0] + stride * (starts[0] + np.arange(c))
    cols = offsets[1] + stride * (starts[1] + np.arange(c))
    return rows, cols
