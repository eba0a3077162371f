"""The generators' layer widths: the reference's channel tables, by stage.

widths.skip_widths(widths.num_pairs(256), channel_multiplier=2)
# [512, 512, 512, 512, 512, 256, 128]: CIPSskip-256's layer pairs
"""

from __future__ import annotations

import math
from typing import Sequence

from cips_jax import errors


def skip_widths(
  count: int, channel_multiplier: int, max_channels: int = 512
) -> list[int]:
  """Widths of CIPSskip's layer pairs: the reference's channel table, capped."""
  # Indexed by stage, not by resolution (docs/reference.md 1.4).
  table = [
    512,
    512,
    512,
    512,
    256 * channel_multiplier,
    128 * channel_multiplier,
    64 * channel_multiplier,
    32 * channel_multiplier,
    16 * channel_multiplier,
  ]
  return [min(w, max_channels) for w in _extend(table, count)]


def res_widths(
  count: int, channel_multiplier: int, max_channels: int = 512
) -> list[int]:
  """Widths of CIPSres's residual blocks.

  Entries 7 and 8 differ from CIPSskip's.
  """
  # 64 cm and 32 cm where CIPSskip has 32 cm and 16 cm: the reference's own
  # table, not a typo (docs/reference.md 1.4).
  table = [
    512,
    512,
    512,
    512,
    256 * channel_multiplier,
    128 * channel_multiplier,
    64 * channel_multiplier,
    64 * channel_multiplier,
    32 * channel_multiplier,
  ]
  return [min(w, max_channels) for w in _extend(table, count)]


def _extend(table: Sequence[int], count: int) -> list[int]:
  if count > len(table):
    raise errors.InputError(
      f'size too large: {count} layer pairs, the channel table has {len(table)}'
    )
  return list(table[:count])


def num_pairs(size: int) -> int:
  """log2(size) - 1: number of layer pairs (CIPSskip) or residual blocks."""
  # size & (size - 1) clears the lowest set bit: 0 only for powers of two.
  if size < 4 or size & (size - 1):
    raise errors.InputError(f'size must be a power of two >= 4, got {size}')
  return int(math.log2(size)) - 1


def input_widths(widths: list[int]) -> list[int]:
  """Input width of each layer pair or block.

  conv1 outputs widths[0], then each takes the previous one's output.
  """
  return [widths[0]] + widths[:-1]
