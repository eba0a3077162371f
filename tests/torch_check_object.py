"""The object checked against real torch, and the checks torch runs on it.

Shared by tests/make_torch_load_check.py (run under a Python with torch, it
records the outcome in tests/data/torch_load_check.json) and
tests/test_torch_pickle.py (which rebuilds the object and checks the bytes
``torch_pickle.save`` writes for it are the ones recorded).  Imports only numpy
and the standard library: torch is passed in by the caller, and never imported
here.
"""

from __future__ import annotations

import collections
import pathlib
import struct
from typing import Any

import numpy as np

DATA = pathlib.Path(__file__).resolve().parent / 'data'
RECORD = DATA / 'torch_load_check.json'
# The archive's top folder is named after the file, so the name is part of the
# bytes.
FILE_NAME = 'torch_load_check.pt'
# A torch-written checkpoint, to show the layout check accepts torch's own
# files.
TORCH_WRITTEN = DATA / 'cips_skip_s4_checkpoint.pt'
ALIGNMENT = 64
ZIP32_LIMIT = 0xFFFFFFFF


def _bits(n: int, salt: int) -> np.ndarray:
  """``n`` pseudo-random uint32 values (as uint64), by integer arithmetic only.

  Stable across numpy versions and machines, unlike a random generator.
  """
  i = np.arange(n, dtype=np.uint64)
  mixed = i * np.uint64(2654435761) + np.uint64(salt * 40503 + 12345)
  return (mixed ^ (mixed >> np.uint64(13))) % np.uint64(2**32)


def _floats(shape: tuple[int, ...], salt: int) -> np.ndarray:
  """float32 values k / 1024 in [-2, 2): exact, no rounding anywhere."""
  n = int(np.prod(shape, dtype=np.int64))
  k = (_bits(n, salt) >> np.uint64(8)) % np.uint64(4096)
  return (k.astype(np.float32) / np.float32(1024) - np.float32(2)).reshape(
    shape
  )


def _from_bits(values: list[int], dtype: str) -> np.ndarray:
  """An array of ``dtype`` holding exactly the given bit patterns."""
  width = np.dtype(dtype).itemsize
  return np.array(values, dtype=f'<u{width}').view(f'<{dtype}')


def build() -> dict[str, Any]:
  """The canonical object: a small training checkpoint and every dtype.

  Deterministic: the same arrays and values on every machine.
  """
  shapes = collections.OrderedDict(
    [
      ('mapping.1.weight', (8, 4)),
      ('mapping.1.bias', (8,)),
      ('conv1.conv.weight', (1, 4, 8, 1, 1)),
      ('to_rgb.bias', (1, 3, 1, 1)),
    ]
  )
  state_dict = collections.OrderedDict(
    (key, _floats(shape, salt))
    for salt, (key, shape) in enumerate(shapes.items())
  )
  state_dict['noise.strength'] = np.array(0.25, np.float32)  # 0-d

  # torch.optim.Adam(...).state_dict() for two parameters, as torch 2.x keeps
  # it: int keys, a 0-d float32 step per parameter.
  optimizer = {
    'state': {
      index: {
        'step': np.array(16.0, np.float32),
        'exp_avg': _floats(shapes[key], 10 + index),
        'exp_avg_sq': np.abs(_floats(shapes[key], 20 + index)),
      }
      for index, key in enumerate(['mapping.1.weight', 'mapping.1.bias'])
    },
    'param_groups': [
      {
        'lr': 0.002,
        'betas': (0.0, 0.99),
        'eps': 1e-08,
        'weight_decay': 0,
        'amsgrad': False,
        'maximize': False,
        'foreach': None,
        'capturable': False,
        'differentiable': False,
        'fused': None,
        'decoupled_weight_decay': False,
        'params': [0, 1],
      }
    ],
  }

  # One array of every dtype, with the values that catch a lossy copy: NaNs
  # with payloads (quiet and signalling, both signs), -0.0, infinities,
  # subnormals, and the integer extremes.
  dtypes = {
    'float32': _from_bits(
      [0x7FC00001, 0xFFA00002, 0x80000000, 0x00000001, 0x7F800000, 0x3FC00000]
      + [0xFF800000, 0x7F7FFFFF],
      'f4',
    ).reshape(2, 4),
    'float64': _from_bits(
      [0x7FF8000000000001, 0xFFF0000000000001, 0x8000000000000000, 1]
      + [0x7FF0000000000000, 0x3FF8000000000000],
      'f8',
    ),
    'float16': _from_bits(
      [0x7E01, 0xFC01, 0x8000, 0x0001, 0x7C00, 0x3E00], 'f2'
    ).reshape(3, 2),
    'int64': np.array([-(2**63), -1, 0, 1, 2**63 - 1], np.int64),
    'int32': np.array([-(2**31), -1, 0, 1, 2**31 - 1], np.int32),
    'int16': np.array([[-(2**15), -1], [0, 2**15 - 1]], np.int16),
    'int8': np.array([-128, -1, 0, 1, 127], np.int8),
    'uint8': np.arange(256, dtype=np.uint8).reshape(16, 16),
    'bool': np.array([[True, False, True]]),
  }

  # Arrays the writer must copy: non-contiguous, big-endian; and the edge
  # shapes.
  grid = _floats((4, 6), 30)
  layouts = {
    'transposed': grid.T,
    'fortran': np.asfortranarray(_floats((3, 5), 31)),
    'strided': np.arange(20, dtype=np.float64)[::3],
    'reversed': np.arange(-3, 4, dtype=np.int32)[::-1],
    'big_endian_float32': _floats((2, 3), 32).astype('>f4'),
    'big_endian_int64': np.array([-(2**40), 7, 2**50], '>i8'),
    'big_endian_float16': _from_bits([0x7E01, 0x8000, 0x3C00], 'f2').astype(
      '>f2'
    ),
    'empty': np.zeros((0,), np.float32),
    'empty_3d': np.zeros((2, 0, 3), np.int64),
    'scalar_int': np.array(7, np.int64),
    'scalar_bool': np.array(True),
    'larger': _floats((64, 64, 3), 33),  # 48 KiB
  }

  scalars = {
    'int': 1234,
    'negative_int': -7,
    'int32_min': -(2**31),
    'big_int': 2**40,
    'big_negative_int': -(2**35),
    'huge_int': 3**100,
    'float': 0.1,
    'negative_zero': -0.0,
    'infinity': float('inf'),
    'nan_with_payload': struct.unpack('>d', bytes.fromhex('7ff8000000000123'))[
      0
    ],
    'none': None,
    'true': True,
    'false': False,
    'text': 'CIPS \u2713 \xfcn\xefc\xf8d\xe9',
    'empty_text': '',
  }
  containers = {
    'empty_list': [],
    'empty_tuple': (),
    'empty_dict': {},
    'empty_ordered_dict': collections.OrderedDict(),
    'long_tuple': (1, 2, 3, 4, 5),
    'nested': [
      (1, 'a', None),
      (2.5, [True, {'k': (np.array([1, 2], np.int8),)}]),
      {3: {-4: 'negative key'}, 'mixed': collections.OrderedDict([(5, 6)])},
    ],
  }
  return {
    'g_ema': state_dict,
    'g_optim': optimizer,
    'step': 1234,
    'dtypes': dtypes,
    'layouts': layouts,
    'scalars': scalars,
    'containers': containers,
  }


