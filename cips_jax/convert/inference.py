"""The architecture of a reference state dict, inferred from names and shapes.

`infer_generator` tells CIPSskip from CIPSres and reads the size, widths, style
dim, mapping depth and channel multiplier; `infer_discriminator` does the same
for the discriminator. Keys that fit no architecture, and tensors of the wrong
rank, are left to the strict check of `layouts.params_from_layout` to name:
inference reads a dimension only where it exists, and falls back to the
reference's default elsewhere.
"""

from __future__ import annotations

import re
from typing import Optional

from cips_jax import discriminator as discriminator_lib
from cips_jax import errors
from cips_jax import generator as generator_lib
from cips_jax import widths as widths_lib
from cips_jax.convert import layouts

# Layer numbers in keys: longer ones fit no architecture (and would be slow to
# parse), so such keys are left to the strict check to name.
_INDEX = r'(\d{1,6})'
# The most discriminator blocks any supported size (up to 1024) has.
_MAX_DISCRIMINATOR_BLOCKS = 8


def _dim(state_dict: layouts.StateDict, key: str, axis: int, default: int):
  """Dimension `axis` of the tensor `key`; `default` if there is none."""
  shape = layouts.array_shape(state_dict.get(key))
  if shape is None or not -len(shape) <= axis < len(shape):
    return default
  return shape[axis]


def _str_keys(state_dict: layouts.StateDict) -> set[str]:
  return {k for k in state_dict if isinstance(k, str)}


def _fit_channel_table(widths: list[int], table_fn) -> tuple[int, int]:
  """(channel_multiplier, max_channels) that reproduce `widths`.

  The reference's values are preferred.
  """
  max_channels = max(widths) if widths else 512
  for cm in (2, 1, 4, 8, 3, 5, 6, 7):
    try:
      if table_fn(len(widths), cm, max_channels) == widths:
        return cm, max_channels
    except errors.InputError:  # more layers than the table has
      break
  raise layouts.CheckpointMismatchError(
    f'layer widths {layouts.listing([str(w) for w in widths])} fit no '
    'channel_multiplier of the reference channel table'
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
  keys = _str_keys(state_dict)
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
  hidden = _dim(state_dict, 'lff.ffm.conv.weight', 0, 512)
  size = _dim(state_dict, 'emb.input', -1, 256)
  style_dim = _dim(state_dict, 'style.1.weight', -1, 512)
  n_mlp = (
    len([k for k in keys if re.fullmatch(rf'style\.{_INDEX}\.weight', k)]) or 8
  )
  if residual:  # blocks are linears.1 ... (linears.0 is the input layer)
    cls, table_fn = generator_lib.CIPSres, widths_lib.res_widths
    pattern = rf'linears\.{_INDEX}\.conv1\.conv\.weight'
  else:  # layers come in pairs of one width
    cls, table_fn = generator_lib.CIPSskip, widths_lib.skip_widths
    pattern = rf'linears\.{_INDEX}\.conv\.weight'
  layer_widths = {
    int(match.group(1)): _dim(state_dict, key, 1, 0)
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
  keys = _str_keys(state_dict)
  input_channels = _dim(state_dict, 'convs.0.0.weight', 1, 3)
  blocks = sorted(
    {
      int(m.group(1))
      for k in keys
      if (m := re.fullmatch(rf'convs\.{_INDEX}\.conv1\.0\.weight', k))
    }
  )
  if len(blocks) > _MAX_DISCRIMINATOR_BLOCKS:
    raise layouts.CheckpointMismatchError(
      f'the state dict has {len(blocks)} discriminator blocks; a '
      f'discriminator has at most {_MAX_DISCRIMINATOR_BLOCKS} (size 1024)'
    )
  n_first = (
    len([k for k in keys if re.fullmatch(rf'convs\.{_INDEX}\.0\.weight', k)])
    - 1
  )
  size = 2 ** (len(blocks) + 2)
  widths = [_dim(state_dict, f'convs.{i}.conv1.0.weight', 0, 0) for i in blocks]
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
