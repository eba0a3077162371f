"""Tests for cips_jax.torch_pickle: a torch-free, code-execution-free checkpoint
reader.
"""

from __future__ import annotations

import collections
import hashlib
import io
import json
import os
from pathlib import Path
import pickle
import pickletools
import re
import struct
import zipfile

import numpy as np
import pytest

from cips_jax import convert
from cips_jax import errors
from cips_jax import torch_pickle
from cips_jax.torch_pickle import UnsafeCheckpointError
from cips_jax.torch_pickle import writer
import torch_check_object
import torch_hostile

DATA = Path(__file__).parent / 'data'


# ----------------------------------------------------------------------------
# Writing torch-style checkpoints by hand (torch is not installed).
# ------------------------------------------------------------------------------


def _torch_global(module: str, name: str) -> type:
  """A class that our pickler writes as ``GLOBAL module name``."""
  cls = type(name, (), {})
  cls.__module__, cls.__qualname__ = module, name
  return cls


REBUILD_V2 = _torch_global('torch._utils', '_rebuild_tensor_v2')
REBUILD_V1 = _torch_global('torch._utils', '_rebuild_tensor')
REBUILD_PARAM = _torch_global('torch._utils', '_rebuild_parameter')
SIZE = _torch_global('torch', 'Size')
FLOAT32 = _torch_global('torch', 'float32')
STORAGE_CLASSES = {
  name: _torch_global('torch', name)
  for name in [
    'FloatStorage',
    'DoubleStorage',
    'HalfStorage',
    'BFloat16Storage',
    'LongStorage',
    'IntStorage',
    'ShortStorage',
    'CharStorage',
    'ByteStorage',
    'BoolStorage',
  ]
}
UNTYPED = _torch_global('torch.storage', 'UntypedStorage')


class FakeStorage:
  """A storage reference; pickled as torch's persistent id tuple."""

  def __init__(self, key: str, storage_class: type, numel: int) -> None:
    self.key, self.storage_class, self.numel = key, storage_class, numel


class FakeTensor:
  """Pickles the way torch pickles a tensor view of a storage."""

  def __init__(self, storage, offset, size, stride, rebuild=REBUILD_V2) -> None:
    self.storage, self.offset, self.size, self.stride = (
      storage,
      offset,
      size,
      stride,
    )
    self.rebuild = rebuild

  def __reduce__(self):
    if self.rebuild is REBUILD_V1:
      return (REBUILD_V1, (self.storage, self.offset, self.size, self.stride))
    return (
      REBUILD_V2,
      (
        self.storage,
        self.offset,
        self.size,
        self.stride,
        False,
        collections.OrderedDict(),
      ),
    )


class FakeParameter:
  def __init__(self, tensor: FakeTensor) -> None:
    self.tensor = tensor

  def __reduce__(self):
    return (REBUILD_PARAM, (self.tensor, True, collections.OrderedDict()))


class FakeSize(tuple):
  def __reduce__(self):
    return (SIZE, (tuple(self),))


# The pure-Python pickler lets us override save_global.
class TorchLikePickler(pickle._Pickler):
  def persistent_id(self, obj):
    if isinstance(obj, FakeStorage):
      return ('storage', obj.storage_class, obj.key, 'cpu', obj.numel)
    return None

  def save_global(self, obj, name=None):
    # The real pickler would import the module to check the name; torch is
    # absent.
    self.write(
      pickle.GLOBAL + f'{obj.__module__}\n{obj.__qualname__}\n'.encode()
    )
    self.memoize(obj)


def torch_like_dumps(obj) -> bytes:
  buf = io.BytesIO()
  TorchLikePickler(buf, protocol=2).dump(obj)
  return buf.getvalue()


def write_checkpoint(
  path: Path,
  data_pkl: bytes,
  storages: dict[str, bytes] | None = None,
  byteorder: str = 'little',
  top: str = 'archive',
) -> Path:
  with zipfile.ZipFile(path, 'w') as zf:
    zf.writestr(f'{top}/data.pkl', data_pkl)
    zf.writestr(f'{top}/byteorder', byteorder)
    zf.writestr(f'{top}/.format_version', '1')
    zf.writestr(f'{top}/version', '3\n')
    for key, raw in (storages or {}).items():
      zf.writestr(f'{top}/data/{key}', raw)
  return path


def strided_reference(
  flat: np.ndarray, offset: int, shape, stride
) -> np.ndarray:
  """Gather a strided view element by element, independent of as_strided."""
  out = np.empty(shape, dtype=flat.dtype)
  for index in np.ndindex(*shape):
    out[index] = flat[offset + sum(i * s for i, s in zip(index, stride))]
  return out


# ----------------------------------------------------------------------------
# The real torch.save fixture.
# ------------------------------------------------------------------------------


def test_real_checkpoint_matches_independent_reconstruction():
  state = torch_pickle.load(DATA / 'cips_skip_s4_checkpoint.pt')
  assert type(state) is dict and list(state) == ['g_ema']
  g_ema = state['g_ema']
  assert isinstance(g_ema, collections.OrderedDict)

  weight = g_ema['lff.ffm.conv.weight']
  assert isinstance(weight, np.ndarray)
  assert weight.shape == (16, 2, 1, 1) and weight.dtype == np.float32

  spec = json.loads((DATA / 'cips_skip_s4.json').read_text())
  rng = np.random.default_rng(spec['seed'])
  expected = collections.OrderedDict()
  for entry in spec['keys']:
    if entry.get('buffer'):
      continue
    shape = tuple(entry['shape'])
    expected[entry['key']] = (
      entry['base'] + entry['std'] * rng.standard_normal(shape)
    ).astype(np.float32)

  assert list(expected) == [k for k in g_ema if k in expected]
  buffers = {e['key'] for e in spec['keys'] if e.get('buffer')}
  assert set(g_ema) == set(expected) | (buffers & set(g_ema))
  for key, value in expected.items():
    got = g_ema[key]
    assert got.dtype == np.float32 and got.shape == value.shape, key
    assert got.flags.c_contiguous and got.flags.writeable, key
    np.testing.assert_array_equal(got, value, err_msg=key)


# ----------------------------------------------------------------------------
# Hostile checkpoints.
# ------------------------------------------------------------------------------


class RunsShell:
  def __init__(self, command: str) -> None:
    self.command = command

  def __reduce__(self):
    return (os.system, (self.command,))


class RunsEval:
  def __init__(self, source: str) -> None:
    self.source = source

  def __reduce__(self):
    return (eval, (self.source,))


def test_refuses_os_system_and_does_not_run_it(tmp_path):
  marker = tmp_path / 'SOMEFILE'
  payload = {'g_ema': collections.OrderedDict(w=RunsShell(f'touch {marker}'))}
  path = write_checkpoint(
    tmp_path / 'evil.pt', pickle.dumps(payload, protocol=2)
  )

  with pytest.raises(UnsafeCheckpointError) as info:
    torch_pickle.load(path)
  message = str(info.value)
  assert "'os.system'" in message or "'posix.system'" in message
  assert str(path) in message
  assert 'only tensors and plain containers are allowed' in message
  assert not marker.exists()
  assert isinstance(info.value, pickle.UnpicklingError)


