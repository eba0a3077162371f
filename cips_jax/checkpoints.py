"""Orbax checkpoints of generators: export a (module, variables) pair and load it back.

An exported generator is a directory with two orbax items: `params` (the variables) and
`model` (JSON: the class name and its constructor arguments), so it can be rebuilt without
knowing the architecture in advance.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax.numpy as jnp
import orbax.checkpoint as ocp

from cips_jax import generator as generator_lib

GENERATOR_CLASSES = {cls.__name__: cls for cls in (generator_lib.CIPSskip, generator_lib.CIPSres)}
_SKIPPED_FIELDS = ('parent', 'name')


def module_config(module) -> dict[str, Any]:
  """The constructor arguments of a generator as JSON-friendly values (dtype as its name)."""
  config = {}
  for field in dataclasses.fields(module):
    if field.name in _SKIPPED_FIELDS:
      continue
    value = getattr(module, field.name)
    config[field.name] = jnp.dtype(value).name if field.name == 'dtype' else value
  return {'class': type(module).__name__, 'kwargs': config}


def module_from_config(config: dict[str, Any]):
  """Inverse of `module_config`."""
  name = config.get('class')
  if name not in GENERATOR_CLASSES:
    raise ValueError(f'unknown generator class {name!r}; expected one of '
                     f'{sorted(GENERATOR_CLASSES)}')
  kwargs = dict(config['kwargs'])
  if 'dtype' in kwargs:
    kwargs['dtype'] = jnp.dtype(kwargs['dtype'])
  return GENERATOR_CLASSES[name](**kwargs)


def export_generator(directory: str, module, variables: dict[str, Any]) -> None:
  """Writes `variables` and `module`'s configuration as an orbax checkpoint at `directory`.

  Refuses to overwrite an existing directory, so nothing already saved is lost.
  """
  directory = os.path.abspath(directory)
  if os.path.exists(directory):
    raise FileExistsError(f'{directory} exists; choose a new output directory')
  checkpointer = ocp.Checkpointer(ocp.CompositeCheckpointHandler())
  checkpointer.save(directory, ocp.args.Composite(
      params=ocp.args.StandardSave({'params': variables['params']}),
      model=ocp.args.JsonSave(module_config(module))))


def load_generator(directory: str):
  """Reads an exported generator: returns `(module, variables)`."""
  directory = os.path.abspath(directory)
  if not os.path.isdir(directory):
    raise FileNotFoundError(f'no exported generator at {directory}')
  checkpointer = ocp.Checkpointer(ocp.CompositeCheckpointHandler())
  restored = checkpointer.restore(directory, ocp.args.Composite(
      params=ocp.args.StandardRestore(), model=ocp.args.JsonRestore()))
  return module_from_config(restored['model']), {'params': restored['params']['params']}
