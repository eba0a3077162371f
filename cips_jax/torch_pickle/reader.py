"""Read PyTorch zip checkpoints into numpy without torch.

No pickled code is run.  The archive's layout is described in
`cips_jax.torch_pickle.formats`.

A pickle may name any importable callable, so unpickling an untrusted file with
the standard `pickle.load` can run arbitrary code.  `load` uses an
unpickler that resolves only an explicit whitelist of torch names, each to a
small local stand-in, and refuses everything else with
`UnsafeCheckpointError`.  Tensors come back as fresh C-contiguous
`numpy.ndarray` objects, `collections.OrderedDict` as itself, and plain
containers and scalars unchanged.

TorchScript archives (`torch.jit.save`) share this layout; their `data.pkl`
also names the scripted module classes (`__torch__.<module> <Class>`, built
with NEWOBJ and BUILD) and list helpers from `torch.jit._pickle`.  Any name
under `__torch__.` resolves to an inert `ScriptObject` subclass, made
afresh for each load, whose instances keep only the class name and the BUILD
state dict; none of the archive's `code/` is read or run.

Bounds
------
Running no code is not enough: a file of a few hundred bytes can still ask for
gigabytes (a tensor view with zero strides, a deflated record, a memo index of
2**32), or for a structure that crashes or stalls the interpreter when it is
hashed or printed (a dict key nested a million deep, a tuple whose memo shares
one sub-tuple 2**100 times).  So every size the file declares is checked
against the file before anything is read or allocated, and a load costs
memory and time in proportion to the file.  Each bound is described where it
is enforced:

* memory (`.budget`): at most `4 x file size + 64 MiB`, charged before
  each allocation; a valid checkpoint needs about twice its size;
* records (`.archive`): stored, not compressed, within the file, named
  once and matching their CRC; a storage record must also hold its declared
  elements, checked against the size the zip declares before it is read;
* the pickle (`.scan`): scanned before it is unpickled, so that only
  protocol 2's opcodes, a bounded memo, short ints, cheap dict keys and
  objects of bounded size and depth get through;
* tensors (`.stand_ins`): at most 32 dimensions, reaching no element
  outside their storage, and broadcast only up to a small size.

Anything else wrong with the file (a damaged zip, a truncated record, a pickle
that does not parse) is a `cips_jax.errors.CheckpointError` whose
one-line message names the file; untrusted values are quoted with
`cips_jax.errors.bounded_repr`.
"""

from __future__ import annotations

import io
import os
import pickle
from typing import Any, BinaryIO

import numpy as np

from cips_jax import errors
from cips_jax.torch_pickle import archive as archive_lib
from cips_jax.torch_pickle import budget as budget_lib
from cips_jax.torch_pickle import scan
from cips_jax.torch_pickle import stand_ins

# The byteorder record holds 'little' or 'big'.
_MAX_BYTEORDER_BYTES = 16


def _is_text(value: Any, text: str) -> bool:
  # An array compared with a str would compare each of its elements.
  return isinstance(value, str) and value == text


class _CheckpointUnpickler(pickle.Unpickler):
  """Unpickler for `data.pkl` that resolves only whitelisted names.

  It reads storages from the archive on demand.
  """

  def __init__(
    self,
    file: Any,
    archive: archive_lib.Archive,
    prefix: str,
    byteorder: str,
    budget: budget_lib.Budget,
  ) -> None:
    # torch.load decodes Python 2 byte strings as UTF-8; do the same.
    super().__init__(file, encoding='utf-8')
    self._archive = archive
    self._prefix = prefix
    self._order = '>' if byteorder == 'big' else '<'
    self._path = archive.path
    self._budget = budget
    self._builders = stand_ins.tensor_builders(budget)
    # Shared storages are read once.
    self._storages: dict[str, stand_ins.Storage] = {}
    self._script_classes: dict[
      tuple[str, str], type[stand_ins.ScriptObject]
    ] = {}

  def find_class(self, module: str, name: str) -> Any:
    if stand_ins.is_script_name(module):
      key = (module, name)
      if key not in self._script_classes:
        self._script_classes[key] = stand_ins.script_class(module, name)
      return self._script_classes[key]
    key = (module, name)
    if key in self._builders:
      return self._builders[key]
    if key not in stand_ins.STAND_INS:
      raise stand_ins.refuse_global(module, name, self._path)
    return stand_ins.STAND_INS[key]

  def persistent_load(self, pid: Any) -> stand_ins.Storage:
    if not (
      isinstance(pid, tuple) and len(pid) == 5 and _is_text(pid[0], 'storage')
    ):
      raise errors.UnsafeCheckpointError(
        f'unsupported persistent reference {errors.bounded_repr(pid)} in '
        f'{self._path}'
      )
    _, storage_type, key, _location, numel = pid
    if not isinstance(storage_type, stand_ins.StorageType):
      raise errors.UnsafeCheckpointError(
        f'{errors.bounded_repr(storage_type)} is not a storage type'
      )
    if (
      not isinstance(key, str)
      or not isinstance(numel, int)
      or isinstance(numel, bool)
      or numel < 0
    ):
      raise errors.UnsafeCheckpointError(
        f'bad storage reference {errors.bounded_repr(pid)} in {self._path}'
      )

    cached = self._storages.get(key)
    if cached is None:
      cached = stand_ins.Storage(
        storage_type, self._read_storage(storage_type, key, numel)
      )
      self._storages[key] = cached
    elif cached.type is not storage_type:
      raise errors.UnsafeCheckpointError(
        f'storage {errors.bounded_repr(key)} is used as both '
        f'{cached.type.name} and {storage_type.name}'
      )
    return cached

  def _read_storage(
    self, storage_type: stand_ins.StorageType, key: str, numel: int
  ) -> np.ndarray:
    record = f'{self._prefix}data/{key}'
    info = self._archive.info(record)
    if info is None:
      raise errors.CheckpointError(
        f'{self._path}: missing storage record {errors.bounded_repr(record)}'
      )
    dtype = storage_type.stored.newbyteorder(self._order)
    # Checked against the record's declared size before anything is read.
    if numel * dtype.itemsize > info.file_size:
      raise errors.CheckpointError(
        f'{self._path}: storage record {errors.bounded_repr(record)} holds '
        f'{info.file_size} bytes, fewer than {numel} {storage_type.name} '
        'elements'
      )
    raw = self._archive.read(info, self._budget)
    # Read-only view of the bytes.
    return np.frombuffer(raw, dtype=dtype, count=numel)