@pytest.mark.parametrize(
  'protocol, error',
  [
    # Protocol 2 spells the module the Python 2 way, '__builtin__'.
    (2, r"'__builtin__\.eval'"),
    # Protocol 4 (STACK_GLOBAL) is refused before any name is read: torch
    # writes protocol 2.
    (4, 'protocol 4'),
  ],
)
def test_refuses_builtins_eval(tmp_path, protocol, error):
  marker = tmp_path / 'EVALFILE'
  source = f"open({str(marker)!r}, 'w').close()"
  data_pkl = pickle.dumps([1, RunsEval(source)], protocol=protocol)
  path = write_checkpoint(tmp_path / 'evil.pt', data_pkl)

  with pytest.raises(UnsafeCheckpointError, match=error):
    torch_pickle.load(path)
  assert not marker.exists()


def test_refuses_unlisted_global_after_legal_tensors(tmp_path):
  storage = FakeStorage('0', STORAGE_CLASSES['FloatStorage'], 2)
  payload = {'ok': FakeTensor(storage, 0, (2,), (1,)), 'bad': RunsShell('true')}
  path = write_checkpoint(
    tmp_path / 'mixed.pt',
    torch_like_dumps(payload),
    {'0': np.zeros(2, '<f4').tobytes()},
  )
  with pytest.raises(UnsafeCheckpointError, match='system'):
    torch_pickle.load(path)


def test_stand_ins_cannot_be_mutated_by_build(tmp_path):
  # GLOBAL torch._utils._rebuild_tensor_v2, then BUILD with a dict / slot state.
  head = b'\x80\x02ctorch._utils\n_rebuild_tensor_v2\n'
  dict_state = b'}X\x04\x00\x00\x00funcK\x01sb.'
  slot_state = b'N}X\x04\x00\x00\x00funcK\x01s\x86b.'
  for i, body in enumerate([dict_state, slot_state]):
    path = write_checkpoint(tmp_path / f'build{i}.pt', head + body)
    with pytest.raises(UnsafeCheckpointError, match='changes a global'):
      torch_pickle.load(path)
  # The shared stand-in still works afterwards.
  test_hand_built_tensors_have_the_right_values(tmp_path)


def test_rejects_tensor_reaching_past_its_storage(tmp_path):
  storage = FakeStorage('0', STORAGE_CLASSES['FloatStorage'], 4)
  # Last element index 1 + 2 + 1 = 4.
  payload = FakeTensor(storage, 1, (2, 2), (2, 1))
  path = write_checkpoint(
    tmp_path / 'oob.pt',
    torch_like_dumps(payload),
    {'0': np.zeros(4, '<f4').tobytes()},
  )
  with pytest.raises(UnsafeCheckpointError, match='past'):
    torch_pickle.load(path)


def test_rejects_storage_record_shorter_than_numel(tmp_path):
  storage = FakeStorage('0', STORAGE_CLASSES['DoubleStorage'], 4)
  path = write_checkpoint(
    tmp_path / 'short.pt',
    torch_like_dumps(FakeTensor(storage, 0, (4,), (1,))),
    {'0': np.zeros(3, '<f8').tobytes()},
  )
  with pytest.raises(ValueError, match='fewer than 4'):
    torch_pickle.load(path)


# ----------------------------------------------------------------------------
# Legal checkpoints built by hand.
# ------------------------------------------------------------------------------


def test_hand_built_tensors_have_the_right_values(tmp_path):
  flat32 = np.arange(12, dtype=np.float32) * 1.5 - 4.0
  flat64 = np.array(
    [np.pi, -1e-300, 2.0**70, -0.0, 7.25, 1 / 3], dtype=np.float64
  )
  flat_i64 = np.array([-(2**62) - 3, 2**53 + 1, -1, 0, 42, 9], dtype=np.int64)
  # bfloat16 bit patterns of 1.0, -2.5, 0.15625, 3.0e38-ish
  bf16_bits = np.array([0x3F80, 0xC020, 0x3E20, 0x7F61], dtype=np.uint16)

  s32 = FakeStorage('0', STORAGE_CLASSES['FloatStorage'], 12)
  s64 = FakeStorage('1', STORAGE_CLASSES['DoubleStorage'], 6)
  si64 = FakeStorage('2', STORAGE_CLASSES['LongStorage'], 6)
  sbf = FakeStorage('3', STORAGE_CLASSES['BFloat16Storage'], 4)
  sbool = FakeStorage('4', STORAGE_CLASSES['BoolStorage'], 3)
  sraw = FakeStorage('5', UNTYPED, 5)

  payload = {
    'matrix': FakeTensor(s32, 0, FakeSize((3, 4)), (4, 1)),
    'transposed': FakeTensor(s32, 0, (4, 3), (1, 4)),
    'offset_view': FakeTensor(s32, 2, (2, 3), (1, 4)),
    'v1_scalar': FakeTensor(s32, 5, (), (), rebuild=REBUILD_V1),
    'empty': FakeTensor(s32, 12, (0, 3), (3, 1)),
    'f64': FakeTensor(s64, 1, (5,), (1,)),
    'i64_cols': FakeTensor(si64, 0, (2, 3), (1, 2)),
    'param': FakeParameter(FakeTensor(s32, 4, (2, 2), (4, 1))),
    'bf16': FakeTensor(sbf, 0, (4,), (1,)),
    'mask': FakeTensor(sbool, 0, (3,), (1,)),
    'raw': FakeTensor(sraw, 0, (5,), (1,)),
    'meta': [
      1,
      2.5,
      'text',
      None,
      True,
      (3, 'x'),
      collections.OrderedDict(a=1),
    ],
    'dtype': FLOAT32,
  }
  storages = {
    '0': flat32.astype('<f4').tobytes(),
    '1': flat64.astype('<f8').tobytes(),
    '2': flat_i64.astype('<i8').tobytes(),
    '3': bf16_bits.astype('<u2').tobytes(),
    '4': bytes([1, 0, 7]),
    '5': bytes([0, 1, 2, 254, 255]),
  }
  path = write_checkpoint(
    tmp_path / 'legal.pt', torch_like_dumps(payload), storages
  )
  out = torch_pickle.load(path)

  assert set(out) == set(payload)
  np.testing.assert_array_equal(
    out['matrix'], strided_reference(flat32, 0, (3, 4), (4, 1))
  )
  assert out['matrix'][2, 3] == flat32[11]

  transposed = out['transposed']
  assert transposed.shape == (4, 3) and transposed.dtype == np.float32
  assert transposed.flags.c_contiguous and transposed.flags.owndata
  np.testing.assert_array_equal(transposed, flat32.reshape(3, 4).T)
  np.testing.assert_array_equal(
    out['offset_view'], strided_reference(flat32, 2, (2, 3), (1, 4))
  )
  np.testing.assert_array_equal(
    out['offset_view'], [[-1.0, 5.0, 11.0], [0.5, 6.5, 12.5]]
  )

  assert out['v1_scalar'].shape == () and out['v1_scalar'] == flat32[5]
  assert out['empty'].shape == (0, 3) and out['empty'].dtype == np.float32

  assert out['f64'].dtype == np.float64
  np.testing.assert_array_equal(out['f64'], flat64[1:])
  assert out['i64_cols'].dtype == np.int64
  np.testing.assert_array_equal(out['i64_cols'], flat_i64.reshape(3, 2).T)
  assert (
    out['i64_cols'][0, 0] == -(2**62) - 3 and out['i64_cols'][1, 0] == 2**53 + 1
  )

  np.testing.assert_array_equal(out['param'], [[2.0, 3.5], [8.0, 9.5]])
  assert out['bf16'].dtype == np.float32
  np.testing.assert_array_equal(out['bf16'][:3], [1.0, -2.5, 0.15625])
  assert out['bf16'][3] == np.uint32(0x7F610000).view(np.float32)
  assert out['mask'].dtype == np.bool_ and out['mask'].tolist() == [
    True,
    False,
    True,
  ]
  assert out['raw'].dtype == np.uint8 and out['raw'].tolist() == [
    0,
    1,
    2,
    254,
    255,
  ]

  assert out['meta'] == [
    1,
    2.5,
    'text',
    None,
    True,
    (3, 'x'),
    collections.OrderedDict(a=1),
  ]
  assert type(out['meta'][6]) is collections.OrderedDict
  assert out['dtype'] == torch_pickle.TorchDtype('float32', np.float32)
  assert out['dtype'].numpy == np.float32

  # Results are independent copies, not views of one shared storage buffer.
  assert not np.shares_memory(out['matrix'], out['transposed'])
  out['matrix'][0, 0] = 100.0
  assert out['transposed'][0, 0] == flat32[0]


