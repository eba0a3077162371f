"""The memory a training run needs per device, planned from shapes alone.

    plan = memory_plan.plan(config, num_devices=8)
    plan.total_bytes  # parameters + optimizer state + EMA + activations
    memory_plan.device_memory_bytes()  # what this process's device has

Nothing is allocated or compiled: the train state's bytes come exactly from
`jax.eval_shape`, and the step's activations are estimated from the layer
widths. The validator (`config_validation`) refuses a config whose plan
exceeds the device, so an absurd size (`model.style_dim=1000000`) is named at
once instead of hanging in initialisation.

The activation estimate counts what the backward pass must keep per pixel:
each modulated layer's input, style-scaled input, product and pre-activation
(only the input with `train.remat`, which recomputes the rest), in the compute
dtype; and for D, each convolution's output, activation and input at every
level, for the real and fake halves of the D step. Against XLA's memory
analysis of the step compiled on a CPU (`benchmarks/memory_plan.py`,
docs/benchmarks.md "Memory per device") it is within a few tens of percent.
XLA:CPU keeps recomputed values alive as long as saved ones, so the remat
figures are the plan's alone there.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, Optional

import jax
import jax.numpy as jnp
import ml_collections

from cips_jax import discriminator as discriminator_lib
from cips_jax import train_state as train_state_lib

# Arrays per pixel and modulated layer the backward pass keeps: the layer's
# input, the style-scaled input, the product and the pre-activation; with remat
# the input alone.
SAVED_PER_LAYER = 4
SAVED_PER_LAYER_REMAT = 1
# D keeps each convolution's input, output and activation; the D step runs it
# on reals and fakes.
SAVED_PER_CONV = 3
D_PASSES = 2


@dataclasses.dataclass(frozen=True)
class Plan:
  """Bytes per device of one training run."""

  parameters: int  # G and D, float32
  optimizer: int  # Adam's two moments of each
  ema: int  # the EMA copy of G
  activations: int  # the step's, estimated
  batch_per_device: int
  activations_per_image: int  # of one image of the per-device batch

  def max_batch(self, memory_bytes: int) -> int:
    """The largest per-device batch whose plan fits `memory_bytes` (0: none)."""
    free = memory_bytes - self.state_bytes
    return max(free // self.activations_per_image, 0)

  @property
  def state_bytes(self) -> int:
    """Parameters, optimizer state and EMA: what lives between steps."""
    return self.parameters + self.optimizer + self.ema

  @property
  def total_bytes(self) -> int:
    """Everything the plan counts."""
    return self.state_bytes + self.activations


def _bytes(tree: Any, sharded=lambda path: False, num_devices: int = 1) -> int:
  """Bytes per device of an abstract tree; `sharded(path)` leaves are split."""
  total = 0
  for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
    size = math.prod(leaf.shape) * jnp.dtype(leaf.dtype).itemsize
    total += size // num_devices if sharded(path) else size
  return total


def _is_embedding(path) -> bool:
  return any(getattr(key, 'key', None) == 'embedding' for key in path)


def plan(
  config: ml_collections.ConfigDict, num_devices: int, *, least: bool = False
) -> Plan:
  """The per-device memory plan of a training config on `num_devices`.

  `least`: count the activations as with remat whatever the config says, a
  lower bound of what any setting of the run needs.
  """
  gen, disc, _, _, abstract = train_state_lib.abstract_state(config)
  t = config.train
  # train.shard_embedding splits the embedding tables (and their moments) by
  # rows over the devices; everything else is replicated.
  sharded = _is_embedding if t.shard_embedding else lambda path: False
  g = _bytes(abstract.g_params, sharded, num_devices)
  d = _bytes(abstract.d_params, num_devices=num_devices)
  optimizer = _bytes(abstract.g_opt_state, sharded, num_devices) + _bytes(
    abstract.d_opt_state
  )
  batch = max(t.global_batch_size // num_devices, 1)
  itemsize = jnp.dtype(t.compute_dtype).itemsize
  pixels = config.data.crop**2
  saved = SAVED_PER_LAYER_REMAT if t.remat or least else SAVED_PER_LAYER
  g_widths = 2 * gen.hidden_size + 2 * sum(gen.layer_widths())
  g_per_image = pixels * g_widths * saved * itemsize
  channels = discriminator_lib.discriminator_channels(
    disc.size, disc.channel_multiplier, disc.max_channels
  )
  d_per_image = sum(res * res * width for res, width in channels.items())
  d_per_image *= D_PASSES * SAVED_PER_CONV * itemsize
  per_image = g_per_image + d_per_image
  return Plan(
    parameters=g + d,
    optimizer=optimizer,
    ema=g,
    activations=batch * per_image,
    batch_per_device=batch,
    activations_per_image=per_image,
  )


def device_memory_bytes(device: Optional[jax.Device] = None) -> Optional[int]:
  """Memory of `device` (default: this process's first): an accelerator's
  allocator limit, or the host's physical memory for a CPU. None if unknown.
  """
  device = device or jax.local_devices()[0]
  if device.platform == 'cpu':
    return host_memory_bytes()
  stats = device.memory_stats() or {}
  return stats.get('bytes_limit')


def host_memory_bytes() -> Optional[int]:
  """This machine's physical memory; None if unknown."""
  try:
    return os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES')
  except (ValueError, OSError):
    return None


def describe(num_bytes: float) -> str:
  """Bytes as '12.3 GB' (powers of 1024)."""
  for unit in ('B', 'KB', 'MB', 'GB', 'TB', 'PB'):
    if num_bytes < 1024 or unit == 'PB':
      return f'{num_bytes:.1f} {unit}' if unit != 'B' else f'{num_bytes} B'
    num_bytes /= 1024
  raise AssertionError('unreachable')
