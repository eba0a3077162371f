"""Reference (PyTorch) CIPS checkpoints -> cips_jax modules and variables.

    gen, variables = convert.load_torch_checkpoint('churches.pt')  # g_ema
    disc, dvariables = convert.load_torch_checkpoint('000100.pt', which='d')

Checkpoints are read with `torch_pickle`, which rebuilds tensors and plain
containers only and runs no other pickled code; torch is not needed. Accepted
forms: the reference's training checkpoint (a dict with g, d, g_ema, g_optim,
d_optim) and a bare state dict (the released checkpoints are bare g_ema state
dicts). The architecture (CIPSskip or CIPSres, size, widths, style dim, mapping
depth, channel multiplier) is inferred from names and shapes; a state dict that
does not fit gets an error naming every missing, unexpected and mis-shaped key.

`python -m cips_jax.convert` (`cips_jax/convert/__main__.py`) writes an orbax
checkpoint of the generator from the shell.
"""

from __future__ import annotations

import collections
import dataclasses
import re
from typing import Any, Callable, Mapping, Optional

import flax
import numpy as np

from cips_jax import discriminator as discriminator_lib
from cips_jax import generator as generator_lib
from cips_jax import torch_pickle

StateDict = Mapping[str, np.ndarray]
# One reference tensor: (path in our params tree, reference shape, reference ->
# ours).
Entry = tuple[
  tuple[str, ...], tuple[int, ...], Callable[[np.ndarray], np.ndarray]
]

GENERATOR_KINDS = ('g_ema', 'g')
WHICH = ('g_ema', 'g', 'd')


class CheckpointMismatchError(ValueError):
  """A state dict does not fit the architecture.

  The message lists the offending keys.
  """


# ------------------------------------------------------------------------------
# Layout of the reference generators, derived from our module structure.


# Linear (out, in) -> kernel (in, out)
def _dense_t(w: np.ndarray) -> np.ndarray:
  return w.T


def _mod_conv(w: np.ndarray) -> np.ndarray:  # (1, out, in, 1, 1) -> (in, out)
  return w[0, :, :, 0, 0].T


def _conv1x1(w: np.ndarray) -> np.ndarray:  # (out, in, 1, 1) -> (in, out)
  return w[:, :, 0, 0].T


def _flat(w: np.ndarray) -> np.ndarray:  # (1, C, 1, 1) or (C,) -> (C,)
  return w.reshape(-1)


def _scalar(w: np.ndarray) -> np.ndarray:  # (1,) -> ()
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


def check_state_dict(
  state_dict: StateDict, expected: Mapping[str, tuple[int, ...]], what: str
) -> None:
  """Raises CheckpointMismatchError naming every bad key.

  Bad keys are missing, unexpected or mis-shaped.
  """
  missing = [k for k in expected if k not in state_dict]
  unexpected = [k for k in state_dict if k not in expected]
  misshaped = [
    f'{k}: checkpoint {tuple(np.shape(state_dict[k]))}, expected {expected[k]}'
    for k in expected
    if k in state_dict and tuple(np.shape(state_dict[k])) != expected[k]
  ]
  if missing or unexpected or misshaped:
    lines = [f'the checkpoint does not fit {what}:']
    for title, keys in (
      ('missing', missing),
      ('unexpected', unexpected),
      ('mis-shaped', misshaped),
    ):
      if keys:
        lines.append(f'  {len(keys)} {title}: ' + ', '.join(keys))
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
  given = {k: v for k, v in state_dict.items() if k not in optional}
  check_state_dict(given, {k: entry[1] for k, entry in layout.items()}, what)
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


# (out, in, kh, kw) -> (kh, kw, in, out)
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
_ARCH_FIELDS = {
  generator_lib.CIPSskip: _GENERATOR_FIELDS,
  generator_lib.CIPSres: _GENERATOR_FIELDS,
  discriminator_lib.Discriminator: (
    'size',
    'channel_multiplier',
    'input_channels',
    'n_first_layers',
    'max_channels',
  ),
}


