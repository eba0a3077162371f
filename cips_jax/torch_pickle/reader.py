"""Read PyTorch zip checkpoints into numpy without torch.

No pickled code is run.  The archive's layout is described in
:mod:`cips_jax.torch_pickle.formats`.

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
"""

from __future__ import annotations

import collections
import os
import pickle
from typing import Any, Callable
import zipfile

import numpy as np
from numpy.lib.stride_tricks import as_strided

from cips_jax import errors
from cips_jax.torch_pickle import formats

# A checkpoint that asked for something outside the whitelist, or is malformed
# in a way that could make the reader touch memory or objects it should not.
UnsafeCheckpointError = errors.UnsafeCheckpointError


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
  _StorageType(f.name, f.stored, f.kind) for f in formats.STORAGE_FORMATS
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
      raise errors.CheckpointError(
        f'{self._path}: missing storage record {record!r}'
      ) from None
    dtype = storage_type.stored.newbyteorder(self._order)
    if numel * dtype.itemsize > len(raw):
      raise errors.CheckpointError(
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
    raise errors.CheckpointError(
      f'{path}: not a torch zip checkpoint ({reason})'
    )
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
    raise errors.MissingInputError(f'checkpoint not found: {path_str}')
  if not zipfile.is_zipfile(path_str):
    raise errors.CheckpointError(
      f'{path_str}: not a torch zip checkpoint (legacy or corrupt format)'
    )

  try:
    archive = zipfile.ZipFile(path_str)
  except zipfile.BadZipFile as err:
    raise errors.CheckpointError(
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
      raise errors.CheckpointError(
        f'{path_str}: unknown byteorder record {byteorder!r}'
      )

    with archive.open(prefix + 'data.pkl') as pickled:
      unpickler = _CheckpointUnpickler(
        pickled, archive, prefix, byteorder, path_str
      )
      return unpickler.load()
