"""The scan that refuses a costly `data.pkl` before it is unpickled.

Only the opcodes of protocol 2, which `torch.save` and TorchScript write, at
most `MAX_OPCODES` of them (and no more than the budget allows,
`.budget`); memo indices no larger than their byte offset (the C
unpickler sizes its memo array by the largest index); ints of at most 1 KiB;
dict keys only strings, ints of up to 8 bytes, floats, bools, None and globals
(their hashes are cheap, and no crafted key collides with more than a few
others).  A simulation of the unpickler's stack, memo and marks tracks the
size of every object with shared parts counted each time they appear, so that
hashing, printing or walking the result is bounded: no object may exceed
`MAX_NODES` parts or `MAX_DEPTH` levels, and no container may
change once it is inside another (which rules out cycles and keeps the sizes
exact).  Scanning costs under a microsecond per opcode.
"""

from __future__ import annotations

import pickletools
import struct
from typing import Any

from cips_jax import errors
from cips_jax.torch_pickle import budget as budget_lib
from cips_jax.torch_pickle import stand_ins

#: Most objects an unpickled value may expand to (shared parts counted each
#: time).
MAX_NODES = 10**7
#: Deepest nesting of containers in an unpickled value.
MAX_DEPTH = 100
#: Most opcodes in a `data.pkl`.
MAX_OPCODES = 10**7
# Longest int (LONG1/LONG4 payload) and longest int usable as a dict key: a
# key's hash is its value modulo 2**61 - 1, so longer ints could all collide.
_MAX_LONG_BYTES = 1024
_MAX_KEY_LONG_BYTES = 8


# Protocol 2 opcodes, as Python's pickler writes them for torch.save and
# TorchScript's C++ pickler for torch.jit.save (LONG4 for ints over 255 bytes,
# POP and POP_MARK for recursive tuples, BINSTRING and SHORT_BINSTRING for
# Python 2 strings), with the size of their argument: a fixed byte count, or
# ('len', n, signed) for a length of n bytes followed by that many bytes.  Not:
# the text opcodes of protocol 0 (INT, LONG, STRING, UNICODE, FLOAT, PERSID,
# GET, PUT, DICT, LIST, INST, OBJ), DUP, the extension registry (EXT1/2/4), and
# everything protocols 3 to 5 added (bytes, sets, frames, STACK_GLOBAL,
# MEMOIZE, NEWOBJ_EX, buffers).
_OPCODES: dict[str, Any] = {
  'PROTO': 1,
  'STOP': 0,
  'MARK': 0,
  'POP': 0,
  'POP_MARK': 0,
  'NONE': 0,
  'NEWTRUE': 0,
  'NEWFALSE': 0,
  'BININT': 4,
  'BININT1': 1,
  'BININT2': 2,
  'LONG1': ('len', 1, False),
  'LONG4': ('len', 4, True),
  'BINFLOAT': 8,
  'BINUNICODE': ('len', 4, False),
  'SHORT_BINSTRING': ('len', 1, False),
  'BINSTRING': ('len', 4, True),
  'EMPTY_TUPLE': 0,
  'TUPLE': 0,
  'TUPLE1': 0,
  'TUPLE2': 0,
  'TUPLE3': 0,
  'EMPTY_LIST': 0,
  'APPEND': 0,
  'APPENDS': 0,
  'EMPTY_DICT': 0,
  'SETITEM': 0,
  'SETITEMS': 0,
  'BINGET': 1,
  'LONG_BINGET': 4,
  'BINPUT': 1,
  'LONG_BINPUT': 4,
  'GLOBAL': 'lines',
  'REDUCE': 0,
  'NEWOBJ': 0,
  'BUILD': 0,
  'BINPERSID': 0,
}
# Opcode byte -> name, for all of them (to name a refused one).
_OPCODE_NAMES = {ord(op.code): op.name for op in pickletools.opcodes}
_CODES = {op.name: ord(op.code) for op in pickletools.opcodes}

