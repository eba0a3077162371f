r"""TFDS builders for the training images, prepared as ArrayRecord files.

Everything here works with tensorflow-datasets alone (no TensorFlow) because the
builders are defined in a package module, are prepared with
`file_format='array_record'`, yield images as PIL images or encoded bytes (never
numpy arrays, whose encoding calls TensorFlow) and are read back with
`load_source` (a random-access `tfds` data source, decoded with pillow).

Datasets, each stored under `DATA_DIR/<name>/<config>/<version>/`:

- `procedural_landscapes/{s32,s64,s256,panorama_s64}`: download-free procedural
  landscapes (`cips_jax.data.procedural`); image i is the scene with seed i.
      python -m cips_jax.data procedural --data_dir DATA_DIR --config s32
- `image_folder/<name>`: any tree of JPEG/PNG/WebP files, converted to RGB and
  resized so that the shorter side equals the resolution (the reference's
  prepare_data.py, minus LMDB); stored as JPEG quality 95.
      python -m cips_jax.data folder SOURCE_DIR --data_dir DATA_DIR \
          --resolution 256 [--name N]
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
import importlib.util
import io
import itertools
import os
import pathlib
import re
from typing import Any

from absl import logging
from PIL import Image
import tensorflow_datasets as tfds

from cips_jax import images
from cips_jax.data import lmdb_source
from cips_jax.data import procedural

JPEG_QUALITY = 95
_VERSION = tfds.core.Version('1.0.0')


# ------------------------------------------------------------------------------
# Procedural landscapes
# ------------------------------------------------------------------------------


@dataclasses.dataclass(eq=False)
class ProceduralConfig(tfds.core.BuilderConfig):
  """One size of the procedural data set.

  It holds `num_images` images of `height` x `width`.
  """

  height: int = 32
  width: int = 32
  num_images: int = 2048
  kind: str = 'landscape'  # or 'panorama' (a full 360 degree cylinder)


def _procedural_config(name, height, width, num_images, kind='landscape'):
  what = '360 degree panoramas' if kind == 'panorama' else 'landscapes'
  return ProceduralConfig(
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
  """

  source_dir: str | None = None
  resolution: int = 256
  num_threads: int = 8
  source_format: str = 'folder'


