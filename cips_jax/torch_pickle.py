"""Read PyTorch zip checkpoints into numpy without torch.

No pickled code is run.

``torch.save`` (torch >= 1.6) writes a zip archive with one top folder
``NAME/`` holding

* ``data.pkl``      -- a pickle of the saved object; tensors appear as calls to
                       ``torch._utils._rebuild_tensor_v2`` on *persistent*
                       storage references,
* ``data/<key>``    -- the raw bytes of each storage,
* ``byteorder``     -- ``little`` or ``big``, the order of those bytes,
* ``.format_version``, maybe ``version`` and other bookkeeping records.

A pickle may name any importable callable, so unpickling an untrusted file with
the standard ``pickle.load`` can run arbitrary code.  :func:`load` uses an
unpickler that resolves only an explicit whitelist of torch names, each to a
small local stand-in, and refuses everything else with
:class:`UnsafeCheckpointError`.  Tensors come back as fresh C-contiguous
``numpy.ndarray`` objects, ``collections.OrderedDict`` as itself, and plain
containers and scalars unchanged.

TorchScript archives (``torch.jit.save``) share this layout; their ``data.pkl``
also names the scripted module classes (``__torch__.<module> <Class>``, built
with NEWOBJ and BUILD) and list helpers from ``torch.jit._pickle``.  Any name
under ``__torch__.`` resolves to an inert :class:`ScriptObject` subclass, made
afresh for each load, whose instances keep only the class name and the BUILD
state dict; none of the archive's ``code/`` is read or run.

:func:`save` is the inverse of :func:`load` for plain checkpoints: it writes
numpy arrays (as tensors), dicts, ``OrderedDict``, lists, tuples, str, int,
float, bool and None in the layout ``torch.save`` uses, so that :func:`load`
gives the object back bit for bit and ``torch.load(path, weights_only=True)``
reads it, all without torch.  The pickle is emitted opcode by opcode (the
standard pickler cannot name torch's globals without importing torch), and the
zip records are laid out as torch's own writer lays them out: stored, each
payload aligned to 64 bytes (so ``torch.load(..., mmap=True)`` can map it),
followed by the same data descriptors.  The file is written to a temporary name
beside ``path`` and renamed into place, and the same object always gives the
same bytes.
"""

from __future__ import annotations

import collections
import os
import pickle
import struct
from typing import Any, Callable
import zipfile
import zlib

import numpy as np
from numpy.lib.stride_tricks import as_strided

__all__ = [
  'ALLOWED_GLOBALS',
  'SCRIPT_NAMESPACE',
  'ScriptObject',
  'TorchDtype',
  'UnsafeCheckpointError',
  'load',
  'save',
]


class UnsafeCheckpointError(pickle.UnpicklingError, ValueError):
  """A checkpoint asked for something outside the whitelist, or is malformed.

  Malformed in a way that could make the reader touch memory or objects it
  should not. Also a ValueError: like other unreadable inputs, the commands
  report it in one line.
  """


class _Frozen:
  """Base for the stand-ins handed to the unpickler.

  The pickle BUILD opcode sets attributes on whatever object is on the stack.
  Stand-ins are shared module-level objects, so they refuse attribute writes
  (and have no ``__dict__``) to keep one checkpoint from altering how the next
  one is read.
  """

  __slots__ = ()

  def __setattr__(self, name: str, value: Any) -> None:
    raise AttributeError(f'{type(self).__name__} is read-only')

  def _init(self, **fields: Any) -> None:
    for name, value in fields.items():
      object.__setattr__(self, name, value)


class TorchDtype(_Frozen):
  """What a pickled torch dtype global (e.g. ``torch.float32``) loads as.

  ``name`` is the torch name (``"float32"``); ``numpy`` is the matching numpy
  dtype (bfloat16, which numpy lacks, maps to float32, the type its tensors are
  widened to).
  """

  __slots__ = ('name', 'numpy')

  def __init__(self, name: str, numpy_dtype: np.dtype) -> None:
    self._init(name=name, numpy=np.dtype(numpy_dtype))

  def __repr__(self) -> str:
    return f'torch.{self.name}'

  def __eq__(self, other: object) -> bool:
    return isinstance(other, TorchDtype) and other.name == self.name

  def __hash__(self) -> int:
    return hash(('TorchDtype', self.name))


