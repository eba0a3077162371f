"""Checks a training config before anything compiles.

The checks are one table, `RULES`: a row names a field, a test of its value
and what the value must be. Rows may depend on other fields (contradictions)
and on the devices the run has. `validate` reports the first broken row as

    config.data.crop = 512: must be <= config.data.resolution = 256
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Optional

from absl import logging
import jax
import ml_collections

from cips_jax import augment
from cips_jax import configs
from cips_jax import data
from cips_jax import encodings
from cips_jax import errors
from cips_jax import generator as generator_lib
from cips_jax import memory_plan
from cips_jax import models

TRAIN_EMBEDDING_MODES = ('table_on_full_grid',) + encodings.EMBEDDING_MODES


# A config value that cannot work; the message starts with the field's name.
ConfigError = errors.ConfigError


@dataclasses.dataclass(frozen=True)
class _Context:
  """What a rule may look at besides its own field's value."""

  config: ml_collections.ConfigDict
  num_devices: int
  num_processes: int


@dataclasses.dataclass(frozen=True)
class _Rule:
  """One row of the table.

  Attributes:
    field: the dotted name, e.g. 'data.crop'.
    ok: ok(value, context) -> whether the value can work.
    message: what the value must be; formatted with the context's attributes
      (e.g. '{num_devices}', '{config.data.resolution}').
    applies: applies(context) -> whether to check the row at all.
  """

  field: str
  ok: Callable[[Any, _Context], bool]
  message: str
  applies: Callable[[_Context], bool] = lambda context: True


def _power_of_two(value: Any) -> bool:
  return isinstance(value, int) and value > 0 and value & (value - 1) == 0


# The most images logging.num_samples may ask of each sample grid.
MAX_SAMPLE_GRID = 1024


def _int_at_least(low: int) -> Callable[[Any, _Context], bool]:
  return lambda v, _: isinstance(v, int) and v >= low


def _one_of(choices) -> Callable[[Any, _Context], bool]:
  return lambda v, _: v in choices


def _is_policy(value: Any) -> bool:
  if not isinstance(value, str):
    return False
  try:
    augment.parse_policy(value)
  except ValueError:
    return False
  return True


def _boolean(value: Any, _) -> bool:
  return isinstance(value, bool)


POSITIVE = 'must be a positive integer'
BOOLEAN = 'must be True or False'

