"""Tests for cips_jax.torch_pickle: a torch-free, code-execution-free checkpoint
reader.
"""

from __future__ import annotations

import collections
import io
import json
import os
from pathlib import Path
import pickle
import zipfile

import numpy as np
import pytest

from cips_jax import torch_pickle
from cips_jax.torch_pickle import UnsafeCheckpointError

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


@pytest.mark.parametrize('protocol', [2, 4])  # GLOBAL and STACK_GLOBAL opcodes
def test_refuses_builtins_eval(tmp_path, protocol):
  marker = tmp_path / 'EVALFILE'
  source = f"open({str(marker)!r}, 'w').close()"
  data_pkl = pickle.dumps([1, RunsEval(source)], protocol=protocol)
  path = write_checkpoint(tmp_path / 'evil.pt', data_pkl)

  # Protocol 2 spells the module the Python 2 way, '__builtin__'.
  with pytest.raises(
    UnsafeCheckpointError, match=r"'(builtins|__builtin__)\.eval'"
  ):
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
    with pytest.raises(AttributeError):
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