def test_zero_dim_widened_tensors_stay_arrays(tmp_path):
  # bfloat16 and bool tensors go through a ufunc after reading, which turns a
  # 0-d array into a numpy scalar unless the reader keeps it an array.
  sbf = FakeStorage('0', STORAGE_CLASSES['BFloat16Storage'], 1)
  sbool = FakeStorage('1', STORAGE_CLASSES['BoolStorage'], 1)
  payload = {
    'bf16': FakeTensor(sbf, 0, (), ()),
    'flag': FakeTensor(sbool, 0, (), ()),
  }
  storages = {'0': np.array([0xC020], '<u2').tobytes(), '1': b'\x02'}
  path = write_checkpoint(
    tmp_path / 'c.pt', torch_like_dumps(payload), storages
  )
  out = torch_pickle.load(path)
  for name, dtype, value in [('bf16', np.float32, -2.5), ('flag', bool, True)]:
    assert type(out[name]) is np.ndarray and out[name].shape == (), name
    assert out[name].dtype == dtype and out[name] == value, name
    assert out[name].flags.writeable, name


def test_big_endian_archive(tmp_path):
  values = np.array([[1.25, -3.0], [1e10, 0.5]], dtype=np.float64)
  storage = FakeStorage('7', STORAGE_CLASSES['DoubleStorage'], 4)
  ints = FakeStorage('8', STORAGE_CLASSES['IntStorage'], 3)
  payload = {
    'd': FakeTensor(storage, 0, (2, 2), (1, 2)),
    'i': FakeTensor(ints, 0, (3,), (1,)),
  }
  path = write_checkpoint(
    tmp_path / 'big.pt',
    torch_like_dumps(payload),
    {
      '7': values.T.astype('>f8').tobytes(),
      '8': np.array([1, -2, 65536], '>i4').tobytes(),
    },
    byteorder='big',
  )
  out = torch_pickle.load(path)
  np.testing.assert_array_equal(out['d'], values)
  assert out['d'].dtype.isnative and out['i'].dtype.isnative
  assert out['i'].tolist() == [1, -2, 65536]


# ----------------------------------------------------------------------------
# Files that are not checkpoints.
# ------------------------------------------------------------------------------


def test_missing_file(tmp_path):
  path = tmp_path / 'nope.pt'
  with pytest.raises(FileNotFoundError, match='nope.pt'):
    torch_pickle.load(path)


def test_legacy_non_zip_file(tmp_path):
  # Pre-1.6 torch files are bare pickles starting with a magic number.
  path = tmp_path / 'legacy.pt'
  path.write_bytes(pickle.dumps(0x1950A86A20F9469CFC6C, protocol=2) + b'more')
  with pytest.raises(
    ValueError, match=r'legacy\.pt.*not a torch zip checkpoint'
  ):
    torch_pickle.load(path)


def test_zip_without_data_pkl(tmp_path):
  path = tmp_path / 'plain.zip'
  with zipfile.ZipFile(path, 'w') as zf:
    zf.writestr('readme.txt', 'hello')
  with pytest.raises(ValueError, match='no data.pkl'):
    torch_pickle.load(path)


# ----------------------------------------------------------------------------
# TorchScript archives: __torch__.* objects load as inert records.
# ------------------------------------------------------------------------------

BUILD_INTLIST = _torch_global('torch.jit._pickle', 'build_intlist')


class IntList(list):
  def __reduce__(self):
    return (BUILD_INTLIST, (list(self),))


def _script_class(module: str, name: str) -> type:
  """A class pickled (protocol 2) as GLOBAL module name, NEWOBJ, then BUILD of
  __dict__.
  """
  cls = type(name, (), {})
  cls.__module__, cls.__qualname__ = module, name
  return cls


def test_torchscript_objects_load_as_records(tmp_path):
  Net = _script_class('__torch__.net', 'Net')
  Conv = _script_class('__torch__.net.___torch_mangle_2', 'Conv2dLayer')
  conv = Conv()
  conv.__dict__.update(
    weight=FakeTensor(
      FakeStorage('0', STORAGE_CLASSES['FloatStorage'], 4), 0, (2, 2), (1, 2)
    ),
    padding=IntList([0, 3]),
    stride=1,
    training=False,
  )
  net = Net()
  net.__dict__.update(conv=conv, training=False)
  path = write_checkpoint(
    tmp_path / 'script.pt',
    torch_like_dumps(net),
    {'0': np.arange(4, dtype='<f4').tobytes()},
    top='out_jit_module',
  )

  out = torch_pickle.load(path)
  assert isinstance(out, torch_pickle.ScriptObject)
  assert out.type_name == '__torch__.net.Net' and list(out.state) == [
    'conv',
    'training',
  ]
  layer = out.state['conv']
  assert layer.type_name == '__torch__.net.___torch_mangle_2.Conv2dLayer'
  np.testing.assert_array_equal(layer.state['weight'], [[0.0, 2.0], [1.0, 3.0]])
  assert type(layer.state['padding']) is list and layer.state['padding'] == [
    0,
    3,
  ]
  with pytest.raises(AttributeError):
    out.state = {}
  # Stand-in classes are made per load, never shared between archives.
  assert type(torch_pickle.load(path)) is not type(out)


