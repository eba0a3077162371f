"""The model namespace users import.

Generators, the mapping network, the discriminator and `init`.
"""

from __future__ import annotations

from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from cips_jax import errors
from cips_jax.discriminator import Discriminator
from cips_jax.generator import CIPSres
from cips_jax.generator import CIPSskip
from cips_jax.layers import MappingNetwork

__all__ = [
  'CIPSskip',
  'CIPSres',
  'MappingNetwork',
  'Discriminator',
  'init',
  'param_count',
  'generator_from_config',
]

# The one registry of generator classes, by the name configs and exported
# generators give (config.model.arch, an export's 'class').
GENERATORS = {cls.__name__: cls for cls in (CIPSskip, CIPSres)}


def generator_from_config(
  model: Mapping[str, Any],
  dtype: Any = jnp.float32,
  remat: bool = False,
  per_image_form: str = 'auto',
):
  """The generator that a `config.model` section describes.

  The section is a ConfigDict or its dict; dtype, remat and per_image_form
  (see `generator.CIPS`) are how it computes, not what it is.
  """
  if model['arch'] not in GENERATORS:
    raise errors.InputError(
      f'model.arch = {model["arch"]!r}: expected one of {sorted(GENERATORS)}'
    )
  return GENERATORS[model['arch']](
    size=model['size'],
    hidden_size=model['hidden_size'],
    style_dim=model['style_dim'],
    n_mlp=model['n_mlp'],
    lr_mlp=model['lr_mlp'],
    channel_multiplier=model['channel_multiplier'],
    # Configs spell the released models' activation '' (configs.py).
    activation=model['activation'] or None,
    max_channels=model['max_channels'],
    embedding_mode=model['embedding_mode'],
    cylindrical=model['cylindrical'],
    # Accepts names such as 'bfloat16' as well as dtypes.
    dtype=jnp.dtype(dtype),
    remat=remat,
    per_image_form=per_image_form,
  )


def init(module: nn.Module, rng: jax.Array) -> dict[str, Any]:
  """Initialises any model of this package.

  Returns Flax variables `{'params': ...}`. Generators are initialised through
  their whole path (mapping network included) on one pixel; the discriminator on
  one image of its size.
  """
  if isinstance(module, tuple(GENERATORS.values())):
    # One pixel: no parameter's shape depends on the pixel count, and
    # `generate` runs the mapping network too, so its parameters are created.
    z = jnp.zeros((1, module.style_dim), jnp.float32)
    coords = jnp.zeros((1, 2), jnp.float32)
    return module.init(rng, z, coords, method=type(module).generate)
  if isinstance(module, MappingNetwork):
    return module.init(rng, jnp.zeros((1, module.style_dim), jnp.float32))
  if isinstance(module, Discriminator):
    # A whole image: D accepts only (B, size, size, input_channels).
    images = jnp.zeros(
      (1, module.size, module.size, module.input_channels), jnp.float32
    )
    return module.init(rng, images)
  raise TypeError(f'models.init does not know {type(module).__name__}')


def param_count(variables: Any) -> int:
  """Number of scalar parameters in `variables['params']`.

  The leaves may be arrays or ShapeDtypeStructs.
  """
  leaves = jax.tree_util.tree_leaves(variables['params'])
  return sum(int(leaf.size) for leaf in leaves)