def compare_with_torch(
  expected: Any, got: Any, torch: Any, path: str = 'obj', aligned: bool = False
) -> int:
  """Assert ``got`` (from torch.load) is ``expected``; returns tensors seen.

  Exactly: container types (dict vs OrderedDict, list vs tuple), key order and
  key types, scalar types and float bits, and each tensor's dtype, shape and
  bytes.  ``aligned``: also require each non-empty tensor's data to start on a
  64-byte boundary (a memory-mapped load maps the payloads where they lie).
  """
  if isinstance(expected, np.ndarray):
    assert type(got) is torch.Tensor, f'{path}: got a {type(got)}'
    assert got.dtype == getattr(torch, expected.dtype.name), (
      f'{path}: {got.dtype} for {expected.dtype}'
    )
    assert tuple(got.shape) == expected.shape, f'{path}: shape {got.shape}'
    assert not got.requires_grad and got.device.type == 'cpu', path
    want = np.ascontiguousarray(expected, expected.dtype.newbyteorder('='))
    assert got.contiguous().numpy().tobytes() == want.tobytes(), (
      f'{path}: bytes differ'
    )
    if aligned and got.numel():
      assert got.data_ptr() % ALIGNMENT == 0, f'{path}: data not aligned'
    return 1
  assert type(got) is type(expected), (
    f'{path}: {type(got)}, not {type(expected)}'
  )
  if isinstance(expected, dict):
    keys = [(type(k), k) for k in expected]
    assert [(type(k), k) for k in got] == keys, f'{path}: keys {list(got)}'
    return sum(
      compare_with_torch(value, got[key], torch, f'{path}[{key!r}]', aligned)
      for key, value in expected.items()
    )
  if isinstance(expected, (list, tuple)):
    assert len(got) == len(expected), f'{path}: length {len(got)}'
    return sum(
      compare_with_torch(value, item, torch, f'{path}[{i}]', aligned)
      for i, (value, item) in enumerate(zip(expected, got))
    )
  if isinstance(expected, float):
    assert struct.pack('>d', got) == struct.pack('>d', expected), (
      f'{path}: {got!r} is not {expected!r}'
    )
  else:
    assert got == expected, f'{path}: {got!r} is not {expected!r}'
  return 0


def check_layout_with_torch(torch: Any, path: Any) -> int:
  """Assert every record lies where torch's reader predicts; returns records.

  Walks the records in order with torch's own reader: each local header must
  start where the previous record ends (payload plus data descriptor, as
  miniz writes them), and ``get_record_offset_no_read`` (what
  ``torch.load`` uses under ``calculate_storage_offsets``) must predict the
  payload offset that the header says, a multiple of 64.
  """
  reader = torch._C.PyTorchFileReader(str(path))
  cursor = 0
  records = reader.get_all_records()
  for name in records:
    header = reader.get_record_header_offset(name)
    assert header == cursor, f'{name}: header at {header}, expected {cursor}'
    size = reader.get_record_size(name)
    offset = reader.get_record_offset(name)
    predicted = reader.get_record_offset_no_read(cursor, name, size, ALIGNMENT)
    assert predicted == offset, f'{name}: at {offset}, predicted {predicted}'
    assert offset % ALIGNMENT == 0, f'{name}: payload at {offset}'
    cursor = offset + size
    if size:  # a data descriptor follows
      cursor += 24 if max(header, size) >= ZIP32_LIMIT else 16
  return len(records)