class _StorageType(_Frozen):
  """Stand-in for a storage class such as ``torch.FloatStorage``.

  ``stored`` is the little-endian dtype of one element as written in
  ``data/<key>``; ``kind`` says whether elements need more than a byte-order fix
  after reading.
  """

  __slots__ = ('name', 'stored', 'kind')

  def __init__(self, name: str, stored: str, kind: str = 'plain') -> None:
    self._init(name=name, stored=np.dtype(stored), kind=kind)

  def __repr__(self) -> str:
    return f'<stand-in for torch.{self.name}>'


class _Storage(_Frozen):
  """One loaded storage: a read-only 1-D array of its elements.

  The elements are in archive byte order.
  """

  __slots__ = ('type', 'array')

  def __init__(self, storage_type: _StorageType, array: np.ndarray) -> None:
    self._init(type=storage_type, array=array)


class _Function(_Frozen):
  """Stand-in for a whitelisted torch function; calls a local implementation."""

  __slots__ = ('name', 'func')

  def __init__(self, name: str, func: Callable[..., Any]) -> None:
    self._init(name=name, func=func)

  def __call__(self, *args: Any) -> Any:
    return self.func(*args)

  def __repr__(self) -> str:
    return f'<stand-in for {self.name}>'


#: Module prefix of TorchScript class names; globals under it load as
#:class:`ScriptObject`.
SCRIPT_NAMESPACE = '__torch__'


class ScriptObject(_Frozen):
  """What an instance of a TorchScript class loads as.

  For example a scripted ``nn.Module``. ``type_name`` is the pickled class name,
  e.g. ``"__torch__.inceptionv3.Conv2dLayer"``; ``state`` is the dict the
  pickle's BUILD opcode supplied (attribute name -> value: tensors as numpy
  arrays, submodules as further ``ScriptObject`` instances).  The instance has
  no other behaviour; the methods in the archive's ``code/`` are ignored.
  """

  __slots__ = ('state',)
  # each loaded class name gets a subclass that overrides it
  type_name = SCRIPT_NAMESPACE

  def __setstate__(self, state: Any) -> None:
    # BUILD calls this once per object; a second BUILD or a non-dict state is
    # malformed.
    if hasattr(self, 'state'):
      raise UnsafeCheckpointError(f'{self.type_name} object built twice')
    if not isinstance(state, dict) or not all(
      isinstance(k, str) for k in state
    ):
      raise UnsafeCheckpointError(
        f'{self.type_name} state must be a dict with str keys, got '
        f'{type(state).__name__}'
      )
    self._init(state=state)

  def __repr__(self) -> str:
    fields = ', '.join(getattr(self, 'state', {}))
    return f'<{self.type_name} ({fields})>'


def _script_class(module: str, name: str) -> type[ScriptObject]:
  """A fresh, empty ``ScriptObject`` subclass for one pickled class name.

  NEWOBJ insists on a real type, so each name gets its own subclass; making them
  per load keeps a class seen in one archive from being shared with the next.
  """
  if not all(part.isidentifier() for part in [*module.split('.'), name]):
    raise UnsafeCheckpointError(
      f'malformed TorchScript class name {module}.{name!r:.100}'
    )
  return type(
    'ScriptObject',
    (ScriptObject,),
    {'__slots__': (), 'type_name': f'{module}.{name}'},
  )


# Item checks of the ``torch.jit._pickle.build_<kind>list`` helpers (bool is an
# int subclass).
_LIST_ITEM_CHECKS: dict[str, Callable[[Any], bool]] = {
  'int': lambda x: isinstance(x, int) and not isinstance(x, bool),
  'double': lambda x: isinstance(x, float),
  'bool': lambda x: isinstance(x, bool),
  'tensor': lambda x: isinstance(x, np.ndarray),
}