# Rows run in order: a field's type rows come before any row that compares it
# with another field, so a wrong type is named as such, not hit as a TypeError.
RULES: tuple[_Rule, ...] = (
  # The model.
  _Rule(
    'model.arch',
    _one_of(models.GENERATORS),
    f'must be one of {sorted(models.GENERATORS)}',
  ),
  _Rule(
    'model.size',
    lambda v, _: _power_of_two(v) and 4 <= v <= 1024,
    'must be a power of two between 4 and 1024',
  ),
  *(
    _Rule(f'model.{name}', _int_at_least(1), POSITIVE)
    for name in (
      'hidden_size',
      'style_dim',
      'n_mlp',
      'max_channels',
      'd_max_channels',
      'channel_multiplier',
    )
  ),
  _Rule('model.d_n_first_layers', _int_at_least(0), 'must be >= 0'),
  _Rule(
    'model.activation',
    _one_of(('', 'sin', 'sinrelu')),
    "must be '' (leaky ReLU, the released models), 'sin' or 'sinrelu'",
  ),
  _Rule(
    'model.embedding_mode',
    _one_of(encodings.EMBEDDING_MODES),
    f'must be one of {encodings.EMBEDDING_MODES}',
  ),
  _Rule('model.cylindrical', _boolean, BOOLEAN),
  # The data.
  _Rule(
    'data.name',
    lambda v, _: isinstance(v, str) and bool(v),
    'must name the prepared dataset',
  ),
  _Rule(
    'data.resolution',
    lambda v, _: _power_of_two(v) and v >= 4,
    'must be a power of two >= 4 (the side of the training coordinate grid)',
  ),
  _Rule(
    'data.crop',
    lambda v, _: _power_of_two(v) and v >= 4,
    'must be a power of two >= 4 (the side of the patches D sees)',
  ),
  _Rule(
    'data.crop',
    lambda v, c: v <= c.config.data.resolution,
    'must be <= config.data.resolution = {config.data.resolution}',
  ),
  # Training.
  _Rule('train.global_batch_size', _int_at_least(1), POSITIVE),
  _Rule(
    'train.global_batch_size',
    lambda v, c: v % c.num_devices == 0,
    'must be divisible by the number of devices ({num_devices})',
  ),
  _Rule(
    'train.global_batch_size',
    lambda v, c: v % c.num_processes == 0,
    'must be divisible by the number of processes ({num_processes})',
  ),
  _Rule(
    'train.global_batch_size',
    # D's minibatch standard deviation works on groups of min(batch, 4).
    lambda v, _: v % min(v, 4) == 0,
    'must be divisible by the minibatch-stddev group size min(batch, 4)',
  ),
  _Rule('train.num_steps', _int_at_least(1), 'must be >= 1'),
  _Rule('train.g_lr', lambda v, _: v > 0, 'must be positive'),
  _Rule('train.d_lr', lambda v, _: v > 0, 'must be positive'),
  *(
    _Rule(
      field,
      lambda v, _: len(v) == 2 and all(0 <= b < 1 for b in v),
      'must be two numbers in [0, 1)',
    )
    for field in ('train.g_betas', 'train.d_betas')
  ),
  _Rule('train.r1_every', _int_at_least(1), 'must be >= 1'),
  _Rule('train.r1_gamma', lambda v, _: v >= 0, 'must be >= 0'),
  _Rule('train.ema_decay', lambda v, _: 0 <= v <= 1, 'must be in [0, 1]'),
  _Rule(
    'train.ema_rampup',
    lambda v, _: isinstance(v, (int, float)) and 0 <= v < math.inf,
    'must be >= 0 (0 = a fixed EMA decay; StyleGAN2-ADA ramps with 0.05)',
  ),
  _Rule(
    'train.augment',
    lambda v, _: _is_policy(v),
    'must name DiffAugment policies, comma-separated: '
    f"{', '.join(augment.POLICIES)}; '' = none",
  ),
  _Rule(
    'train.compute_dtype',
    _one_of(('float32', 'bfloat16')),
    "must be 'float32' or 'bfloat16'",
  ),
  _Rule(
    'train.per_image_form',
    _one_of(generator_lib.PER_IMAGE_FORMS),
    f'must be one of {generator_lib.PER_IMAGE_FORMS}',
  ),
  _Rule('train.shard_embedding', _boolean, BOOLEAN),
  _Rule(
    'model.size',
    lambda v, c: v % c.num_devices == 0,
    'must be divisible by the number of devices ({num_devices}) with '
    'train.shard_embedding (the table is split by rows)',
    applies=lambda c: c.config.train.shard_embedding,
  ),
  _Rule(
    'train.embedding_mode',
    _one_of(TRAIN_EMBEDDING_MODES),
    f'must be one of {TRAIN_EMBEDDING_MODES}',
  ),
  # Contradictions between fields.
  _Rule(
    'train.init_generator_from',
    lambda v, _: not v,
    'contradicts train.continue_from (a continued run takes its generator '
    'from the training checkpoint)',
    applies=lambda c: bool(c.config.train.continue_from),
  ),
  _Rule(
    'model.size',
    lambda v, c: v == c.config.data.resolution,
    'must equal config.data.resolution = {config.data.resolution} with '
    "train.embedding_mode = 'table' (the table is read at the training "
    "grid's points)",
    applies=lambda c: c.config.train.embedding_mode == 'table',
  ),
  _Rule(
    'train.embedding_mode',
    _one_of(('bilinear', 'aligned')),
    "must be 'bilinear' or 'aligned' for a cylindrical model (the "
    "reference's table lookup assumes the R x R grid, not windows of a "
    'panorama)',
    applies=lambda c: c.config.model.cylindrical is True,
  ),
  # Logging.
  *(
    _Rule(f'logging.{name}', _int_at_least(1), POSITIVE)
    for name in (
      'log_every',
      'sample_every',
      'checkpoint_every',
      'keep_checkpoints',
    )
  ),
  # The sample grid is rendered whole, on every sample step.
  _Rule(
    'logging.num_samples',
    lambda v, _: isinstance(v, int) and 1 <= v <= MAX_SAMPLE_GRID,
    f'must be in [1, {MAX_SAMPLE_GRID}] (the images of the sample grid)',
  ),
  _Rule('logging.swd_num_images', _int_at_least(0), 'must be >= 0'),
  _Rule(
    'logging.eval_every_steps',
    _int_at_least(0),
    'must be >= 0 (0 = no FID/KID during training)',
  ),
  *(
    _Rule(f'logging.{name}', _int_at_least(2), 'must be an integer >= 2')
    for name in ('eval_num_samples', 'eval_num_real')
  ),
  _Rule(
    'logging.profile_steps',
    _int_at_least(0),
    'must be >= 0 (0 = no profiler trace)',
  ),
)


