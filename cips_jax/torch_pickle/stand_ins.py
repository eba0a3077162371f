"""What a checkpoint's globals resolve to: a whitelist of inert stand-ins.

A pickle may name any importable callable; here only the names of
`ALLOWED_GLOBALS` resolve, each to a small local stand-in (a dtype, a
storage type, a function rebuilding a tensor or a container), and any name
under `SCRIPT_NAMESPACE` to a fresh, inert `ScriptObject`
subclass.

Tensors are rebuilt with at most 32 dimensions, reaching no element outside
their storage, and with more elements than the storage holds (zero or
overlapping strides) only for a result of at most `MAX_EXPANDED_BYTES`;
each is charged to the load's budget (`.budget`) before it is copied.
"""

from __future__ import annotations

import collections
from typing import Any, Callable

import numpy as np
from numpy.lib.stride_tricks import as_strided

from cips_jax import errors
from cips_jax.torch_pickle import budget as budget_lib
from cips_jax.torch_pickle import formats

#: Largest tensor that may have more elements than its storage (a broadcast
#: view: zero or overlapping strides).
MAX_EXPANDED_BYTES = 1 << 20
_MAX_DIMS = 32


class _Frozen:
  """Base for the stand-ins handed to the unpickler.

  The pickle BUILD opcode sets attributes on whatever object is on the stack.
  Stand-ins are shared module-level objects, so they refuse attribute writes
  (and have no `__dict__`) to keep one checkpoint from altering how the next
  one is read.
  """

  __slots__ = ()

  def __setattr__(self, name: str, value: Any) -> None:
    raise AttributeError(f'{type(self).__name__} is read-only')

  def _init(self, **fields: Any) -> None:
    for name, value in fields.items():
      object.__setattr__(self, name, value)


class TorchDtype(_Frozen):
  """What a pickled torch dtype global (e.g. `torch.float32`) loads as.

  `name` is the torch name (`"float32"`); `numpy` is the matching numpy
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


class StorageType(_Frozen):
  """Stand-in for a storage class such as `torch.FloatStorage`.

  `stored` is the little-endian dtype of one element as written in
  `data/<key>`; `kind` says whether elements need more than a byte-order fix
  after reading.
  """

  __slots__ = ('name', 'stored', 'kind')

  def __init__(self, name: str, stored: str, kind: str = 'plain') -> None:
    self._init(name=name, stored=np.dtype(stored), kind=kind)

  def __repr__(self) -> str:
    return f'<stand-in for torch.{self.name}>'


class Storage(_Frozen):
  """One loaded storage: a read-only 1-D array of its elements.

  The elements are in archive byte order.
  """

  __slots__ = ('type', 'array')

  def __init__(self, storage_type: StorageType, array: np.ndarray) -> None:
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
#: `ScriptObject`.
SCRIPT_NAMESPACE = '__torch__'


class ScriptObject(_Frozen):
  """What an instance of a TorchScript class loads as.

  For example a scripted `nn.Module`. `type_name` is the pickled class name,
  e.g. `"__torch__.inceptionv3.Conv2dLayer"`; `state` is the dict the
  pickle's BUILD opcode supplied (attribute name -> value: tensors as numpy
  arrays, submodules as further `ScriptObject` instances).  The instance has
  no other behaviour; the methods in the archive's `code/` are ignored.
  """

  __slots__ = ('state',)
  # each loaded class name gets a subclass that overrides it
  type_name = SCRIPT_NAMESPACE

  def __setstate__(self, state: Any) -> None:
    # BUILD calls this once per object; a second BUILD or a non-dict state is
    # malformed.
    name = self.type_name[:100]
    if hasattr(self, 'state'):
      raise errors.UnsafeCheckpointError(f'{name} object built twice')
    if not isinstance(state, dict) or not all(
      isinstance(k, str) for k in state
    ):
      raise errors.UnsafeCheckpointError(
        f'{name} state must be a dict with str keys, got {type(state).__name__}'
      )
    self._init(state=state)

  def __repr__(self) -> str:
    fields = ', '.join(getattr(self, 'state', {}))
    return f'<{self.type_name} ({fields})>'


def is_script_name(module: str) -> bool:
  """Whether a pickled global's module is under `SCRIPT_NAMESPACE`."""
  return module == SCRIPT_NAMESPACE or module.startswith(SCRIPT_NAMESPACE + '.')


def check_script_name(module: str, name: str) -> None:
  """Refuses a TorchScript class name that is not dotted identifiers."""
  if not all(part.isidentifier() for part in [*module.split('.'), name]):
    dotted = errors.bounded_repr(f'{module}.{name}')
    raise errors.UnsafeCheckpointError(
      f'malformed TorchScript class name {dotted}'
    )