def _typed_list(kind: str) -> Callable[[Any], list[Any]]:
  """Stand-in for ``torch.jit._pickle.build_<kind>list``.

  Checks the items and returns a list.
  """
  check = _LIST_ITEM_CHECKS[kind]

  def build(items: Any) -> list[Any]:
    if not isinstance(items, list) or not all(check(x) for x in items):
      raise UnsafeCheckpointError(f'build_{kind}list expects a list of {kind}s')
    return list(items)

  return build


def _restore_type_tag(value: Any, type_str: Any = None) -> Any:
  """Returns `value` unchanged, dropping its TorchScript type tag.

  TorchScript tags typed lists and dicts with their static type; numpy has no
  use for it.
  """
  return value


def _index_tuple(value: Any, what: str) -> tuple[int, ...]:
  """Validate a size or stride: a sequence of non-negative Python ints."""
  if not isinstance(value, (tuple, list)):
    raise UnsafeCheckpointError(
      f'tensor {what} must be a tuple, got {type(value).__name__}'
    )
  for item in value:
    # bool is an int subclass; a real checkpoint never uses it here.
    if not isinstance(item, int) or isinstance(item, bool) or item < 0:
      raise UnsafeCheckpointError(f'bad tensor {what} {value!r}')
  return tuple(value)


def _rebuild_tensor(
  storage: Any, storage_offset: Any, size: Any, stride: Any
) -> np.ndarray:
  """Build a fresh contiguous array from a strided view of ``storage``."""
  if not isinstance(storage, _Storage):
    raise UnsafeCheckpointError(
      f'tensor built from {type(storage).__name__}, not a storage'
    )
  shape = _index_tuple(size, 'size')
  strides = _index_tuple(stride, 'stride')
  offset = _index_tuple((storage_offset,), 'storage offset')[0]
  if len(shape) != len(strides):
    raise UnsafeCheckpointError(
      f'tensor size {shape} and stride {strides} differ in length'
    )

  array = storage.array
  # as_strided does no bounds checking, so a hostile size/stride could read
  # memory outside the storage.  Check the furthest element the view can reach.
  if all(shape):
    last = offset + sum((n - 1) * s for n, s in zip(shape, strides))
    if last >= array.size:
      raise UnsafeCheckpointError(
        f'tensor (offset {offset}, size {shape}, stride {strides}) reaches '
        f'past its storage of {array.size} elements'
      )
    base = array[offset:]
  else:
    # An empty tensor reads nothing, wherever it claims to start.
    base = array[:0]
  view = as_strided(
    base,
    shape=shape,
    strides=[s * array.itemsize for s in strides],
    writeable=False,
  )

  # Copying to the native-order dtype also byte-swaps data from big-endian
  # archives.
  out = np.array(view, dtype=array.dtype.newbyteorder('='), order='C')
  kind = storage.type.kind
  # (A ufunc on a 0-d array returns a numpy scalar: asarray keeps it an array.)
  if kind == 'bfloat16':
    # bfloat16 is the top half of a float32, so widening is exact.
    out = np.asarray(out.astype(np.uint32) << 16).view(np.float32)
  elif kind == 'bool':
    # stored as one byte; normalise any non-zero byte to True
    out = np.asarray(out != 0)
  return out


def _rebuild_tensor_v2(
  storage: Any,
  storage_offset: Any,
  size: Any,
  stride: Any,
  requires_grad: Any = False,
  backward_hooks: Any = None,
  metadata: Any = None,
) -> np.ndarray:
  """``_rebuild_tensor`` plus autograd fields, which mean nothing for numpy."""
  return _rebuild_tensor(storage, storage_offset, size, stride)


def _rebuild_parameter(
  data: Any,
  requires_grad: Any = False,
  backward_hooks: Any = None,
  state: Any = None,
) -> np.ndarray:
  """An ``nn.Parameter`` is just its tensor once autograd is gone."""
  if not isinstance(data, np.ndarray):
    raise UnsafeCheckpointError(
      f'parameter built from {type(data).__name__}, not a tensor'
    )
  return data


def _size(dims: Any = ()) -> tuple[int, ...]:
  """``torch.Size`` is a tuple of ints."""
  return _index_tuple(tuple(dims) if isinstance(dims, list) else dims, 'size')


