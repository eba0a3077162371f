r"""TFDS builders for the training images, prepared as ArrayRecord files.

Everything here works with tensorflow-datasets alone (no TensorFlow) because the
builders are defined in a package module, are prepared with
`file_format='array_record'`, yield images as PIL images or encoded bytes (never
numpy arrays, whose encoding calls TensorFlow) and are read back with
`sources.load_source` (a random-access `tfds` data source, decoded with pillow).
`preparation` prepares them (`python -m cips_jax.data` from the shell).

Datasets, each stored under `DATA_DIR/<name>/<config>/<version>/`:

- `procedural_landscapes/{s32,s64,s256,panorama_s64}`: download-free procedural
  landscapes (`cips_jax.data.procedural`); image i is the scene with seed i.
      python -m cips_jax.data procedural --data_dir DATA_DIR --config s32
- `image_folder/<name>`: any tree of JPEG/PNG/WebP files, converted to RGB
  (transparent images composited on a background colour, white by default)
  and resized so that the shorter side equals the resolution (the reference's
  prepare_data.py, minus LMDB); stored as JPEG quality 95.
      python -m cips_jax.data folder SOURCE_DIR --data_dir DATA_DIR \
          --resolution 256 [--name N] [--background white]
  The same from the images of an LMDB (LSUN's own, e.g.
  church_outdoor_train_lmdb, or one the reference's prepare_data.py made; see
  `lmdb_source`); needs the `lmdb` extra, not TensorFlow.
      python -m cips_jax.data lmdb LMDB_PATH --data_dir DATA_DIR \
          --resolution 256 [--name N]
- `lsun/church_outdoor`: the TFDS catalog's LSUN builder (preparing it needs
  TensorFlow, reading it does not).
      python -m cips_jax.data lsun --data_dir DATA_DIR
"""

from __future__ import annotations

from collections.abc import Iterator
import concurrent.futures
import dataclasses
import io
import itertools
import pathlib
from typing import Any

from absl import logging
import numpy as np
from PIL import Image
import tensorflow_datasets as tfds

from cips_jax import errors
from cips_jax import images
from cips_jax.data import lmdb_source
from cips_jax.data import procedural

JPEG_QUALITY = 95
WHITE = (255, 255, 255)  # the default background of transparent images
NAMED_SKIPS = 5  # unreadable images named one by one; the rest are counted
_VERSION = tfds.core.Version('1.0.0')


def name_some(keys: list[str], limit: int = NAMED_SKIPS) -> str:
  """The first `limit` of `keys`, then how many more: 'a, b ... and 7 more'.

  Keeps a log line or message short however many files were skipped.
  """
  named = ', '.join(keys[:limit])
  rest = len(keys) - limit
  return f'{named} ... and {rest} more' if rest > 0 else named


# ------------------------------------------------------------------------------
# Procedural landscapes
# ------------------------------------------------------------------------------


@dataclasses.dataclass(eq=False)
class _ProceduralConfig(tfds.core.BuilderConfig):
  """One size of the procedural data set.

  It holds `num_images` images of `height` x `width`.
  """

  height: int = 32
  width: int = 32
  num_images: int = 2048
  kind: str = 'landscape'  # or 'panorama' (a full 360 degree cylinder)


def _procedural_config(name, height, width, num_images, kind='landscape'):
  what = '360 degree panoramas' if kind == 'panorama' else 'landscapes'
  return _ProceduralConfig(
    name=name,
    height=height,
    width=width,
    num_images=num_images,
    kind=kind,
    description=(
      f'{num_images} procedural {what} of {height}x{width}; image i has seed i.'
    ),
  )


