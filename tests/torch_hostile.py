"""Hostile torch checkpoints, and a worker that loads them in isolation.

Shared by test_torch_pickle.py (one focused test per way a checkpoint attacks
the reader) and test_torch_fuzz.py (a seeded fuzzer over the real fixtures).

* Builders: protocol 2 pickles written opcode by opcode (``pkl``), torch-style
  archives (``write_archive``; ``write_deflate_bomb`` for a deflated record
  declaring gigabytes), and the bombs themselves.
* ``run_cases``: loads files in ONE worker subprocess (this file run as a
  script) under a memory limit (RLIMIT_AS) and a per-case time limit
  (SIGALRM, whose default action kills the worker even inside C code), and
  measures each load's peak memory with tracemalloc (numpy reports its
  buffers to it) and its time.  A crash or hang is the worker's death; the
  case it was running is reported, and a new worker goes on with the next.
* ``fuzz_case``: the seeded mutator: case ``index`` of ``seed`` is always the
  same file, so a failing case can be rebuilt from the two numbers.
* ``acceptable``: what every outcome must be: a load, or a
  ``cips_jax.errors.Error`` whose message is one line (the mismatch listing of
  ``CheckpointMismatchError`` may take a few) of bounded length.
"""

from __future__ import annotations

import collections
import io
import json
import os
import pathlib
import pickle
import pickletools
import random
import resource
import shutil
import signal
import struct
import subprocess
import sys
import time
import tracemalloc
import warnings
import zipfile
import zlib

import numpy as np

DATA = pathlib.Path(__file__).resolve().parent / 'data'
FIXTURES = {
  'cips_skip_s4': DATA / 'cips_skip_s4_checkpoint.pt',
  'train_step_s8': DATA / 'train_step_s8.pt',
}
# What a message may be: one line of at most this many characters (a
# CheckpointMismatchError's key listing: a few such lines).
MAX_MESSAGE_LINE = 2000
MAX_MISMATCH_LINES = 4
# The worker's address space beyond what it holds once imports are done.
WORKER_MEMORY = 3 << 30

# ------------------------------------------------------------------------------
# Protocol 2 pickles, opcode by opcode.

PROTO = b'\x80\x02'
STOP = b'.'
MARK = b'('
TUPLE = b't'
EMPTY_TUPLE = b')'
EMPTY_DICT = b'}'
EMPTY_LIST = b']'
SETITEM = b's'
REDUCE = b'R'
NONE = b'N'


def op_int(n: int) -> bytes:
  """The shortest int opcode torch's pickler would write for `n`."""
  if 0 <= n < 256:
    return b'K' + bytes([n])
  if 0 <= n < 65536:
    return b'M' + struct.pack('<H', n)
  if -(2**31) <= n < 2**31:
    return b'J' + struct.pack('<i', n)
  data = pickle.encode_long(n)
  return b'\x8a' + bytes([len(data)]) + data


def op_str(text: str) -> bytes:
  data = text.encode('utf-8', 'surrogatepass')
  return b'X' + struct.pack('<I', len(data)) + data


def op_global(module: str, name: str) -> bytes:
  return b'c' + f'{module}\n{name}\n'.encode()


def op_tuple(*items: bytes) -> bytes:
  return MARK + b''.join(items) + TUPLE if items else EMPTY_TUPLE


def op_put(index: int) -> bytes:
  return (
    b'q' + bytes([index]) if index < 256 else b'r' + struct.pack('<I', index)
  )


def op_get(index: int) -> bytes:
  return (
    b'h' + bytes([index]) if index < 256 else b'j' + struct.pack('<I', index)
  )


def pkl(body: bytes) -> bytes:
  """A whole pickle: PROTO 2, `body` (which leaves one object), STOP."""
  return PROTO + body + STOP


def op_tensor(
  key: str,
  numel: int,
  offset: int,
  size: tuple[int, ...],
  stride: tuple[int, ...],
  storage: str = 'FloatStorage',
) -> bytes:
  """``_rebuild_tensor_v2`` of a view of storage `key`, as torch pickles it."""
  pid = op_tuple(
    op_str('storage'),
    op_global('torch', storage),
    op_str(key),
    op_str('cpu'),
    op_int(numel),
  )
  return (
    op_global('torch._utils', '_rebuild_tensor_v2')
    + op_tuple(
      pid + b'Q',
      op_int(offset),
      op_tuple(*map(op_int, size)),
      op_tuple(*map(op_int, stride)),
      b'\x89',
      op_global('collections', 'OrderedDict') + EMPTY_TUPLE + REDUCE,
    )
    + REDUCE
  )


def op_dict(items: list[tuple[bytes, bytes]]) -> bytes:
  return EMPTY_DICT + b''.join(k + v + SETITEM for k, v in items)


# ------------------------------------------------------------------------------
# Archives.


def checkpoint_records(
  data_pkl: bytes,
  storages: dict[str, bytes] | None = None,
  top: str = 'archive',
) -> list[tuple[str, bytes]]:
  """The records of a torch checkpoint, in torch's order."""
  records = [(f'{top}/data.pkl', data_pkl), (f'{top}/byteorder', b'little')]
  records += [(f'{top}/data/{k}', v) for k, v in (storages or {}).items()]
  return records + [(f'{top}/version', b'3\n')]