def script_class(module: str, name: str) -> type[ScriptObject]:
  """A fresh, empty `ScriptObject` subclass for one pickled class name.

  NEWOBJ insists on a real type, so each name gets its own subclass; making them
  per load keeps a class seen in one archive from being shared with the next.
  """
  check_script_name(module, name)
  return type(
    'ScriptObject',
    (ScriptObject,),
    {'__slots__': (), 'type_name': f'{module}.{name}'},
  )


# Item checks of the `torch.jit._pickle.build_<kind>list` helpers (bool is an
# int subclass).
_LIST_ITEM_CHECKS: dict[str, Callable[[Any], bool]] = {
  'int': lambda x: isinstance(x, int) and not isinstance(x, bool),
  'double': lambda x: isinstance(x, float),
  'bool': lambda x: isinstance(x, bool),
  'tensor': lambda x: isinstance(x, np.ndarray),
}


def _typed_list(kind: str) -> Callable[[Any], list[Any]]:
  """Stand-in for `torch.jit._pickle.build_<kind>list`.

  Checks the items and returns a list.
  """
  check = _LIST_ITEM_CHECKS[kind]

  def build(items: Any) -> list[Any]:
    if not isinstance(items, list) or not all(check(x) for x in items):
      raise errors.UnsafeCheckpointError(
        f'build_{kind}list expects a list of {kind}s'
      )
    return list(items)

  return build


def _restore_type_tag(value: Any, type_str: Any = None) -> Any:
  """Returns `value`, dropping its TorchScript type tag.

  TorchScript tags typed lists and dicts with their static type; numpy has no
  use for it.  A list or dict comes back as a copy: the scan takes what REDUCE
  returns for a new object, and an alias could change a container that is
  already inside another.
  """
  if isinstance(value, (list, dict)):
    return type(value)(value)
  if isinstance(value, ScriptObject):
    raise errors.UnsafeCheckpointError(
      'restore_type_tag of a TorchScript object'
    )
  return value


def _ordered_dict(*args: Any) -> collections.OrderedDict:
  """`collections.OrderedDict()`: pickles fill it with SETITEMS afterwards.

  Arguments are refused, so that its keys pass the scan's key checks.
  """
  if args:
    raise errors.UnsafeCheckpointError('OrderedDict called with arguments')
  return collections.OrderedDict()


def _index_tuple(value: Any, what: str) -> tuple[int, ...]:
  """Validate a size or stride: a sequence of non-negative Python ints."""
  if not isinstance(value, (tuple, list)):
    raise errors.UnsafeCheckpointError(
      f'tensor {what} must be a tuple, got {type(value).__name__}'
    )
  for item in value:
    # bool is an int subclass; a real checkpoint never uses it here.
    if not isinstance(item, int) or isinstance(item, bool) or item < 0:
      raise errors.UnsafeCheckpointError(
        f'bad tensor {what} {errors.bounded_repr(value)}'
      )
  return tuple(value)


def _rebuild_tensor(
  storage: Any,
  storage_offset: Any,
  size: Any,
  stride: Any,
  budget: budget_lib.Budget,
) -> np.ndarray:
  """Build a fresh contiguous array from a strided view of `storage`."""
  if not isinstance(storage, Storage):
    raise errors.UnsafeCheckpointError(
      f'tensor built from {type(storage).__name__}, not a storage'
    )
  shape = _index_tuple(size, 'size')
  strides = _index_tuple(stride, 'stride')
  offset = _index_tuple((storage_offset,), 'storage offset')[0]
  if len(shape) != len(strides):
    raise errors.UnsafeCheckpointError(
      f'tensor size {errors.bounded_repr(shape)} and stride '
      f'{errors.bounded_repr(strides)} differ in length'
    )
  if len(shape) > _MAX_DIMS:
    raise errors.UnsafeCheckpointError(
      f'tensor of {len(shape)} dimensions (at most {_MAX_DIMS})'
    )

  array = storage.array
  numel = 1
  for n in shape:
    numel *= n

  def where() -> str:
    return (
      f'tensor (offset {errors.bounded_repr(offset)}, '
      f'size {errors.bounded_repr(shape)}, '
      f'stride {errors.bounded_repr(strides)})'
    )

  # as_strided does no bounds checking, so a hostile size/stride could read
  # memory outside the storage.  Check the furthest element the view can reach.
  if numel:
    # A dimension of one element never moves: its stride may be anything.
    strides = tuple(s if n > 1 else 0 for n, s in zip(shape, strides))
    last = offset + sum((n - 1) * s for n, s in zip(shape, strides))
    if last >= array.size:
      raise errors.UnsafeCheckpointError(
        f'{where()} reaches past its storage of {array.size} elements'
      )
    base = array[offset:]
  else:
    # An empty tensor reads nothing, wherever it claims to start.
    base, strides = array[:0], (0,) * len(shape)
  nbytes = numel * array.itemsize
  # Zero or overlapping strides let a small storage declare a huge tensor, which
  # the copy below would materialise.
  if numel > array.size and nbytes > MAX_EXPANDED_BYTES:
    raise errors.UnsafeCheckpointError(
      f'{where()} has {numel} elements, more than its storage of {array.size}: '
      f'a broadcast view is allowed only up to {MAX_EXPANDED_BYTES} bytes'
    )
  kind = storage.type.kind
  # The copy, and the widened or normalised copy of a bfloat16 or bool tensor.
  budget.charge(nbytes * (1 if kind == 'plain' else 3), where)
  view = as_strided(
    base,
    shape=shape,
    strides=[s * array.itemsize for s in strides],
    writeable=False,
  )

  # Copying to the native-order dtype also byte-swaps data from big-endian
  # archives.
  out = np.array(view, dtype=array.dtype.newbyteorder('='), order='C')
  # (A ufunc on a 0-d array returns a numpy scalar: asarray keeps it an array.)
  if kind == 'bfloat16':
    # bfloat16 is the top half of a float32, so widening is exact.
    wide = out.astype(np.uint32)
    wide <<= 16
    out = np.asarray(wide).view(np.float32)
  elif kind == 'bool':
    # stored as one byte; normalise any non-zero byte to True
    out = np.asarray(out != 0)
  return out