# What the scan knows of a stack item.
_KEY = 0  # an atom usable as a dict key: str, small int, float, bool, None
_ATOM = 1  # another atom: a long int
_GLOBAL = 2  # a resolved global: a stand-in or a TorchScript class
_TUPLE = 3
_LIST = 4
_DICT = 5
_OBJECT = 6  # what REDUCE, NEWOBJ and BINPERSID make
_KIND_NAMES = (
  'an atom',
  'an atom',
  'a global',
  'a tuple',
  'a list',
  'a dict',
  'an object',
)


class _Node:
  """One object of the simulated stack: its kind and expanded size.

  `nodes` counts the object and everything it holds, a part shared through
  the memo counted each time it appears (what hashing, printing or walking it
  costs); `depth` is its nesting.  `sealed` marks a container that is
  inside another, which may no longer change.
  """

  __slots__ = ('kind', 'nodes', 'depth', 'sealed')

  def __init__(self, kind: int, nodes: int = 1, depth: int = 1) -> None:
    self.kind, self.nodes, self.depth, self.sealed = kind, nodes, depth, False


# Atoms never change, so they share one node each.
_KEY_ATOM = _Node(_KEY)
_LONG_ATOM = _Node(_ATOM)
_GLOBAL_ATOM = _Node(_GLOBAL)

# How each opcode's argument is read, by opcode byte: (kind, struct format,
# width); kinds: refused, none, fixed size, a length and that many bytes,
# GLOBAL's two lines.
_REFUSED, _NO_ARG, _FIXED_ARG, _SIZED_ARG, _LINES_ARG = range(5)
_FORMATS = {
  1: '<B',
  2: '<H',
  4: '<I',
  8: '>d',
  (1, False): '<B',
  (4, False): '<I',
  (4, True): '<i',
}
_ARGUMENTS = [(_REFUSED, '', 0)] * 256
for _name, _size in _OPCODES.items():
  if _size == 0:
    _spec = (_NO_ARG, '', 0)
  elif _size == 'lines':
    _spec = (_LINES_ARG, '', 0)
  elif type(_size) is int:
    _spec = (_FIXED_ARG, _FORMATS[_size], _size)
  else:
    _spec = (_SIZED_ARG, _FORMATS[_size[1:]], _size[1])
  _ARGUMENTS[_CODES[_name]] = _spec
(
  _BINGET,
  _LONG_BINGET,
  _BINPUT,
  _LONG_BINPUT,
  _MARK,
  _TUPLE_OP,
  _TUPLE1,
  _TUPLE2,
  _TUPLE3,
  _EMPTY_TUPLE,
  _EMPTY_LIST,
  _EMPTY_DICT,
  _APPEND,
  _APPENDS,
  _SETITEM,
  _SETITEMS,
  _GLOBAL_OP,
  _REDUCE,
  _NEWOBJ,
  _BUILD,
  _BINPERSID,
  _POP,
  _POP_MARK,
  _PROTO,
  _STOP,
  _LONG1,
  _LONG4,
) = (
  _CODES[n]
  for n in (
    'BINGET LONG_BINGET BINPUT LONG_BINPUT MARK TUPLE TUPLE1 TUPLE2 TUPLE3 '
    'EMPTY_TUPLE EMPTY_LIST EMPTY_DICT APPEND APPENDS SETITEM SETITEMS GLOBAL '
    'REDUCE NEWOBJ BUILD BINPERSID POP POP_MARK PROTO STOP LONG1 LONG4'
  ).split()
)
_STRINGS = frozenset(
  _CODES[n] for n in ('BINUNICODE', 'SHORT_BINSTRING', 'BINSTRING')
)


def scan_pickle(data: bytes, path: str, budget: budget_lib.Budget) -> None:
  """Refuses a `data.pkl` that could exhaust memory or time once unpickled.

  Parses the opcodes as the C unpickler does and simulates its stack, memo and
  marks over sizes instead of objects; see the module docstring for the
  bounds.  Raises UnsafeCheckpointError.
  """
  _Scan(data, path, budget).run()


