"""The layout of torch's zip checkpoints: what the reader and writer share.

`torch.save` (torch >= 1.6) writes a zip archive with one top folder
`NAME/` holding

* `data.pkl`      -- a pickle of the saved object; tensors appear as calls to
                       `torch._utils._rebuild_tensor_v2` on *persistent*
                       storage references,
* `data/<key>`    -- the raw bytes of each storage,
* `byteorder`     -- `little` or `big`, the order of those bytes,
* `.format_version`, maybe `version` and other bookkeeping records.

A persistent storage reference names the storage's class (`torch.<name>`,
one of `STORAGE_FORMATS`), which fixes how `data/<key>` holds its
elements.
"""

from __future__ import annotations

from typing import NamedTuple


class _StorageFormat(NamedTuple):
  """One torch storage class and how `data/<key>` holds its elements.

  `name` is the class name in `torch` (`"FloatStorage"`); `stored` is
  the little-endian numpy dtype of one element as written; `kind` says
  whether elements need more than a byte-order fix after reading
  (`"bfloat16"`, `"bool"`) or not (`"plain"`).
  """

  name: str
  stored: str
  kind: str = 'plain'


#: The typed storage classes torch pickles tensors with.
STORAGE_FORMATS = (
  _StorageFormat('FloatStorage', '<f4'),
  _StorageFormat('DoubleStorage', '<f8'),
  _StorageFormat('HalfStorage', '<f2'),
  _StorageFormat('BFloat16Storage', '<u2', 'bfloat16'),
  _StorageFormat('LongStorage', '<i8'),
  _StorageFormat('IntStorage', '<i4'),
  _StorageFormat('ShortStorage', '<i2'),
  _StorageFormat('CharStorage', 'i1'),
  _StorageFormat('ByteStorage', 'u1'),
  _StorageFormat('BoolStorage', 'u1', 'bool'),
)
