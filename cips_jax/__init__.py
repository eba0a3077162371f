"""cips_jax: CIPS (Conditionally-Independent Pixel Synthesis) in JAX/Flax.

    from cips_jax import models, grids, sampling, convert

Submodules load on first use, so `import cips_jax` alone does not import JAX: the command-line
entry points configure the host allocator first (see `cips_jax.host_malloc`).
"""

__version__ = '0.1.0'

__all__ = ['grids', 'models', 'sampling', 'convert', 'checkpoints', 'torch_pickle']


def __getattr__(name):
  if name in __all__:
    import importlib
    return importlib.import_module(f'cips_jax.{name}')
  raise AttributeError(f'module cips_jax has no attribute {name!r}')


def __dir__():
  return sorted(list(globals()) + __all__)
