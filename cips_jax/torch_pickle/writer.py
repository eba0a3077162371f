"""Write PyTorch zip checkpoints from numpy without torch.

`save` is the inverse of `load` for plain checkpoints: it writes
numpy arrays (as tensors), dicts, `OrderedDict`, lists, tuples, str, int,
float, bool and None in the layout `torch.save` uses, so that `load`
gives the object back bit for bit and `torch.load(path, weights_only=True)`
reads it, all without torch.  The pickle is emitted opcode by opcode (the
standard pickler cannot name torch's globals without importing torch), and the
zip records are laid out as torch's own writer lays them out: stored, each
payload aligned to 64 bytes (so `torch.load(..., mmap=True)` can map it),
followed by the same data descriptors.  The file is written to a temporary name
beside `path` and renamed into place, and the same object always gives the
same bytes.
"""

from __future__ import annotations

import collections
import os
import pickle
import struct
from typing import Any
import zlib

import numpy as np

from cips_jax import errors
from cips_jax.torch_pickle import formats

# Little-endian dtype (`numpy.dtype.str`) -> the torch storage class written
# for it.  bfloat16, which numpy lacks, is read but never written.
_STORAGE_FOR_DTYPE = {
  **{
    np.dtype(f.stored).str: f.name
    for f in formats.STORAGE_FORMATS
    if f.kind == 'plain'
  },
  '|b1': 'BoolStorage',
}

# The bookkeeping records torch 2.x writes, with their contents: these after
# data.pkl, before the storages...
_HEAD_RECORDS = (
  ('.format_version', b'1'),
  ('.storage_alignment', b'64'),
  ('byteorder', b'little'),
)
# ... and this one after them.  (torch also writes `.data/serialization_id`,
# a random number used for logging; it is left out to keep the bytes
# reproducible, and torch.load does not need it.)
_TAIL_RECORDS = (('version', b'3\n'),)

_ALIGNMENT = 64  # of every record's payload, as torch's .storage_alignment
# Sizes and offsets from this value up need zip64 fields (miniz's threshold).
_ZIP32_LIMIT = 0xFFFFFFFF

_GLOBAL_REBUILD = pickle.GLOBAL + b'torch._utils\n_rebuild_tensor_v2\n'
_GLOBAL_ORDERED_DICT = pickle.GLOBAL + b'collections\nOrderedDict\n'