@pytest.mark.parametrize(
  'body, error',
  [
    (b'c__torch__.m\nC\n)\x81]b.', 'state must be a dict'),  # BUILD with a list
    (b'c__torch__.m\nC\n)\x81}b}b.', 'built twice'),  # two BUILDs
    (b'c__torch__os\nsystem\n.', '__torch__os.system'),  # look-alike module
    (b'c__torch__.m\nC()\n.', 'malformed'),  # not an identifier
    (
      b'ctorch.jit._pickle\nbuild_intlist\n]X\x01\x00\x00\x00xa\x85R.',
      'list of ints',
    ),
  ],
)
def test_torchscript_malformed_records_are_refused(tmp_path, body, error):
  path = write_checkpoint(tmp_path / 'bad.pt', b'\x80\x02' + body)
  with pytest.raises(UnsafeCheckpointError, match=error):
    torch_pickle.load(path)


# ----------------------------------------------------------------------------
# Writing checkpoints: save.
# ------------------------------------------------------------------------------

SAVE_DTYPES = [
  'float32',
  'float64',
  'float16',
  'int64',
  'int32',
  'int16',
  'int8',
  'uint8',
  'bool',
]


def native_bytes(array: np.ndarray) -> bytes:
  """The C-order bytes of ``array`` in native (little-endian) order.

  Swapped through unsigned integers, so no float conversion can touch a NaN.
  """
  array = np.ascontiguousarray(array)
  if array.dtype.byteorder == '>':
    width = array.dtype.itemsize
    return array.view(f'>u{width}').astype(f'<u{width}').tobytes()
  return array.tobytes()


def big_endian(array: np.ndarray) -> np.ndarray:
  """The same values stored big-endian (bytes swapped, not converted)."""
  return array.byteswap().view(array.dtype.newbyteorder('>'))


def assert_identical(expected, got, path='obj') -> int:
  """What torch_pickle.load returned is exactly what was saved.

  Containers of the same types with the same keys (and key types); scalars of
  the same type and bits; arrays C-contiguous, native-order, same bytes.
  Returns the number of arrays.
  """
  if isinstance(expected, np.ndarray):
    assert type(got) is np.ndarray, f'{path}: {type(got)}'
    assert got.dtype == expected.dtype.newbyteorder('='), path
    assert got.dtype.isnative, path
    assert got.shape == expected.shape and got.flags.c_contiguous, path
    assert got.tobytes() == native_bytes(expected), f'{path}: bytes differ'
    return 1
  assert type(got) is type(expected), f'{path}: {type(got)}'
  if isinstance(expected, dict):
    assert [(type(k), k) for k in got] == [(type(k), k) for k in expected], path
    return sum(
      assert_identical(value, got[key], f'{path}[{key!r}]')
      for key, value in expected.items()
    )
  if isinstance(expected, (list, tuple)):
    assert len(got) == len(expected), path
    return sum(
      assert_identical(value, item, f'{path}[{i}]')
      for i, (value, item) in enumerate(zip(expected, got))
    )
  if isinstance(expected, float):
    assert struct.pack('>d', got) == struct.pack('>d', expected), path
  else:
    assert got == expected, path
  return 0


def arbitrary_array(dtype: str, shape, seed: int) -> np.ndarray:
  """Random bit patterns: for floats, NaN payloads, -0.0 and subnormals."""
  rng = np.random.default_rng(seed)
  if dtype == 'bool':
    return rng.integers(0, 2, shape).astype(bool)
  width = np.dtype(dtype).itemsize
  n = int(np.prod(shape))
  return (
    rng.integers(0, 256, n * width, dtype=np.uint8).view(dtype).reshape(shape)
  )


@pytest.mark.parametrize('dtype', SAVE_DTYPES)
def test_save_round_trips_every_shape_and_layout(tmp_path, dtype):
  base = arbitrary_array(dtype, (6, 4), seed=SAVE_DTYPES.index(dtype))
  arrays = collections.OrderedDict(
    [
      ('0-d', arbitrary_array(dtype, (), seed=1)),
      ('empty', arbitrary_array(dtype, (0,), seed=2)),
      ('empty_3d', arbitrary_array(dtype, (2, 0, 3), seed=3)),
      ('vector', arbitrary_array(dtype, (7,), seed=4)),
      ('5-d', arbitrary_array(dtype, (1, 2, 3, 1, 2), seed=5)),
      ('contiguous', base),
      ('transposed', base.T),
      ('strided', base[::2, ::-1]),
      ('fortran', np.asfortranarray(base)),
      ('big_endian', big_endian(base)),
      ('big_endian_strided', big_endian(base)[1::3, ::2]),
      ('big_endian_0-d', big_endian(arbitrary_array(dtype, (), seed=6))),
    ]
  )
  assert not arrays['strided'].flags.c_contiguous
  path = tmp_path / 'arrays.pt'
  torch_pickle.save(arrays, path)
  assert assert_identical(arrays, torch_pickle.load(path)) == len(arrays)

  # An array on its own is a checkpoint too (torch.save(tensor)).
  torch_pickle.save(base.T, path)
  assert_identical(base.T, torch_pickle.load(path))


def test_save_round_trips_special_values_bit_for_bit(tmp_path):
  def from_bits(values, dtype):
    width = np.dtype(dtype).itemsize
    return np.array(values, f'<u{width}').view(dtype)

  arrays = {
    'f32': from_bits([0x7FC00001, 0xFFA00002, 0x80000000, 1, 0x7F800000], 'f4'),
    'f64': from_bits([0x7FF8000000000123, 0x8000000000000000, 1], 'f8'),
    'f16': from_bits([0x7E01, 0xFC01, 0x8000, 0x0001], 'f2'),
  }
  arrays['f32_big_endian'] = big_endian(arrays['f32'])
  path = tmp_path / 'special.pt'
  torch_pickle.save(arrays, path)
  back = torch_pickle.load(path)
  assert_identical(arrays, back)
  assert back['f32_big_endian'].view('<u4')[:2].tolist() == [
    0x7FC00001,
    0xFFA00002,
  ]


def test_save_round_trips_containers_and_scalars(tmp_path):
  nan = struct.unpack('>d', bytes.fromhex('7ff8000000000123'))[0]
  obj = collections.OrderedDict(
    [
      ('state', {0: {'step': np.array(3.0, np.float32)}, 7: {}}),
      (
        'param_groups',
        [{'betas': (0.0, 0.99), 'foreach': None, 'params': [0]}],
      ),
      ('scalars', [True, False, None, 0, 255, 256, 65536, -1, -(2**31)]),
      ('big_ints', [2**31, -(2**31) - 1, 2**64, -(2**100), 7**1000]),
      ('floats', (0.1, -0.0, float('inf'), float('-inf'), nan, 5e-324)),
      ('strings', ['', 'ascii', 'ünïcødé ✓', 'line\nbreak', '\ud800']),
      ('tuples', ((), (1,), (1, 2), (1, 2, 3), (1, 2, 3, 4), ((),))),
      ('empties', [[], {}, collections.OrderedDict(), ()]),
      ('int_keys', {-1: 'a', 0: 'b', 2**40: 'c', 'mixed': 'd'}),
    ]
  )
  path = tmp_path / 'containers.pt'
  torch_pickle.save(obj, path)
  back = torch_pickle.load(path)
  assert type(back) is collections.OrderedDict
  assert type(back['state']) is dict and list(back['state']) == [0, 7]
  assert_identical(obj, back)