def _rebuild_parameter(
  data: Any,
  requires_grad: Any = False,
  backward_hooks: Any = None,
  state: Any = None,
) -> np.ndarray:
  """An `nn.Parameter` is just its tensor once autograd is gone."""
  if not isinstance(data, np.ndarray):
    raise errors.UnsafeCheckpointError(
      f'parameter built from {type(data).__name__}, not a tensor'
    )
  return data


def _size(dims: Any = ()) -> tuple[int, ...]:
  """`torch.Size` is a tuple of ints."""
  return _index_tuple(tuple(dims) if isinstance(dims, list) else dims, 'size')


_STORAGE_TYPES = [
  StorageType(f.name, f.stored, f.kind) for f in formats.STORAGE_FORMATS
]
# torch pickles an untyped storage as bytes; its numel is then a byte count.
_UNTYPED = StorageType('UntypedStorage', 'u1')

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

# The tensor builders charge each load's budget, so each load gets its own
# (`tensor_builders`).
_TENSOR_BUILDERS = ('_rebuild_tensor', '_rebuild_tensor_v2')

# (module, name) as they appear in the pickle -> shared local stand-in.  Besides
# these, only each load's tensor builders and TorchScript classes resolve.
STAND_INS: dict[tuple[str, str], Any] = {
  ('collections', 'OrderedDict'): _Function(
    'collections.OrderedDict', _ordered_dict
  ),
  ('torch', 'Size'): _Function('torch.Size', _size),
  ('torch', 'UntypedStorage'): _UNTYPED,
  ('torch.storage', 'UntypedStorage'): _UNTYPED,
  **{
    ('torch._utils', name): _Function(f'torch._utils.{name}', func)
    for name, func in [
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

# Every (module, name) that resolves.
ALLOWED_NAMES = frozenset(
  [*STAND_INS, *(('torch._utils', name) for name in _TENSOR_BUILDERS)]
)

#: Dotted names of the only globals a checkpoint may reference, besides
#: TorchScript class names (under `SCRIPT_NAMESPACE`).
ALLOWED_GLOBALS = frozenset(
  f'{module}.{name}' for module, name in ALLOWED_NAMES
)


def tensor_builders(
  budget: budget_lib.Budget,
) -> dict[tuple[str, str], _Function]:
  """The `torch._utils._rebuild_tensor*` stand-ins of one load."""

  def v1(storage: Any, storage_offset: Any, size: Any, stride: Any) -> Any:
    return _rebuild_tensor(storage, storage_offset, size, stride, budget)

  def v2(
    storage: Any,
    storage_offset: Any,
    size: Any,
    stride: Any,
    requires_grad: Any = False,
    backward_hooks: Any = None,
    metadata: Any = None,
  ) -> Any:
    # The autograd fields mean nothing for numpy.
    return _rebuild_tensor(storage, storage_offset, size, stride, budget)

  return {
    ('torch._utils', name): _Function(f'torch._utils.{name}', func)
    for name, func in zip(_TENSOR_BUILDERS, (v1, v2))
  }


def refuse_global(
  module: str, name: str, path: str
) -> errors.UnsafeCheckpointError:
  """The error for a global outside the whitelist, naming it and the file."""
  return errors.UnsafeCheckpointError(
    f"refusing to load '{module[:100]}.{name[:100]}' from {path}: "
    'only tensors and plain containers are allowed'
  )