class _Scan:
  """One scan: the simulated stack (a frame per open MARK), memo and budget,
  and a handler per opcode (`_HANDLERS`).

  The arguments are read here rather than by `pickletools.genops`, which
  decodes each one in full first (a string argument of any declared length, a
  GLOBAL line of any length) and stops at an unknown opcode with its own
  error: reading only the length, checking it against the data and the
  budget, and then skipping the bytes keeps the scan's own cost bounded, and
  every refusal names the byte offset and the opcode.
  """

  def __init__(self, data: bytes, path: str, budget: budget_lib.Budget):
    self.data, self.path, self.budget = data, path, budget
    # Opcodes left in the budget (strings and classes count as several), and
    # the largest memo index (the C unpickler's memo array is twice that).
    self.allowance = min(
      (budget.limit - budget.used) // budget_lib.OPCODE_BYTES, MAX_OPCODES
    )
    self.left, self.top_index = self.allowance, 0
    self.frames: list[list[_Node]] = [[]]
    self.memo: dict[int, _Node] = {}
    self.classes: set[bytes] = set()
    self.pos = self.at = 0
    self.op = _STOP
    self.arg: Any = None
    self.module = self.attr = ''
    self.done = False

  # --- the loop and the arguments.

  def run(self) -> None:
    while not self.done:
      if self.pos >= len(self.data):
        raise self.refuse('the pickle ends without STOP')
      self.at = self.pos
      self.op = self.data[self.pos]
      self.pos += 1
      self.left -= 1
      if self.left < 0:
        if self.allowance == MAX_OPCODES:
          raise self.refuse(f'more than {MAX_OPCODES} opcodes')
        self.budget.charge(
          (self.allowance + 1) * budget_lib.OPCODE_BYTES, 'the pickle'
        )
      self.read_argument()
      _HANDLERS.get(self.op, _Scan.atom)(self)

  def read_argument(self) -> None:
    """Reads the opcode's argument as the C unpickler reads it."""
    kind, form, width = _ARGUMENTS[self.op]
    data, pos = self.data, self.pos
    if kind == _NO_ARG:
      return
    if kind == _FIXED_ARG:
      if pos + width > len(data):
        raise self.refuse('truncated')
      self.arg = struct.unpack_from(form, data, pos)[0]
      self.pos = pos + width
    elif kind == _SIZED_ARG:
      if pos + width > len(data):
        raise self.refuse('truncated')
      self.arg = struct.unpack_from(form, data, pos)[0]
      if self.arg < 0:
        raise self.refuse(f'negative length {self.arg}')
      self.pos = pos + width + self.arg
      if self.pos > len(data):
        raise self.refuse('truncated')
      self.left -= budget_lib.STRING_BYTE * self.arg // budget_lib.OPCODE_BYTES
    elif kind == _LINES_ARG:
      first = data.find(b'\n', pos)
      second = data.find(b'\n', first + 1) if first >= 0 else -1
      if second < 0:
        raise self.refuse('truncated')
      self.module = data[pos:first].decode('utf-8', 'replace')
      self.attr = data[first + 1 : second].decode('utf-8', 'replace')
      self.pos = second + 1
    else:
      name = _OPCODE_NAMES.get(self.op)
      raise self.refuse(
        'an unknown opcode'
        if name is None
        else 'an opcode torch does not write'
      )

  # --- the simulation's rules.

  @property
  def stack(self) -> list[_Node]:
    return self.frames[-1]

  def refuse(self, reason: str) -> errors.UnsafeCheckpointError:
    return errors.UnsafeCheckpointError(
      f'{self.path}: unsafe pickle at byte {self.at} '
      f'({_OPCODE_NAMES.get(self.op, self.op)}): {reason}'
    )

  def pop_mark(self) -> list[_Node]:
    if len(self.frames) == 1:
      raise self.refuse('no MARK to pop')
    return self.frames.pop()

  def adopt(self, target: _Node, children: list[_Node]) -> None:
    # Each child is now inside `target`: sealed, and counted in its size.
    for child in children:
      child.sealed = True
      target.nodes += child.nodes
      target.depth = max(target.depth, child.depth + 1)
    if target.nodes > MAX_NODES:
      raise self.refuse(
        f'an object of more than {MAX_NODES} parts (counting each appearance '
        'of a shared one)'
      )
    if target.depth > MAX_DEPTH:
      raise self.refuse(f'containers nested more than {MAX_DEPTH} deep')

  def new(self, kind: int, children: list[_Node]) -> _Node:
    node = _Node(kind)
    self.adopt(node, children)
    return node

  def grow(self, target: _Node, kinds: tuple[int, ...], children: list[_Node]):
    if target.kind not in kinds:
      raise self.refuse(f'it changes {_KIND_NAMES[target.kind]}')
    if target.sealed:
      raise self.refuse('it changes a container already inside another')
    for child in children:
      if child is target:
        raise self.refuse('it puts a container inside itself')
    self.adopt(target, children)

  # --- one handler per opcode (`_HANDLERS`).

  def atom(self) -> None:  # ints, floats, bools, None
    self.stack.append(_KEY_ATOM)

  def string(self) -> None:
    self.stack.append(_KEY_ATOM)

  def get(self) -> None:
    node = self.memo.get(self.arg)
    if node is None:
      raise self.refuse(f'memo entry {self.arg} was never put')
    self.stack.append(node)

  def put(self) -> None:
    # The C unpickler grows its memo array to twice the largest index:
    # Python's pickler numbers its entries from 0, one per opcode at most.
    if self.arg > self.at:
      raise self.refuse(f'memo index {self.arg} past the opcodes so far')
    self.top_index = max(self.top_index, self.arg)
    if not self.stack:
      raise self.refuse('an empty stack')
    self.memo[self.arg] = self.stack[-1]

  def mark(self) -> None:
    self.frames.append([])

  def tuple_of_mark(self) -> None:
    items = self.pop_mark()
    self.stack.append(self.new(_TUPLE, items))

  def small_tuple(self) -> None:
    n = self.op - _TUPLE1 + 1
    if len(self.stack) < n:
      raise self.refuse(f'a stack of {len(self.stack)}')
    items = self.stack[-n:]
    del self.stack[-n:]
    self.stack.append(self.new(_TUPLE, items))

  def empty_tuple(self) -> None:
    self.stack.append(_Node(_TUPLE))

  def empty_list(self) -> None:
    self.stack.append(_Node(_LIST))

  def empty_dict(self) -> None:
    self.stack.append(_Node(_DICT))

  def call(self) -> None:  # REDUCE, NEWOBJ
    stack = self.stack
    if len(stack) < 2 or stack[-2].kind != _GLOBAL:
      raise self.refuse('it calls something other than a global')
    args = stack.pop()
    if args.kind != _TUPLE:
      raise self.refuse(f'its arguments are {_KIND_NAMES[args.kind]}')
    stack[-1] = self.new(_OBJECT, [args])

  def persistent_id(self) -> None:
    if not self.stack:
      raise self.refuse('an empty stack')
    self.stack.append(self.new(_OBJECT, [self.stack.pop()]))

  def setitem(self) -> None:
    if len(self.stack) < 3:
      raise self.refuse(f'a stack of {len(self.stack)}')
    items = self.stack[-2:]
    del self.stack[-2:]
    self.set_items(items)

  def setitems(self) -> None:
    items = self.pop_mark()
    if len(items) % 2:
      raise self.refuse('a key without a value')
    if not self.stack:
      raise self.refuse('an empty stack')
    self.set_items(items)

  def set_items(self, items: list[_Node]) -> None:
    for key in items[::2]:
      if key.kind > _GLOBAL:
        raise self.refuse(f'a dict key that is {_KIND_NAMES[key.kind]}')
    self.grow(self.stack[-1], (_DICT, _OBJECT), items)

  def append(self) -> None:
    if len(self.stack) < 2:
      raise self.refuse(f'a stack of {len(self.stack)}')
    item = self.stack.pop()
    self.grow(self.stack[-1], (_LIST, _OBJECT), [item])

  def appends(self) -> None:
    items = self.pop_mark()
    if not self.stack:
      raise self.refuse('an empty stack')
    self.grow(self.stack[-1], (_LIST, _OBJECT), items)

  def build(self) -> None:
    if len(self.stack) < 2:
      raise self.refuse(f'a stack of {len(self.stack)}')
    state = self.stack.pop()
    self.grow(self.stack[-1], (_OBJECT,), [state])

  def global_(self) -> None:
    module, attr = self.module, self.attr
    if stand_ins.is_script_name(module):
      stand_ins.check_script_name(module, attr)
      line = self.data[self.at : self.pos]
      if line not in self.classes:
        self.classes.add(line)
        self.left -= budget_lib.SCRIPT_CLASS_BYTES // budget_lib.OPCODE_BYTES
    elif (module, attr) not in stand_ins.ALLOWED_NAMES:
      raise stand_ins.refuse_global(module, attr, self.path)
    self.stack.append(_GLOBAL_ATOM)

  def long(self) -> None:
    if self.arg > _MAX_LONG_BYTES:
      raise self.refuse(f'an int of more than {_MAX_LONG_BYTES} bytes')
    self.stack.append(
      _KEY_ATOM if self.arg <= _MAX_KEY_LONG_BYTES else _LONG_ATOM
    )

  def pop(self) -> None:
    if self.stack:
      self.stack.pop()
    else:
      self.pop_mark()

  def pop_mark_op(self) -> None:
    self.pop_mark()

  def proto(self) -> None:
    if self.arg > 2:
      raise self.refuse(f'pickle protocol {self.arg}; torch writes protocol 2')

  def stop(self) -> None:
    if not self.stack:
      raise self.refuse('an empty stack')
    spent = (self.allowance - self.left) * budget_lib.OPCODE_BYTES
    spent += budget_lib.MEMO_INDEX_BYTES * self.top_index
    self.budget.charge(spent, 'the pickle')
    self.done = True