def test_save_round_trips_the_canonical_and_a_real_checkpoint(tmp_path):
  canonical = torch_check_object.build()
  torch_pickle.save(canonical, tmp_path / 'canonical.pt')
  assert (
    assert_identical(canonical, torch_pickle.load(tmp_path / 'canonical.pt'))
    == json.loads(torch_check_object.RECORD.read_text())['tensors_compared']
  )

  real = torch_pickle.load(DATA / 'cips_skip_s4_checkpoint.pt')
  torch_pickle.save(real, tmp_path / 'again.pt')
  assert_identical(real, torch_pickle.load(tmp_path / 'again.pt'))


def test_save_accepts_a_memory_mapped_array(tmp_path):
  mapped = np.memmap(tmp_path / 'raw', np.float32, 'w+', shape=(3, 2))
  mapped[:] = np.arange(6).reshape(3, 2)
  torch_pickle.save({'w': mapped[:, ::-1]}, tmp_path / 'mapped.pt')
  assert_identical(
    {'w': np.array(mapped[:, ::-1])}, torch_pickle.load(tmp_path / 'mapped.pt')
  )


def test_save_writes_the_records_torch_writes(tmp_path):
  path = tmp_path / 'model.ckpt.pt'
  torch_pickle.save({'w': np.ones(3, np.float32), 'e': np.zeros(0)}, path)
  real_path = DATA / 'cips_skip_s4_checkpoint.pt'
  with zipfile.ZipFile(path) as ours, zipfile.ZipFile(real_path) as real:
    # The top folder is the file's name less its extension, as torch names it.
    assert ours.namelist() == [
      f'model.ckpt/{name}'
      for name in [
        'data.pkl',
        '.format_version',
        '.storage_alignment',
        'byteorder',
        'data/0',
        'data/1',
        'version',
      ]
    ]
    real_names = [name.split('/', 1)[1] for name in real.namelist()]
    # torch's random .data/serialization_id is left out, for reproducible bytes.
    assert [
      name
      for name in real_names
      if not name.startswith(('data/', '.data/serialization_id'))
    ] == [
      name.split('/', 1)[1] for name in ours.namelist() if '/data/' not in name
    ]
    for name in [
      '.format_version',
      '.storage_alignment',
      'byteorder',
      'version',
    ]:
      assert ours.read(f'model.ckpt/{name}') == real.read(
        f'cips_skip_s4_checkpoint/{name}'
      )
    for info in ours.infolist():
      assert info.compress_type == zipfile.ZIP_STORED
      assert info.date_time == real.infolist()[0].date_time  # no timestamp
    assert ours.testzip() is None  # every CRC matches
    assert ours.read('model.ckpt/data/0') == np.ones(3, '<f4').tobytes()


# The opcodes torch 2.13's weights_only unpickler accepts that the writer may
# use (it has no LONG4: an int of 2**2040 or more is written, but only the
# plain unpickler reads it).
WEIGHTS_ONLY_OPCODES = {
  'PROTO',
  'STOP',
  'MARK',
  'GLOBAL',
  'REDUCE',
  'BINPERSID',
  'EMPTY_DICT',
  'EMPTY_LIST',
  'EMPTY_TUPLE',
  'SETITEMS',
  'APPENDS',
  'TUPLE',
  'TUPLE1',
  'TUPLE2',
  'TUPLE3',
  'NONE',
  'NEWTRUE',
  'NEWFALSE',
  'BININT',
  'BININT1',
  'BININT2',
  'LONG1',
  'BINFLOAT',
  'BINUNICODE',
}


def test_data_pkl_uses_only_what_torchs_safe_loader_accepts(tmp_path):
  path = tmp_path / 'canonical.pt'
  torch_pickle.save(torch_check_object.build(), path)
  with zipfile.ZipFile(path) as archive:
    data_pkl = archive.read('canonical/data.pkl')
  ops = list(pickletools.genops(data_pkl))
  assert {op.name for op, _, _ in ops} <= WEIGHTS_ONLY_OPCODES
  assert ops[0][0].name == 'PROTO' and ops[0][1] == 2
  storages = {f'torch {t}Storage' for t in ['Float', 'Double', 'Half', 'Long']}
  storages |= {f'torch {t}Storage' for t in ['Int', 'Short', 'Char', 'Byte']}
  allowed = storages | {
    'torch BoolStorage',
    'torch._utils _rebuild_tensor_v2',
    'collections OrderedDict',
  }
  named = {arg for op, arg, _ in ops if op.name == 'GLOBAL'}
  assert named == allowed  # every storage class is used, nothing else


def walk_records(path: Path, zip32_limit: int = 0xFFFFFFFF) -> int:
  """Check each record lies where torch's reader predicts it; returns count.

  torch.load under ``calculate_storage_offsets`` does not read the headers: it
  assumes miniz's layout.  Each local header starts right after the previous
  record's payload and data descriptor (16 bytes, 24 with zip64; none after
  an empty payload), and its extra field ends in an ``FB`` field of ``Z``
  bytes just long enough to start the payload on a multiple of 64.
  """
  raw = path.read_bytes()
  with zipfile.ZipFile(path) as archive:
    infos = archive.infolist()
    directory = archive.start_dir
  cursor = 0
  for info in infos:
    assert info.header_offset == cursor, info.filename
    fields = struct.unpack('<IHHHHHIIIHH', raw[cursor : cursor + 30])
    assert fields[0] == 0x04034B50 and fields[6:9] == (0, 0, 0)
    name_length, extra_length = fields[9:]
    extra = raw[cursor + 30 + name_length :][:extra_length]
    zip64 = 0
    while extra[:2] != b'FB':
      assert extra[:2] == b'\x01\x00', info.filename  # only zip64 before FB
      zip64 = 4 + struct.unpack('<H', extra[2:4])[0]
      extra = extra[zip64:]
    padding = struct.unpack('<H', extra[2:4])[0]
    assert extra[4:] == b'Z' * padding, info.filename
    start = cursor + 30 + name_length + zip64 + 4
    assert padding == -start % 64, info.filename
    payload = start + padding
    size = info.file_size
    cursor = payload + size
    if size:
      big = max(info.header_offset, size) >= zip32_limit
      layout = '<IIQQ' if big else '<IIII'
      descriptor = struct.unpack_from(layout, raw, cursor)
      assert descriptor == (0x08074B50, info.CRC, size, size), info.filename
      cursor += struct.calcsize(layout)
  assert cursor == directory
  return len(infos)


def test_records_lie_where_torch_predicts_them(tmp_path):
  # The rule is torch's: its own file follows it.
  assert walk_records(DATA / 'cips_skip_s4_checkpoint.pt') == 32
  path = tmp_path / 'canonical.pt'
  torch_pickle.save(torch_check_object.build(), path)
  assert walk_records(path) > 30


def test_zip64_fields_where_sizes_or_offsets_need_them(tmp_path, monkeypatch):
  # Lowering the writer's threshold writes the zip64 fields a file over 4 GiB
  # needs, on a small file.
  monkeypatch.setattr(writer, '_ZIP32_LIMIT', 100)
  canonical = torch_check_object.build()
  path = tmp_path / 'zip64.pt'
  torch_pickle.save(canonical, path)
  assert_identical(canonical, torch_pickle.load(path))
  walk_records(path, zip32_limit=100)
  with zipfile.ZipFile(path) as archive:
    assert archive.testzip() is None
    infos = archive.infolist()
  assert any(i.file_size < 100 < i.header_offset for i in infos)
  assert any(i.file_size >= 100 for i in infos)
  for info in infos:
    needs_zip64 = max(info.file_size, info.header_offset) >= 100
    assert info.extra.startswith(b'\x01\x00') == needs_zip64, info.filename