class _TensorPickler:
  """Writes `data.pkl` with the opcodes torch's pickler uses for these types.

  Protocol 2 and no memo: each global is spelled out where it is used, and an
  object reached twice is written twice.  An array becomes a call of
  `torch._utils._rebuild_tensor_v2` on a persistent reference to a storage
  of its own; the arrays are collected in `storages`, in key order, for the
  zip.
  """

  def __init__(self) -> None:
    self._out: list[bytes] = []
    # (array, the little-endian dtype its storage record holds)
    self.storages: list[tuple[np.ndarray, np.dtype]] = []
    self._open: set[int] = set()  # ids of the containers being written

  def dumps(self, obj: Any) -> bytes:
    self._out = [pickle.PROTO, b'\x02']
    self._save(obj, 'obj')
    self._out.append(pickle.STOP)
    return b''.join(self._out)

  def _save(self, obj: Any, path: str) -> None:
    # Exact types only: a subclass (a numpy scalar, a namedtuple, a defaultdict)
    # would come back as something else.
    kind = type(obj)
    if obj is None:
      self._out.append(pickle.NONE)
    elif kind is bool:
      self._out.append(pickle.NEWTRUE if obj else pickle.NEWFALSE)
    elif kind is int:
      self._int(obj)
    elif kind is float:
      self._out.append(pickle.BINFLOAT + struct.pack('>d', obj))
    elif kind is str:
      self._str(obj)
    elif kind is np.ndarray or kind is np.memmap:
      self._array(obj, path)
    elif kind is dict or kind is collections.OrderedDict:
      self._dict(obj, path)
    elif kind is list or kind is tuple:
      self._sequence(obj, path)
    else:
      raise TypeError(f'{path}: cannot write a {kind}')

  def _int(self, value: int) -> None:
    if 0 <= value < 0x100:
      self._out.append(pickle.BININT1 + bytes((value,)))
    elif 0 <= value < 0x10000:
      self._out.append(pickle.BININT2 + struct.pack('<H', value))
    elif -0x80000000 <= value < 0x80000000:
      self._out.append(pickle.BININT + struct.pack('<i', value))
    else:
      data = value.to_bytes(
        (value.bit_length() + 8) // 8, 'little', signed=True
      )
      if len(data) < 0x100:
        self._out.append(pickle.LONG1 + bytes((len(data),)) + data)
      else:  # torch's weights_only loader has no LONG4; only a ~600-digit int
        self._out.append(pickle.LONG4 + struct.pack('<i', len(data)) + data)

  def _str(self, value: str) -> None:
    data = value.encode('utf-8', 'surrogatepass')  # as pickle and torch read it
    self._out.append(pickle.BINUNICODE + struct.pack('<I', len(data)) + data)

  def _array(self, array: np.ndarray, path: str) -> None:
    stored = array.dtype.newbyteorder('<')
    storage_name = _STORAGE_FOR_DTYPE.get(stored.str)
    if storage_name is None:
      raise TypeError(f'{path}: cannot write an array of dtype {array.dtype}')
    key = str(len(self.storages))
    self.storages.append((array, stored))
    # torch's strides for a contiguous tensor: an empty dimension counts as 1.
    strides, step = [], 1
    for n in reversed(array.shape):
      strides.append(step)
      step *= max(n, 1)

    out = self._out
    out.append(_GLOBAL_REBUILD)
    out.append(pickle.MARK)
    # The persistent id ('storage', storage class, key, location, numel).
    out.append(pickle.MARK)
    self._str('storage')
    out.append(pickle.GLOBAL + f'torch\n{storage_name}\n'.encode('ascii'))
    self._str(key)
    self._str('cpu')
    self._int(array.size)
    out.append(pickle.TUPLE)
    out.append(pickle.BINPERSID)
    self._int(0)  # storage offset
    self._sequence(tuple(array.shape), path)
    self._sequence(tuple(reversed(strides)), path)
    out.append(pickle.NEWFALSE)  # requires_grad
    # backward_hooks: an empty OrderedDict
    out.extend((_GLOBAL_ORDERED_DICT, pickle.EMPTY_TUPLE, pickle.REDUCE))
    out.extend((pickle.TUPLE, pickle.REDUCE))

  def _enter(self, container: Any, path: str) -> None:
    if id(container) in self._open:
      raise errors.CheckpointError(
        f'{path}: the object contains itself (a cycle)'
      )
    self._open.add(id(container))

  def _dict(self, mapping: dict[Any, Any], path: str) -> None:
    self._enter(mapping, path)
    if type(mapping) is dict:
      self._out.append(pickle.EMPTY_DICT)
    else:  # OrderedDict() then its items, as pickle writes it
      self._out.extend(
        (_GLOBAL_ORDERED_DICT, pickle.EMPTY_TUPLE, pickle.REDUCE)
      )
    if mapping:
      self._out.append(pickle.MARK)
      for key, value in mapping.items():
        if type(key) is not str and type(key) is not int:
          raise TypeError(
            f'{path}: cannot write a dict key of {type(key)} ({key!r:.60}); '
            'keys must be str or int'
          )
        self._save(key, path)
        self._save(value, f'{path}[{key!r}]')
      self._out.append(pickle.SETITEMS)
    self._open.discard(id(mapping))

  def _sequence(self, items: list[Any] | tuple[Any, ...], path: str) -> None:
    self._enter(items, path)
    n = len(items)
    if type(items) is list:
      self._out.append(pickle.EMPTY_LIST)
      if n:
        self._out.append(pickle.MARK)
        for i, item in enumerate(items):
          self._save(item, f'{path}[{i}]')
        self._out.append(pickle.APPENDS)
    elif n == 0:
      self._out.append(pickle.EMPTY_TUPLE)
    else:
      if n > 3:
        self._out.append(pickle.MARK)
      for i, item in enumerate(items):
        self._save(item, f'{path}[{i}]')
      ends = (pickle.TUPLE1, pickle.TUPLE2, pickle.TUPLE3)
      self._out.append(ends[n - 1] if n <= 3 else pickle.TUPLE)
    self._open.discard(id(items))


