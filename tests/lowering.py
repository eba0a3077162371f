"""Reads the properties of a lowered (StableHLO) module that accelerators care
about: host callbacks, float64, the operand and result types of every matrix
product and convolution (forward or backward), donated arguments.

Shared by tests/scripts/lower_for_accelerators.py (which lowers the package's
programs for 'cuda' and 'tpu') and tests/test_lowering.py.
"""

from __future__ import annotations

import dataclasses
import math
import re

_PRODUCT = re.compile(
  r'stablehlo\.(dot_general|convolution)\b(?P<body>[^\n]*?)'
  r':\s*\((?P<lhs>tensor<[^>]*>),\s*(?P<rhs>tensor<[^>]*>)\)\s*->\s*'
  r'(?P<out>tensor<[^>]*>)(?P<tail>[^\n]*)'
)
_LOC_REF = re.compile(r'loc\((#loc\d+)\)\s*$')
_LOC_DEF = re.compile(r'^(#loc\d+) = loc\("([^"]*)"', re.MULTILINE)
_CUSTOM_CALL = re.compile(r'custom_call @([\w$.]+)')
_FLOAT64 = re.compile(r'tensor<[^>]*\bf64>|tensor<f64>|\bf64\b(?![\w"])')
# Products that matter for speed: at least this many multiply-adds, a
# contraction of at least 16 (not the Fourier features' x and y) and a result
# of at least 4096 elements (not their (2, 512) weight gradient). Per-image
# style affines and demodulations fall below.
MIN_MACS = 10**9
MIN_CONTRACTION = 16
MIN_ELEMENTS = 4096


def _shape(tensor: str) -> tuple[int, ...]:
  parts = tensor[len('tensor<') : -1].split('x')
  return tuple(int(p) for p in parts[:-1] if p.isdigit())


def _dtype(tensor: str) -> str:
  return tensor[len('tensor<') : -1].split('x')[-1]


@dataclasses.dataclass(frozen=True)
class Product:
  """One dot_general or convolution of a lowered module."""

  op: str
  lhs: str  # operand dtypes, e.g. 'bf16'
  rhs: str
  out: str
  contraction: int  # elements summed per output (dot_general); 0 if unknown
  elements: int  # of the result
  bf16_algorithm: bool  # the product names BF16_BF16_F32
  backward: bool  # part of a transpose (the backward pass)

  @property
  def matters(self) -> bool:
    """Whether the product is large enough to count (see MIN_MACS)."""
    if self.op == 'convolution':
      return True
    return (
      self.elements * self.contraction >= MIN_MACS
      and self.contraction >= MIN_CONTRACTION
      and self.elements >= MIN_ELEMENTS
    )

  def describe(self) -> str:
    """'dot_general bf16 x bf16 -> f32 (K 512, backward)'."""
    where = 'backward' if self.backward else 'forward'
    return (
      f'{self.op} {self.lhs} x {self.rhs} -> {self.out} '
      f'(K {self.contraction}, {where})'
    )


def products(mlir: str) -> list[Product]:
  """Every dot_general and convolution of the module."""
  locations = dict(_LOC_DEF.findall(mlir))
  found = []
  for match in _PRODUCT.finditer(mlir):
    body, lhs, rhs, out = (match[k] for k in ('body', 'lhs', 'rhs', 'out'))
    contraction = 0
    dims = re.search(r'contracting_dims = \[([\d, ]*)\] x', body)
    if match[1] == 'dot_general' and dims:
      axes = [int(d) for d in dims[1].split(',') if d.strip()]
      contraction = math.prod(_shape(lhs)[a] for a in axes)
    reference = _LOC_REF.search(match[0])
    name = locations.get(reference[1], '') if reference else ''
    found.append(
      Product(
        op=match[1],
        lhs=_dtype(lhs),
        rhs=_dtype(rhs),
        out=_dtype(out),
        contraction=contraction,
        elements=math.prod(_shape(out)),
        bf16_algorithm='lhs_precision_type = bf16' in body
        and 'rhs_precision_type = bf16' in body,
        backward='transpose(' in name,
      )
    )
  return found


def host_callbacks(mlir: str) -> list[str]:
  """Custom-call targets that call back into Python on the host."""
  return sorted({t for t in _CUSTOM_CALL.findall(mlir) if 'callback' in t})


def custom_calls(mlir: str) -> list[str]:
  """Every custom-call target (Pallas kernels show up here)."""
  return sorted(set(_CUSTOM_CALL.findall(mlir)))


def has_float64(mlir: str) -> bool:
  """Whether any value of the module is float64."""
  return bool(_FLOAT64.search(mlir))


def donated_arguments(mlir: str) -> int:
  """Arguments of the main function aliased to an output (donated)."""
  main = re.search(r'func\.func public @main\((.*?)\)\s*->', mlir, re.DOTALL)
  return main[1].count('tf.aliasing_output') if main else 0


def bf16_violations(found: list[Product]) -> list[str]:
  """Products of a bfloat16 program that break "bf16 operands, f32 sums".

  Forward products must take bfloat16 operands (or name the BF16_BF16_F32
  algorithm) with float32 results; backward dot_generals must too (the
  algorithm rounds their float32 cotangent). Backward convolutions are the
  stated exception (StableHLO convolutions carry no algorithm), counted by
  `f32_backward_convolutions`. Small products are ignored (`Product.matters`).
  """
  bad = []
  for p in found:
    if not p.matters or (p.op == 'convolution' and p.backward):
      continue
    bf16_operands = (p.lhs, p.rhs) == ('bf16', 'bf16') or p.bf16_algorithm
    if not bf16_operands or p.out != 'f32':
      bad.append(p.describe())
  return sorted(set(bad))


def f32_backward_convolutions(found: list[Product]) -> int:
  """Backward convolutions with float32 operands (the stated exception)."""
  return sum(
    p.op == 'convolution' and p.backward and 'f32' in (p.lhs, p.rhs)
    for p in found
  )


def argument_shardings(mlir: str) -> list[str]:
  """The Shardy sharding of each argument of the main function, in order.

  E.g. '[{"data"}, {}, {}, {}]' for a batch split over the 'data' axis, '[{},
  {}]' for a replicated matrix, '' where the module names none.
  """
  main = re.search(r'func\.func public @main\((.*?)\)\s*->', mlir, re.DOTALL)
  if not main:
    return []
  arguments = re.split(r'%arg\d+:', main[1])[1:]
  found = []
  for argument in arguments:
    sharding = re.search(r'sdy\.sharding<@\w+, (\[.*?\])>', argument)
    found.append(sharding[1] if sharding else '')
  return found


def summary(mlir: str) -> dict:
  """The properties the tests check, as JSON-friendly values."""
  found = products(mlir)
  return {
    'host_callbacks': host_callbacks(mlir),
    'float64': has_float64(mlir),
    'custom_calls': custom_calls(mlir),
    'donated': donated_arguments(mlir),
    'dot_generals': sum(p.op == 'dot_general' for p in found),
    'convolutions': sum(p.op == 'convolution' for p in found),
    'forward_convolution_dtypes': sorted(
      {
        f'{p.lhs}x{p.rhs}'
        for p in found
        if p.op == 'convolution' and not p.backward
      }
    ),
    'bf16_violations': bf16_violations(found),
    'f32_backward_convolutions': f32_backward_convolutions(found),
    'dtypes': sorted({p.lhs for p in found} | {p.rhs for p in found}),
    'argument_shardings': argument_shardings(mlir),
  }