class ProceduralLandscapes(tfds.core.GeneratorBasedBuilder):
  """Procedural landscapes: deterministic, no download.

  Made by `cips_jax.data.procedural`. Features: {'image': uint8 (H, W, 3)}
  stored as PNG. The single split 'train' holds images 0 .. num_images-1 in
  order, image i being `procedural.landscape(i, H, W)` (or
  `procedural.panorama(i, H, W)` for the `panorama_*` configs).
  """

  VERSION = _VERSION
  RELEASE_NOTES = {'1.0.0': 'First release.'}
  BUILDER_CONFIGS = [
    _procedural_config('s32', 32, 32, 2048),
    _procedural_config('s64', 64, 64, 4096),
    _procedural_config('s256', 256, 256, 4096),
    _procedural_config('panorama_s64', 64, 256, 2048, kind='panorama'),
  ]

  def _info(self) -> tfds.core.DatasetInfo:
    cfg = self.builder_config
    return tfds.core.DatasetInfo(
      builder=self,
      description=cfg.description,
      features=tfds.features.FeaturesDict(
        {
          'image': tfds.features.Image(
            shape=(cfg.height, cfg.width, 3), encoding_format='png'
          )
        }
      ),
      # record i must be image i: the data set is its seeds
      disable_shuffling=True,
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing to download
    return {'train': self._generate_examples()}

  def _generate_examples(self) -> Iterator[tuple[int, dict[str, Any]]]:
    cfg = self.builder_config
    render = (
      procedural.panorama if cfg.kind == 'panorama' else procedural.landscape
    )
    for i in range(cfg.num_images):
      # A PIL image: tfds encodes it as PNG with pillow (a numpy array would
      # need TensorFlow).
      yield i, {'image': Image.fromarray(render(i, cfg.height, cfg.width))}


# ------------------------------------------------------------------------------
# A folder of images
# ------------------------------------------------------------------------------


@dataclasses.dataclass(eq=False)
class ImageFolderConfig(tfds.core.BuilderConfig):
  """Where the images come from and the size they are stored at.

  Attributes:
    source_dir: the folder to read (recursively), or the LMDB when
      `source_format` is 'lmdb'. None: use the download config's `manual_dir`,
      i.e. `tfds.download.DownloadConfig(manual_dir=...)`.
    resolution: the shorter side of every stored image, in pixels.
    num_threads: images decoded/resized/encoded in parallel (pillow releases the
      GIL).
    source_format: 'folder' (a tree of image files) or 'lmdb' (an LMDB of
      encoded images, either layout of `lmdb_source`).
    background: (R, G, B) in 0..255, the colour transparent images are
      composited on (see `flatten`).
  """

  source_dir: str | None = None
  resolution: int = 256
  num_threads: int = 8
  source_format: str = 'folder'
  background: tuple[int, int, int] = WHITE


class ImageFolder(tfds.core.GeneratorBasedBuilder):
  """Any tree of JPEG/PNG/WebP images, shorter side resized to `resolution`.

  What the reference's prepare_data.py does, stored as ArrayRecord instead of
  LMDB:
  - files are found recursively by extension (.jpg .jpeg .png .webp, any case),
    sorted by their path relative to the source folder; record i is the i-th
    readable file;
  - each image is converted to RGB (grayscale, palette, CMYK all become RGB;
    images with transparency, i.e. an alpha channel or a transparent palette
    entry or colour, are composited on the config's `background`, see
    `flatten`) and resized with PIL
    bilinear so that its SHORTER side equals `resolution` (the longer side
    becomes int(resolution * long / short), as torchvision's resize); no centre
    crop, so images may be non-square;
  - it is stored as JPEG quality 95 with full-resolution chroma (the reference
    used JPEG 85).
  Unreadable or corrupt files are skipped: the first `NAMED_SKIPS` are named in
  a warning each (absl logging) and a last warning counts them all, naming the
  first few; the full list is kept in `builder.info.metadata['skipped_files']`
  (also saved with the data).

  With `source_format='lmdb'` the images are an LMDB's instead, in the order of
  `lmdb_source.LmdbImages` (LSUN's layout: key order; prepare_data.py's: index
  order, at the stored size chosen by `lmdb_source.select_size`), converted the
  same way; record keys and `skipped_files` are then the LMDB's keys.

  The source folder comes from the config (`ImageFolderConfig(source_dir=...)`,
  what `prepare_image_folder` uses) or, when that is None, from
  `download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=...))`.
  Features: {'image': uint8 (H, W, 3)}, H and W varying. Split: 'train'.
  """

  VERSION = _VERSION
  RELEASE_NOTES = {'1.0.0': 'First release.'}
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
    'Pass the folder of images as ImageFolderConfig(source_dir=...) or as '
    'tfds.download.DownloadConfig(manual_dir=...).'
  )

  def _info(self) -> tfds.core.DatasetInfo:
    cfg = self.builder_config
    if cfg is None:
      raise errors.DataError(
        'ImageFolder needs a config: ImageFolder(config=ImageFolderConfig('
        'name=..., resolution=...), data_dir=...) or prepare_image_folder(...)'
      )
    return tfds.core.DatasetInfo(
      builder=self,
      description=(
        f'Images resized to a shorter side of {cfg.resolution} px, '
        f'stored as JPEG quality {JPEG_QUALITY}.'
      ),
      features=tfds.features.FeaturesDict(
        {
          'image': tfds.features.Image(
            shape=(None, None, 3), encoding_format='jpeg'
          )
        }
      ),
      metadata=tfds.core.MetadataDict(),
      # keep the sorted file order, as the reference does
      disable_shuffling=True,
    )

  def _split_generators(self, dl_manager):
    cfg = self.builder_config
    source = (
      pathlib.Path(cfg.source_dir)
      if cfg.source_dir
      else pathlib.Path(dl_manager.manual_dir)
    )
    return {'train': self._generate_examples(source)}

  def _generate_examples(
    self, source: pathlib.Path
  ) -> Iterator[tuple[str, dict[str, Any]]]:
    if self.builder_config.source_format == 'lmdb':
      with lmdb_source.LmdbImages(
        source, self.builder_config.resolution
      ) as entries:
        logging.info('Reading LMDB %s: %s', source, entries.describe())
        yield from self._convert_all(
          entries.items(), len(entries), source, {'layout': entries.describe()}
        )
      return
    files = images.find_images(source)
    if not files:
      raise errors.MissingInputError(
        f'no {"/".join(images.IMAGE_EXTENSIONS)} files under {source}'
      )
    items = ((path.relative_to(source).as_posix(), path) for path in files)
    yield from self._convert_all(items, len(files), source, {})

  def _convert_all(
    self,
    items: Iterator[tuple[str, pathlib.Path | bytes | None]],
    count: int,
    source: pathlib.Path,
    metadata: dict[str, Any],
  ) -> Iterator[tuple[str, dict[str, Any]]]:
    """The examples of `count` (key, image file or encoded bytes) `items`.

    Unreadable images (None: a missing entry) are skipped, named and counted.
    """
    cfg = self.builder_config
    logging.info(
      'Preparing %d images from %s at resolution %d',
      count,
      source,
      cfg.resolution,
    )
    skipped = []

    def convert(image):
      return _load_resized_jpeg(image, cfg.resolution, tuple(cfg.background))

    with concurrent.futures.ThreadPoolExecutor(max(1, cfg.num_threads)) as pool:
      # Bounded chunks keep memory flat and the output in order.
      while chunk := list(itertools.islice(items, 256)):
        keys, inputs = zip(*chunk)
        for key, result in zip(keys, pool.map(convert, inputs)):
          if isinstance(result, Exception):
            # One line each for the first few only: a damaged source may have
            # millions.
            if len(skipped) < NAMED_SKIPS:
              logging.warning(
                'Skipping unreadable image %s in %s: %s: %s',
                key,
                source,
                type(result).__name__,
                result,
              )
            skipped.append(key)
          else:
            yield key, {'image': result}
    if skipped:
      logging.warning(
        'Skipped %d unreadable image(s) of %d in %s: %s',
        len(skipped),
        count,
        source,
        name_some(skipped),
      )
    if len(skipped) == count:
      raise errors.DataError(
        f'none of the {count} images in {source} could be read'
      )
    # Saved with the dataset info once the split is written.
    self.info.metadata.update(
      {
        'source_dir': str(source),
        'source_format': cfg.source_format,
        'resolution': cfg.resolution,
        'background': list(cfg.background),
        'encoding': f'jpeg{JPEG_QUALITY}',
        'num_files': count,
        'skipped_files': skipped,
        **metadata,
      }
    )