def write_archive(
  path: pathlib.Path,
  records: list[tuple[str, bytes]],
  compressed: frozenset[str] | set[str] = frozenset(),
) -> pathlib.Path:
  """A zip of `records` (duplicates kept), those in `compressed` deflated."""
  with warnings.catch_warnings():
    warnings.simplefilter('ignore')  # 'Duplicate name'
    with zipfile.ZipFile(path, 'w') as archive:
      for name, data in records:
        method = zipfile.ZIP_DEFLATED if name in compressed else 0
        archive.writestr(name, data, compress_type=method)
  return path


def write_checkpoint(path, data_pkl, storages=None, compressed=()):
  """A torch-style checkpoint at `path`; `compressed` names records to deflate
  (e.g. 'data.pkl', 'data/0').
  """
  return write_archive(
    path,
    checkpoint_records(data_pkl, storages),
    {f'archive/{name}' for name in compressed},
  )


def _repeated_deflate(
  head: bytes, chunk: bytes, count: int, tail: bytes = b''
) -> bytes:
  """Raw deflate of chunk * count + tail, the head replacing its start; fast.

  After a full flush the compressor starts afresh, on a byte boundary, so
  every chunk after the first compresses to the same bytes: compress two and
  repeat the second.
  """
  compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
  flush = zlib.Z_FULL_FLUSH
  first = compressor.compress(head + chunk[len(head) :])
  first += compressor.flush(flush)
  again = compressor.compress(chunk) + compressor.flush(flush)
  end = compressor.compress(tail) + compressor.flush()
  return first + again * (count - 1) + end


def write_raw_zip(
  path: pathlib.Path, entries: list[tuple[str, int, bytes, int]]
) -> pathlib.Path:
  """A zip of (name, method, payload, declared size) records.

  For records whose payload is not their content (a deflate bomb): zipfile
  would have to inflate it to write it.  A deflated record's CRC is zero:
  torch_pickle's old reader inflated it all before checking.
  """
  out, directory = io.BytesIO(), io.BytesIO()
  for name, method, payload, size in entries:
    raw_name = name.encode()
    offset = out.tell()
    crc = zlib.crc32(payload) if method == 0 else 0
    sizes = (crc, len(payload), size, len(raw_name), 0)
    out.write(struct.pack('<IHHHHH', 0x04034B50, 20, 0, method, 0, 0x21))
    out.write(struct.pack('<IIIHH', *sizes) + raw_name + payload)
    directory.write(
      struct.pack('<IHHHHHH', 0x02014B50, 20, 20, 0, method, 0, 0x21)
      + struct.pack('<IIIHHHHHII', *sizes, 0, 0, 0, 0, offset)
      + raw_name
    )
  start, table = out.tell(), directory.getvalue()
  out.write(table)
  count = len(entries)
  out.write(
    struct.pack(
      '<IHHHHIIH', 0x06054B50, 0, 0, count, count, len(table), start, 0
    )
  )
  path.write_bytes(out.getvalue())
  return path


def write_deflate_bomb(
  path: pathlib.Path, record: str, gib: float = 3.5
) -> pathlib.Path:
  """A checkpoint whose `record` ('data.pkl' or 'data/0') is a deflated stream
  of a few MB that inflates to `gib` GiB.

  A deflated data.pkl holds a pickle whose first string is that long; a
  deflated storage is what a one-element tensor's storage '0' reads.
  """
  chunk_size = 1 << 20
  count = int(gib * 1024)
  size = count * chunk_size
  tensor = pkl(op_tensor('0', 1, 0, (1,), (1,)))
  if record == 'data.pkl':
    head = PROTO + b'X' + struct.pack('<I', size - 7)
    data_pkl = (8, _repeated_deflate(head, bytes(chunk_size), count), size)
    storage = (0, b'\0\0\0\0', 4)
  else:
    data_pkl = (0, tensor, len(tensor))
    storage = (8, _repeated_deflate(b'', bytes(chunk_size), count), size)
  return write_raw_zip(
    path,
    [
      ('archive/data.pkl', *data_pkl),
      ('archive/byteorder', 0, b'little', 6),
      ('archive/data/0', *storage),
    ],
  )