def _zip64_extra(size: int | None, offset: int | None) -> bytes:
  """A zip64 extra field holding the sizes and offset that need it, or b''."""
  fields = ([size, size] if size is not None else []) + (
    [offset] if offset is not None else []
  )
  if not fields:
    return b''
  return struct.pack(f'<HH{len(fields)}Q', 0x0001, 8 * len(fields), *fields)


class _ZipWriter:
  """Stored zip records in the layout of torch's writer (miniz, patched).

  A record is a local header whose extra field ends in an `FB` field of
  `Z` bytes padding the payload's start to a multiple of 64, the payload,
  and, for a non-empty payload, a data descriptor (its CRC and sizes); the
  local header's own CRC and sizes are 0, and so are all dates.  The archive
  ends with zip64 end records whatever its size.  Zip64 fields appear, as
  miniz writes them, only where a size or offset reaches `_ZIP32_LIMIT`.
  torch.load with `calculate_storage_offsets` predicts each storage's
  offset from this layout, without reading the headers.
  """

  def __init__(self, file: Any, prefix: str) -> None:
    self._file = file
    self._prefix = prefix
    self._offset = 0
    self._central: list[bytes] = []

  def _write(self, data: bytes | memoryview) -> None:
    self._file.write(data)
    self._offset += len(data)

  def add(self, name: str, payload: bytes | memoryview) -> None:
    """Append one record; `payload` is bytes or a 1-D memoryview of bytes."""
    filename = (self._prefix + name).encode('utf-8')
    size, offset = len(payload), self._offset
    big_size, big_offset = size >= _ZIP32_LIMIT, offset >= _ZIP32_LIMIT
    zip64 = _zip64_extra(
      size if big_size else None, offset if big_offset else None
    )
    start = offset + 30 + len(filename) + len(zip64) + 4
    padding = -start % _ALIGNMENT
    extra = zip64 + b'FB' + struct.pack('<H', padding) + b'Z' * padding
    # bit 11: the name is UTF-8; bit 3: sizes and CRC follow the payload
    flags = 0x0800 | (0x0008 if size else 0)
    version = 45 if zip64 else 0  # torch writes 0; zip64 needs 4.5
    crc = zlib.crc32(payload)
    self._write(
      struct.pack(
        '<IHHHHHIIIHH',
        0x04034B50,
        version,
        flags,
        0,  # stored
        0,  # time
        0,  # date
        0,  # CRC, in the data descriptor
        0,  # compressed size, ditto
        0,  # size, ditto
        len(filename),
        len(extra),
      )
      + filename
      + extra
    )
    self._write(payload)
    if size:
      descriptor = '<IIQQ' if zip64 else '<IIII'
      self._write(struct.pack(descriptor, 0x08074B50, crc, size, size))
    self._central.append(
      struct.pack(
        '<IHHHHHHIIIHHHHHII',
        0x02014B50,
        0,  # made by
        version,
        flags,
        0,  # stored
        0,  # time
        0,  # date
        crc,
        0xFFFFFFFF if big_size else size,  # then in the zip64 field
        0xFFFFFFFF if big_size else size,
        len(filename),
        len(zip64),
        0,  # comment length
        0,  # disk
        0,  # internal attributes
        0,  # external attributes
        0xFFFFFFFF if big_offset else offset,
      )
      + filename
      + zip64
    )

  def finish(self) -> None:
    """Write the central directory and the (zip64) end records."""
    directory_offset = self._offset
    for entry in self._central:
      self._write(entry)
    directory_size = self._offset - directory_offset
    count = len(self._central)
    end64_offset = self._offset
    self._write(
      struct.pack(
        '<IQHHIIQQQQ',
        0x06064B50,
        44,  # size of the rest of this record
        0x031E,  # made by, as torch's files say
        45,  # version needed
        0,
        0,
        count,
        count,
        directory_size,
        directory_offset,
      )
    )
    self._write(struct.pack('<IIQI', 0x07064B50, 0, end64_offset, 1))
    self._write(
      struct.pack(
        '<IHHHHIIH',
        0x06054B50,
        0,
        0,
        min(count, 0xFFFF),
        min(count, 0xFFFF),
        min(directory_size, 0xFFFFFFFF),  # the zip64 record has them all
        min(directory_offset, 0xFFFFFFFF),
        0,  # comment length
      )
    )


