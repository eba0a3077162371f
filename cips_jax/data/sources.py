"""Opening prepared data sets, for training and evaluation; no TensorFlow.

    source = sources.load_source('/data', 'image_folder/churches_256')
    source[0]['image']  # uint8 (H, W, 3)
    # procedural sets are generated on first use:
    source = sources.open_source('/data', 'procedural_landscapes/s32')

A data set missing from the data root is an error that names the command that
prepares it (`_prepare_command`); `preparation` prepares them.
"""

from __future__ import annotations

import os
import pathlib
import re
import shlex
from typing import Optional

import tensorflow_datasets as tfds

from cips_jax import errors
from cips_jax.data import preparation


def _prepare_command(
  data_dir: str | os.PathLike, name: str, resolution: Optional[int] = None
) -> str:
  """The shell command that prepares data set `name`, ready to paste.

  `name` is e.g. 'procedural_landscapes/s32'; `resolution`, the training
  config's data.resolution, is the side images are prepared at (a
  placeholder when not given). What only the user knows, where their images
  are, stays a placeholder (SOURCE_DIR).
  """
  dataset, _, config = name.partition('/')
  config = config.split(':')[0]
  data_dir = shlex.quote(os.fspath(data_dir))
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
      f'{data_dir} --resolution {resolution or 256} --name church_outdoor '
      'and train with --config.data.name=image_folder/church_outdoor)'
    )
  if dataset == 'image_folder':
    flags = (
      f'--data_dir {data_dir} --resolution {resolution or "RESOLUTION"} '
      f'--name {shlex.quote(config) if config else "NAME"}'
    )
    return (
      f'python -m cips_jax.data folder SOURCE_DIR {flags}\nor, from an LMDB '
      f"(LSUN's):\n  python -m cips_jax.data lmdb LMDB_PATH {flags}"
    )
  return (
    f'tfds build {shlex.quote(name)} --data_dir {data_dir} '
    '--file_format array_record'
  )


def _version_dirs(path: pathlib.Path) -> list[pathlib.Path]:
  """Finished data set version folders (x.y.z) under `path`, oldest first.

  Finished means holding dataset_info.json, which tfds writes last; what an
  unfinished preparation left (`preparation.incomplete_leftovers`) is never
  read.
  """
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


def _prepared_versions(
  data_dir: str | os.PathLike, name: str, resolution: Optional[int] = None
) -> list[pathlib.Path]:
  """The prepared version folders of `name`, oldest first.

  Raises:
    FileNotFoundError: none prepared (see `load_source`).
  """
  dataset_config, _, version = name.partition(':')
  path = pathlib.Path(data_dir) / dataset_config
  versions = _version_dirs(path)
  if version:
    versions = [v for v in versions if v.name == version]
  if not versions:
    leftovers = preparation.incomplete_leftovers(path)
    ignored = (
      f'; ignored {", ".join(p.name for p in leftovers)}, the partial output '
      'of a preparation that was stopped (or is still running): delete it'
      if leftovers
      else ''
    )
    raise errors.MissingInputError(
      f'no prepared data set {name!r} in {path} (looked for '
      f'{path}/{version or "<version>"}/dataset_info.json{ignored}). '
      'Prepare it with:\n  '
      f'{_prepare_command(data_dir, name, resolution)}'
    )
  return versions


def load_source(
  data_dir: str | os.PathLike,
  name: str,
  split: str = 'train',
  resolution: Optional[int] = None,
):
  """A random-access data source over a prepared data set; no TensorFlow needed.

  Args:
    data_dir: root of the prepared data sets.
    name: '<dataset>/<config>' with an optional ':<version>' (default: the
      newest prepared), e.g. 'procedural_landscapes/s32',
      'image_folder/churches_256', 'lsun/church_outdoor'.
    split: e.g. 'train'.
    resolution: the training resolution, for the command a missing data set's
      error gives (else a placeholder).
  Returns:
    A sequence-like source: `len(source)`, `source[i]` -> {'image': uint8
    (H, W, 3)} and `source.__getitems__(indices)`; grain reads it.
  Raises:
    FileNotFoundError: naming the folder searched, what unfinished
      preparations left there (ignored) and the command that prepares it.
  """
  versions = _prepared_versions(data_dir, name, resolution)
  # Reading from the directory needs neither the builder's code nor TensorFlow
  # (LSUN's needs).
  builder = tfds.builder_from_directory(os.fspath(versions[-1]))
  if split not in builder.info.splits:
    raise errors.DataError(
      f'{name} has no split {split!r}; it has {sorted(builder.info.splits)}'
    )
  return builder.as_data_source(split=split)


PROCEDURAL_DATASET = 'procedural_landscapes'


def check_prepared(
  data_dir: str | os.PathLike, name: str, resolution: Optional[int] = None
) -> None:
  """Raises what `open_source` would for a data set that is not there.

  Reads no data and generates none (procedural data sets pass: `open_source`
  generates them), so a run can be refused before anything is created or
  compiled.

  Raises:
    FileNotFoundError: a data set that is not procedural and not prepared; the
      message gives the command that prepares it, with `data_dir`, the name
      and `resolution` filled in.
  """
  data_dir = os.path.expanduser(os.fspath(data_dir))
  if name.partition('/')[0] != PROCEDURAL_DATASET:
    _prepared_versions(data_dir, name, resolution)


def open_source(
  data_dir: str | os.PathLike,
  name: str,
  split: str = 'train',
  resolution: Optional[int] = None,
):
  """`load_source`, except that procedural data sets are generated on first use.

  Args:
    data_dir: root of the prepared data sets (`~` is expanded).
    name: as for `load_source`. Names under `procedural_landscapes/` are
      generated here when missing (deterministically, no download); every
      other data set must be prepared first.
    split: e.g. 'train'.
    resolution: as for `load_source`.
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
      preparation.prepare_procedural(data_dir, config or 's32')
  return load_source(data_dir, name, split, resolution)
