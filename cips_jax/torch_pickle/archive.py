"""The zip records of a checkpoint, each checked before it is read.

The records the reader reads (`data.pkl`, `data/<key>`, `byteorder`)
must be stored, not compressed: torch writes them stored, and a deflated
record can inflate to any size before its length is known.  Each must lie
within the file, be named once in the archive, and match its CRC.  The zip's
central directory, and each record read, are charged to the load's budget
(`.budget`) before `zipfile` builds or reads them.
"""

from __future__ import annotations

import struct
from typing import BinaryIO
import zipfile

from cips_jax import errors
from cips_jax.torch_pickle import budget as budget_lib


def _directory_size(file: BinaryIO, size: int) -> int | None:
  """The size the zip's end record gives its central directory, or None.

  Found as `zipfile` finds it (the last end record in the file's last 64 KiB,
  and the zip64 end record it points to), so that what `zipfile` then builds
  from the directory can be charged before it is built.
  """
  tail_size = min(size, 22 + 0xFFFF)
  file.seek(size - tail_size)
  tail = file.read(tail_size)
  at = tail.rfind(b'PK\x05\x06', 0, max(len(tail) - 18, 0))
  if at < 0:
    return None
  directory = struct.unpack_from('<I', tail, at + 12)[0]
  locator = at - 20
  if locator >= 0 and tail[locator : locator + 4] == b'PK\x06\x07':
    offset = struct.unpack_from('<Q', tail, locator + 8)[0]
    if offset + 56 > size:
      return None
    file.seek(offset)
    record = file.read(56)
    if record[:4] != b'PK\x06\x06':
      return None
    directory = struct.unpack_from('<Q', record, 40)[0]
  return directory


class Archive:
  """The zip records of one checkpoint, each checked before it is read."""

  def __init__(
    self, file: BinaryIO, path: str, budget: budget_lib.Budget
  ) -> None:
    self.path = path
    size = budget.file_size
    directory = _directory_size(file, size)
    if directory is None:
      raise errors.CheckpointError(
        f'{path}: not a torch zip checkpoint (legacy or corrupt format)'
      )
    if directory > size:
      raise errors.CheckpointError(
        f'{path}: its zip directory claims {directory} bytes, more than the '
        f"file's {size}"
      )
    budget.charge(budget_lib.DIRECTORY_BYTE * directory, 'the zip directory')
    file.seek(0)
    try:
      self.zip = zipfile.ZipFile(file)
    except zipfile.BadZipFile as err:
      raise errors.CheckpointError(
        f'{path}: not a torch zip checkpoint ({str(err)[:100]})'
      ) from None
    self.size = size
    self.infos: dict[str, zipfile.ZipInfo] = {}
    for info in self.zip.infolist():
      if info.filename in self.infos:
        raise errors.CheckpointError(
          f'{path}: the record {errors.bounded_repr(info.filename)} appears '
          'twice'
        )
      self.infos[info.filename] = info

  def info(self, name: str) -> zipfile.ZipInfo | None:
    """The record `name`, or None."""
    return self.infos.get(name)

  def read(self, info: zipfile.ZipInfo, budget: budget_lib.Budget) -> bytes:
    """The bytes of a stored record, its size and CRC checked."""
    name = repr(info.filename[:100])  # a str, so bounded by its cut
    if info.compress_type != zipfile.ZIP_STORED:
      raise errors.UnsafeCheckpointError(
        f'{self.path}: the record {name} is compressed (method '
        f'{info.compress_type}); torch stores its records, and a compressed '
        'one could inflate to any size'
      )
    end = info.header_offset + info.file_size
    if info.compress_size != info.file_size or end > self.size:
      raise errors.CheckpointError(
        f'{self.path}: the record {name} declares {info.file_size} bytes '
        f'({info.compress_size} stored) at offset {info.header_offset}, '
        f"beyond the file's {self.size}"
      )
    budget.charge(info.file_size, f'the record {name}')
    try:
      with self.zip.open(info) as stream:
        raw = stream.read()
    except (zipfile.BadZipFile, EOFError) as err:
      raise errors.CheckpointError(
        f'{self.path}: the record {name} is damaged '
        f'({type(err).__name__}: {str(err)[:100]})'
      ) from None
    if len(raw) != info.file_size:
      raise errors.CheckpointError(
        f'{self.path}: the record {name} is truncated'
      )
    return raw


def find_prefix(archive: Archive) -> str:
  """Return the top folder (with trailing slash) that holds `data.pkl`."""
  pickles = [
    name
    for name in archive.infos
    if (name == 'data.pkl' or name.endswith('/data.pkl'))
    and name.count('/') <= 1
  ]
  if len(pickles) != 1:
    reason = 'no data.pkl record' if not pickles else 'several data.pkl records'
    raise errors.CheckpointError(
      f'{archive.path}: not a torch zip checkpoint ({reason})'
    )
  return pickles[0][: -len('data.pkl')]
