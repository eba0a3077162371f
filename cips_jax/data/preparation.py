"""Preparing the data sets: what `python -m cips_jax.data` runs.

    preparation.prepare_procedural(DATA_DIR, 's32')
    preparation.prepare_image_folder('photos/', DATA_DIR, 256, 'photos')
    preparation.prepare_lmdb('church_outdoor_train_lmdb', DATA_DIR, 256)
    preparation.prepare_lsun_churches(DATA_DIR)  # needs TensorFlow

Each writes ArrayRecord files with a `builders` builder (or the tfds catalog's,
for LSUN); `sources.load_source` reads them back. tfds writes into a temporary
`incomplete.*` folder beside the version folder and renames it when done,
removing it on an exception; here a SIGTERM raises one too, so a stopped
preparation leaves nothing that could pass for data (a killed one may leave
the temporary folder, which `load_source` ignores and names).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
import contextlib
import importlib.util
import io
import os
import pathlib
import re
import signal
import threading

from absl import logging
import tensorflow_datasets as tfds
from tensorflow_datasets.core import constants as tfds_constants

from cips_jax import errors
from cips_jax.data import builders
from cips_jax.data import lmdb_source

BACKGROUND_NAMES = {'white': builders.WHITE, 'black': (0, 0, 0)}
BACKGROUND_FORMS = 'white, black, R,G,B (each 0-255) or #rrggbb'


def parse_background(
  value: str | Sequence[int], what: str = 'background'
) -> tuple[int, int, int]:
  """The (R, G, B) colour `value` names.

  Args:
    value: 'white', 'black', 'R,G,B' with integers 0..255 (e.g. '0,128,255'),
      '#rrggbb' (hex, e.g. '#0080ff'), or already an (R, G, B) sequence.
    what: how an error names the value (e.g. '--background').
  Returns:
    (R, G, B), ints in 0..255.
  Raises:
    ValueError: a one-line message naming `what` and the accepted forms.
  """
  if isinstance(value, str):
    text = value.strip().lower()
    if text in BACKGROUND_NAMES:
      return BACKGROUND_NAMES[text]
    if re.fullmatch(r'#[0-9a-f]{6}', text):
      return tuple(int(text[i : i + 2], 16) for i in (1, 3, 5))
    parts = text.split(',')
  else:
    parts = list(value)
  try:
    colour = tuple(int(str(part).strip()) for part in parts)
  except ValueError:
    colour = ()
  if len(colour) != 3 or not all(0 <= c <= 255 for c in colour):
    raise errors.DataError(f'{what} must be {BACKGROUND_FORMS}; got {value!r}')
  return colour


def incomplete_leftovers(config_dir: str | os.PathLike) -> list[pathlib.Path]:
  """What unfinished preparations left in `config_dir`, sorted.

  That is tfds's temporary `incomplete.*` folders (a preparation killed, or
  still running) and version folders (x.y.z) without dataset_info.json.

  Args:
    config_dir: a data set's folder, DATA_DIR/<dataset>/<config>.
  """
  path = pathlib.Path(config_dir)
  if not path.is_dir():
    return []
  return sorted(
    child
    for child in path.iterdir()
    if child.name.startswith(tfds_constants.INCOMPLETE_PREFIX)
    or (
      re.fullmatch(r'\d+\.\d+\.\d+', child.name)
      and not (child / 'dataset_info.json').exists()
    )
  )


class _Terminated(BaseException):
  """A SIGTERM, raised so that the preparation unwinds and cleans up."""


@contextlib.contextmanager
def _cleanup_on_sigterm() -> Iterator[None]:
  """Makes a SIGTERM unwind the block, then end the process as it would.

  SIGTERM's default action ends the process at once, leaving tfds's temporary
  folder (possibly gigabytes) behind; raised as an exception, it lets tfds and
  `_prepare_images` remove their partial output first. Only in the main thread
  (the only one signal handlers run in) and only where SIGTERM has its default
  action: a handler someone else installed is left alone.
  """
  if (
    threading.current_thread() is not threading.main_thread()
    or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL
  ):
    yield
    return

  def stop(signum, frame):
    del signum, frame
    # A second SIGTERM must not cut the cleanup short.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise _Terminated()

  signal.signal(signal.SIGTERM, stop)
  try:
    yield
  except _Terminated:
    logging.warning('SIGTERM: stopped preparing; its partial output is removed')
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    os.kill(os.getpid(), signal.SIGTERM)  # the exit status tells SIGTERM
    raise
  finally:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


@contextlib.contextmanager
def _tfds_output_in_the_log(progress_bars: bool) -> Iterator[None]:
  """Keeps what tfds prints during a preparation off the console.

  tfds prints 'Downloading and preparing dataset ...' and '... downloaded and
  prepared to ...' on stdout, where a command writes only its result, and
  draws a progress bar per stage. The lines are dropped (the command logs its
  own) and the bars shown only where `progress_bars` asks for them (a
  preparation long enough to need them); CIPS_JAX_VERBOSE=1 lets all of it
  through.
  """
  if os.environ.get('CIPS_JAX_VERBOSE', '') not in ('', '0'):
    yield
    return
  if not progress_bars:
    tfds.display_progress_bar(False)
  try:
    with contextlib.redirect_stdout(io.StringIO()):
      yield
  finally:
    if not progress_bars:
      tfds.display_progress_bar(True)


def _check_leftovers(builder: tfds.core.DatasetBuilder) -> None:
  """Names what unfinished preparations left beside `builder`'s data.

  Raises:
    ValueError: its version folder exists without dataset_info.json. tfds
      would take it for the finished data set and write nothing.
  """
  version_dir = pathlib.Path(builder.data_dir)
  if version_dir.exists() and not (version_dir / 'dataset_info.json').exists():
    raise errors.DataError(
      f'{version_dir} holds an unfinished data set (no dataset_info.json: a '
      'copy or preparation cut short); delete it and prepare again'
    )
  for leftover in incomplete_leftovers(version_dir.parent):
    # Not removed: it may be another preparation's, still running.
    logging.warning(
      'Ignoring %s: the partial output of a preparation that was killed (or '
      'is still running); delete it to free its space',
      leftover,
    )


def prepare_procedural(
  data_dir: str | os.PathLike, config_name: str = 's32'
) -> builders.ProceduralLandscapes:
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
  builder = builders.ProceduralLandscapes(
    config=config_name, data_dir=os.fspath(data_dir)
  )
  if builder.is_prepared():
    return builder
  _check_leftovers(builder)
  logging.info(
    'generating procedural_landscapes/%s in %s (first use; no download)',
    config_name,
    data_dir,
  )
  with _cleanup_on_sigterm(), _tfds_output_in_the_log(progress_bars=False):
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
  background: str | Sequence[int] = 'white',
) -> builders.ImageFolder:
  """Prepares `image_folder/<name>` under `data_dir` from `source_dir`'s images.

  Args:
    source_dir: folder searched recursively for .jpg/.jpeg/.png/.webp files
      (any case).
    data_dir: root of the prepared data sets.
    resolution: shorter side of the stored images (bilinear resize, no crop).
    name: config name (letters, digits, '_'); default
      `<source folder name>_<resolution>`.
    num_threads: parallel image conversions (default: min(8, CPU count)).
    background: the colour transparent images are composited on (see
      `parse_background` for the forms; `builders.flatten`).
  Returns:
    The prepared builder. `builder.info.metadata['skipped_files']` lists the
    unreadable files (paths relative to `source_dir`);
    `load_source(data_dir, f'image_folder/{name}')` reads the images, uint8
    (H, W, 3) with min(H, W) == resolution.
  Raises:
    ValueError: if `name` already holds images prepared from another folder,
      resolution or background, or an unfinished version folder; or
      `background` names no colour.
  """
  return _prepare_images(
    'folder', source_dir, data_dir, resolution, name, num_threads, background
  )


def prepare_lmdb(
  lmdb_path: str | os.PathLike,
  data_dir: str | os.PathLike,
  resolution: int,
  name: str | None = None,
  *,
  num_threads: int | None = None,
  background: str | Sequence[int] = 'white',
) -> builders.ImageFolder:
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
    background: the colour transparent images are composited on, as for
      `prepare_image_folder`.
  Returns:
    The prepared builder. `builder.info.metadata['skipped_files']` lists the
    keys of the entries that could not be decoded, `['layout']` what was
    read; `load_source(data_dir, f'image_folder/{name}')` reads the images.
  Raises:
    ImportError: the lmdb package is not installed.
    FileNotFoundError: `lmdb_path` does not exist.
    ValueError: `lmdb_path` is not an LMDB, is truncated, holds no decodable
      image, or (from prepare_data.py) no size at least `resolution` or fewer
      entries of that size than its b'length'; or `name` already holds other
      images. Nothing is written then.
  """
  return _prepare_images(
    'lmdb', lmdb_path, data_dir, resolution, name, num_threads, background
  )


