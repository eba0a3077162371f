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
  # Opcodes left in the budget (strings and classes count as several), and
  # the largest memo index (the C unpickler's memo array is twice that).
  allowance = min(
    (budget.limit - budget.used) // budget_lib.OPCODE_BYTES, MAX_OPCODES
  )
  left, top_index = allowance, 0
  frames: list[list[_Node]] = [[]]  # the stack, one frame per open MARK
  memo: dict[int, _Node] = {}
  classes: set[bytes] = set()
  size = len(data)
  pos = at = 0
  op = _STOP

  def refuse(reason: str) -> errors.UnsafeCheckpointError:
    return errors.UnsafeCheckpointError(
      f'{path}: unsafe pickle at byte {at} ({_OPCODE_NAMES.get(op, op)}): '
      f'{reason}'
    )

  def pop_mark() -> list[_Node]:
    if len(frames) == 1:
      raise refuse('no MARK to pop')
    return frames.pop()

  def check(node: _Node) -> None:
    if node.nodes > MAX_NODES:
      raise refuse(
        f'an object of more than {MAX_NODES} parts (counting each appearance '
        'of a shared one)'
      )
    if node.depth > MAX_DEPTH:
      raise refuse(f'containers nested more than {MAX_DEPTH} deep')

  def adopt(target: _Node, children: list[_Node]) -> None:
    # Each child is now inside `target`: sealed, and counted in its size.
    for child in children:
      child.sealed = True
      target.nodes += child.nodes
      target.depth = max(target.depth, child.depth + 1)
    check(target)

  def new(kind: int, children: list[_Node]) -> _Node:
    node = _Node(kind)
    adopt(node, children)
    return node

  def grow(target: _Node, kinds: tuple[int, ...], children: list[_Node]):
    if target.kind not in kinds:
      raise refuse(f'it changes {_KIND_NAMES[target.kind]}')
    if target.sealed:
      raise refuse('it changes a container already inside another')
    for child in children:
      if child is target:
        raise refuse('it puts a container inside itself')
    adopt(target, children)

  while True:
    if pos >= size:
      raise refuse('the pickle ends without STOP')
    at = pos
    op = data[pos]
    pos += 1
    left -= 1
    if left < 0:
      if allowance == MAX_OPCODES:
        raise refuse(f'more than {MAX_OPCODES} opcodes')
      budget.charge((allowance + 1) * budget_lib.OPCODE_BYTES, 'the pickle')
    # The argument, read as the C unpickler reads it.
    kind, form, width = _ARGUMENTS[op]
    if kind == _NO_ARG:
      pass
    elif kind == _FIXED_ARG:
      if pos + width > size:
        raise refuse('truncated')
      arg = struct.unpack_from(form, data, pos)[0]
      pos += width
    elif kind == _SIZED_ARG:
      if pos + width > size:
        raise refuse('truncated')
      arg = struct.unpack_from(form, data, pos)[0]
      if arg < 0:
        raise refuse(f'negative length {arg}')
      pos += width + arg
      if pos > size:
        raise refuse('truncated')
      left -= budget_lib.STRING_BYTE * arg // budget_lib.OPCODE_BYTES
    elif kind == _LINES_ARG:
      first = data.find(b'\n', pos)
      second = data.find(b'\n', first + 1) if first >= 0 else -1
      if second < 0:
        raise refuse('truncated')
      module = data[pos:first].decode('utf-8', 'replace')
      attr = data[first + 1 : second].decode('utf-8', 'replace')
      pos = second + 1
    else:
      name = _OPCODE_NAMES.get(op)
      raise refuse(
        'an unknown opcode'
        if name is None
        else 'an opcode torch does not write'
      )
    stack = frames[-1]

    if op == _BINGET or op == _LONG_BINGET:
      node = memo.get(arg)
      if node is None:
        raise refuse(f'memo entry {arg} was never put')
      stack.append(node)
    elif op == _BINPUT or op == _LONG_BINPUT:
      # The C unpickler grows its memo array to twice the largest index:
      # Python's pickler numbers its entries from 0, one per opcode at most.
      if arg > at:
        raise refuse(f'memo index {arg} past the opcodes so far')
      if arg > top_index:
        top_index = arg
      if not stack:
        raise refuse('an empty stack')
      memo[arg] = stack[-1]
    elif op == _MARK:
      frames.append([])
    elif op in _STRINGS:
      stack.append(_KEY_ATOM)
    elif op == _TUPLE_OP:
      items = pop_mark()
      frames[-1].append(new(_TUPLE, items))
    elif op == _TUPLE1 or op == _TUPLE2 or op == _TUPLE3:
      n = op - _TUPLE1 + 1
      if len(stack) < n:
        raise refuse(f'a stack of {len(stack)}')
      items = stack[-n:]
      del stack[-n:]
      stack.append(new(_TUPLE, items))
    elif op == _EMPTY_TUPLE:
      stack.append(_Node(_TUPLE))
    elif op == _REDUCE or op == _NEWOBJ:
      if len(stack) < 2 or stack[-2].kind != _GLOBAL:
        raise refuse('it calls something other than a global')
      args = stack.pop()
      if args.kind != _TUPLE:
        raise refuse(f'its arguments are {_KIND_NAMES[args.kind]}')
      stack[-1] = new(_OBJECT, [args])
    elif op == _BINPERSID:
      if not stack:
        raise refuse('an empty stack')
      stack.append(new(_OBJECT, [stack.pop()]))
    elif op == _SETITEM or op == _SETITEMS:
      if op == _SETITEM:
        if len(stack) < 3:
          raise refuse(f'a stack of {len(stack)}')
        items = stack[-2:]
        del stack[-2:]
      else:
        items = pop_mark()
        stack = frames[-1]
        if len(items) % 2:
          raise refuse('a key without a value')
        if not stack:
          raise refuse('an empty stack')
      for key in items[::2]:
        if key.kind > _GLOBAL:
          raise refuse(f'a dict key that is {_KIND_NAMES[key.kind]}')
      grow(stack[-1], (_DICT, _OBJECT), items)
    elif op == _APPEND:
      if len(stack) < 2:
        raise refuse(f'a stack of {len(stack)}')
      item = stack.pop()
      grow(stack[-1], (_LIST, _OBJECT), [item])
    elif op == _APPENDS:
      items = pop_mark()
      if not frames[-1]:
        raise refuse('an empty stack')
      grow(frames[-1][-1], (_LIST, _OBJECT), items)
    elif op == _EMPTY_DICT:
      stack.append(_Node(_DICT))
    elif op == _EMPTY_LIST:
      stack.append(_Node(_LIST))
    elif op == _BUILD:
      if len(stack) < 2:
        raise refuse(f'a stack of {len(stack)}')
      state = stack.pop()
      grow(stack[-1], (_OBJECT,), [state])
    elif op == _GLOBAL_OP:
      if stand_ins.is_script_name(module):
        stand_ins.check_script_name(module, attr)
        if data[at:pos] not in classes:
          classes.add(data[at:pos])
          left -= budget_lib.SCRIPT_CLASS_BYTES // budget_lib.OPCODE_BYTES
      elif (module, attr) not in stand_ins.ALLOWED_NAMES:
        raise stand_ins.refuse_global(module, attr, path)
      stack.append(_GLOBAL_ATOM)
    elif op == _LONG1 or op == _LONG4:
      if arg > _MAX_LONG_BYTES:
        raise refuse(f'an int of more than {_MAX_LONG_BYTES} bytes')
      stack.append(_KEY_ATOM if arg <= _MAX_KEY_LONG_BYTES else _LONG_ATOM)
    elif op == _POP:
      if stack:
        stack.pop()
      else:
        pop_mark()
    elif op == _POP_MARK:
      pop_mark()
    elif op == _PROTO:
      if arg > 2:
        raise refuse(f'pickle protocol {arg}; torch writes protocol 2')
    elif op == _STOP:
      if not stack:
        raise refuse('an empty stack')
      spent = (allowance - left) * budget_lib.OPCODE_BYTES
      spent += budget_lib.MEMO_INDEX_BYTES * top_index
      budget.charge(spent, 'the pickle')
      return
    else:  # the atoms: ints, floats, bools, None
      stack.append(_KEY_ATOM)