def _write_archive(
  file: Any,
  prefix: str,
  data_pkl: bytes,
  storages: list[tuple[np.ndarray, np.dtype]],
) -> None:
  archive = _ZipWriter(file, prefix)
  archive.add('data.pkl', data_pkl)
  for name, content in _HEAD_RECORDS:
    archive.add(name, content)
  for key, (array, stored) in enumerate(storages):
    # One contiguous little-endian copy at a time, and none when the array
    # already is one.
    data = np.ascontiguousarray(array, dtype=stored).reshape(-1)
    archive.add(f'data/{key}', memoryview(data.view(np.uint8)))
  for name, content in _TAIL_RECORDS:
    archive.add(name, content)
  archive.finish()


def _create_temporary(directory: str, base: str) -> tuple[int, str]:
  """Create and open a new file beside the target; returns (fd, path).

  Created with mode 0o666 less the umask, as `open` would create the target.
  """
  flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, 'O_BINARY', 0)
  for _ in range(100):
    temporary = os.path.join(directory, f'.{base}.{os.urandom(6).hex()}.tmp')
    try:
      return os.open(temporary, flags, 0o666), temporary
    except FileExistsError:
      continue
  raise errors.OutputExistsError(f'no free temporary file name in {directory}')


def save(obj: Any, path: str | os.PathLike[str]) -> None:
  """Write `obj` as a `torch.save` zip checkpoint, without torch.

  `obj` may hold numpy arrays of dtype float32, float64, float16, int64,
  int32, int16, int8, uint8 or bool (any shape, 0-d and empty included; each
  becomes a tensor of its own, written C-contiguous and little-endian), dicts
  and `collections.OrderedDict` with str or int keys, lists, tuples, str,
  int, float, bool and None, nested in any way.  The types must be exactly
  these: a subclass (a numpy scalar, a namedtuple) raises `TypeError`, as
  does anything else, naming where it is, e.g. `obj['g']['x']: cannot write
  a <class 'set'>`; a container that contains itself raises `ValueError`.
  Nothing is written in either case.

  `load` reads the file back bit for bit (arrays in native byte order,
  OrderedDicts as OrderedDicts), and so does `torch.load(path,
  weights_only=True)`, with or without `mmap=True`.  The archive's top
  folder is named after the file (`path`'s name less its extension), as
  torch names it; the same object and file name always give the same bytes.

  The file is written under a temporary name in `path`'s folder, synced and
  renamed over `path`: if anything fails, `path` is as it was and no
  temporary file is left.
  """
  path_str = os.fspath(path)
  pickler = _TensorPickler()
  data_pkl = pickler.dumps(obj)  # raises before anything touches the disk

  directory, base = os.path.split(os.path.abspath(path_str))
  prefix = (os.path.splitext(base)[0] or 'archive') + '/'
  fd, temporary = _create_temporary(directory, base)
  try:
    with open(fd, 'wb') as file:
      _write_archive(file, prefix, data_pkl, pickler.storages)
      file.flush()
      os.fsync(file.fileno())
    os.replace(temporary, path_str)
  except BaseException:
    try:
      os.unlink(temporary)
    except OSError:
      pass
    raise