# Modes with an alpha channel (PIL converts each to RGBA), and the modes whose
# `transparency` info (a palette index or one colour) marks transparent pixels.
_ALPHA_MODES = ('RGBA', 'LA', 'PA', 'RGBa')
_KEYED_MODES = ('P', 'L', 'RGB')


def _has_transparency(image: Image.Image) -> bool:
  """Whether some pixels of `image` may be (partly) transparent.

  True for an alpha channel (RGBA, LA, PA, RGBa), a palette with alpha, or a
  `transparency` entry (a palette index, or the one transparent colour of an
  L or RGB PNG).
  """
  if image.mode in _ALPHA_MODES:
    return True
  if image.mode == 'P' and image.palette and image.palette.mode == 'RGBA':
    return True
  return image.mode in _KEYED_MODES and 'transparency' in image.info


def flatten(
  image: Image.Image, background: tuple[int, int, int] = WHITE
) -> Image.Image:
  """`image` as RGB, transparent pixels composited on `background`.

  A pixel (c, alpha) becomes round((c * alpha + b * (255 - alpha)) / 255) per
  channel, b being the background's: fully opaque pixels keep their colour
  exactly, fully transparent ones become the background. Images without
  transparency are converted by `images.to_rgb` (unchanged).

  Args:
    image: any PIL image, (H, W) pixels.
    background: (R, G, B) in 0..255.
  Returns:
    An RGB image, (H, W) pixels.
  """
  if not _has_transparency(image):
    return images.to_rgb(image)
  rgba = np.asarray(image.convert('RGBA'), np.uint32)  # (H, W, 4)
  alpha = rgba[..., 3:]
  # in integers: + 127 rounds the division by 255 to nearest (never a tie)
  mixed = (
    rgba[..., :3] * alpha
    + np.asarray(background, np.uint32) * (255 - alpha)
    + 127
  ) // 255
  return Image.fromarray(mixed.astype(np.uint8))