def test_save_is_deterministic(tmp_path):
  (tmp_path / 'a').mkdir()
  (tmp_path / 'b').mkdir()
  for folder in ['a', 'b']:
    torch_pickle.save(torch_check_object.build(), tmp_path / folder / 'x.pt')
  first = (tmp_path / 'a' / 'x.pt').read_bytes()
  assert (tmp_path / 'b' / 'x.pt').read_bytes() == first


class Point(collections.namedtuple('Point', 'x y')):
  pass


@pytest.mark.parametrize(
  'obj, where, what',
  [
    ({'g': {'x': {1, 2}}}, "obj['g']['x']", "<class 'set'>"),
    ([1, b'raw'], 'obj[1]', "<class 'bytes'>"),
    ({'lr': np.float64(0.1)}, "obj['lr']", 'numpy.float64'),
    ({'n': (1, np.int64(3))}, "obj['n'][1]", 'numpy.int64'),
    (
      {'state': {0: {'step': np.zeros(2, np.uint16)}}},
      "obj['state'][0]['step']",
      'dtype uint16',
    ),
    ([np.zeros(2, np.complex64)], 'obj[0]', 'dtype complex64'),
    ([np.array([None])], 'obj[0]', 'dtype object'),
    ([np.ma.masked_array([1.0])], 'obj[0]', 'MaskedArray'),
    ({'p': Point(1, 2)}, "obj['p']", 'Point'),
    (collections.defaultdict(list), 'obj', 'defaultdict'),
    ({'k': {(1, 2): 3}}, "obj['k']", 'dict key'),
    ({True: 1}, 'obj', 'dict key'),
    (object(), 'obj', "<class 'object'>"),
  ],
)
def test_save_refuses_what_it_cannot_write(tmp_path, obj, where, what):
  with pytest.raises(TypeError) as info:
    torch_pickle.save(obj, tmp_path / 'bad.pt')
  assert str(info.value).startswith(f'{where}: cannot write'), info.value
  assert what in str(info.value)
  assert not list(tmp_path.iterdir())  # nothing written, not even a temporary


def test_save_refuses_cycles(tmp_path):
  loop = {'a': [1]}
  loop['a'].append(loop)
  with pytest.raises(ValueError, match=r"obj\['a'\]\[1\]: .* contains itself"):
    torch_pickle.save(loop, tmp_path / 'loop.pt')
  assert not list(tmp_path.iterdir())
  shared = [1, 2]
  torch_pickle.save({'a': shared, 'b': shared}, tmp_path / 'shared.pt')
  assert torch_pickle.load(tmp_path / 'shared.pt') == {'a': [1, 2], 'b': [1, 2]}


def test_failed_save_leaves_the_existing_file(tmp_path, monkeypatch):
  path = tmp_path / 'ckpt.pt'
  torch_pickle.save({'w': np.ones(3, np.float32)}, path)
  before = path.read_bytes()

  with pytest.raises(TypeError):
    torch_pickle.save({'w': np.ones(3, np.float32), 'x': {1}}, path)
  assert path.read_bytes() == before
  assert os.listdir(tmp_path) == ['ckpt.pt']

  # A failure half-way through writing (a full disk, an interrupt).
  real_add = writer._ZipWriter.add

  def fail_on_the_storage(self, name, payload):
    if name.startswith('data/'):
      raise OSError(28, 'No space left on device')
    real_add(self, name, payload)

  monkeypatch.setattr(writer._ZipWriter, 'add', fail_on_the_storage)
  with pytest.raises(OSError, match='No space'):
    torch_pickle.save({'w': np.zeros(5, np.float32)}, path)
  assert path.read_bytes() == before
  assert os.listdir(tmp_path) == ['ckpt.pt']
  monkeypatch.undo()

  # A directory where the file should go: the rename fails.
  (tmp_path / 'folder.pt').mkdir()
  with pytest.raises(OSError):
    torch_pickle.save({'w': np.ones(1)}, tmp_path / 'folder.pt')
  assert sorted(os.listdir(tmp_path)) == ['ckpt.pt', 'folder.pt']
  assert not list((tmp_path / 'folder.pt').iterdir())


# ----------------------------------------------------------------------------
# save against real torch (recorded by tests/make_torch_load_check.py).
# ------------------------------------------------------------------------------


def sha256(path: Path) -> str:
  return hashlib.sha256(path.read_bytes()).hexdigest()


def test_written_bytes_are_the_ones_checked_with_torch(tmp_path):
  record = json.loads(torch_check_object.RECORD.read_text())
  assert record['outcome'] == 'passed', record['outcome']
  path = tmp_path / torch_check_object.FILE_NAME
  torch_pickle.save(torch_check_object.build(), path)
  assert sha256(path) == record['file_sha256'], (
    'save writes different bytes from the ones torch '
    f'{record["torch_version"]} read on {record["date"]}: rerun '
    'tests/make_torch_load_check.py under torch (see its docstring)'
  )


def test_real_torch_load_reads_what_save_writes(tmp_path):
  record = json.loads(torch_check_object.RECORD.read_text())
  try:
    import torch  # optional: never a dependency of cips_jax
  except ImportError:
    pytest.skip(
      f'torch is not installed; torch {record["torch_version"]} read these '
      f'bytes on {record["date"]} ({record["outcome"]}, '
      f'{record["tensors_compared"]} tensors; tests/data/torch_load_check.json)'
    )
  expected = torch_check_object.build()
  path = tmp_path / torch_check_object.FILE_NAME
  torch_pickle.save(expected, path)
  for mmap in (False, True):
    got = torch.load(path, weights_only=True, mmap=mmap)
    assert (
      torch_check_object.compare_with_torch(expected, got, torch, aligned=mmap)
      == record['tensors_compared']
    )
  torch_check_object.check_layout_with_torch(torch, path)


# ----------------------------------------------------------------------------
# Bounds: small files that would exhaust memory or time, or crash the
# interpreter, are refused before they can (see the reader's docstring).
# ------------------------------------------------------------------------------

# Each would exhaust memory (tens of GB), hang or crash a reader without the
# bounds, so they run in one isolated worker (torch_hostile.run_cases) with a
# memory and a time limit: a crash or hang there fails the test and names the
# case, instead of taking the test process down.
ISOLATED = {
  'zero strides': lambda d: torch_hostile.write_checkpoint(
    d / 'strides.pt', *torch_hostile.zero_stride_bomb(40)
  ),
  'deflated storage': lambda d: torch_hostile.write_deflate_bomb(
    d / 'storage.pt', 'data/0'
  ),
  'deflated data.pkl': lambda d: torch_hostile.write_deflate_bomb(
    d / 'pickle.pt', 'data.pkl'
  ),
  'compressed list': lambda d: torch_hostile.write_compressed_list(
    d / 'list.pt'
  ),
  'nested dict key': lambda d: torch_hostile.write_checkpoint(
    d / 'key.pt', torch_hostile.key_bomb()
  ),
  'shared dict key': lambda d: torch_hostile.write_checkpoint(
    d / 'shared_key.pt', torch_hostile.memo_bomb(100, 'key')
  ),
  'shared persistent id': lambda d: torch_hostile.write_checkpoint(
    d / 'shared_pid.pt', torch_hostile.memo_bomb(100, 'persistent id')
  ),
  'memo index': lambda d: torch_hostile.write_checkpoint(
    d / 'memo.pt', torch_hostile.memo_index_bomb()
  ),
}


