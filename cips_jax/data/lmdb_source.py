"""The encoded images of an LMDB database, in order, for one resolution.

Two layouts are recognised (`_detect_layout`):
- LSUN's own databases (e.g. `church_outdoor_train_lmdb` from the LSUN
  download): every key is an image id (ascii), every value an encoded image
  (WebP in LSUN; anything pillow decodes). Images come in key order.
- The output of the official CIPS / stylegan2-pytorch `prepare_data.py`: keys
  `f'{size}-{str(index).zfill(5)}'` hold the JPEG of image `index` at each
  prepared `size`, and the key `b'length'` holds the number of images (ascii
  digits). Images come in index order, at the stored size equal to the
  resolution asked for, else the smallest larger one (`select_size`).

    with lmdb_source.LmdbImages(path, resolution=256) as entries:
      print(entries.describe())
      for key, encoded in entries.items():  # encoded is None if key is missing
        ...

The database is opened read-only without locking, as a directory (holding
data.mdb) or a single file. Before anything is read, the data file must hold
every page the database uses (a truncated copy would crash the process with a
bus error when read, LMDB mapping it into memory) and prepare_data's b'length'
must not exceed the entries of the size read. `preparation.prepare_lmdb` turns
it into a data set.
"""

from __future__ import annotations

from collections.abc import Iterator
import dataclasses
import os
import pathlib
import re

from cips_jax import errors

try:
  import lmdb
except ImportError:  # optional (the `lmdb` extra): only LMDB sources need it
  lmdb = None

LSUN = 'lsun'
PREPARE_DATA = 'prepare_data'
_LENGTH_KEY = b'length'
_SIZED_KEY = re.compile(rb'(\d+)-(\d+)')


@dataclasses.dataclass(frozen=True)
class Layout:
  """What an LMDB holds.

  Attributes:
    kind: LSUN (image id -> encoded image) or PREPARE_DATA ('<size>-<index>'
      keys and b'length').
    count: the number of images (PREPARE_DATA: the value of b'length'; LSUN:
      the number of entries).
    sizes: PREPARE_DATA: the sizes stored, ascending; LSUN: ().
  """

  kind: str
  count: int
  sizes: tuple[int, ...] = ()


def _open_lmdb(path: str | os.PathLike) -> lmdb.Environment:
  """Opens an LMDB read-only, without locking.

  Args:
    path: a directory holding data.mdb, or a single-file LMDB.
  Returns:
    The lmdb environment; close it when done.
  Raises:
    ImportError: the lmdb package is not installed.
    FileNotFoundError: `path` does not exist.
    ValueError: `path` is not an LMDB, or its data file is truncated.
  """
  if lmdb is None:
    raise ImportError(
      'reading an LMDB needs the lmdb package: pip install cips_jax[lmdb] '
      '(or pip install lmdb)'
    )
  path = pathlib.Path(path)
  if not path.exists():
    raise errors.MissingInputError(f'LMDB {path} does not exist')
  subdir = path.is_dir()
  data_file = path / 'data.mdb' if subdir else path
  if subdir and not data_file.is_file():
    raise errors.DataError(
      f'{path} is not an LMDB: a directory without data.mdb'
    )
  if not os.path.getsize(data_file):  # lmdb says 'Bad file descriptor'
    raise errors.DataError(f'{path} is not an LMDB: {data_file} is empty')
  try:
    env = lmdb.open(
      os.fspath(path), readonly=True, lock=False, readahead=False, subdir=subdir
    )
  except lmdb.Error as error:
    raise errors.DataError(f'{path} is not an LMDB: {error}') from None
  try:
    _check_not_truncated(env, path, data_file)
  except BaseException:
    env.close()
    raise
  return env


def _check_not_truncated(
  env: lmdb.Environment, path: pathlib.Path, data_file: pathlib.Path
) -> None:
  """Raises DataError if `data_file` is shorter than the pages `env` uses.

  LMDB maps the file into memory and trusts its meta pages: reading a page past
  the end of a truncated file (an interrupted copy or download) kills the
  process with SIGBUS instead of raising. The meta pages themselves are safe
  to read: opening checked that the file holds both.
  """
  needed = (env.info()['last_pgno'] + 1) * env.stat()['psize']
  actual = os.path.getsize(data_file)
  if actual < needed:
    raise errors.DataError(
      f'LMDB {path} is truncated: {data_file} holds {actual} bytes but its '
      f'pages need {needed} (an interrupted copy or download?)'
    )


def _detect_layout(env: lmdb.Environment, path: str | os.PathLike) -> Layout:
  """The layout of the LMDB `env` (`path` names it in errors).

  Raises:
    ValueError: an empty LMDB, or a b'length' key that is not a count of
      '<size>-<index>' entries.
  """
  with env.begin() as txn:
    length = txn.get(_LENGTH_KEY)
    if length is None:
      count = env.stat()['entries']
      if not count:
        raise errors.DataError(f'LMDB {path} holds no entries')
      return Layout(LSUN, count)
    return _prepare_data_layout(txn, length, path)


