"""Where each reference (PyTorch) tensor goes in our Flax parameters.

A layout maps every reference state-dict key of one architecture to an `Entry`:
the path in our params tree, the reference shape, and the function that turns
the reference array into ours. `generator_layout` and `discriminator_layout`
derive it from our module structure; `params_from_layout` checks a state dict
against it and converts it. Every conversion only moves elements, so the
reverse direction (`to_torch`) inverts the same layouts exactly.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Optional, Sequence

import flax
import numpy as np

from cips_jax import discriminator as discriminator_lib
from cips_jax import errors
from cips_jax import generator as generator_lib
from cips_jax import models

# A reference state dict: reference names -> arrays.
StateDict = Mapping[str, np.ndarray]
# One reference tensor: (path in our params tree, reference shape, reference ->
# ours).
Entry = tuple[
  tuple[str, ...], tuple[int, ...], Callable[[np.ndarray], np.ndarray]
]


# A state dict that does not fit the architecture; the message lists the keys.
CheckpointMismatchError = errors.CheckpointMismatchError


# ------------------------------------------------------------------------------
# Naming a checkpoint's content in messages: checkpoints are untrusted, so a
# message never quotes one of their values at length.


def key_text(key: Any) -> str:
  """How a state-dict key (or another untrusted name) appears in a message.

  As it is when it is a short printable str, else as a bounded repr.
  """
  if isinstance(key, str) and len(key) <= 100 and key.isprintable():
    return key
  return errors.bounded_repr(key, 100)


def listing(items: Sequence[str], limit: int = 1500) -> str:
  """`items` joined with commas, cut after about `limit` characters.

  What is cut is counted, e.g. 'a, b, ... (40 more)'.
  """
  shown, length = [], 0
  for item in items:
    if length + len(item) > limit and shown:
      break
    shown.append(item)
    length += len(item) + 2
  rest = len(items) - len(shown)
  return ', '.join(shown) + (f', ... ({rest} more)' if rest else '')


def shape_text(value: Any) -> str:
  """The shape of a tensor, or the type of something else, for a message."""
  shape = array_shape(value)
  if shape is None:
    return f'a {type(value).__name__}'
  return str(shape) if len(shape) <= 8 else errors.bounded_repr(shape, 100)


def array_shape(value: Any) -> Optional[tuple[int, ...]]:
  """The shape of an array (numpy or jax), or None for anything else.

  Never converts `value`: `np.shape` of a nested list would copy it.
  """
  shape = getattr(value, 'shape', None)
  return shape if isinstance(shape, tuple) else None


# ------------------------------------------------------------------------------
# Layout of the reference generators, derived from our module structure.


# Linear (out, in) -> kernel (in, out): torch stores y = x W^T, Flax y = x K.
def _dense_t(w: np.ndarray) -> np.ndarray:
  return w.T


# (1, out, in, 1, 1) -> (in, out): the reference's modulated convs are 1x1
# (per-pixel) with a leading batch axis for the styles; ours are dense kernels.
def _mod_conv(w: np.ndarray) -> np.ndarray:
  return w[0, :, :, 0, 0].T


# (out, in, 1, 1) -> (in, out): a 1x1 conv is a dense layer on every pixel.
def _conv1x1(w: np.ndarray) -> np.ndarray:
  return w[:, :, 0, 0].T


# (1, C, 1, 1) or (C,) -> (C,): the reference shapes biases to broadcast over
# NCHW maps; ours add to the channel axis last.
def _flat(w: np.ndarray) -> np.ndarray:
  return w.reshape(-1)


# (1,) -> (): the noise strength is one learned scalar.
def _scalar(w: np.ndarray) -> np.ndarray:
  return w.reshape(())


def _modulated_entries(
  prefix: str, path: tuple[str, ...], fan_in: int, features: int, style_dim: int
) -> dict[str, Entry]:
  return {
    f'{prefix}.weight': (
      path + ('kernel',),
      (1, features, fan_in, 1, 1),
      _mod_conv,
    ),
    f'{prefix}.modulation.weight': (
      path + ('modulation', 'kernel'),
      (fan_in, style_dim),
      _dense_t,
    ),
    f'{prefix}.modulation.bias': (
      path + ('modulation', 'bias'),
      (fan_in,),
      _flat,
    ),
  }


def _styled_entries(
  prefix: str,
  path: tuple[str, ...],
  fan_in: int,
  features: int,
  style_dim: int,
  activation: Optional[str],
) -> dict[str, Entry]:
  # In the reference's order: a module's own parameters, then its children's.
  entries: dict[str, Entry] = {}
  if activation is not None:  # 'sin' / 'sinrelu': StyledConv owns the bias
    entries[f'{prefix}.bias'] = (path + ('bias',), (1, features, 1, 1), _flat)
  entries.update(
    _modulated_entries(
      f'{prefix}.conv', path + ('modulated',), fan_in, features, style_dim
    )
  )
  entries[f'{prefix}.noise.weight'] = (
    path + ('noise_strength',),
    (1,),
    _scalar,
  )
  if activation is None:  # FusedLeakyReLU owns the bias
    entries[f'{prefix}.activate.bias'] = (path + ('bias',), (features,), _flat)
  return entries


def _to_rgb_entries(
  prefix: str, path: tuple[str, ...], fan_in: int, style_dim: int
) -> dict[str, Entry]:
  entries = {f'{prefix}.bias': (path + ('bias',), (1, 3, 1, 1), _flat)}
  entries.update(
    _modulated_entries(
      f'{prefix}.conv', path + ('modulated',), fan_in, 3, style_dim
    )
  )
  return entries


def _mapping_entries(module: generator_lib.CIPS) -> dict[str, Entry]:
  d, entries = module.style_dim, {}
  for i in range(module.n_mlp):  # style.0 is the parameter-free pixel norm
    entries[f'style.{i + 1}.weight'] = (
      ('mapping', f'dense_{i}', 'kernel'),
      (d, d),
      _dense_t,
    )
    entries[f'style.{i + 1}.bias'] = (
      ('mapping', f'dense_{i}', 'bias'),
      (d,),
      _flat,
    )
  return entries


def generator_layout(module: generator_lib.CIPS) -> dict[str, Entry]:
  """Every reference state-dict key of `module`'s architecture.

  Each comes with where it goes in ours. The keys are in the reference's
  state-dict order, which is also its `named_parameters()` order (the order
  its optimizer numbers them in).
  """
  d, h, act = module.style_dim, module.hidden_size, module.activation
  entries: dict[str, Entry] = {
    'lff.ffm.conv.weight': (('fourier', 'kernel'), (h, 2, 1, 1), _conv1x1),
    'lff.ffm.conv.bias': (('fourier', 'bias'), (h,), _flat),
    'emb.input': (
      ('embedding',),
      (1, h, module.size, module.size),
      # (1, h, H, W) NCHW -> (H, W, h): our feature maps are channels-last.
      lambda w: w[0].transpose(1, 2, 0),
    ),
  }
  widths = module.layer_widths()
  if isinstance(module, generator_lib.CIPSskip):
    entries.update(
      _styled_entries('conv1', ('conv1',), 2 * h, widths[0], d, act)
    )
    fan_in = widths[0]
    for i, width in enumerate(widths):
      for j in (2 * i, 2 * i + 1):
        entries.update(
          _styled_entries(
            f'linears.{j}', (f'linears_{j}',), fan_in, width, d, act
          )
        )
        fan_in = width
    for i, width in enumerate(widths):
      entries.update(
        _to_rgb_entries(f'to_rgbs.{i}', (f'to_rgbs_{i}',), width, d)
      )
  else:
    entries.update(
      _styled_entries('linears.0', ('conv1',), 2 * h, widths[0], d, act)
    )
    fan_in = widths[0]
    for i, width in enumerate(widths):
      prefix, path = f'linears.{i + 1}', (f'blocks_{i}',)
      entries.update(
        _styled_entries(
          f'{prefix}.conv1', path + ('conv1',), fan_in, width, d, act
        )
      )
      entries.update(
        _styled_entries(
          f'{prefix}.conv2', path + ('conv2',), width, width, d, act
        )
      )
      if fan_in != width:
        entries[f'{prefix}.skip.0.weight'] = (
          path + ('skip', 'kernel'),
          (width, fan_in, 1, 1),
          _conv1x1,
        )
      fan_in = width
    entries.update(_to_rgb_entries('to_rgb_last', ('to_rgb',), fan_in, d))
  entries.update(_mapping_entries(module))
  return entries


def _check_state_dict(
  state_dict: StateDict, expected: Mapping[str, tuple[int, ...]], what: str
) -> None:
  """Raises CheckpointMismatchError naming every bad key.

  Bad keys are missing, unexpected or mis-shaped (a value that is not an array
  is mis-shaped).  Each list is cut after about 1500 characters.
  """
  if not isinstance(state_dict, Mapping):
    raise CheckpointMismatchError(
      f'the checkpoint holds a {type(state_dict).__name__} where a state dict '
      f'of {what} belongs'
    )
  missing = [k for k in expected if k not in state_dict]
  unexpected = [key_text(k) for k in state_dict if k not in expected]
  misshaped = [
    f'{k}: checkpoint {shape_text(state_dict[k])}, expected {expected[k]}'
    for k in expected
    if k in state_dict and array_shape(state_dict[k]) != expected[k]
  ]
  if missing or unexpected or misshaped:
    lines = [f'the checkpoint does not fit {what}:']
    for title, keys in (
      ('missing', missing),
      ('unexpected', unexpected),
      ('mis-shaped', misshaped),
    ):
      if keys:
        lines.append(f'  {len(keys)} {title}: ' + listing(keys))
    raise CheckpointMismatchError('\n'.join(lines))


def params_from_layout(
  state_dict: StateDict,
  layout: Mapping[str, Entry],
  what: str,
  optional: frozenset[str] = frozenset(),
) -> dict[str, Any]:
  """Checks `state_dict` against `layout` strictly; returns `{'params': ...}`.

  The params are float32. `optional` names keys that may be present and are
  ignored (fixed buffers).
  """
  if not isinstance(state_dict, Mapping):
    _check_state_dict(state_dict, {}, what)  # raises, naming what it holds
  given = {k: v for k, v in state_dict.items() if k not in optional}
  _check_state_dict(given, {k: entry[1] for k, entry in layout.items()}, what)
  flat = {
    path: np.asarray(to_ours(np.asarray(given[key], np.float32)), np.float32)
    for key, (path, _, to_ours) in layout.items()
  }
  return {'params': flax.traverse_util.unflatten_dict(flat)}


def generator_params(
  state_dict: StateDict, module: generator_lib.CIPS
) -> dict[str, Any]:
  """Reference generator state dict -> `{'params': ...}` for `module`.

  The state dict is checked strictly.
  """
  return params_from_layout(
    state_dict, generator_layout(module), describe(module)
  )


# ------------------------------------------------------------------------------
# Layout of the reference discriminator.


def reference_flatten_order(
  channels: int, height: int = 4, width: int = 4
) -> np.ndarray:
  """Row permutation from the reference's flatten order to ours.

  The reference flattens its NCHW map in (C, H, W) order; our discriminator
  flattens NHWC in (H, W, C) order. Returns `perm` (H*W*C,) such that our flat
  feature i is the reference's flat feature perm[i]; so our `final_dense/kernel`
  = `final_linear.0.weight.T[perm]`.
  """
  ref_index = np.arange(channels * height * width).reshape(
    channels, height, width
  )
  return ref_index.transpose(1, 2, 0).reshape(-1)


# (out, in, kh, kw) -> (kh, kw, in, out): torch's OIHW kernels, Flax's HWIO.
def _conv(w: np.ndarray) -> np.ndarray:
  return w.transpose(2, 3, 1, 0)


def discriminator_layout(
  module: discriminator_lib.Discriminator,
) -> tuple[dict[str, Entry], frozenset[str]]:
  """Every reference key of the discriminator with where it goes.

  Also returns the keys of its blur buffers.
  """
  size = module.size
  channels = discriminator_lib.discriminator_channels(
    size, module.channel_multiplier, module.max_channels
  )
  entries: dict[str, Entry] = {}
  buffers: set[str] = set()

  def conv_layer(
    ref, path, fan_in, features, kernel, blur=False, activate=True
  ):
    # The reference ConvLayer is a Sequential: [Blur,] EqualConv2d,
    # [FusedLeakyReLU].
    index = 1 if blur else 0
    if blur:
      buffers.add(f'{ref}.0.kernel')
    entries[f'{ref}.{index}.weight'] = (
      path + ('conv', 'kernel'),
      (features, fan_in, kernel, kernel),
      _conv,
    )
    if activate:
      entries[f'{ref}.{index + 1}.bias'] = (
        path + ('bias',),
        (features,),
        _flat,
      )

  conv_layer('convs.0', ('from_rgb',), module.input_channels, channels[size], 1)
  for i in range(module.n_first_layers):
    conv_layer(
      f'convs.{1 + i}',
      (f'first_layers_{i}',),
      channels[size],
      channels[size],
      3,
    )
  resolution, block = size, 0
  while resolution > 4:
    ref, path = (
      f'convs.{1 + module.n_first_layers + block}',
      (f'block_{block}',),
    )
    fan_in, features = channels[resolution], channels[resolution // 2]
    conv_layer(f'{ref}.conv1', path + ('conv1',), fan_in, fan_in, 3)
    conv_layer(
      f'{ref}.conv2', path + ('conv2',), fan_in, features, 3, blur=True
    )
    conv_layer(
      f'{ref}.skip',
      path + ('skip',),
      fan_in,
      features,
      1,
      blur=True,
      activate=False,
    )
    resolution, block = resolution // 2, block + 1
  width = channels[4]
  conv_layer('final_conv', ('final_conv',), width + 1, width, 3)
  order = reference_flatten_order(width)
  entries['final_linear.0.weight'] = (
    ('final_dense', 'kernel'),
    (width, 16 * width),
    # Transposed like any Linear, and its input rows taken in our (H, W, C)
    # flatten order rather than the reference's (C, H, W).
    lambda w: w.T[order],
  )
  entries['final_linear.0.bias'] = (('final_dense', 'bias'), (width,), _flat)
  entries['final_linear.1.weight'] = (
    ('logits', 'kernel'),
    (1, width),
    _dense_t,
  )
  entries['final_linear.1.bias'] = (('logits', 'bias'), (1,), _flat)
  return entries, frozenset(buffers)


def discriminator_params(
  state_dict: StateDict, module: discriminator_lib.Discriminator
) -> dict[str, Any]:
  """Reference discriminator state dict -> `{'params': ...}` for `module`.

  The state dict is checked strictly.
  """
  layout, buffers = discriminator_layout(module)
  return params_from_layout(
    state_dict, layout, describe(module), optional=buffers
  )


# ------------------------------------------------------------------------------
# Naming an architecture in messages.


def describe(module) -> str:
  """A one-line description of a converted module's architecture.

  For example 'CIPSskip(size=256, ...)'.
  """
  fields = ', '.join(
    f'{k}={getattr(module, k)!r}' for k in _ARCH_FIELDS.get(type(module), ())
  )
  return f'{type(module).__name__}({fields})'


_GENERATOR_FIELDS = (
  'size',
  'hidden_size',
  'style_dim',
  'n_mlp',
  'channel_multiplier',
  'activation',
  'max_channels',
)
# Every registered generator class shares the generator fields.
_ARCH_FIELDS = {
  **dict.fromkeys(models.GENERATORS.values(), _GENERATOR_FIELDS),
  discriminator_lib.Discriminator: (
    'size',
    'channel_multiplier',
    'input_channels',
    'n_first_layers',
    'max_channels',
  ),
}