def _prepare_images(
  source_format: str,
  source_path: str | os.PathLike,
  data_dir: str | os.PathLike,
  resolution: int,
  name: str | None,
  num_threads: int | None,
  background: str | Sequence[int],
) -> builders.ImageFolder:
  """`image_folder/<name>` from a folder or an LMDB (`source_format`)."""
  source = pathlib.Path(source_path).resolve()
  if resolution < 1:
    raise errors.DataError(f'resolution must be positive, got {resolution}')
  background = parse_background(background)
  name = name or _default_folder_name(source, resolution)
  if not re.fullmatch(r'[A-Za-z0-9_]+', name):
    raise errors.DataError(
      f'dataset name must be letters, digits and _, got {name!r}'
    )
  description = f'{source} at resolution {resolution}'
  if source_format == 'lmdb':
    # Fails here, before anything is written, if it is no usable LMDB.
    with lmdb_source.LmdbImages(source, resolution) as entries:
      description = f'LMDB {description}: {entries.describe()}'
  if background != builders.WHITE:
    description += f' on background {background}'
  config = builders.ImageFolderConfig(
    name=name,
    source_dir=str(source),
    resolution=resolution,
    num_threads=num_threads or min(8, os.cpu_count() or 1),
    source_format=source_format,
    background=background,
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
  builder = builders.ImageFolder(config=config, data_dir=os.fspath(data_dir))
  if builder.is_prepared():
    # tfds would silently reuse it: make sure it is what was asked for.
    old = builder.info.metadata or {}
    # Sets prepared before backgrounds were recorded count as white.
    old_background = tuple(old.get('background', builders.WHITE))
    asked = (str(source), resolution, source_format, background)
    found = (
      old.get('source_dir'),
      old.get('resolution'),
      old.get('source_format', 'folder'),
      old_background,
    )
    if found != asked:
      on = (
        f' on background {old_background}'
        if old_background != background
        else ''
      )
      raise errors.DataError(
        f'{builder.data_dir} already holds images from '
        f'{old.get("source_dir")} at '
        f'resolution {old.get("resolution")}{on}; pass another name or delete '
        'it'
      )
  else:
    _check_leftovers(builder)
  with _cleanup_on_sigterm(), _tfds_output_in_the_log(progress_bars=True):
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
  with _cleanup_on_sigterm(), _tfds_output_in_the_log(progress_bars=True):
    builder.download_and_prepare(
      download_dir=None if download_dir is None else os.fspath(download_dir),
      file_format='array_record',
    )
  return builder