_STORAGE_TYPES = [
  _StorageType('FloatStorage', '<f4'),
  _StorageType('DoubleStorage', '<f8'),
  _StorageType('HalfStorage', '<f2'),
  _StorageType('BFloat16Storage', '<u2', 'bfloat16'),
  _StorageType('LongStorage', '<i8'),
  _StorageType('IntStorage', '<i4'),
  _StorageType('ShortStorage', '<i2'),
  _StorageType('CharStorage', 'i1'),
  _StorageType('ByteStorage', 'u1'),
  _StorageType('BoolStorage', 'u1', 'bool'),
]
# torch pickles an untyped storage as bytes; its numel is then a byte count.
_UNTYPED = _StorageType('UntypedStorage', 'u1')

_DTYPES = {
  'float32': 'f4',
  'float64': 'f8',
  'float16': 'f2',
  'bfloat16': 'f4',
  'int64': 'i8',
  'int32': 'i4',
  'int16': 'i2',
  'int8': 'i1',
  'uint8': 'u1',
  'bool': '?',
}

# (module, name) as they appear in the pickle -> local stand-in.  Nothing else
# resolves.
_ALLOWED: dict[tuple[str, str], Any] = {
  ('collections', 'OrderedDict'): collections.OrderedDict,
  ('torch', 'Size'): _Function('torch.Size', _size),
  ('torch', 'UntypedStorage'): _UNTYPED,
  ('torch.storage', 'UntypedStorage'): _UNTYPED,
  **{
    ('torch._utils', name): _Function(f'torch._utils.{name}', func)
    for name, func in [
      ('_rebuild_tensor', _rebuild_tensor),
      ('_rebuild_tensor_v2', _rebuild_tensor_v2),
      ('_rebuild_parameter', _rebuild_parameter),
      ('_rebuild_parameter_with_state', _rebuild_parameter),
    ]
  },
  **{
    ('torch.jit._pickle', f'build_{kind}list'): _Function(
      f'torch.jit._pickle.build_{kind}list', _typed_list(kind)
    )
    for kind in _LIST_ITEM_CHECKS
  },
  ('torch.jit._pickle', 'restore_type_tag'): _Function(
    'torch.jit._pickle.restore_type_tag', _restore_type_tag
  ),
  **{('torch', t.name): t for t in _STORAGE_TYPES},
  **{
    ('torch', name): TorchDtype(name, np_dtype)
    for name, np_dtype in _DTYPES.items()
  },
}

#: Dotted names of the only globals a checkpoint may reference, besides
# TorchScript class : names under :data:`SCRIPT_NAMESPACE`.
ALLOWED_GLOBALS = frozenset(f'{module}.{name}' for module, name in _ALLOWED)


class _CheckpointUnpickler(pickle.Unpickler):
  """Unpickler for ``data.pkl`` that resolves only whitelisted names.

  It reads storages from the archive on demand.
  """

  def __init__(
    self,
    file: Any,
    archive: zipfile.ZipFile,
    prefix: str,
    byteorder: str,
    path: str,
  ) -> None:
    # torch.load decodes Python 2 byte strings as UTF-8; do the same.
    super().__init__(file, encoding='utf-8')
    self._archive = archive
    self._prefix = prefix
    self._order = '>' if byteorder == 'big' else '<'
    self._path = path
    self._storages: dict[str, _Storage] = {}  # shared storages are read once
    self._script_classes: dict[tuple[str, str], type[ScriptObject]] = {}

  def find_class(self, module: str, name: str) -> Any:
    if module == SCRIPT_NAMESPACE or module.startswith(SCRIPT_NAMESPACE + '.'):
      key = (module, name)
      if key not in self._script_classes:
        self._script_classes[key] = _script_class(module, name)
      return self._script_classes[key]
    try:
      return _ALLOWED[(module, name)]
    except KeyError:
      raise UnsafeCheckpointError(
        f"refusing to load '{module}.{name}' from {self._path}: "
        'only tensors and plain containers are allowed'
      ) from None

  def persistent_load(self, pid: Any) -> _Storage:
    if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == 'storage'):
      raise UnsafeCheckpointError(
        f'unsupported persistent reference {pid!r:.100} in {self._path}'
      )
    _, storage_type, key, _location, numel = pid
    if not isinstance(storage_type, _StorageType):
      raise UnsafeCheckpointError(
        f'{storage_type!r:.100} is not a storage type'
      )
    if not isinstance(key, str) or not isinstance(numel, int) or numel < 0:
      raise UnsafeCheckpointError(
        f'bad storage reference {pid!r:.100} in {self._path}'
      )

    cached = self._storages.get(key)
    if cached is None:
      cached = _Storage(
        storage_type, self._read_storage(storage_type, key, numel)
      )
      self._storages[key] = cached
    elif cached.type is not storage_type:
      raise UnsafeCheckpointError(
        f'storage {key!r} is used as both {cached.type.name} and '
        f'{storage_type.name}'
      )
    return cached

  def _read_storage(
    self, storage_type: _StorageType, key: str, numel: int
  ) -> np.ndarray:
    record = f'{self._prefix}data/{key}'
    try:
      raw = self._archive.read(record)
    except KeyError:
      raise ValueError(
        f'{self._path}: missing storage record {record!r}'
      ) from None
    dtype = storage_type.stored.newbyteorder(self._order)
    if numel * dtype.itemsize > len(raw):
      raise ValueError(
        f'{self._path}: storage record {record!r} holds {len(raw)} bytes, '
        f'fewer than {numel} {storage_type.name} elements'
      )
    # Read-only view of the bytes.
    return np.frombuffer(raw, dtype=dtype, count=numel)