def _unknown_fields(config, reference, prefix: str = '') -> list[str]:
  """Dotted names of the fields of `config` that the reference recipe lacks."""
  unknown = []
  for key, value in config.items():
    name = f'{prefix}{key}'
    if key not in reference:
      unknown.append(name)
    elif isinstance(value, (dict, ml_collections.ConfigDict)):
      unknown += _unknown_fields(value, reference[key], f'{name}.')
  return unknown


def _value(config, field: str):
  value = config
  for key in field.split('.'):
    if key not in value:
      raise ConfigError(f'config.{field} is missing')
    value = value[key]
  return value


def validate(
  config: ml_collections.ConfigDict,
  num_devices: int,
  num_processes: int = 1,
  memory_bytes: Optional[int] = None,
  *,
  check_data: bool = False,
) -> None:
  """Raises ConfigError naming the first field that cannot work.

  With `check_data`, then raises FileNotFoundError (`data.check_prepared`)
  when the data set is not prepared: no run trains without its data, whatever
  memory it would need. Last, checks that the run fits its devices
  (`check_fits`): `memory_bytes` per device, by default what this process's
  devices have.
  """
  unknown = _unknown_fields(config, configs.reference_config())
  if unknown:
    raise ConfigError(
      ', '.join(f'config.{name}' for name in unknown) + ': not a field of the '
      'training config (see cips_jax/configs.py; data.source, data.to_crop and '
      'data.cylindrical were removed: procedural data sets are known by their '
      'name, larger images are always cropped, and model.cylindrical says '
      'whether the data are panoramas)'
    )
  context = _Context(config, num_devices, num_processes)
  for rule in RULES:
    value = _value(config, rule.field)
    if rule.applies(context) and not rule.ok(value, context):
      message = rule.message.format(
        config=config, num_devices=num_devices, num_processes=num_processes
      )
      raise ConfigError(f'config.{rule.field} = {value!r}: {message}')
  if check_data:
    data.check_prepared(
      config.data.data_dir, config.data.name, config.data.resolution
    )
  check_fits(config, num_devices, memory_bytes)


# Backends whose compiler rematerializes a program to fit the device by
# itself. XLA:TPU does: the churches step in float32 at 4 images per device,
# planned at 29.4 GiB without remat, compiles into 14.3 GiB of a v4
# TensorCore's 16 (docs/tpu_compile.md); there only the remat plan can tell
# that a run cannot fit.
REMATERIALIZING_BACKENDS = ('tpu',)