def write_compressed_list(path: pathlib.Path, items: int = 10**9):
  """A data.pkl deflated to about items / 1000 bytes: a list of `items` Nones.

  (A few Nones fewer: the pickle's first opcodes take their place.)
  """
  chunk = b'N' * (1 << 20)
  count = -(-items // len(chunk))
  body = _repeated_deflate(PROTO + EMPTY_LIST + MARK, chunk, count, b'e.')
  return write_raw_zip(
    path,
    [
      ('archive/data.pkl', 8, body, count * len(chunk) + 2),
      ('archive/byteorder', 0, b'little', 6),
    ],
  )


def key_bomb(depth: int = 10**6) -> bytes:
  """A dict keyed by a tuple nested `depth` deep: its hash recurses in C."""
  return pkl(EMPTY_DICT + EMPTY_TUPLE + b'\x85' * depth + NONE + SETITEM)


def shared_tuples(levels: int) -> bytes:
  """Opcodes leaving t_levels on the stack, t_i = (t_i-1, t_i-1): 2**levels
  parts in a few bytes each, through the memo.
  """
  body = EMPTY_TUPLE + op_put(0)
  for i in range(1, levels + 1):
    body += op_get(i - 1) + b'\x86' + op_put(i)  # t_i-1 is on top already
  return body


def memo_bomb(levels: int = 100, use: str = 'key') -> bytes:
  """A memo-sharing bomb: hashed as a dict key, quoted in an error (as a
  persistent id), or returned as is.
  """
  bomb = shared_tuples(levels)
  if use == 'key':
    return pkl(EMPTY_DICT + bomb + NONE + SETITEM)
  if use == 'persistent id':
    return pkl(bomb + b'Q')
  return pkl(bomb)


def memo_index_bomb() -> bytes:
  """LONG_BINPUT 2**32 - 1: the C unpickler sizes its memo by the index."""
  return pkl(NONE + b'r\xff\xff\xff\xff')


def zero_stride_bomb(gib: int = 40) -> tuple[bytes, dict[str, bytes]]:
  """A one-float storage viewed as `gib` GiB of float32 through zero strides."""
  size = (gib, 1 << 28)
  data_pkl = pkl(op_tensor('0', 1, 0, size, (0, 0)))
  return data_pkl, {'0': np.ones(1, '<f4').tobytes()}


class Payload:
  """Pickles as a call of `func` with `args` (a __reduce__ trick)."""

  def __init__(self, func, *args) -> None:
    self.func, self.args = func, args

  def __reduce__(self):
    return (self.func, self.args)


def payload_pickles(marker: pathlib.Path) -> dict[str, bytes]:
  """Pickles that would create `marker` if any of their code ran."""
  touch = f'touch {marker}'
  source = f'open({str(marker)!r}, "w").close()'
  plain = {
    'os.system': Payload(os.system, touch),
    'builtins.eval': Payload(eval, source),
    'builtins.exec': Payload(exec, source),
    'subprocess.Popen': Payload(subprocess.Popen, ['touch', str(marker)]),
    'pathlib.Path.touch': Payload(pathlib.Path.touch, marker),
    'state_dict with os.system': {
      'g_ema': collections.OrderedDict(w=Payload(os.system, touch))
    },
  }
  found = {
    name: pickle.dumps(value, protocol=2) for name, value in plain.items()
  }
  # Hand-written: names the whitelist might be fooled by, and calls of
  # allowed stand-ins with a payload as argument.
  call = op_tuple(op_str(touch)) + REDUCE
  found.update(
    {
      'posix.system': pkl(op_global('posix', 'system') + call),
      '__torch__ look-alike': pkl(op_global('__torch__os', 'system') + call),
      '__torch__.os.system': pkl(op_global('__torch__.os', 'system') + call),
      'getattr chain': pkl(
        op_global('builtins', 'getattr')
        + op_tuple(op_global('os', 'path'), op_str('join'))
        + REDUCE
      ),
      'copyreg._reconstructor': pkl(
        op_global('copyreg', '_reconstructor')
        + op_tuple(op_global('os', 'system'), NONE, NONE)
        + REDUCE
      ),
      'OrderedDict with a payload argument': pkl(
        op_global('collections', 'OrderedDict')
        + op_tuple(op_global('os', 'system') + call)
        + REDUCE
      ),
      'build_intlist of a payload': pkl(
        op_global('torch.jit._pickle', 'build_intlist')
        + op_tuple(op_global('os', 'system') + call)
        + REDUCE
      ),
      'BUILD on a stand-in': pkl(
        op_global('torch', 'Size')
        + op_dict([(op_str('func'), op_global('os', 'system'))])
        + b'b'
      ),
      'INST opcode': PROTO + b'(S"' + touch.encode() + b'"\nios\nsystem\n.',
      'STACK_GLOBAL opcode': pickle.dumps(Payload(os.system, touch), 4),
    }
  )
  return found


# ------------------------------------------------------------------------------
# Outcomes.


def acceptable(outcome: dict) -> str | None:
  """Why `outcome` (a worker's report) is not acceptable, or None if it is."""
  if outcome['outcome'] == 'crash':
    return f'the worker died ({outcome["message"]})'
  if outcome['outcome'] == 'ok':
    return None
  if not outcome['is_error']:
    return f'{outcome["type"]} is not a cips_jax.errors.Error'
  lines = outcome['message'].split('\n')
  if len(lines) > 1 and not (
    outcome['mismatch'] and len(lines) <= MAX_MISMATCH_LINES
  ):
    return f'a message of {len(lines)} lines'
  if max(map(len, lines)) > MAX_MESSAGE_LINE:
    return f'a message line of {max(map(len, lines))} characters'
  return None


def memory_bound(file_size: int) -> int:
  """What one load may materialise: the reader's documented budget."""
  return 4 * file_size + (64 << 20)


# ------------------------------------------------------------------------------
# Running cases in a worker.


def run_cases(
  spec: dict, workdir: pathlib.Path, timeout: float = 600
) -> list[dict]:
  """Outcomes of the cases `spec` describes, run in worker subprocesses.

  `spec` is {'cases': [{'name', 'path', 'call'}...]} or {'fuzz': {'seed',
  'count', 'workdir'}} (cases 0 .. count - 1 of the seeded mutator), with
  'case_seconds' (the per-case hang limit).  A worker
  that dies is replaced, going on after the case it died in, which is reported
  as {'outcome': 'crash'}.
  """
  outcomes: list[dict] = []
  start, deadline = 0, time.monotonic() + timeout
  while True:
    spec_path = workdir / 'spec.json'
    spec_path.write_text(json.dumps({**spec, 'start': start}))
    process = subprocess.run(
      [sys.executable, __file__, str(spec_path)],
      capture_output=True,
      text=True,
      timeout=max(deadline - time.monotonic(), 1),
      check=False,
    )
    started, done = None, False
    for line in process.stdout.splitlines():
      if not line.startswith('{'):
        continue
      record = json.loads(line)
      if record['event'] == 'start':
        started, done = record, False
      elif record['event'] == 'done':
        outcomes.append(record)
        done = True
    if process.returncode == 0 and (started is None or done):
      return outcomes
    if started is None or done:
      raise RuntimeError(
        f'the worker failed outside any case: {process.stderr[-2000:]}'
      )
    how = (
      f'signal {-process.returncode}'
      if process.returncode < 0
      else f'exit {process.returncode}: {process.stderr[-300:]}'
    )
    outcomes.append(
      {
        **started,
        'event': 'done',
        'outcome': 'crash',
        'type': None,
        'is_error': False,
        'mismatch': False,
        'message': how,
        'seconds': None,
        'peak': None,
        'file_size': os.path.getsize(started['path']),
      }
    )
    start = started['index'] + 1
    total = len(spec['cases']) if 'cases' in spec else spec['fuzz']['count']
    if start >= total:
      return outcomes


# ------------------------------------------------------------------------------
# The mutator.

# Values a mutated int takes: the edges of each encoding, and sizes that would
# ask for far more than the file holds.
INTS = [
  0,
  1,
  2,
  3,
  7,
  255,
  256,
  65535,
  65536,
  2**31 - 1,
  2**31,
  2**32,
  2**40,
  2**62,
  2**63,
  2**64,
  -1,
  -2,
  -(2**31),
  10**9,
  10**12,
]
# Values a mutated zip field takes (before masking to its width).
FIELDS = [0, 1, 2, 0xFFFF, 0xFFFFFFFF, 0x7FFFFFFF, 8, 12, 99]
NAMES = [
  ('os', 'system'),
  ('posix', 'system'),
  ('builtins', 'eval'),
  ('__builtin__', 'exec'),
  ('subprocess', 'Popen'),
  ('torch', 'load'),
  ('torch._utils', '_rebuild_tensor'),
  ('torch._utils', '_rebuild_tensor_v2'),
  ('torch._utils', '_rebuild_parameter'),
  ('torch', 'Size'),
  ('torch', 'FloatStorage'),
  ('torch', 'BFloat16Storage'),
  ('torch', 'BoolStorage'),
  ('torch', 'float32'),
  ('collections', 'OrderedDict'),
  ('torch.jit._pickle', 'build_intlist'),
  ('torch.jit._pickle', 'restore_type_tag'),
  ('__torch__.m', 'C'),
  ('__torch__.m', 'not an identifier'),
  ('__torch__' + '.x' * 3000, 'C'),
]
DELETE = object()


def _strings(rng: random.Random) -> str:
  return rng.choice(
    [
      '',
      'x' * rng.choice([1, 100, 5000, 100000]),
      'line\nbreak',
      '\x00\x1b[31m',
      'ünïcødé',
      '\ud800',
      str(rng.randrange(10**6)),
      '9' * 5000,
    ]
  )


def _values(rng: random.Random):
  """A value that does not belong where it is put."""
  return rng.choice(
    [
      lambda: np.zeros(3, np.float32),
      lambda: np.zeros((), np.float32),
      lambda: np.ones((2, 3, 1), np.float32),
      lambda: np.zeros(2, bool),
      lambda: np.arange(3, dtype=np.int64),
      lambda: np.zeros((1, 1, 1, 1, 1, 1), np.float16),
      lambda: _strings(rng),
      lambda: None,
      lambda: True,
      lambda: rng.choice(INTS),
      lambda: float(rng.choice(['nan', 'inf', '-inf', '1e300', '-0.5'])),
      lambda: [1, 2],
      lambda: [[1.0], [2.0, 3.0]],
      lambda: {},
      lambda: {'a': 1},
      lambda: {7: np.zeros(1, np.float32)},
      lambda: (1, 'a'),
      lambda: DELETE,
    ]
  )()


def _replaced(obj, path: tuple, value):
  """`obj` with `obj[path]` set to `value` (or deleted), containers copied."""
  if not path:
    return value
  head, rest = path[0], path[1:]
  if isinstance(obj, (list, tuple)):
    items = list(obj)
    index = head % max(len(items), 1)
    if not items:
      return [value]
    if rest or value is not DELETE:
      items[index] = _replaced(items[index], rest, value)
    else:
      del items[index]
    return type(obj)(items) if isinstance(obj, list) else tuple(items)
  if not isinstance(obj, dict):
    return {head: value}
  copy = type(obj)(obj)
  if rest:
    copy[head] = _replaced(copy.get(head), rest, value)
  elif value is DELETE:
    copy.pop(head, None)
  else:
    copy[head] = value
  return copy


def _zip_layout(data: bytes) -> dict:
  """Where each zip structure of a (fixture) file starts."""
  with zipfile.ZipFile(io.BytesIO(data)) as archive:
    infos = archive.infolist()
    start = archive.start_dir
  central, at = [], start
  for _ in infos:
    central.append(at)
    lengths = struct.unpack_from('<HHH', data, at + 28)
    at += 46 + sum(lengths)
  return {
    'local': [info.header_offset for info in infos],
    'central': central,
    'end': at,
    'names': [info.filename for info in infos],
  }


# ------------------------------------------------------------------------------
# Damaged exported generators (checkpoints.export_generator's layout).

# Values a field of an export's model JSON is set to.
EXPORT_VALUES = [
  -1,
  0,
  1,
  2**31,
  2**63,
  1e308,
  float('nan'),
  float('inf'),
  '',
  'x' * 5000,
  [],
  {},
  None,
  True,
  'float64',
  'CIPSres',
]
# What the model JSON is replaced with whole.
EXPORT_JSON = [b'', b'{', b'null', b'[]', b'{"class": "CIPSskip"}', b'\xff\xfe']


def export_cases(
  seed: int, count: int, source: pathlib.Path, workdir: pathlib.Path
) -> list[dict]:
  """`count` damaged copies of the export `source`, as run_cases' cases.

  Case i depends on (seed, i) alone; every 20th is an undamaged control.
  """
  cases = []
  for index in range(count):
    rng = random.Random(f'export:{seed}:{index}')
    path = workdir / f'export_{index}'
    shutil.copytree(source, path)
    files = sorted(p for p in path.rglob('*') if p.is_file())
    kind = (
      'control'
      if index % 20 == 0
      else rng.choice(['flip', 'truncate', 'delete', 'field', 'json'])
    )
    target = rng.choice(files)
    what = str(target.relative_to(path))
    if kind == 'flip':
      data = bytearray(target.read_bytes())
      for _ in range(rng.randint(1, 8)):
        if data:
          data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
      target.write_bytes(bytes(data))
    elif kind == 'truncate':
      data = target.read_bytes()
      target.write_bytes(data[: rng.randrange(max(len(data), 1))])
    elif kind == 'delete':
      target.unlink()
    elif kind in ('field', 'json'):
      model = path / 'model' / 'metadata'
      config = json.loads(model.read_text())
      if kind == 'json':
        model.write_bytes(rng.choice(EXPORT_JSON))
        what = 'model JSON replaced'
      else:
        key = rng.choice(sorted(config['kwargs']) + ['class', 'extra'])
        value = rng.choice(EXPORT_VALUES)
        if key == 'class':
          config['class'] = value
        else:
          config['kwargs'][key] = value
        model.write_text(json.dumps(config))
        what = f'{key} = {str(value)[:20]}'
    cases.append(
      {'name': f'export {kind}: {what}', 'path': str(path), 'call': 'export'}
    )
  return cases


# The kinds of case the mutator makes, with their weights.
CASE_KINDS = {
  'control': 1,
  'flip': 8,
  'truncate': 3,
  'header': 8,
  'records': 4,
  'compress': 2,
  'pickle': 20,
  'semantic': 10,
  'bomb': 6,
  'payload': 3,
  'program': 12,
}


class Mutator:
  """Case `index` of seed `seed`: a file in `workdir` and how to load it.

  The cases mutate the real fixtures (bytes, zip headers, records, data.pkl's
  opcodes, the saved objects) or are built by hand (bombs, payloads, random
  opcode programs).
  """

  def __init__(self, seed: int, workdir: pathlib.Path, train_step) -> None:
    self.seed, self.workdir = seed, workdir
    self.marker = workdir / 'PAYLOAD_RAN'
    self.files = {name: path.read_bytes() for name, path in FIXTURES.items()}
    self.layouts = {name: _zip_layout(d) for name, d in self.files.items()}
    self.records, self.ops = {}, {}
    for name, data in self.files.items():
      with zipfile.ZipFile(io.BytesIO(data)) as archive:
        self.records[name] = [
          (info.filename, archive.read(info)) for info in archive.infolist()
        ]
      pickled = next(d for n, d in self.records[name] if n.endswith('.pkl'))
      self.ops[name] = [
        (op.name, pos) for op, _, pos in pickletools.genops(pickled)
      ] + [('END', len(pickled))]
    self.objects = {'train_step_s8': train_step}
    self.payloads = payload_pickles(self.marker)

  def case(self, index: int) -> dict:
    rng = random.Random(f'{self.seed}:{index}')
    path = self.workdir / f'case_{index}.pt'
    # Every 40th case an unchanged fixture, so that any list of cases holds
    # controls (which must load).
    kind = (
      'control'
      if index % 40 == 0
      else rng.choices(list(CASE_KINDS), list(CASE_KINDS.values()))[0]
    )
    fixture = rng.choices(list(FIXTURES), [3, 1])[0]
    call = rng.choice(
      ['load', 'convert' if fixture == 'cips_skip_s4' else 'run']
    )
    what = getattr(self, f'_{kind}')(rng, fixture, path)
    if kind in ('bomb', 'payload', 'program'):
      call = 'load'
    if kind == 'semantic':
      call = 'convert' if fixture == 'cips_skip_s4' else 'run'
    return {
      'name': f'{kind} {fixture}: {what}',
      'path': str(path),
      'call': call,
    }

  # Byte-level mutations of the fixture file.

  def _control(self, rng, fixture, path):
    path.write_bytes(self.files[fixture])
    return 'unchanged'

  def _flip(self, rng, fixture, path):
    data = bytearray(self.files[fixture])
    layout = self.layouts[fixture]
    pickled = layout['local'][0]
    zones = [
      (0, len(data)),
      (pickled, pickled + 4000),
      (layout['central'][0], len(data)),
    ]
    low, high = rng.choice(zones)
    spots = [rng.randrange(low, min(high, len(data))) for _ in range(8)]
    spots = spots[: rng.randint(1, 8)]
    for at in spots:
      data[at] ^= 1 << rng.randrange(8) if rng.random() < 0.5 else 0xFF
    path.write_bytes(data)
    return f'bytes {spots} flipped'

  def _truncate(self, rng, fixture, path):
    data = self.files[fixture]
    cut = rng.choice([rng.randrange(len(data)), len(data) - rng.randrange(100)])
    path.write_bytes(data[:cut])
    return f'cut at {cut}'

  def _header(self, rng, fixture, path):
    data = bytearray(self.files[fixture])
    layout = self.layouts[fixture]
    where = rng.choice(['local', 'central', 'end'])
    if where == 'end':
      at = layout['end']
      field = rng.choice([(8, 'H'), (10, 'H'), (12, 'I'), (16, 'I'), (20, 'H')])
    else:
      entry = rng.choice([0, 1, rng.randrange(len(layout[where]))])
      at = layout[where][entry]
      fields = {
        'local': [
          (8, 'H'),
          (14, 'I'),
          (18, 'I'),
          (22, 'I'),
          (26, 'H'),
          (28, 'H'),
        ],
        'central': [
          (10, 'H'),
          (16, 'I'),
          (20, 'I'),
          (24, 'I'),
          (28, 'H'),
          (30, 'H'),
          (42, 'I'),
        ],
      }[where]
      field = rng.choice(fields)
    offset, kind = field
    old = struct.unpack_from('<' + kind, data, at + offset)[0]
    value = rng.choice(FIELDS + [old + 1, old - 1, old * 2, old + 64])
    value &= 0xFFFF if kind == 'H' else 0xFFFFFFFF
    struct.pack_into('<' + kind, data, at + offset, value)
    if where != 'end' and rng.random() < 0.5:
      # The same edit in both copies of the field, as a consistent liar would.
      twin = {'local': 'central', 'central': 'local'}[where]
      shift = {
        ('local', 8): 10,
        ('local', 14): 16,
        ('local', 18): 20,
        ('local', 22): 24,
        ('central', 10): 8,
        ('central', 16): 14,
        ('central', 20): 18,
        ('central', 24): 22,
      }.get((where, offset))
      if shift is not None:
        other = layout[twin][layout[where].index(at)]
        struct.pack_into('<' + kind, data, other + shift, value)
    path.write_bytes(data)
    return f'{where} header at {at} + {offset}: {old} -> {value}'

  # Record-level mutations (the archive rewritten).

  def _records(self, rng, fixture, path):
    records = list(self.records[fixture])
    i = rng.randrange(len(records))
    how = rng.choice(['duplicate', 'remove', 'rename', 'swap', 'empty'])
    name, data = records[i]
    if how == 'duplicate':
      other = rng.choice([data, data[: len(data) // 2], b'junk'])
      records.insert(rng.randrange(len(records) + 1), (name, other))
    elif how == 'remove':
      del records[i]
    elif how == 'rename':
      records[i] = (rng.choice([name + 'x', 'data.pkl', name.upper()]), data)
    elif how == 'swap':
      j = rng.randrange(len(records))
      records[i], records[j] = (name, records[j][1]), (records[j][0], data)
    else:
      records[i] = (name, b'')
    write_archive(path, records)
    return f'{how} {name}'

  def _compress(self, rng, fixture, path):
    records = self.records[fixture]
    names = [n for n, _ in records]
    chosen = rng.choice(
      [
        [names[0]],
        [rng.choice(names)],
        names,
        [n for n in names if 'byte' in n],
      ]
    )
    write_archive(path, records, set(chosen))
    return f'deflated {chosen[:3]}'

  # data.pkl rewritten, opcode by opcode.

  def _pickle(self, rng, fixture, path):
    records = list(self.records[fixture])
    pickled = records[0][1]
    ops = self.ops[fixture]
    pieces = [pickled[a:b] for (_, a), (_, b) in zip(ops, ops[1:])]
    names = [name for name, _ in ops[:-1]]
    how = rng.choice(
      [
        'opcode',
        'int',
        'int',
        'int',
        'memo',
        'string',
        'delete',
        'duplicate',
        'insert',
        'global',
        'stride',
        'compress',
      ]
    )
    i = rng.randrange(len(pieces))

    def pick(*wanted):
      found = [k for k, name in enumerate(names) if name in wanted]
      return rng.choice(found) if found else i

    if how == 'opcode':
      pieces[i] = bytes([rng.randrange(256)]) + pieces[i][1:]
    elif how == 'int':
      i = pick('BININT1', 'BININT2', 'BININT', 'LONG1')
      pieces[i] = op_int(rng.choice(INTS + [rng.randrange(2**20)]))
    elif how == 'memo':
      i = pick('BINPUT', 'BINGET', 'LONG_BINPUT', 'LONG_BINGET')
      index = rng.choice(
        [0, 1, 255, 256, 2**20, 2**32 - 1, rng.randrange(3000)]
      )
      maker = op_put if 'PUT' in names[i] else op_get
      pieces[i] = maker(index)
    elif how == 'string':
      i = pick('BINUNICODE')
      pieces[i] = rng.choice(
        [
          op_str(_strings(rng)),
          b'X' + struct.pack('<I', 2**32 - 1) + b'abc',
          b'X\x03\x00\x00\x00\xff\xfe\xfd',
        ]
      )
    elif how == 'delete':
      del pieces[i]
    elif how == 'duplicate':
      pieces.insert(i, pieces[i])
    elif how == 'insert':
      pieces.insert(i, self._snippet(rng))
    elif how == 'global':
      i = pick('GLOBAL')
      pieces[i] = op_global(*rng.choice(NAMES))
    elif how == 'stride':
      # A size and a stride of one tensor: (n, 0) or (n, huge).
      i = pick('TUPLE1', 'TUPLE2')
      pieces[i] = b'0' * (1 if names[i] == 'TUPLE1' else 2) + op_tuple(
        op_int(rng.choice(INTS)), op_int(rng.choice(INTS))
      )
    data_pkl = b''.join(pieces)
    records[0] = (records[0][0], data_pkl)
    compressed = {records[0][0]} if how == 'compress' else set()
    write_archive(path, records, compressed)
    return f'{how} at op {i} ({names[i] if i < len(names) else "end"})'

  def _snippet(self, rng) -> bytes:
    """Opcodes that push one object and pop it: a bomb inside a real pickle."""
    body = rng.choice(
      [
        lambda: shared_tuples(rng.randint(20, 80)),
        lambda: EMPTY_TUPLE + b'\x85' * rng.choice([150, 10**4]),
        lambda: EMPTY_LIST + MARK + NONE * rng.choice([10, 10**5]) + b'e',
        lambda: EMPTY_DICT + shared_tuples(30) + NONE + SETITEM,
        lambda: NONE + b'r' + struct.pack('<I', rng.choice([2**20, 2**32 - 1])),
        lambda: op_str('x' * 10**5),
        lambda: b'\x8b' + struct.pack('<i', 4096) + b'\x01' * 4096,
        lambda: MARK * rng.choice([10, 10**4]) + NONE,
      ]
    )()
    return body + b'0'

  # The saved objects changed, then written with torch_pickle.save.

  def _semantic(self, rng, fixture, path):
    from cips_jax import torch_pickle  # the worker has imported it already

    if fixture not in self.objects:
      self.objects[fixture] = torch_pickle.load(FIXTURES[fixture])
    obj = self.objects[fixture]
    if fixture == 'cips_skip_s4':
      keys = list(obj['g_ema'])
      paths = [('g_ema', rng.choice(keys)), ('g_ema',), ('g_ema', None), ()]
    else:
      state = obj['g_optim']['state']
      index = rng.choice(list(state))
      paths = [
        ('g', rng.choice(list(obj['g']))),
        ('d', rng.choice(list(obj['d']))),
        ('g_ema', None),
        ('g_optim', 'state', index, 'exp_avg'),
        ('d_optim', 'state', 0, 'exp_avg_sq'),
        ('g_optim', 'state', index, 'step'),
        ('g_optim', 'state', index),
        ('g_optim', 'state'),
        ('g_optim', 'param_groups'),
        ('g_optim', 'param_groups', 0),
        ('g_optim', 'param_groups', 0, 'params'),
        ('g_optim', 'param_groups', 0, 'params', rng.randrange(40)),
        ('d_optim', 'param_groups', 0, 'lr'),
        ('d_optim', 'param_groups', 0, 'betas'),
        ('step',),
        ('g',),
        ('d_optim',),
      ]
    where = list(rng.choice(paths))
    if None in where:  # a new key
      where[where.index(None)] = rng.choice(
        [_strings(rng), rng.choice(INTS), 'style.999999999.weight']
      )
    value = _values(rng)
    try:
      torch_pickle.save(_replaced(obj, tuple(where), value), path)
    except (TypeError, ValueError):  # a value the writer refuses
      torch_pickle.save(_replaced(obj, tuple(where), None), path)
    shown = [w if not isinstance(w, str) else w[:40] for w in where]
    return f'{shown} = {type(value).__name__}'

  # Built by hand.

  def _bomb(self, rng, fixture, path):
    how = rng.choice(
      [
        'key',
        'memo',
        'index',
        'stride',
        'deflate',
        'list',
        'deep',
        'wide',
        'cycle',
        'alias',
      ]
    )
    storages = None
    if how == 'key':
      data_pkl = key_bomb(rng.choice([101, 1000, 10**5]))
    elif how == 'memo':
      use = rng.choice(['key', 'persistent id', 'result'])
      data_pkl = memo_bomb(rng.choice([24, 60, 120]), use)
    elif how == 'index':
      data_pkl = memo_index_bomb()
    elif how == 'stride':
      data_pkl, storages = zero_stride_bomb(rng.choice([1, 40]))
    elif how == 'deflate':
      write_deflate_bomb(path, rng.choice(['data.pkl', 'data/0']), 3.5)
      return how
    elif how == 'list':
      write_compressed_list(path, rng.choice([10**7, 10**9]))
      return how
    elif how == 'cycle':
      data_pkl = pkl(rng.choice([b']q\x00h\x00a', b'}q\x00K\x01h\x00s']))
    elif how == 'alias':
      data_pkl = pkl(
        b'}q\x00h\x00\x85q\x010'
        + op_global('torch.jit._pickle', 'restore_type_tag')
        + b'h\x00\x85RK\x01h\x01s0h\x01'
      )
    elif how == 'deep':
      data_pkl = pkl(EMPTY_LIST * 200 + b'a' * 199)
    else:
      data_pkl = pkl(EMPTY_LIST + MARK + NONE * 10**6 + b'e')
    write_checkpoint(path, data_pkl, storages)
    return how

  def _payload(self, rng, fixture, path):
    name = rng.choice(sorted(self.payloads))
    write_checkpoint(path, self.payloads[name])
    return name

  def _program(self, rng, fixture, path):
    """A random sequence of the opcodes torch writes, with plausible args."""
    simple = [
      b'N',
      b'\x88',
      b'\x89',
      b'(',
      b')',
      b']',
      b'}',
      b't',
      b'\x85',
      b'\x86',
      b'\x87',
      b'a',
      b'e',
      b's',
      b'u',
      b'R',
      b'\x81',
      b'b',
      b'Q',
      b'0',
      b'1',
    ]
    body = b''
    for _ in range(rng.randint(1, 60)):
      roll = rng.random()
      if roll < 0.45:
        body += rng.choice(simple)
      elif roll < 0.6:
        body += op_int(rng.choice(INTS + [rng.randrange(10)] * 5))
      elif roll < 0.7:
        body += rng.choice([op_put, op_get])(rng.randrange(6))
      elif roll < 0.8:
        body += op_str(rng.choice(['storage', 'cpu', '0', 'k', 'weight']))
      elif roll < 0.9:
        body += op_global(*rng.choice(NAMES[6:]))
      else:
        body += op_tensor(
          '0',
          rng.choice([1, 4, 10**9]),
          rng.choice([0, 1, 3]),
          rng.choice([(4,), (2, 2), (), (10**6,)]),
          rng.choice([(1,), (2, 1), (), (0,)]),
        )
    storages = {'0': np.arange(4, dtype='<f4').tobytes()}
    write_checkpoint(path, pkl(body), storages)
    return body[:60].hex()


def _message(err: BaseException) -> str:
  """The message of `err`, as a command would print it."""
  if err.args and all(isinstance(a, str) for a in err.args):
    return str(err)
  # Another exception's str could be the whole of an untrusted object.
  return f'<{len(err.args)} non-str arguments>'


def _worker(spec_path: str) -> None:
  spec = json.loads(pathlib.Path(spec_path).read_text())
  # Imported here, not at the top: the parent (pytest) only starts workers.
  from cips_jax import convert
  from cips_jax import errors
  from cips_jax import loading
  from cips_jax import torch_pickle

  fixture = torch_pickle.load(FIXTURES['train_step_s8'])
  modules = (
    convert.infer_generator(fixture['g']),
    convert.infer_discriminator(fixture['d']),
  )
  calls = {
    'load': torch_pickle.load,
    'convert': convert.load_torch_checkpoint,
    'run': lambda path: convert.load_training_run(path, *modules),
    'export': loading.open_generator,
  }
  if 'cases' in spec:
    cases = iter(spec['cases'][spec['start'] :])
  else:
    fuzz = spec['fuzz']
    mutator = Mutator(fuzz['seed'], pathlib.Path(fuzz['workdir']), fixture)
    cases = (mutator.case(i) for i in range(spec['start'], fuzz['count']))
  with open('/proc/self/status') as status:
    held = next(
      int(line.split()[1]) << 10 for line in status if line.startswith('VmSize')
    )
  limit = held + WORKER_MEMORY
  resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
  signal.signal(signal.SIGALRM, signal.SIG_DFL)  # a hang kills the worker
  tracemalloc.start()

  for index, case in enumerate(cases, spec['start']):
    print(json.dumps({'event': 'start', 'index': index, **case}), flush=True)
    size = os.path.getsize(case['path'])
    signal.alarm(spec['case_seconds'])
    base = tracemalloc.get_traced_memory()[0]
    tracemalloc.reset_peak()
    began = time.perf_counter()
    error = None
    try:
      calls[case['call']](case['path'])
    except BaseException as caught:  # every outcome is reported
      error = caught
    seconds = time.perf_counter() - began
    peak = tracemalloc.get_traced_memory()[1] - base
    signal.alarm(0)
    record = {
      **case,
      'event': 'done',
      'index': index,
      'outcome': 'ok' if error is None else 'error',
      'type': None if error is None else type(error).__name__,
      'is_error': isinstance(error, errors.Error),
      'mismatch': isinstance(error, errors.CheckpointMismatchError),
      'message': '' if error is None else _message(error),
      'seconds': seconds,
      'peak': peak,
      'file_size': size,
    }
    del error
    print(json.dumps(record), flush=True)
    if 'cases' not in spec:
      os.remove(case['path'])


if __name__ == '__main__':
  _worker(sys.argv[1])