# ------------------------------------------------------------------------------
# Inferring the architecture from names and shapes.


def _shape(state_dict: StateDict, key: str) -> Optional[tuple[int, ...]]:
  return tuple(np.shape(state_dict[key])) if key in state_dict else None


def _fit_channel_table(widths: list[int], table_fn) -> tuple[int, int]:
  """(channel_multiplier, max_channels) that reproduce `widths`.

  The reference's values are preferred.
  """
  max_channels = max(widths) if widths else 512
  for cm in (2, 1, 4, 8, 3, 5, 6, 7):
    if table_fn(len(widths), cm, max_channels) == widths:
      return cm, max_channels
  raise CheckpointMismatchError(
    f'layer widths {widths} fit no channel_multiplier of the '
    'reference channel table'
  )


def infer_generator(
  state_dict: StateDict, activation: Optional[str] = None, **overrides
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
    raise CheckpointMismatchError(
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
  except CheckpointMismatchError:
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
  state_dict: StateDict, **overrides
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


# ------------------------------------------------------------------------------
# Checkpoint files.


def _is_state_dict(obj: Any) -> bool:
  return (
    isinstance(obj, Mapping)
    and bool(obj)
    and all(
      isinstance(k, str) and isinstance(v, np.ndarray) for k, v in obj.items()
    )
  )


def _looks_like_discriminator(state_dict: StateDict) -> bool:
  return (
    'convs.0.0.weight' in state_dict or 'final_linear.0.weight' in state_dict
  )


def select_state_dict(
  checkpoint: Any, which: str, source: str = 'checkpoint'
) -> StateDict:
  """Picks g_ema / g / d from a training checkpoint.

  A bare state dict is returned once its kind is checked.
  """
  if which not in WHICH:
    raise ValueError(f'which must be one of {WHICH}, got {which!r}')
  if (
    isinstance(checkpoint, Mapping)
    and which in checkpoint
    and _is_state_dict(checkpoint[which])
  ):
    return checkpoint[which]
  if _is_state_dict(checkpoint):
    is_disc = _looks_like_discriminator(checkpoint)
    if is_disc != (which == 'd'):
      kind = 'a discriminator' if is_disc else 'a generator'
      raise CheckpointMismatchError(
        f'{source} is a bare state dict of {kind}; '
        f'which={which!r} does not fit it'
      )
    return checkpoint
  found = (
    sorted(map(str, checkpoint))
    if isinstance(checkpoint, Mapping)
    else type(checkpoint)
  )
  raise CheckpointMismatchError(
    f'{source} has no {which!r} state dict (found: {found})'
  )


def from_state_dict(
  state_dict: StateDict,
  which: str = 'g_ema',
  activation: Optional[str] = None,
  **overrides,
) -> tuple[Any, dict[str, Any]]:
  """A reference state dict -> (module, variables).

  The architecture is inferred from the state dict.
  """
  if which == 'd':
    module = infer_discriminator(state_dict, **overrides)
    return module, discriminator_params(state_dict, module)
  module = infer_generator(state_dict, activation=activation, **overrides)
  return module, generator_params(state_dict, module)


def load_torch_checkpoint(
  path: str, which: str = 'g_ema', activation: Optional[str] = None, **overrides
) -> tuple[Any, dict[str, Any]]:
  """Reads a reference `.pt` file (safely) and returns `(module, variables)`.

  Args:
    path: a torch zip checkpoint: the reference's training checkpoint or a bare
      state dict.
    which: 'g_ema' (the EMA generator, what the released files hold), 'g' or
      'd'.
    activation: for sine models only (see `infer_generator`).
    **overrides: module attributes to force, e.g. `dtype=jnp.bfloat16`.
  Returns:
    A Flax module (CIPSskip, CIPSres or Discriminator) and its variables
    `{'params': ...}`.
  """
  checkpoint = torch_pickle.load(path)
  state_dict = select_state_dict(checkpoint, which, source=str(path))
  return from_state_dict(state_dict, which, activation=activation, **overrides)


# ------------------------------------------------------------------------------
# Training checkpoints: networks, Adam states and the step.

TRAINING_KEYS = ('g', 'd', 'g_ema', 'g_optim', 'd_optim')


@dataclasses.dataclass(frozen=True)
class AdamState:
  """A torch.optim.Adam state in our layout.

  count: the step count every parameter shares; mu, nu: the first and second
  moments, trees shaped like the parameters; hyperparameters: the 'lr',
  'betas' and 'eps' of its (first) parameter group.
  """

  count: int
  mu: Any
  nu: Any
  hyperparameters: dict[str, Any]


@dataclasses.dataclass(frozen=True)
class TrainingRun:
  """Everything a reference training checkpoint holds, in our layout.

  step: the number of completed steps (the next step's index).
  g, d, g_ema: parameter trees; g_adam, d_adam: their Adam states.
  """

  step: int
  g: Any
  d: Any
  g_ema: Any
  g_adam: AdamState
  d_adam: AdamState


def reference_parameter_names(
  state_dict: StateDict, buffers: frozenset[str] = frozenset()
) -> list[str]:
  """The reference module's `named_parameters()` order.

  That is the order torch's optimizer numbers the parameters in: the state
  dict's order without its buffers.
  """
  return [key for key in state_dict if key not in buffers]


def adam_state(
  optimizer: Any, names: list[str], layout: Mapping[str, Entry], what: str
) -> AdamState:
  """A torch Adam `state_dict()` -> AdamState in our layout.

  Args:
    optimizer: {'state': {i: {'step', 'exp_avg', 'exp_avg_sq'}}, 'param_groups':
      [{'params': [i, ...], 'lr', 'betas', 'eps', ...}]}; state i belongs to
      parameter names[i].
    names: the reference parameter names in optimizer order
      (`reference_parameter_names`).
    layout: the module's reference layout (`generator_layout`, ...).
    what: names the optimizer in errors, e.g. "g_optim".
  Raises:
    CheckpointMismatchError naming every parameter whose state is missing or
    mis-shaped, or whose step count differs from the others.
  """
  if not (
    isinstance(optimizer, Mapping)
    and isinstance(optimizer.get('state'), Mapping)
    and isinstance(optimizer.get('param_groups'), (list, tuple))
  ):
    raise CheckpointMismatchError(
      f'{what} is not a torch optimizer state dict (expected the keys '
      "'state' and 'param_groups')"
    )
  groups = optimizer['param_groups']
  indices = [i for group in groups for i in group.get('params', ())]
  if len(indices) != len(names):
    detail = (
      'no Adam state for ' + ', '.join(names[len(indices) :])
      if len(indices) < len(names)
      else f'{len(indices) - len(names)} entries more than the parameters'
    )
    raise CheckpointMismatchError(
      f'{what} optimises {len(indices)} parameters, the model has '
      f'{len(names)}: {detail}'
    )
  problems, moments, counts = [], {'exp_avg': {}, 'exp_avg_sq': {}}, {}
  for index, name in zip(indices, names):
    entry = optimizer['state'].get(index)
    shape = layout[name][1]
    if not isinstance(entry, Mapping) or not {
      'step',
      'exp_avg',
      'exp_avg_sq',
    } <= set(entry):
      problems.append(f'{name}: no Adam state')
      continue
    for moment in ('exp_avg', 'exp_avg_sq'):
      found = tuple(np.shape(entry[moment]))
      if found != shape:
        problems.append(f'{name}: {moment} {found}, parameter {shape}')
      moments[moment][name] = entry[moment]
    counts[name] = float(np.asarray(entry['step']))
  if problems:
    raise CheckpointMismatchError(
      f'{what} does not fit the model ({len(problems)} parameters): '
      + '; '.join(problems)
    )
  distinct = sorted(set(counts.values()))
  if len(distinct) != 1 or distinct[0] != int(distinct[0]):
    raise CheckpointMismatchError(
      f'{what}: the parameters have different step counts {distinct} '
      '(optax keeps one count per optimizer)'
    )
  mu, nu = (
    params_from_layout(moments[m], layout, f'{what} {m}')['params']
    for m in ('exp_avg', 'exp_avg_sq')
  )
  group = groups[0]
  return AdamState(
    count=int(distinct[0]),
    mu=mu,
    nu=nu,
    hyperparameters={k: group.get(k) for k in ('lr', 'betas', 'eps')},
  )


def load_training_run(
  path: str,
  generator: generator_lib.CIPS,
  discriminator: discriminator_lib.Discriminator,
) -> TrainingRun:
  """Reads a reference training checkpoint for these two modules.

  The checkpoint is the dict the reference's train.py saves (g, d, g_ema,
  g_optim, d_optim), optionally with 'step', the number of completed steps;
  without it, the step is the generator's Adam count (G takes one Adam step
  per training step). Every state dict is checked strictly against the
  modules: a checkpoint of another architecture is refused with the keys that
  differ.
  """
  checkpoint = torch_pickle.load(path)
  missing = [
    k
    for k in TRAINING_KEYS
    if not isinstance(checkpoint, Mapping) or k not in checkpoint
  ]
  if missing:
    found = (
      sorted(map(str, checkpoint))
      if isinstance(checkpoint, Mapping)
      else type(checkpoint).__name__
    )
    raise CheckpointMismatchError(
      f'{path} is not a reference training checkpoint: it lacks '
      f'{", ".join(missing)} (found: {found}). A generator alone starts a '
      'run with config.train.init_generator_from instead.'
    )
  g_layout = generator_layout(generator)
  d_layout, d_buffers = discriminator_layout(discriminator)
  g = generator_params(checkpoint['g'], generator)['params']
  g_ema = generator_params(checkpoint['g_ema'], generator)['params']
  d = discriminator_params(checkpoint['d'], discriminator)['params']
  g_adam = adam_state(
    checkpoint['g_optim'],
    reference_parameter_names(checkpoint['g']),
    g_layout,
    'g_optim',
  )
  d_adam = adam_state(
    checkpoint['d_optim'],
    reference_parameter_names(checkpoint['d'], d_buffers),
    d_layout,
    'd_optim',
  )
  step = checkpoint.get('step', g_adam.count)
  if not isinstance(step, int) or isinstance(step, bool) or step < 0:
    raise CheckpointMismatchError(
      f"{path}: 'step' must be a non-negative int, got {step!r}"
    )
  return TrainingRun(
    step=step, g=g, d=d, g_ema=g_ema, g_adam=g_adam, d_adam=d_adam
  )


# ------------------------------------------------------------------------------
# Our layout -> the reference's: state dicts and training checkpoints to hand
# back to PyTorch.

# torch.optim.Adam's param_group fields (torch 2.x) besides lr, betas, eps.
_ADAM_GROUP_DEFAULTS = {
  'weight_decay': 0,
  'amsgrad': False,
  'maximize': False,
  'foreach': None,
  'capturable': False,
  'differentiable': False,
  'fused': None,
  'decoupled_weight_decay': False,
}


def to_reference(value: np.ndarray, entry: Entry) -> np.ndarray:
  """Our array -> the reference tensor of `entry`, bit for bit.

  Every conversion in a layout only moves elements (transposes, reshapes, the
  row order of `final_linear.0.weight`), so its exact inverse is found by
  converting the element indices of the reference shape.
  """
  path, shape, to_ours = entry
  value = np.asarray(value)
  positions = to_ours(np.arange(int(np.prod(shape))).reshape(shape))
  if positions.shape != value.shape:
    raise CheckpointMismatchError(
      f'{"/".join(path)}: shape {value.shape}, the layout expects '
      f'{positions.shape}'
    )
  flat = np.empty(positions.size, value.dtype)
  flat[positions.reshape(-1)] = value.reshape(-1)
  return flat.reshape(shape)


def state_dict_from_layout(
  params: Any, layout: Mapping[str, Entry]
) -> collections.OrderedDict:
  """`params` (our tree) -> the reference state dict, in its key order."""
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(params))
  missing = [key for key, entry in layout.items() if entry[0] not in flat]
  if missing:
    raise CheckpointMismatchError(
      'the parameters lack what the reference keys need: ' + ', '.join(missing)
    )
  return collections.OrderedDict(
    (key, to_reference(flat[entry[0]], entry)) for key, entry in layout.items()
  )


def generator_state_dict(
  params: Any, module: generator_lib.CIPS
) -> collections.OrderedDict:
  """Our generator parameters -> the reference's state dict for `module`."""
  return state_dict_from_layout(params, generator_layout(module))


def blur_kernel(taps=(1, 3, 3, 1)) -> np.ndarray:
  """The reference's 2-D blur buffer: outer(taps, taps), summing to 1."""
  taps = np.asarray(taps, np.float32)
  kernel = np.outer(taps, taps)
  return kernel / kernel.sum()


def discriminator_state_dict(
  params: Any, module: discriminator_lib.Discriminator
) -> collections.OrderedDict:
  """Our discriminator parameters -> the reference's state dict.

  The blur buffers are included, each where the reference's state dict has
  it: `P.0.kernel` just before the weight `P.1.weight` of the same layer.
  """
  layout, buffers = discriminator_layout(module)
  parameters = state_dict_from_layout(params, layout)
  state_dict = collections.OrderedDict()
  for key, value in parameters.items():
    buffer = key.removesuffix('.1.weight') + '.0.kernel'
    if buffer in buffers:
      state_dict[buffer] = blur_kernel(module.blur_kernel)
    state_dict[key] = value
  return state_dict


def torch_adam_state_dict(
  adam: AdamState, layout: Mapping[str, Entry]
) -> dict[str, Any]:
  """AdamState -> a `torch.optim.Adam.state_dict()` for the reference module.

  The moments take the reference layout of their parameters; every
  parameter's step is the shared count, as a 0-d float32 tensor (torch >= 1.12
  keeps it so).
  """
  mu = state_dict_from_layout(adam.mu, layout)
  nu = state_dict_from_layout(adam.nu, layout)
  state = {
    index: {
      'step': np.asarray(adam.count, np.float32),
      'exp_avg': mu[key],
      'exp_avg_sq': nu[key],
    }
    for index, key in enumerate(layout)
  }
  group = {
    'lr': float(adam.hyperparameters['lr']),
    'betas': tuple(float(b) for b in adam.hyperparameters['betas']),
    'eps': float(adam.hyperparameters['eps']),
    **_ADAM_GROUP_DEFAULTS,
    'params': list(range(len(layout))),
  }
  return {'state': state, 'param_groups': [group]}


def training_checkpoint(
  run: TrainingRun,
  generator: generator_lib.CIPS,
  discriminator: discriminator_lib.Discriminator,
) -> dict[str, Any]:
  """A TrainingRun -> the dict the reference's train.py saves, plus 'step'.

  {'g', 'd', 'g_ema': state dicts, 'g_optim', 'd_optim': Adam state dicts,
  'step': completed steps}. `load_training_run` reads it back exactly.
  """
  g_layout = generator_layout(generator)
  d_layout, _ = discriminator_layout(discriminator)
  return {
    'g': generator_state_dict(run.g, generator),
    'd': discriminator_state_dict(run.d, discriminator),
    'g_ema': generator_state_dict(run.g_ema, generator),
    'g_optim': torch_adam_state_dict(run.g_adam, g_layout),
    'd_optim': torch_adam_state_dict(run.d_adam, d_layout),
    'step': int(run.step),
  }