def _prepare_data_layout(txn, length: bytes, path) -> Layout:
  """The PREPARE_DATA layout of an LMDB whose b'length' holds `length`."""
  if not re.fullmatch(rb'\s*\d+\s*', length):
    raise errors.DataError(
      f'LMDB {path} has a b"length" key but its value {length[:40]!r} is not '
      'a number of images'
    )
  sizes = set()
  cursor = txn.cursor()
  found = cursor.first()
  while found:  # one seek per stored size: after '<size>-' comes '<size>.'
    match = _SIZED_KEY.fullmatch(cursor.key())
    if match:
      sizes.add(int(match[1]))
      found = cursor.set_range(match[1] + b'.')
    else:
      found = cursor.next()
  if not sizes:
    raise errors.DataError(
      f'LMDB {path} has a b"length" key but no "<size>-<index>" image keys'
    )
  if not int(length):
    raise errors.DataError(f'LMDB {path} holds no images (length 0)')
  return Layout(PREPARE_DATA, int(length), tuple(sorted(sizes)))


def _count_sized_entries(txn, size: int) -> int:
  """The number of '<size>-<index>' keys of one `size` in transaction `txn`.

  Reads keys only (their values may be large): the keys of one size are
  contiguous in LMDB's byte order, from b'<size>-' up to b'<size>.'.
  """
  prefix = f'{size}-'.encode('ascii')
  cursor = txn.cursor()
  if not cursor.set_range(prefix):
    return 0
  count = 0
  for key in cursor.iternext(keys=True, values=False):
    if not key.startswith(prefix):
      break
    count += bool(_SIZED_KEY.fullmatch(key))
  return count


def select_size(sizes: tuple[int, ...], resolution: int, path='the LMDB'):
  """The stored size to read: `resolution` itself, else the smallest larger.

  Raises:
    ValueError: every stored size is smaller than `resolution`.
  """
  larger = [size for size in sizes if size >= resolution]
  if not larger:
    raise errors.DataError(
      f'{path} stores images of sizes {", ".join(map(str, sizes))}, none of '
      f'them at least the resolution {resolution}'
    )
  return min(larger)


class LmdbImages:
  """The encoded images of one LMDB, for one resolution.

  Attributes:
    path: the LMDB.
    layout: what `_detect_layout` found.
    size: PREPARE_DATA: the stored size read (`select_size`); LSUN: None.
  """

  def __init__(self, path: str | os.PathLike, resolution: int):
    self.path = pathlib.Path(path)
    self.resolution = resolution
    self._env = _open_lmdb(self.path)
    try:
      self.layout = _detect_layout(self._env, self.path)
      self.size = None
      if self.layout.kind == PREPARE_DATA:
        self.size = select_size(self.layout.sizes, resolution, self.path)
        self._check_length()
    except BaseException:
      self._env.close()
      raise

  def _check_length(self) -> None:
    """Raises DataError if b'length' exceeds the entries of the size read.

    A damaged or hand-made b'length' far above the entries would otherwise
    read (and skip) missing keys for hours.
    """
    with self._env.begin() as txn:
      stored = _count_sized_entries(txn, self.size)
    if self.layout.count > stored:
      raise errors.DataError(
        f'LMDB {self.path} has b"length" {self.layout.count} but only '
        f'{stored} "{self.size}-<index>" entries: it is damaged or incomplete'
      )

  def __len__(self) -> int:
    return self.layout.count

  def describe(self) -> str:
    """The layout found, in words, for the log."""
    if self.layout.kind == LSUN:
      return (
        f"LSUN's layout (image id -> encoded image), {len(self)} entries, "
        'in key order'
      )
    sizes = ', '.join(map(str, self.layout.sizes))
    resized = '' if self.size == self.resolution else ', resized'
    return (
      f"prepare_data.py's layout ('<size>-<index>' keys, sizes {sizes}), "
      f'{len(self)} images, reading size {self.size}{resized}'
    )

  def items(self) -> Iterator[tuple[str, bytes | None]]:
    """(key, encoded image) in order; the image is None for a missing key."""
    with self._env.begin() as txn:
      if self.layout.kind == LSUN:
        for key, value in txn.cursor():
          yield key.decode('ascii', 'backslashreplace'), value
      else:
        for index in range(len(self)):
          key = f'{self.size}-{str(index).zfill(5)}'
          yield key, txn.get(key.encode('utf-8'))

  def close(self) -> None:
    self._env.close()

  def __enter__(self) -> LmdbImages:
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()
