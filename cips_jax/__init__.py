"""cips_jax: CIPS (Conditionally-Independent Pixel Synthesis) in JAX/Flax.

    from cips_jax import models, grids, sampling, convert
    from cips_jax import loading
    gen, variables = loading.open_generator('pretrained/noto_emoji')

The public modules are imported with the package; importing it changes no
process state. The command lines are `python -m cips_jax.main` (train),
`.sample`, `.evaluate`, `.convert` and `.data`; nothing in the library imports
them.
"""

from cips_jax import checkpoints
from cips_jax import convert
from cips_jax import errors
from cips_jax import grids
from cips_jax import models
from cips_jax import sampling
from cips_jax import torch_pickle

__version__ = '0.1.0'

__all__ = [
  'checkpoints',
  'convert',
  'errors',
  'grids',
  'models',
  'sampling',
  'torch_pickle',
]