@pytest.fixture(scope='module')
def isolated(tmp_path_factory):
  """The outcome of loading each ISOLATED file, by name."""
  folder = tmp_path_factory.mktemp('hostile')
  cases = [
    {'name': name, 'path': str(build(folder)), 'call': 'load'}
    for name, build in ISOLATED.items()
  ]
  outcomes = torch_hostile.run_cases(
    {'cases': cases, 'case_seconds': 20}, folder
  )
  return {outcome['name']: outcome for outcome in outcomes}


def assert_refused(outcome, match, error='UnsafeCheckpointError'):
  """Refused with `error`, having materialised next to nothing (a hang is the
  worker's 20 s alarm, reported as a crash)."""
  assert outcome['outcome'] == 'error', outcome
  assert outcome['type'] == error, outcome
  assert re.search(match, outcome['message']), outcome['message']
  assert outcome['path'] in outcome['message']
  assert torch_hostile.acceptable(outcome) is None, outcome
  assert outcome['peak'] < 4 << 20, outcome
  assert outcome['file_size'] < 4 << 20, outcome


def test_zero_strides_cannot_expand_a_storage(isolated, tmp_path):
  # 4 bytes of storage viewed as 40 GiB.
  assert_refused(isolated['zero strides'], 'more than its storage of 1')
  # A small broadcast view still loads; a larger one is refused.
  storage = FakeStorage('0', STORAGE_CLASSES['FloatStorage'], 1)
  raw = {'0': np.float32(2.5).tobytes()}
  small = FakeTensor(storage, 0, (8, 1000), (0, 0))
  path = write_checkpoint(tmp_path / 'small.pt', torch_like_dumps(small), raw)
  np.testing.assert_array_equal(
    torch_pickle.load(path), np.full((8, 1000), 2.5)
  )
  large = FakeTensor(storage, 0, (300, 1000), (0, 0))
  path = write_checkpoint(tmp_path / 'large.pt', torch_like_dumps(large), raw)
  with pytest.raises(UnsafeCheckpointError, match='broadcast view'):
    torch_pickle.load(path)


def test_a_deflated_storage_is_refused_unread(isolated):
  # 3.6 MB that inflate to 3.5 GiB.
  assert_refused(isolated['deflated storage'], "'archive/data/0' is compressed")


def test_a_deflated_data_pkl_is_refused_unread(isolated):
  assert_refused(isolated['deflated data.pkl'], "data.pkl' is compressed")


def test_a_compressed_pickle_of_a_billion_items_is_refused(isolated):
  # 1 MB that would build a list of 10**9 Nones.
  assert_refused(isolated['compressed list'], "data.pkl' is compressed")


def test_a_deeply_nested_dict_key_is_refused(isolated):
  # A key nested 10**6 deep: hashing it overflows the C stack.
  assert_refused(isolated['nested dict key'], 'nested more than 100 deep')


def test_a_memo_shared_dict_key_is_refused(isolated):
  # A key of 2**100 parts built in 300 bytes: hashing it never ends.
  assert_refused(isolated['shared dict key'], 'more than 10000000 parts')


def test_a_memo_shared_persistent_id_is_refused(isolated):
  # The same structure where the reader would quote it in a message.
  assert_refused(isolated['shared persistent id'], 'more than 10000000 parts')


def test_a_huge_memo_index_is_refused(isolated):
  # LONG_BINPUT 2**32 - 1 makes the C unpickler allocate a 32 GiB memo.
  assert_refused(isolated['memo index'], 'memo index 4294967295')


def test_the_budget_bounds_what_a_small_pickle_may_build(tmp_path):
  # A stored pickle of 10**6 opcodes: 128 MB charged against a budget of
  # 4 x 1 MB + 64 MiB.
  data_pkl = torch_hostile.pkl(b']' + b'(' + b'N' * 10**6 + b'e')
  path = write_checkpoint(tmp_path / 'wide.pt', data_pkl)
  with pytest.raises(UnsafeCheckpointError, match='over its bound of'):
    torch_pickle.load(path)


@pytest.mark.parametrize(
  'body, match',
  [
    (b']q\x00h\x00a', 'inside itself'),  # a list that holds itself
    (b'}q\x00K\x01h\x00s', 'inside itself'),  # a dict that holds itself
    # A list changed after it went into a tuple: its size in the scan would
    # be stale.
    (b']q\x00h\x00\x850h\x00Na', 'already inside another'),
  ],
)
def test_containers_are_final_once_inside_another(tmp_path, body, match):
  path = write_checkpoint(tmp_path / 'cycle.pt', torch_hostile.pkl(body))
  with pytest.raises(UnsafeCheckpointError, match=match):
    torch_pickle.load(path)


def test_restore_type_tag_cannot_alias_a_container(tmp_path):
  # D = {}; T = (D,); restore_type_tag(D)[1] = T; return T.  Returning D
  # itself would make T hold itself behind the scan's back.
  body = (
    b'}q\x00h\x00\x85q\x010'
    + torch_hostile.op_global('torch.jit._pickle', 'restore_type_tag')
    + b'h\x00\x85RK\x01h\x01s0h\x01'
  )
  path = write_checkpoint(tmp_path / 'alias.pt', torch_hostile.pkl(body))
  assert torch_pickle.load(path) == ({},)


def test_a_duplicate_record_is_refused(tmp_path):
  storage = FakeStorage('0', STORAGE_CLASSES['FloatStorage'], 1)
  records = torch_hostile.checkpoint_records(
    torch_like_dumps(FakeTensor(storage, 0, (1,), (1,))),
    {'0': np.float32(1).tobytes()},
  )
  records.append(('archive/data/0', np.float32(2).tobytes()))
  path = torch_hostile.write_archive(tmp_path / 'twice.pt', records)
  with pytest.raises(errors.CheckpointError, match='appears twice'):
    torch_pickle.load(path)


# ----------------------------------------------------------------------------
# Damaged or malformed files: one-line CheckpointErrors naming the file.
# ------------------------------------------------------------------------------


def record_offsets(data: bytes, name: str) -> tuple[int, int, int]:
  """(local header, central directory entry, payload) offsets of a record."""
  with zipfile.ZipFile(io.BytesIO(data)) as archive:
    infos = archive.infolist()
    central = archive.start_dir
  for info in infos:
    lengths = struct.unpack_from('<HHH', data, central + 28)
    if info.filename == name:
      local = info.header_offset
      skip = sum(struct.unpack_from('<HH', data, local + 26))
      return local, central, local + 30 + skip
    central += 46 + sum(lengths)
  raise KeyError(name)


