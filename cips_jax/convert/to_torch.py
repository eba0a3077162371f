"""Our layout -> the reference's: state dicts and training checkpoints.

What `from_torch` reads, written back for PyTorch: generator and discriminator
state dicts (blur buffers included), Adam state dicts, and the training
checkpoint the reference's train.py resumes from. Every array is the exact
inverse of its layout conversion, bit for bit.
"""

from __future__ import annotations

import collections
from typing import Any, Mapping

import flax
import numpy as np

from cips_jax import discriminator as discriminator_lib
from cips_jax import generator as generator_lib
from cips_jax.convert import layouts
from cips_jax.convert import runs

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


def _to_reference(value: np.ndarray, entry: layouts.Entry) -> np.ndarray:
  """Our array -> the reference tensor of `entry`, bit for bit.

  Every conversion in a layout only moves elements (transposes, reshapes, the
  row order of `final_linear.0.weight`), so its exact inverse is found by
  converting the element indices of the reference shape. `value` has our shape
  (what `entry`'s conversion makes of the reference shape); the result has the
  reference shape `entry[1]` and `value`'s dtype.
  """
  path, shape, to_ours = entry
  value = np.asarray(value)
  positions = to_ours(np.arange(int(np.prod(shape))).reshape(shape))
  if positions.shape != value.shape:
    raise layouts.CheckpointMismatchError(
      f'{"/".join(path)}: shape {value.shape}, the layout expects '
      f'{positions.shape}'
    )
  flat = np.empty(positions.size, value.dtype)
  flat[positions.reshape(-1)] = value.reshape(-1)
  return flat.reshape(shape)


def _state_dict_from_layout(
  params: Any, layout: Mapping[str, layouts.Entry]
) -> collections.OrderedDict:
  """`params` (our tree) -> the reference state dict, in its key order."""
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(params))
  missing = [key for key, entry in layout.items() if entry[0] not in flat]
  if missing:
    raise layouts.CheckpointMismatchError(
      'the parameters lack what the reference keys need: ' + ', '.join(missing)
    )
  return collections.OrderedDict(
    (key, _to_reference(flat[entry[0]], entry)) for key, entry in layout.items()
  )


def generator_state_dict(
  params: Any, module: generator_lib.CIPS
) -> collections.OrderedDict:
  """Our generator parameters -> the reference's state dict for `module`."""
  return _state_dict_from_layout(params, layouts.generator_layout(module))


def blur_kernel(taps=(1, 3, 3, 1)) -> np.ndarray:
  """The reference's 2-D blur buffer: outer(taps, taps), summing to 1.

  (len(taps), len(taps)) float32, (4, 4) by default.
  """
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
  layout, buffers = layouts.discriminator_layout(module)
  parameters = _state_dict_from_layout(params, layout)
  state_dict = collections.OrderedDict()
  for key, value in parameters.items():
    buffer = key.removesuffix('.1.weight') + '.0.kernel'
    if buffer in buffers:
      state_dict[buffer] = blur_kernel(module.blur_kernel)
    state_dict[key] = value
  return state_dict


def _torch_adam_state_dict(
  adam: runs.AdamState, layout: Mapping[str, layouts.Entry]
) -> dict[str, Any]:
  """AdamState -> a `torch.optim.Adam.state_dict()` for the reference module.

  The moments take the reference layout of their parameters; every
  parameter's step is the shared count, as a 0-d float32 tensor (torch >= 1.12
  keeps it so).
  """
  mu = _state_dict_from_layout(adam.mu, layout)
  nu = _state_dict_from_layout(adam.nu, layout)
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
  run: runs.TrainingRun,
  generator: generator_lib.CIPS,
  discriminator: discriminator_lib.Discriminator,
) -> dict[str, Any]:
  """A TrainingRun -> the dict the reference's train.py saves, plus 'step'.

  {'g', 'd', 'g_ema': state dicts, 'g_optim', 'd_optim': Adam state dicts,
  'step': completed steps}. `load_training_run` reads it back exactly.
  """
  g_layout = layouts.generator_layout(generator)
  d_layout, _ = layouts.discriminator_layout(discriminator)
  return {
    'g': generator_state_dict(run.g, generator),
    'd': discriminator_state_dict(run.d, discriminator),
    'g_ema': generator_state_dict(run.g_ema, generator),
    'g_optim': _torch_adam_state_dict(run.g_adam, g_layout),
    'd_optim': _torch_adam_state_dict(run.d_adam, d_layout),
    'step': int(run.step),
  }
