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
import os
import pathlib
import re
from typing import Any

from absl import logging
from PIL import Image
import tensorflow_datasets as tfds

from cips_jax import images
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
    source_dir: the folder to read (recursively). None: use the download
      config's `manual_dir`, i.e.
      `tfds.download.DownloadConfig(manual_dir=...)`.
    resolution: the shorter side of every stored image, in pixels.
    num_threads: images decoded/resized/encoded in parallel (pillow releases the
      GIL).
  """

  source_dir: str | None = None
  resolution: int = 256
  num_threads: int = 8


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
    cfg = self.builder_config
    files = images.find_images(source)
    if not files:
      raise FileNotFoundError(
        f'no {"/".join(images.IMAGE_EXTENSIONS)} files under {source}'
      )
    logging.info(
      'Preparing %d images from %s at resolution %d',
      len(files),
      source,
      cfg.resolution,
    )
    skipped = []

    def convert(path):
      return _load_resized_jpeg(path, cfg.resolution)

    with concurrent.futures.ThreadPoolExecutor(max(1, cfg.num_threads)) as pool:
      # Bounded chunks keep memory flat and the output in sorted order.
      for start in range(0, len(files), 256):
        chunk = files[start : start + 256]
        for path, result in zip(chunk, pool.map(convert, chunk)):
          key = path.relative_to(source).as_posix()
          if isinstance(result, Exception):
            logging.warning(
              'Skipping unreadable image %s: %s: %s',
              path,
              type(result).__name__,
              result,
            )
            skipped.append(key)
          else:
            yield key, {'image': result}
    if skipped:
      logging.warning(
        'Skipped %d unreadable file(s) of %d in %s: %s',
        len(skipped),
        len(files),
        source,
        ', '.join(skipped),
      )
    if len(skipped) == len(files):
      raise ValueError(
        f'none of the {len(files)} image files under {source} could be read'
      )
    # Saved with the dataset info once the split is written.
    self.info.metadata.update(
      {
        'source_dir': str(source),
        'resolution': cfg.resolution,
        'encoding': f'jpeg{JPEG_QUALITY}',
        'num_files': len(files),
        'skipped_files': skipped,
      }
    )


def _load_resized_jpeg(
  path: pathlib.Path, resolution: int
) -> bytes | Exception:
  """The file as RGB, resized and JPEG-encoded.

  Returns the exception instead if the file cannot be read.
  """
  try:
    with Image.open(path) as image:
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
  source = pathlib.Path(source_dir).resolve()
  if resolution < 1:
    raise ValueError(f'resolution must be positive, got {resolution}')
  name = name or _default_folder_name(source, resolution)
  if not re.fullmatch(r'[A-Za-z0-9_]+', name):
    raise ValueError(
      f'dataset name must be letters, digits and _, got {name!r}'
    )
  config = ImageFolderConfig(
    name=name,
    source_dir=str(source),
    resolution=resolution,
    num_threads=num_threads or min(8, os.cpu_count() or 1),
    description=f'{source} at resolution {resolution}',
  )
  builder = ImageFolder(config=config, data_dir=os.fspath(data_dir))
  if builder.is_prepared():
    # tfds would silently reuse it: make sure it is what was asked for.
    old = builder.info.metadata or {}
    if (old.get('source_dir'), old.get('resolution')) != (
      str(source),
      resolution,
    ):
      raise ValueError(
        f'{builder.data_dir} already holds images from '
        f'{old.get("source_dir")} at '
        f'resolution {old.get("resolution")}; pass another name or delete it'
      )
  builder.download_and_prepare(file_format='array_record')
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

  Without TensorFlow, or if the LSUN download server (dl.yf.io) is unreachable,
  export the LMDB to image files with LSUN's own tool (github.com/fyu/lsun:
  `python data.py export church_outdoor_train_lmdb --out_dir DIR`) and use
  `prepare_image_folder(DIR, data_dir, 256, 'church_outdoor_256')`, which is
  also the way to get other resolutions.

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
      '(needs TensorFlow to prepare)'
    )
  if dataset == 'image_folder':
    return (
      f'python -m cips_jax.data folder SOURCE_DIR --data_dir {data_dir} '
      f'--resolution RESOLUTION --name {config or "NAME"}'
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