def _load_resized_jpeg(
  source: pathlib.Path | bytes | None,
  resolution: int,
  background: tuple[int, int, int] = WHITE,
) -> bytes | Exception:
  """The image (a file or its encoded bytes) as RGB, resized, JPEG-encoded.

  Transparent images are composited on `background` first (see `flatten`).
  Returns the exception instead if the image cannot be read.
  """
  try:
    if source is None:
      raise KeyError('no such entry')
    if isinstance(source, bytes):
      source = io.BytesIO(source)
    with Image.open(source) as image:
      # Measured from the header, before decoding: a small file can declare
      # a picture of gigabytes (a 16-bit PNG of 9000 x 9000 is a few KB).
      width, height = image.size
      if width * height > images.MAX_DECODED_PIXELS:
        raise ValueError(
          f'{width}x{height} pixels, more than the '
          f'{images.MAX_DECODED_PIXELS:,} an image may have'
        )
      # decodes everything now: truncated files fail here, not later
      image.load()
      image = images.resize_shorter_side(flatten(image, background), resolution)
    buffer = io.BytesIO()
    image.save(buffer, format='JPEG', quality=JPEG_QUALITY, subsampling=0)
    return buffer.getvalue()
  except Exception as e:  # pylint: disable=broad-except
    # PIL signals corrupt data with many exception types (OSError, SyntaxError,
    # ValueError, DecompressionBombError, struct.error, ...); any of them means
    # "skip this file".
    return e