REAL = DATA / 'cips_skip_s4_checkpoint.pt'
A_STORAGE = 'cips_skip_s4_checkpoint/data/0'


def assert_one_line_error(path, match, error=errors.CheckpointError):
  with pytest.raises(error) as info:
    torch_pickle.load(path)
  message = str(info.value)
  assert re.search(match, message), message
  assert str(path) in message and '\n' not in message and len(message) < 500


def test_a_bad_crc_is_a_checkpoint_error(tmp_path):
  data = bytearray(REAL.read_bytes())
  data[record_offsets(data, A_STORAGE)[2]] ^= 0xFF
  path = tmp_path / 'crc.pt'
  path.write_bytes(data)
  assert_one_line_error(path, 'damaged .*Bad CRC')


def test_a_record_reaching_past_the_file_is_a_checkpoint_error(tmp_path):
  data = bytearray(REAL.read_bytes())
  local, central, _ = record_offsets(data, A_STORAGE)
  for at in (local + 18, local + 22, central + 20, central + 24):
    struct.pack_into('<I', data, at, 2**31)
  path = tmp_path / 'long.pt'
  path.write_bytes(data)
  assert_one_line_error(path, "declares 2147483648 bytes .* beyond the file's")


def test_a_damaged_local_header_is_a_checkpoint_error(tmp_path):
  data = bytearray(REAL.read_bytes())
  data[record_offsets(data, A_STORAGE)[0]] = 0
  path = tmp_path / 'header.pt'
  path.write_bytes(data)
  assert_one_line_error(path, 'damaged .*BadZipFile')


@pytest.mark.parametrize(
  'data_pkl, match',
  [
    (b'', 'ends without STOP'),  # EOFError
    (b'garbage', 'opcode torch does not write'),  # UnpicklingError
    (b'\x80\x02X\x02\x00\x00\x00\xff\xfe.', 'UnicodeDecodeError'),
    (b'\x80\x02h\x05.', 'memo entry 5 was never put'),  # KeyError
    (b'\x80\x02t.', 'no MARK'),
    (
      b'\x80\x02ctorch._utils\n_rebuild_tensor_v2\n)R.',  # TypeError
      'TypeError',
    ),
  ],
)
def test_a_malformed_pickle_is_a_checkpoint_error(tmp_path, data_pkl, match):
  path = write_checkpoint(tmp_path / 'bad.pt', data_pkl)
  assert_one_line_error(path, match)


def test_a_deflated_record_is_refused_before_it_is_inflated(tmp_path):
  # Garbage deflate data (zlib.error once inflated) is never inflated.
  path = tmp_path / 'zlib.pt'
  torch_hostile.write_raw_zip(
    path,
    [
      ('archive/data.pkl', 8, b'\xff' * 64, 1000),
      ('archive/byteorder', 0, b'little', 6),
    ],
  )
  assert_one_line_error(path, 'compressed', UnsafeCheckpointError)


# ----------------------------------------------------------------------------
# Reading reference checkpoints (cips_jax.convert): content that does not fit
# is a CheckpointError naming the file, never another exception.
# ------------------------------------------------------------------------------

TRAIN_STEP = DATA / 'train_step_s8.pt'


def assert_convert_error(call, path, match):
  """`call(path)` raises a bounded CheckpointError naming `path`."""
  with pytest.raises(errors.CheckpointError) as info:
    call(str(path))
  message = str(info.value)
  assert re.search(match, message), message
  assert str(path) in message.split('\n')[0]
  lines = message.split('\n')
  assert len(lines) == 1 or (
    isinstance(info.value, errors.CheckpointMismatchError) and len(lines) <= 4
  ), message
  assert max(map(len, lines)) <= 2000, max(map(len, lines))


def test_a_one_dimensional_weight_is_a_mismatch(tmp_path):
  state = torch_pickle.load(REAL)
  for key in ('linears.0.conv.weight', 'lff.ffm.conv.weight'):
    g_ema = collections.OrderedDict(state['g_ema'])
    g_ema[key] = np.zeros(3, np.float32)
    path = tmp_path / 'flat.pt'
    torch_pickle.save({'g_ema': g_ema}, path)
    assert_convert_error(
      convert.load_torch_checkpoint, path, f'{re.escape(key)}: checkpoint'
    )


def test_untrusted_keys_are_quoted_with_bounds(tmp_path):
  state = torch_pickle.load(REAL)
  g_ema = collections.OrderedDict(state['g_ema'])
  for i in range(2000):
    g_ema[f'extra.{i}.' + 'x' * 1000] = np.zeros(1, np.float32)
  g_ema['line\nbreak'] = np.zeros(1, np.float32)
  path = tmp_path / 'keys.pt'
  torch_pickle.save({'g_ema': g_ema}, path)
  assert_convert_error(
    convert.load_torch_checkpoint, path, r'2001 unexpected: .*\(\d+ more\)'
  )
  torch_pickle.save({'x' * 10**5: 1, 'y\nz': 2}, path)
  assert_convert_error(
    convert.load_torch_checkpoint, path, "no 'g_ema' state dict .*\\.\\.\\."
  )


@pytest.fixture(scope='module')
def training_run():
  """The fixture run's checkpoint and its modules."""
  checkpoint = torch_pickle.load(TRAIN_STEP)
  modules = (
    convert.infer_generator(checkpoint['g']),
    convert.infer_discriminator(checkpoint['d']),
  )
  return checkpoint, modules


def with_optimizer(checkpoint, name, entry=None, **changes):
  """`checkpoint` with changes to the optimizer state dict `name`.

  `entry` changes the Adam state of parameter 0 (a function of it).
  """
  optimizer = dict(checkpoint[name])
  if entry is not None:
    optimizer['state'] = {**optimizer['state']}
    optimizer['state'][0] = entry(dict(optimizer['state'][0]))
  optimizer.update(changes)
  return {**checkpoint, name: optimizer}


@pytest.mark.parametrize(
  'change, match',
  [
    # np.shape of a ragged list raises ValueError.
    (
      dict(entry=lambda s: {**s, 'exp_avg': [[1.0], [2.0, 3.0]]}),
      'exp_avg is a list, not a tensor',
    ),
    (dict(entry=lambda s: {**s, 'step': 'abc'}), "step 'abc' is not a count"),
    (
      dict(entry=lambda s: {**s, 'step': float('nan')}),
      'step nan is not a count',
    ),
    (dict(param_groups=[1, 2]), r'param_groups\[0\] is not a dict with a list'),
    (
      dict(param_groups=[{'params': 'abc'}]),
      r'param_groups\[0\] is not a dict with a list',
    ),
    (dict(state=[1, 2]), 'not a torch optimizer state dict'),
  ],
)
def test_a_malformed_optimizer_state_is_a_mismatch(
  tmp_path, training_run, change, match
):
  checkpoint, modules = training_run
  path = tmp_path / 'run.pt'
  torch_pickle.save(with_optimizer(checkpoint, 'g_optim', **change), path)
  assert_convert_error(
    lambda p: convert.load_training_run(p, *modules), path, match
  )