# The handler of each opcode byte; the others (ints, floats, bools, None) are
# atoms (`_Scan.atom`).
_HANDLERS = {
  **{code: _Scan.string for code in _STRINGS},
  _BINGET: _Scan.get,
  _LONG_BINGET: _Scan.get,
  _BINPUT: _Scan.put,
  _LONG_BINPUT: _Scan.put,
  _MARK: _Scan.mark,
  _TUPLE_OP: _Scan.tuple_of_mark,
  _TUPLE1: _Scan.small_tuple,
  _TUPLE2: _Scan.small_tuple,
  _TUPLE3: _Scan.small_tuple,
  _EMPTY_TUPLE: _Scan.empty_tuple,
  _EMPTY_LIST: _Scan.empty_list,
  _EMPTY_DICT: _Scan.empty_dict,
  _REDUCE: _Scan.call,
  _NEWOBJ: _Scan.call,
  _BINPERSID: _Scan.persistent_id,
  _SETITEM: _Scan.setitem,
  _SETITEMS: _Scan.setitems,
  _APPEND: _Scan.append,
  _APPENDS: _Scan.appends,
  _BUILD: _Scan.build,
  _GLOBAL_OP: _Scan.global_,
  _LONG1: _Scan.long,
  _LONG4: _Scan.long,
  _POP: _Scan.pop,
  _POP_MARK: _Scan.pop_mark_op,
  _PROTO: _Scan.proto,
  _STOP: _Scan.stop,
}