class ImageFolder(tfds.core.GeneratorBasedBuilder):
  """Any tree of JPEG/PNG/WebP images, shorter side resized to `resolution`.

  What the reference's prepare_data.py does, stored as ArrayRecord instead of
  LMDB:
  - files are found recursively by extension (.jpg .jpeg .png .webp, any case),
    sorted by their path relative to the source folder; record i is the i-th
    readable file;
  - each image is converted to RGB (grayscale, palette, RGBA, CMYK all become
    RGB; alpha is dropped as PIL's convert('RGB') does) and resized with PIL
    bilinear so that its SHORTER side equals `resolution` (the longer side
    becomes int(resolution * long / short), as torchvision's resize); no centre
    crop, so images may be non-square;
  - it is stored as JPEG quality 95 with full-resolution chroma (the reference
    used JPEG 85).
  Unreadable or corrupt files are skipped: each one is named in a warning (absl
  logging), and the list is kept in `builder.info.metadata['skipped_files']`
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
      raise ValueError(
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
      raise FileNotFoundError(
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
      return _load_resized_jpeg(image, cfg.resolution)

    with concurrent.futures.ThreadPoolExecutor(max(1, cfg.num_threads)) as pool:
      # Bounded chunks keep memory flat and the output in order.
      while chunk := list(itertools.islice(items, 256)):
        keys, inputs = zip(*chunk)
        for key, result in zip(keys, pool.map(convert, inputs)):
          if isinstance(result, Exception):
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
        ', '.join(skipped),
      )
    if len(skipped) == count:
      raise ValueError(f'none of the {count} images in {source} could be read')
    # Saved with the dataset info once the split is written.
    self.info.metadata.update(
      {
        'source_dir': str(source),
        'source_format': cfg.source_format,
        'resolution': cfg.resolution,
        'encoding': f'jpeg{JPEG_QUALITY}',
        'num_files': count,
        'skipped_files': skipped,
        **metadata,
      }
    )


def _load_resized_jpeg(
  source: pathlib.Path | bytes | None, resolution: int
) -> bytes | Exception:
  """The image (a file or its encoded bytes) as RGB, resized, JPEG-encoded.

  Returns the exception instead if the image cannot be read.
  """
  try:
    if source is None:
      raise KeyError('no such entry')
    if isinstance(source, bytes):
      source = io.BytesIO(source)
    with Image.open(source) as image:
      # decodes everything now: truncated files fail here, not later
      image.load()
      image = images.resize_shorter_side(images.to_rgb(image), resolution)
    buffer = io.BytesIO()
    image.save(buffer, format='JPEG', quality=JPEG_QUALITY, subsampling=0)
    return buffer.getvalue()
  except Exception as e:  # pylint: disable=broad-except
    # PIL signals corrupt data with many exception types (OSError, SyntaxError,
    # ValueError, DecompressionBombError, struct.error, ...); any of them means
    # "skip this file".
    return e


# ------------------------------------------------------------------------------
# Preparing and loading
# ------------------------------------------------------------------------------


def prepare_procedural(
  data_dir: str | os.PathLike, config_name: str = 's32'
) -> ProceduralLandscapes:
  """Generates `procedural_landscapes/<config_name>` under `data_dir`.

  A no-op if it is already present.

  Args:
    data_dir: root of the prepared data sets.
    config_name: 's32' (2048 x 32x32), 's64' (4096 x 64x64), 's256' (4096 x
      256x256) or 'panorama_s64' (2048 x 64x256 full 360 degree panoramas).
  Returns:
    The prepared builder, which
    `load_source(data_dir, f'procedural_landscapes/{config_name}')` reads.
  """
  builder = ProceduralLandscapes(
    config=config_name, data_dir=os.fspath(data_dir)
  )
  builder.download_and_prepare(file_format='array_record')
  return builder


def _default_folder_name(source_dir: pathlib.Path, resolution: int) -> str:
  stem = (
    re.sub(r'[^a-z0-9]+', '_', source_dir.resolve().name.lower()).strip('_')
    or 'images'
  )
  return f'{stem}_{resolution}'


def prepare_image_folder(
  source_dir: str | os.PathLike,
  data_dir: str | os.PathLike,
  resolution: int,
  name: str | None = None,
  *,
  num_threads: int | None = None,
) -> ImageFolder:
  """Prepares `image_folder/<name>` under `data_dir` from `source_dir`'s images.

  Args:
    source_dir: folder searched recursively for .jpg/.jpeg/.png/.webp files
      (any case).
    data_dir: root of the prepared data sets.
    resolution: shorter side of the stored images (bilinear resize, no crop).
    name: config name (letters, digits, '_'); default
      `<source folder name>_<resolution>`.
    num_threads: parallel image conversions (default: min(8, CPU count)).
  Returns:
    The prepared builder. `builder.info.metadata['skipped_files']` lists the
    unreadable files (paths relative to `source_dir`);
    `load_source(data_dir, f'image_folder/{name}')` reads the images, uint8
    (H, W, 3) with min(H, W) == resolution.
  Raises:
    ValueError: if `name` already holds images prepared from another folder or
      resolution.
  """
  return _prepare_images(
    'folder', source_dir, data_dir, resolution, name, num_threads
  )


def prepare_lmdb(
  lmdb_path: str | os.PathLike,
  data_dir: str | os.PathLike,
  resolution: int,
  name: str | None = None,
  *,
  num_threads: int | None = None,
) -> ImageFolder:
  """Prepares `image_folder/<name>` under `data_dir` from an LMDB's images.

  The LMDB is LSUN's own (e.g. church_outdoor_train_lmdb: image id -> encoded
  image) or the reference prepare_data.py's ('<size>-<index>' -> JPEG, and
  b'length'); the layout is detected and stated in the log (see
  `lmdb_source`). The images are stored as `prepare_image_folder` stores a
  folder's: RGB, shorter side resized to `resolution`, JPEG 95. Needs the lmdb
  package (`pip install cips_jax[lmdb]`), not TensorFlow.

  Args:
    lmdb_path: the LMDB: a directory holding data.mdb, or a single file.
    data_dir: root of the prepared data sets.
    resolution: shorter side of the stored images. From a prepare_data.py LMDB,
      the entries of this size are read, else those of the smallest larger
      stored size (resized).
    name: config name (letters, digits, '_'); default
      `<LMDB file or folder name>_<resolution>`.
    num_threads: parallel image conversions (default: min(8, CPU count)).
  Returns:
    The prepared builder. `builder.info.metadata['skipped_files']` lists the
    keys of the entries that could not be decoded, `['layout']` what was
    read; `load_source(data_dir, f'image_folder/{name}')` reads the images.
  Raises:
    ImportError: the lmdb package is not installed.
    FileNotFoundError: `lmdb_path` does not exist.
    ValueError: `lmdb_path` is not an LMDB, holds no decodable image, or (from
      prepare_data.py) no size at least `resolution`; or `name` already holds
      other images. Nothing is written then.
  """
  return _prepare_images(
    'lmdb', lmdb_path, data_dir, resolution, name, num_threads
  )


def _prepare_images(
  source_format: str,
  source_path: str | os.PathLike,
  data_dir: str | os.PathLike,
  resolution: int,
  name: str | None,
  num_threads: int | None,
) -> ImageFolder:
  """`image_folder/<name>` from a folder or an LMDB (`source_format`)."""
  source = pathlib.Path(source_path).resolve()
  if resolution < 1:
    raise ValueError(f'resolution must be positive, got {resolution}')
  name = name or _default_folder_name(source, resolution)
  if not re.fullmatch(r'[A-Za-z0-9_]+', name):
    raise ValueError(
      f'dataset name must be letters, digits and _, got {name!r}'
    )
  description = f'{source} at resolution {resolution}'
  if source_format == 'lmdb':
    # Fails here, before anything is written, if it is no usable LMDB.
    with lmdb_source.LmdbImages(source, resolution) as entries:
      description = f'LMDB {description}: {entries.describe()}'
  config = ImageFolderConfig(
    name=name,
    source_dir=str(source),
    resolution=resolution,
    num_threads=num_threads or min(8, os.cpu_count() or 1),
    source_format=source_format,
    description=description,
  )
  data_dir = pathlib.Path(data_dir)
  new_dirs = [
    d
    for d in (
      data_dir / 'image_folder' / name,
      data_dir / 'image_folder',
      data_dir / 'downloads' / 'extracted',
      data_dir / 'downloads',
      data_dir,
    )
    if not d.exists()
  ]
  builder = ImageFolder(config=config, data_dir=os.fspath(data_dir))
  if builder.is_prepared():
    # tfds would silently reuse it: make sure it is what was asked for.
    old = builder.info.metadata or {}
    asked = (str(source), resolution, source_format)
    found = (
      old.get('source_dir'),
      old.get('resolution'),
      old.get('source_format', 'folder'),
    )
    if found != asked:
      raise ValueError(
        f'{builder.data_dir} already holds images from '
        f'{old.get("source_dir")} at '
        f'resolution {old.get("resolution")}; pass another name or delete it'
      )
  try:
    builder.download_and_prepare(file_format='array_record')
  except BaseException:
    # tfds removes its unfinished files; the empty folders it made go too.
    for folder in new_dirs:
      if folder.is_dir() and not any(folder.iterdir()):
        folder.rmdir()
    raise
  return builder


def prepare_lsun_churches(
  data_dir: str | os.PathLike, *, download_dir: str | os.PathLike | None = None
):
  """Prepares the TFDS catalog's `lsun/church_outdoor` as ArrayRecord.

  The data set has 126,227 train images. The catalog builder reads LSUN's LMDB
  with TensorFlow and tensorflow-io, so PREPARING needs
      pip install 'cips_jax[lsun]'
  (or: pip install tensorflow-cpu tensorflow-io) once, on any machine; the
  result (DATA_DIR/lsun/church_outdoor/3.1.0/*.array_record*) is then read
  without TensorFlow by `load_source(data_dir, 'lsun/church_outdoor')`. The
  images are LSUN's own (shorter side 256, about 3 GB); train at 256 with random
  256x256 crops (`TrainBatches(..., resolution=256)`), as the reference's
  `--to_crop`.

  Without TensorFlow, prepare LSUN's LMDB itself (church_outdoor_train_lmdb,
  from the LSUN download) with `prepare_lmdb(LMDB, data_dir, 256,
  'church_outdoor')`, which is also the way to get other resolutions.

  Args:
    data_dir: root of the prepared data sets.
    download_dir: where the LMDB zips are downloaded (default
      DATA_DIR/downloads).
  Returns:
    The prepared tfds builder.
  Raises:
    ImportError: if TensorFlow or tensorflow-io is not installed.
  """
  missing = [
    m
    for m in ('tensorflow', 'tensorflow_io')
    if importlib.util.find_spec(m) is None
  ]
  if missing:
    raise ImportError(
      'preparing LSUN needs TensorFlow: pip install cips_jax[lsun] (or pip '
      f'install tensorflow-cpu tensorflow-io); missing: {", ".join(missing)}. '
      'Reading the prepared data does not need it. Alternatively export the '
      'LMDB to images and use prepare_image_folder (see the docstring of '
      'prepare_lsun_churches).'
    )
  builder = tfds.builder('lsun/church_outdoor', data_dir=os.fspath(data_dir))
  builder.download_and_prepare(
    download_dir=None if download_dir is None else os.fspath(download_dir),
    file_format='array_record',
  )
  return builder


def prepare_command(data_dir: str | os.PathLike, name: str) -> str:
  """The shell command that prepares data set `name`.

  `name` is e.g. 'procedural_landscapes/s32'.
  """
  dataset, _, config = name.partition('/')
  config = config.split(':')[0]
  if dataset == 'procedural_landscapes':
    return (
      f'python -m cips_jax.data procedural --data_dir {data_dir} '
      f'--config {config or "s32"}'
    )
  if dataset == 'lsun':
    return (
      f'python -m cips_jax.data lsun --data_dir {data_dir}  '
      "(needs TensorFlow to prepare; without it, prepare LSUN's LMDB with "
      'python -m cips_jax.data lmdb church_outdoor_train_lmdb --data_dir '
      f'{data_dir} --resolution 256 --name church_outdoor and train with '
      '--config.data.name=image_folder/church_outdoor)'
    )
  if dataset == 'image_folder':
    flags = (
      f'--data_dir {data_dir} --resolution RESOLUTION --name {config or "NAME"}'
    )
    return (
      f'python -m cips_jax.data folder SOURCE_DIR {flags}  (or from an '
      f'LMDB: python -m cips_jax.data lmdb LMDB_PATH {flags})'
    )
  return f'tfds build {name} --data_dir {data_dir} --file_format array_record'


def _version_dirs(path: pathlib.Path) -> list[pathlib.Path]:
  """Finished data set version folders (x.y.z) under `path`, oldest first."""
  if not path.is_dir():
    return []
  found = []
  for child in path.iterdir():
    if (
      re.fullmatch(r'\d+\.\d+\.\d+', child.name)
      and (child / 'dataset_info.json').exists()
    ):
      found.append((tuple(int(v) for v in child.name.split('.')), child))
  return [p for _, p in sorted(found)]


def load_source(data_dir: str | os.PathLike, name: str, split: str = 'train'):
  """A random-access data source over a prepared data set; no TensorFlow needed.

  Args:
    data_dir: root of the prepared data sets.
    name: '<dataset>/<config>' with an optional ':<version>' (default: the
      newest prepared), e.g. 'procedural_landscapes/s32',
      'image_folder/churches_256', 'lsun/church_outdoor'.
    split: e.g. 'train'.
  Returns:
    A sequence-like source: `len(source)`, `source[i]` -> {'image': uint8
    (H, W, 3)} and `source.__getitems__(indices)`; grain reads it.
  Raises:
    FileNotFoundError: naming the folder searched and the command that prepares
      it.
  """
  dataset_config, _, version = name.partition(':')
  path = pathlib.Path(data_dir) / dataset_config
  versions = _version_dirs(path)
  if version:
    versions = [v for v in versions if v.name == version]
  if not versions:
    raise FileNotFoundError(
      f'no prepared data set {name!r} in {path} (looked for '
      f'{path}/{version or "<version>"}/dataset_info.json). '
      'Prepare it with:\n  '
      f'{prepare_command(data_dir, name)}'
    )
  # Reading from the directory needs neither the builder's code nor TensorFlow
  # (LSUN's needs).
  builder = tfds.builder_from_directory(os.fspath(versions[-1]))
  if split not in builder.info.splits:
    raise ValueError(
      f'{name} has no split {split!r}; it has {sorted(builder.info.splits)}'
    )
  return builder.as_data_source(split=split)


PROCEDURAL_DATASET = 'procedural_landscapes'


def open_source(data_dir: str | os.PathLike, name: str, split: str = 'train'):
  """`load_source`, except that procedural data sets are generated on first use.

  Args:
    data_dir: root of the prepared data sets (`~` is expanded).
    name: as for `load_source`. Names under `procedural_landscapes/` are
      generated here when missing (deterministically, no download); every
      other data set must be prepared first.
  Returns:
    The random-access source (see `load_source`).
  Raises:
    FileNotFoundError: a data set that is not procedural and not prepared; the
      message gives the command that prepares it.
  """
  data_dir = os.path.expanduser(os.fspath(data_dir))
  dataset, _, config = name.partition(':')[0].partition('/')
  if dataset == PROCEDURAL_DATASET:
    try:
      return load_source(data_dir, name, split)
    except FileNotFoundError:
      prepare_procedural(data_dir, config or 's32')
  return load_source(data_dir, name, split)