def _find_prefix(archive: zipfile.ZipFile, path: str) -> str:
  """Return the top folder (with trailing slash) that holds ``data.pkl``."""
  pickles = [
    name
    for name in archive.namelist()
    if (name == 'data.pkl' or name.endswith('/data.pkl'))
    and name.count('/') <= 1
  ]
  if len(pickles) != 1:
    reason = 'no data.pkl record' if not pickles else 'several data.pkl records'
    raise ValueError(f'{path}: not a torch zip checkpoint ({reason})')
  return pickles[0][: -len('data.pkl')]


def load(path: str | os.PathLike[str]) -> Any:
  """Load a ``torch.save`` zip checkpoint without torch or running its code.

  A ``torch.jit.save`` archive loads too. Returns the saved object with every
  tensor (or ``nn.Parameter``) replaced by a fresh C-contiguous
  ``numpy.ndarray`` of the matching dtype in native byte order (bfloat16 becomes
  float32), ``collections.OrderedDict`` kept, and plain containers and scalars
  as they were.  A TorchScript archive gives a tree of :class:`ScriptObject`
  (class name plus attribute dict), its parameters as arrays; ``constants.pkl``
  and ``code/`` are not read.

  Raises ``FileNotFoundError`` if ``path`` does not exist, ``ValueError`` if it
  is not a torch zip checkpoint (e.g. a legacy pre-1.6 file) or is missing
  records, and :class:`UnsafeCheckpointError` if the pickle references any
  global outside :data:`ALLOWED_GLOBALS` or describes tensors that do not fit
  their storage.
  """
  path_str = os.fspath(path)
  if not os.path.exists(path_str):
    raise FileNotFoundError(f'checkpoint not found: {path_str}')
  if not zipfile.is_zipfile(path_str):
    raise ValueError(
      f'{path_str}: not a torch zip checkpoint (legacy or corrupt format)'
    )

  try:
    archive = zipfile.ZipFile(path_str)
  except zipfile.BadZipFile as err:
    raise ValueError(
      f'{path_str}: not a torch zip checkpoint ({err})'
    ) from None

  with archive:
    prefix = _find_prefix(archive, path_str)
    try:
      byteorder = (
        archive.read(prefix + 'byteorder').decode('ascii', 'replace').strip()
      )
    except KeyError:
      # torch versions that omit the record wrote little-endian
      byteorder = 'little'
    if byteorder not in ('little', 'big'):
      raise ValueError(f'{path_str}: unknown byteorder record {byteorder!r}')

    with archive.open(prefix + 'data.pkl') as pickled:
      unpickler = _CheckpointUnpickler(
        pickled, archive, prefix, byteorder, path_str
      )
      return unpickler.load()


