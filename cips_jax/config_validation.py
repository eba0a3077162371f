"""Checks a training config before anything compiles.

Errors name the offending field.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import ml_collections

from cips_jax import configs
from cips_jax import encodings
from cips_jax import generator as generator_lib

TRAIN_EMBEDDING_MODES = ('reference',) + encodings.EMBEDDING_MODES


class ConfigError(ValueError):
  """A config value that cannot work.

  The message starts with the field's dotted name.
  """


def _is_power_of_two(value: Any) -> bool:
  return isinstance(value, int) and value > 0 and value & (value - 1) == 0


def _require(config, field: str, ok: Callable[[Any], bool], what: str) -> None:
  value = config
  for key in field.split('.'):
    if key not in value:
      raise ConfigError(f'config.{field} is missing ({what})')
    value = value[key]
  if not ok(value):
    raise ConfigError(f'config.{field} = {value!r}: {what}')


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


def validate(
  config: ml_collections.ConfigDict, num_devices: int, num_processes: int = 1
) -> None:
  """Raises ConfigError naming the first field that cannot work."""
  unknown = _unknown_fields(config, configs.reference_config())
  if unknown:
    raise ConfigError(
      ', '.join(f'config.{name}' for name in unknown) + ': not a field of the '
      'training config (see cips_jax/configs.py; data.source, data.to_crop and '
      'data.cylindrical were removed: procedural data sets are known by their '
      'name, larger images are always cropped, and model.cylindrical says '
      'whether the data are panoramas)'
    )
  req = functools.partial(_require, config)
  req(
    'model.arch',
    lambda v: v in ('CIPSskip', 'CIPSres'),
    "must be 'CIPSskip' or 'CIPSres'",
  )
  req(
    'model.size',
    lambda v: _is_power_of_two(v) and 4 <= v <= 1024,
    'must be a power of two between 4 and 1024',
  )
  for field in (
    'model.hidden_size',
    'model.style_dim',
    'model.n_mlp',
    'model.max_channels',
    'model.d_max_channels',
    'model.channel_multiplier',
  ):
    req(
      field,
      lambda v: isinstance(v, int) and v >= 1,
      'must be a positive integer',
    )
  req(
    'model.d_n_first_layers',
    lambda v: isinstance(v, int) and v >= 0,
    'must be >= 0',
  )
  req(
    'model.activation',
    lambda v: v in ('', 'sin', 'sinrelu'),
    "must be '' (leaky ReLU, the released models), 'sin' or 'sinrelu'",
  )
  req(
    'model.embedding_mode',
    lambda v: v in encodings.EMBEDDING_MODES,
    f'must be one of {encodings.EMBEDDING_MODES}',
  )

  req(
    'data.name',
    lambda v: isinstance(v, str) and v,
    'must name the prepared dataset',
  )
  req(
    'data.resolution',
    lambda v: _is_power_of_two(v) and v >= 4,
    'must be a power of two >= 4 (the side of the training coordinate grid)',
  )
  req(
    'data.crop',
    lambda v: _is_power_of_two(v) and v >= 4,
    'must be a power of two >= 4 (the side of the patches D sees)',
  )
  req(
    'data.crop',
    lambda v: v <= config.data.resolution,
    f'must be <= config.data.resolution = {config.data.resolution}',
  )

  req(
    'train.global_batch_size',
    lambda v: isinstance(v, int) and v >= 1,
    'must be a positive integer',
  )
  req(
    'train.global_batch_size',
    lambda v: v % num_devices == 0,
    f'must be divisible by the number of devices ({num_devices})',
  )
  req(
    'train.global_batch_size',
    lambda v: v % num_processes == 0,
    f'must be divisible by the number of processes ({num_processes})',
  )
  req(
    'train.global_batch_size',
    lambda v: v % min(v, 4) == 0,
    'must be divisible by the minibatch-stddev group size min(batch, 4)',
  )
  req(
    'train.num_steps', lambda v: isinstance(v, int) and v >= 1, 'must be >= 1'
  )
  for field in ('train.g_lr', 'train.d_lr'):
    req(field, lambda v: v > 0, 'must be positive')
  for field in ('train.g_betas', 'train.d_betas'):
    req(
      field,
      lambda v: len(v) == 2 and all(0 <= b < 1 for b in v),
      'must be two numbers in [0, 1)',
    )
  req('train.r1_every', lambda v: isinstance(v, int) and v >= 1, 'must be >= 1')
  req('train.r1_gamma', lambda v: v >= 0, 'must be >= 0')
  req('train.ema_decay', lambda v: 0 <= v <= 1, 'must be in [0, 1]')
  req(
    'train.compute_dtype',
    lambda v: v in ('float32', 'bfloat16'),
    "must be 'float32' or 'bfloat16'",
  )
  req(
    'train.per_image_form',
    lambda v: v in generator_lib.PER_IMAGE_FORMS,
    f'must be one of {generator_lib.PER_IMAGE_FORMS}',
  )
  req(
    'train.shard_embedding',
    lambda v: isinstance(v, bool),
    'must be True or False',
  )
  if config.train.get('shard_embedding'):
    req(
      'model.size',
      lambda v: v % num_devices == 0,
      f'must be divisible by the number of devices ({num_devices}) with '
      'train.shard_embedding (the table is split by rows)',
    )
  req(
    'train.embedding_mode',
    lambda v: v in TRAIN_EMBEDDING_MODES,
    f'must be one of {TRAIN_EMBEDDING_MODES}',
  )
  req(
    'model.cylindrical', lambda v: isinstance(v, bool), 'must be True or False'
  )
  # Contradictions between fields.
  if config.train.continue_from:
    req(
      'train.init_generator_from',
      lambda v: not v,
      'contradicts train.continue_from (a continued run takes its generator '
      'from the training checkpoint)',
    )
  if config.train.embedding_mode == 'table':
    req(
      'model.size',
      lambda v: v == config.data.resolution,
      f'must equal config.data.resolution = {config.data.resolution} with '
      "train.embedding_mode = 'table' (the table is read at the training "
      "grid's points)",
    )
  if config.model.cylindrical:
    req(
      'train.embedding_mode',
      lambda v: v in ('bilinear', 'aligned'),
      "must be 'bilinear' or 'aligned' for a cylindrical model (the "
      "reference's table lookup assumes the R x R grid, not windows of a "
      'panorama)',
    )

  for field in (
    'logging.log_every',
    'logging.sample_every',
    'logging.checkpoint_every',
    'logging.keep_checkpoints',
    'logging.num_samples',
  ):
    req(
      field,
      lambda v: isinstance(v, int) and v >= 1,
      'must be a positive integer',
    )
  req(
    'logging.swd_num_images',
    lambda v: isinstance(v, int) and v >= 0,
    'must be >= 0',
  )
  req(
    'logging.eval_every_steps',
    lambda v: isinstance(v, int) and v >= 0,
    'must be >= 0 (0 = no FID/KID during training)',
  )
  for field in ('logging.eval_num_samples', 'logging.eval_num_real'):
    req(
      field, lambda v: isinstance(v, int) and v >= 2, 'must be an integer >= 2'
    )