def check_fits(
  config: ml_collections.ConfigDict,
  num_devices: int,
  memory_bytes: Optional[int] = None,
  backend: Optional[str] = None,
) -> None:
  """Raises ConfigError when the run, as configured, exceeds a device.

  The plan (`memory_plan.plan`, with the config's own train.remat and
  train.compute_dtype) comes from shapes, in a second or two at any size, so
  absurd widths and batches are refused before anything is allocated. On a
  TPU (`backend`, default jax's) the compiler rematerializes what does not
  fit, so the run is refused only when even the remat plan exceeds the
  device, and a log line says what the compiler will recompute. The advice
  names only the remedies the config does not already use.
  """
  backend = backend or jax.default_backend()
  if memory_bytes is None:
    memory_bytes = memory_plan.device_memory_bytes()
    if memory_bytes is not None and backend == 'cpu':
      # Simulated CPU devices share the host's memory.
      memory_bytes //= jax.local_device_count()
  if memory_bytes is None:
    return
  needs = memory_plan.plan(config, num_devices)
  if needs.total_bytes <= memory_bytes:
    return
  if backend in REMATERIALIZING_BACKENDS:
    least = memory_plan.plan(config, num_devices, least=True)
    if least.total_bytes <= memory_bytes:
      logging.warning(
        'the run is planned at %s per device without remat, more than the '
        "device's %s: XLA will rematerialize to fit (more FLOPs per step); "
        'a smaller batch per device leaves it room (train.remat=True does '
        'not: XLA:TPU then needs more, docs/tpu_compile.md)',
        memory_plan.describe(needs.total_bytes),
        memory_plan.describe(memory_bytes),
      )
      return
    needs = least
  describe = memory_plan.describe
  t = config.train
  if needs.state_bytes > memory_bytes:
    field = 'config.model'
    cause = 'its parameters, optimizer state and EMA alone do not fit'
  else:
    field = f'config.train.global_batch_size = {t.global_batch_size}'
    cause = (
      f'at {needs.batch_per_device} images of {config.data.crop}x'
      f'{config.data.crop} per device'
    )
  remedies = _memory_remedies(config, needs, memory_bytes, backend)
  raise ConfigError(
    f'{field}: the run needs about {describe(needs.total_bytes)} per device '
    f'(parameters, optimizer state and EMA {describe(needs.state_bytes)}; '
    f'activations about {describe(needs.activations)}), more than the '
    f'{describe(memory_bytes)} a device has here ({cause}). '
    + '; '.join(remedies)
  )


_WIDTHS = 'model.hidden_size, style_dim, max_channels or d_max_channels'


def _memory_remedies(
  config: ml_collections.ConfigDict,
  needs: memory_plan.Plan,
  memory_bytes: int,
  backend: str,
) -> list[str]:
  """What would bring an oversized run within the device: only the changes
  that shrink what overflows and that the config does not already make."""
  t = config.train
  if needs.state_bytes > memory_bytes:
    # Parameters, Adam's moments and the EMA are float32 and do not depend on
    # the batch, the crop or remat: only narrower networks shrink them.
    return [f'Lower the widths ({_WIDTHS})']
  remedies = []
  if needs.batch_per_device > 1:
    fits = needs.max_batch(memory_bytes)
    remedies.append(
      f'Lower the batch (at most {fits} images per device fit)'
      if fits
      else 'Lower the batch'
    )
  if config.data.crop > 4:
    remedies.append('lower data.crop')
  remedies.append(f'lower the widths ({_WIDTHS})')
  if needs.batch_per_device > 1 and backend != 'cpu':
    # CPU devices share the host's memory: more of them do not add any.
    remedies.append('use more devices (the batch is split over them)')
  if not t.remat and backend not in REMATERIALIZING_BACKENDS:
    remedies.append('set train.remat=True')
  if t.compute_dtype != 'bfloat16':
    remedies.append("set train.compute_dtype='bfloat16'")
  remedies[0] = remedies[0][0].upper() + remedies[0][1:]
  return remedies
