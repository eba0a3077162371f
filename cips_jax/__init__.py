"""cips_jax: CIPS (Conditionally-Independent Pixel Synthesis) in JAX/Flax.

    from cips_jax import models, grids, sampling, convert
"""

__version__ = '0.1.0'

from cips_jax import grids, models, sampling  # noqa: E402  (the public API)

__all__ = ['grids', 'models', 'sampling', 'convert', 'checkpoints', 'torch_pickle']


def __getattr__(name):
  # convert and checkpoints pull in the checkpoint readers and orbax: import them lazily.
  if name in ('convert', 'checkpoints', 'torch_pickle'):
    import importlib
    return importlib.import_module(f'cips_jax.{name}')
  raise AttributeError(f'module cips_jax has no attribute {name!r}')
