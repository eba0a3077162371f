"""The memory one load may use: a budget charged before each allocation.

A load may materialise at most `4 x file size + 64 MiB`
(`BUDGET_FILE_MULTIPLE`, `BUDGET_CONSTANT`): a running
`Budget`, charged before each allocation with the zip directory (16
bytes per byte of the central directory, what `zipfile` builds from it), the
pickle (128 bytes per opcode, 5 per byte of string or long int, 4 KiB per
TorchScript class and 16 per memo index: a bound on what the unpickler makes),
each storage record read and each tensor built (three times over for bfloat16
and bool tensors, which are converted).  A valid checkpoint needs about twice
its size: its storages, then the tensors copied out of them.
"""

from __future__ import annotations

from typing import Callable

from cips_jax import errors

#: A load may materialise this many times the file's size ...
BUDGET_FILE_MULTIPLE = 4
#: ... plus this many bytes.
BUDGET_CONSTANT = 64 << 20

# What the scan charges the budget for one opcode and one byte of string.
OPCODE_BYTES = 128
STRING_BYTE = 5
# ... one TorchScript class (a new type object each), and one byte of the
# zip's central directory.
SCRIPT_CLASS_BYTES = 4096
DIRECTORY_BYTE = 16
# ... and per memo index (the C unpickler's array of 8-byte pointers grows to
# twice the largest index).
MEMO_INDEX_BYTES = 16


class Budget:
  """The bytes one load may still materialise; see the module docstring."""

  def __init__(self, file_size: int) -> None:
    self.limit = BUDGET_FILE_MULTIPLE * file_size + BUDGET_CONSTANT
    self.used = 0
    self.file_size = file_size

  def charge(self, nbytes: int, what: str | Callable[[], str]) -> None:
    """Counts `nbytes` more; refuses the file once past the bound.

    `what` names what needs them (a function is called only for the message).
    """
    self.used += nbytes
    if self.used > self.limit:
      what = what if isinstance(what, str) else what()
      raise errors.UnsafeCheckpointError(
        f'{what} would bring the memory this load needs to {self.used} bytes, '
        f'over its bound of {self.limit} ({BUDGET_FILE_MULTIPLE} x the '
        f"file's {self.file_size} bytes + {BUDGET_CONSTANT >> 20} MiB)"
      )