def _describe(err: BaseException) -> str:
  """A bounded one-line account of an exception raised by untrusted input."""
  # Only str arguments are shown: another argument's str could be the whole
  # of an untrusted object.
  if err.args and all(isinstance(a, str) for a in err.args):
    text = ' '.join(err.args).replace('\n', ' ')
    return f'{type(err).__name__}: {text[:200]}'
  return type(err).__name__


def _load(file: BinaryIO, path: str) -> Any:
  budget = budget_lib.Budget(os.fstat(file.fileno()).st_size)
  archive = archive_lib.Archive(file, path, budget)
  with archive.zip:
    prefix = archive_lib.find_prefix(archive)
    info = archive.info(prefix + 'byteorder')
    if info is None:
      # torch versions that omit the record wrote little-endian
      byteorder = 'little'
    elif info.file_size > _MAX_BYTEORDER_BYTES:
      raise errors.CheckpointError(
        f'{path}: byteorder record of {info.file_size} bytes'
      )
    else:
      raw = archive.read(info, budget)
      byteorder = raw.decode('ascii', 'replace').strip()
    if byteorder not in ('little', 'big'):
      raise errors.CheckpointError(
        f'{path}: unknown byteorder record {errors.bounded_repr(byteorder)}'
      )

    data = archive.read(archive.info(prefix + 'data.pkl'), budget)
    scan.scan_pickle(data, path, budget)
    unpickler = _CheckpointUnpickler(
      io.BytesIO(data), archive, prefix, byteorder, budget
    )
    return unpickler.load()


def load(path: str | os.PathLike[str]) -> Any:
  """Load a `torch.save` zip checkpoint without torch or running its code.

  A `torch.jit.save` archive loads too. Returns the saved object with every
  tensor (or `nn.Parameter`) replaced by a fresh C-contiguous
  `numpy.ndarray` of the matching dtype in native byte order (bfloat16 becomes
  float32), `collections.OrderedDict` kept, and plain containers and scalars
  as they were.  A TorchScript archive gives a tree of `ScriptObject`
  (class name plus attribute dict), its parameters as arrays; `constants.pkl`
  and `code/` are not read.

  Raises `cips_jax.errors.MissingInputError` (a `FileNotFoundError`)
  if `path` does not exist, `UnsafeCheckpointError` if the pickle
  references any global outside `ALLOWED_GLOBALS`, or the file breaks
  one of the bounds of the module docstring (it could exhaust memory or time),
  and `cips_jax.errors.CheckpointError` (a `ValueError`) for anything
  else that makes it unreadable: not a torch zip checkpoint (e.g. a legacy
  pre-1.6 file), missing, damaged or truncated records, a malformed pickle.
  Every message is one line naming the file.  `OSError` comes through when
  the file cannot be opened, and `MemoryError` if the machine runs out of
  memory within the bounds.
  """
  path_str = os.fspath(path)
  if not os.path.exists(path_str):
    raise errors.MissingInputError(f'checkpoint not found: {path_str}')
  if os.path.isdir(path_str):
    raise errors.CheckpointError(
      f'{path_str}: not a torch zip checkpoint (legacy or corrupt format)'
    )
  with open(path_str, 'rb') as file:
    try:
      return _load(file, path_str)
    except errors.Error as err:
      if path_str in str(err):
        raise
      raise type(err)(f'{path_str}: {err}') from None
    except MemoryError:
      raise
    except Exception as err:  # anything else the file's content provoked
      raise errors.CheckpointError(
        f'{path_str}: malformed checkpoint ({_describe(err)})'
      ) from None
