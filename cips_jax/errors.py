"""The errors cips_jax raises for input it cannot use, in one hierarchy.

    Error                       anything a user can fix
    ├── InputError              a value that cannot work (also a ValueError)
    │   ├── ConfigError         a training config field
    │   ├── OptionError         a command's flag or a library call's option
    │   ├── ShapeError          arrays that break the shape contract
    │   ├── DataError           a data set that cannot be read or prepared
    │   └── CheckpointError     a checkpoint that cannot be read or used
    │       ├── CheckpointMismatchError   another architecture's
    │       ├── DamagedCheckpointError    truncated or corrupt
    │       ├── UnsafeCheckpointError     a pickle asking for code
    │       └── NotAGeneratorError        no generator at that path
    ├── MissingInputError       a named file or folder is not there
    │                           (also a FileNotFoundError)
    ├── OutputExistsError       an output that would replace a file
    │                           (also a FileExistsError)
    ├── WorkdirLockedError      another run holds the workdir
    ├── DivergedError           non-finite training metrics
    │                           (also a FloatingPointError)
    └── OutOfMemoryError        a computation larger than the device
                                (also a MemoryError)

Each also derives from the built-in exception that code catching the standard
type expects. The commands (`cips_jax.cli.run`) print an `Error` as one line,
`cips_jax.X: error: <message>`, and exit 1; any other exception is a bug and
keeps its traceback. Messages name the offending input (the field, flag, file
or key) and never quote untrusted content at length (`bounded_repr`).
"""

from __future__ import annotations

import itertools
import pickle
import reprlib
from typing import Any

import numpy as np


class Error(Exception):
  """Base of every error cips_jax raises for input a user can fix."""


class InputError(Error, ValueError):
  """A value that cannot work."""


class ConfigError(InputError):
  """A training config value that cannot work; the message names the field."""


class OptionError(InputError):
  """A command's flag or an option of a library call; named as its flag."""


class ShapeError(InputError):
  """Arrays whose shapes break the contract of `cips_jax.shapes`."""


class DataError(InputError):
  """A data set (a folder, an LMDB, a prepared set) that cannot be used."""


class CheckpointError(InputError):
  """A checkpoint that cannot be read or used."""


class CheckpointMismatchError(CheckpointError):
  """A checkpoint of another architecture; the message lists what differs."""


class DamagedCheckpointError(CheckpointError):
  """A truncated or corrupt checkpoint; the message names the intact one."""


class UnsafeCheckpointError(CheckpointError, pickle.UnpicklingError):
  """A checkpoint that asks for code to run, or would exhaust memory or time."""


class NotAGeneratorError(CheckpointError):
  """The path exists but holds nothing this package can read as a generator."""


class MissingInputError(Error, FileNotFoundError):
  """A file or folder the input names is not there."""


class OutputExistsError(Error, FileExistsError):
  """An output path exists; nothing is overwritten."""


class WorkdirLockedError(Error, RuntimeError):
  """Another training run holds the workdir's lock."""


class DivergedError(Error, FloatingPointError):
  """Training metrics or the train state became non-finite; no checkpoint of
  that state exists."""


class OutOfMemoryError(Error, MemoryError):
  """A computation needs more memory than the device has."""


# What bounded_repr keeps of a value: items per container, and levels.
_SHOWN_ITEMS = 8
_SHOWN_LEVELS = 3

_REPR = reprlib.Repr()
_REPR.maxlevel = _SHOWN_LEVELS
_REPR.maxstring = 60
_REPR.maxother = 60
_REPR.maxlist = _REPR.maxtuple = _REPR.maxdict = _REPR.maxset = _SHOWN_ITEMS


class _Cut:
  """What stands for the parts of a value a message leaves out."""

  def __repr__(self) -> str:
    return '...'


_CUT = _Cut()


class _Text(str):
  """A str that reprs as itself (a description, not a value)."""

  def __repr__(self) -> str:
    return str(self)


def _outline(value: Any, levels: int) -> Any:
  """`value` cut to a few items and levels, containers as plain ones."""
  if isinstance(value, np.ndarray):
    return _Text(f'array(shape={value.shape}, dtype={value.dtype})')
  if isinstance(value, str):
    return value[:100]
  if isinstance(value, int) and value.bit_length() > 4096:
    # repr refuses ints of over 4300 digits (sys.set_int_max_str_digits)
    return _Text(f'<int of {value.bit_length()} bits>')
  if not isinstance(value, (dict, list, tuple)):
    return value
  if not levels:
    return _CUT
  if isinstance(value, dict):
    # A key is shown only when it is an atom, cut like any other (a huge int
    # key would make reprlib raise).
    out: Any = {
      _outline(k, 0)
      if isinstance(k, (str, int, float, type(None)))
      else _Text(type(k).__name__): _outline(v, levels - 1)
      for k, v in itertools.islice(value.items(), _SHOWN_ITEMS)
    }
    if len(value) > _SHOWN_ITEMS:
      out[_CUT] = _CUT
    return out
  items = [_outline(v, levels - 1) for v in value[:_SHOWN_ITEMS]]
  if len(value) > _SHOWN_ITEMS:
    items.append(_CUT)
  return tuple(items) if isinstance(value, tuple) else items


def bounded_repr(value: Any, limit: int = 200) -> str:
  """A repr of untrusted `value` for a message: bounded in depth and length.

  Cheap whatever `value` is (a crafted pickle's, a huge checkpoint's): dicts,
  lists and tuples are first cut to a few items and levels, since reprlib
  prints a container subclass (an `OrderedDict`) in full before cutting it;
  arrays are described by shape and dtype, huge ints by their bit length.
  reprlib then stops at a few levels and items, and the text at `limit`.
  """
  text = _REPR.repr(_outline(value, _SHOWN_LEVELS))
  return text if len(text) <= limit else text[: limit - 3] + '...'
