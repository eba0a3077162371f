"""The architecture of a reference state dict, inferred from names and shapes.

`infer_generator` tells CIPSskip from CIPSres and reads the size, widths, style
dim, mapping depth and channel multiplier; `infer_discriminator` does the same
for the discriminator. Keys that fit no architecture are left to the strict
check of `layouts.params_from_layout` to name.
"""

from __future__ import annotations

import re
from typing import Optional

import numpy as np

from cips_jax import discriminator as discriminator_lib
from cips_jax import generator as generator_lib
from cips_jax.convert import layouts


def _shape(
  state_dict: layouts.StateDict, key: str
) -> Optional[tuple[int, ...]]:
  return tuple(np.shape(state_dict[key])) if key in state_dict else None


def _fit_channel_table(widths: list[int], table_fn) -> tuple[int, int]:
  """(channel_multiplier, max_channels) that reproduce `widths`.

  The reference's values are preferred.
  """
  max_channels = max(widths) if widths else 512
  for cm in (2, 1, 4, 8, 3, 5, 6, 7):
    if table_fn(len(widths), cm, max_channels) == widths:
      return cm, max_channels
  raise layouts.CheckpointMismatchError(
    f'layer widths {widths} fit no channel_multiplier of the '
    'reference channel table'
  )


def infer_generator(
  state_dict: layouts.StateDict, activation: Optional[str] = None, **overrides
) -> generator_lib.CIPS:
  """The CIPSskip/CIPSres module of the reference state dict `state_dict`.

  Args:
    state_dict: reference names -> arrays.
    activation: None / 'sin' / 'sinrelu'. The two sine variants have identical
      state dicts, so a sine model needs it spelled out; None is checked against
      the keys.
    **overrides: module attributes to force (e.g. lr_mlp, dtype).
  """
  keys = set(state_dict)
  residual = 'to_rgb_last.bias' in keys or any(
    k.startswith('linears.1.conv1.') for k in keys
  )
  sine_keys = any(
    re.fullmatch(r'(conv1|linears\.\d+(\.conv[12])?)\.bias', k) for k in keys
  )
  if sine_keys and activation is None:
    raise layouts.CheckpointMismatchError(
      "this generator uses a sine activation (its layers hold '.bias' "
      "instead of '.activate.bias'), and 'sin' and 'sinrelu' have the same "
      "keys: pass activation='sin' or activation='sinrelu'"
    )
  hidden = (_shape(state_dict, 'lff.ffm.conv.weight') or (512,))[0]
  size = (_shape(state_dict, 'emb.input') or (1, 1, 256, 256))[-1]
  style_dim = (_shape(state_dict, 'style.1.weight') or (512, 512))[-1]
  n_mlp = len([k for k in keys if re.fullmatch(r'style\.\d+\.weight', k)]) or 8
  if residual:  # blocks are linears.1 ... (linears.0 is the input layer)
    cls, table_fn = generator_lib.CIPSres, generator_lib.res_widths
    pattern = r'linears\.(\d+)\.conv1\.conv\.weight'
  else:  # layers come in pairs of one width
    cls, table_fn = generator_lib.CIPSskip, generator_lib.skip_widths
    pattern = r'linears\.(\d+)\.conv\.weight'
  layer_widths = {
    int(match.group(1)): np.shape(state_dict[key])[1]
    for key in keys
    if (match := re.fullmatch(pattern, key))
  }
  ordered = [layer_widths[i] for i in sorted(layer_widths)]
  widths = ordered if residual else ordered[::2]
  try:
    cm, max_channels = _fit_channel_table(widths, table_fn)
  except layouts.CheckpointMismatchError:
    cm, max_channels = 2, 512  # let the strict key check name what is wrong
  kwargs = dict(
    size=size,
    hidden_size=hidden,
    style_dim=style_dim,
    n_mlp=n_mlp,
    channel_multiplier=cm,
    max_channels=max_channels,
    activation=activation,
  )
  kwargs.update(overrides)
  return cls(**kwargs)


def infer_discriminator(
  state_dict: layouts.StateDict, **overrides
) -> discriminator_lib.Discriminator:
  """The Discriminator module of the reference state dict `state_dict`."""
  keys = set(state_dict)
  input_channels = (_shape(state_dict, 'convs.0.0.weight') or (0, 3))[1]
  blocks = sorted(
    {
      int(m.group(1))
      for k in keys
      if (m := re.fullmatch(r'convs\.(\d+)\.conv1\.0\.weight', k))
    }
  )
  n_first = (
    len([k for k in keys if re.fullmatch(r'convs\.(\d+)\.0\.weight', k)]) - 1
  )
  size = 2 ** (len(blocks) + 2)
  widths = [
    np.shape(state_dict[f'convs.{i}.conv1.0.weight'])[0] for i in blocks
  ]
  max_channels = max(widths) if widths else 512
  cm = 2
  for candidate in (2, 1, 4, 8):
    table = discriminator_lib.discriminator_channels(
      size, candidate, max_channels
    )
    if [table[size >> j] for j in range(len(blocks))] == widths:
      cm = candidate
      break
  kwargs = dict(
    size=size,
    channel_multiplier=cm,
    input_channels=input_channels,
    n_first_layers=max(n_first, 0),
    max_channels=max_channels,
  )
  kwargs.update(overrides)
  return discriminator_lib.Discriminator(**kwargs)