# ----------------------------------------------------------------------------
# Writing.
# ----------------------------------------------------------------------------

# Little-endian dtype (``numpy.dtype.str``) -> the torch storage class written
# for it.  bfloat16, which numpy lacks, is read but never written.
_STORAGE_FOR_DTYPE = {
  **{t.stored.str: t.name for t in _STORAGE_TYPES if t.kind == 'plain'},
  '|b1': 'BoolStorage',
}

# The bookkeeping records torch 2.x writes, with their contents: these after
# data.pkl, before the storages...
_HEAD_RECORDS = (
  ('.format_version', b'1'),
  ('.storage_alignment', b'64'),
  ('byteorder', b'little'),
)
# ... and this one after them.  (torch also writes ``.data/serialization_id``,
# a random number used for logging; it is left out to keep the bytes
# reproducible, and torch.load does not need it.)
_TAIL_RECORDS = (('version', b'3\n'),)

_ALIGNMENT = 64  # of every record's payload, as torch's .storage_alignment
# Sizes and offsets from this value up need zip64 fields (miniz's threshold).
_ZIP32_LIMIT = 0xFFFFFFFF

_GLOBAL_REBUILD = pickle.GLOBAL + b'torch._utils\n_rebuild_tensor_v2\n'
_GLOBAL_ORDERED_DICT = pickle.GLOBAL + b'collections\nOrderedDict\n'


class _TensorPickler:
  """Writes ``data.pkl`` with the opcodes torch's pickler uses for these types.

  Protocol 2 and no memo: each global is spelled out where it is used, and an
  object reached twice is written twice.  An array becomes a call of
  ``torch._utils._rebuild_tensor_v2`` on a persistent reference to a storage
  of its own; the arrays are collected in ``storages``, in key order, for the
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
      raise ValueError(f'{path}: the object contains itself (a cycle)')
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

  A record is a local header whose extra field ends in an ``FB`` field of
  ``Z`` bytes padding the payload's start to a multiple of 64, the payload,
  and, for a non-empty payload, a data descriptor (its CRC and sizes); the
  local header's own CRC and sizes are 0, and so are all dates.  The archive
  ends with zip64 end records whatever its size.  Zip64 fields appear, as
  miniz writes them, only where a size or offset reaches ``_ZIP32_LIMIT``.
  torch.load with ``calculate_storage_offsets`` predicts each storage's
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
    """Append one record; ``payload`` is bytes or a 1-D memoryview of bytes."""
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

  Created with mode 0o666 less the umask, as ``open`` would create the target.
  """
  flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, 'O_BINARY', 0)
  for _ in range(100):
    temporary = os.path.join(directory, f'.{base}.{os.urandom(6).hex()}.tmp')
    try:
      return os.open(temporary, flags, 0o666), temporary
    except FileExistsError:
      continue
  raise FileExistsError(f'no free temporary file name in {directory}')


def save(obj: Any, path: str | os.PathLike[str]) -> None:
  """Write ``obj`` as a ``torch.save`` zip checkpoint, without torch.

  ``obj`` may hold numpy arrays of dtype float32, float64, float16, int64,
  int32, int16, int8, uint8 or bool (any shape, 0-d and empty included; each
  becomes a tensor of its own, written C-contiguous and little-endian), dicts
  and ``collections.OrderedDict`` with str or int keys, lists, tuples, str,
  int, float, bool and None, nested in any way.  The types must be exactly
  these: a subclass (a numpy scalar, a namedtuple) raises ``TypeError``, as
  does anything else, naming where it is, e.g. ``obj['g']['x']: cannot write
  a <class 'set'>``; a container that contains itself raises ``ValueError``.
  Nothing is written in either case.

  :func:`load` reads the file back bit for bit (arrays in native byte order,
  OrderedDicts as OrderedDicts), and so does ``torch.load(path,
  weights_only=True)``, with or without ``mmap=True``.  The archive's top
  folder is named after the file (``path``'s name less its extension), as
  torch names it; the same object and file name always give the same bytes.

  The file is written under a temporary name in ``path``'s folder, synced and
  renamed over ``path``: if anything fails, ``path`` is as it was and no
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
