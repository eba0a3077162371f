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

import pickle
import reprlib
from typing import Any


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
  """Training metrics became non-finite; no checkpoint of that state exists."""


class OutOfMemoryError(Error, MemoryError):
  """A computation needs more memory than the device has."""


_REPR = reprlib.Repr()
_REPR.maxlevel = 3
_REPR.maxstring = 60
_REPR.maxother = 60
_REPR.maxlist = _REPR.maxtuple = _REPR.maxdict = _REPR.maxset = 8


def bounded_repr(value: Any, limit: int = 200) -> str:
  """A repr of untrusted `value` for a message: bounded in depth and length.

  reprlib stops at a few levels and items, so a deep or huge object (a crafted
  pickle's) costs little to describe and never floods the message.
  """
  text = _REPR.repr(value)
  return text if len(text) <= limit else text[: limit - 3] + '...'
