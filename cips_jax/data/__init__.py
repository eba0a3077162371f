"""Training data: procedural landscapes, image folders, LSUN, and the input pipeline.

    from cips_jax import data
    data.prepare_procedural('/data', 's32')                     # or python -m cips_jax.data ...
    source = data.load_source('/data', 'procedural_landscapes/s32')
    batches = data.TrainBatches(source, global_batch_size=32, resolution=32, crop=16, seed=0)
    batch = batches.batch_at(step)                              # {'image', 'coords', 'scale'}

Neither preparing nor reading needs TensorFlow (except preparing LSUN); see `builders`.
"""

from cips_jax.data.pipeline import TrainBatches, coordinate_grid
from cips_jax.data.procedural import landscape, panorama

# The builders import tensorflow_datasets (a second or two): load them on first use.
_BUILDER_NAMES = ('ImageFolder', 'ImageFolderConfig', 'ProceduralConfig', 'ProceduralLandscapes',
                  'find_images', 'load_source', 'prepare_command', 'prepare_image_folder',
                  'prepare_lsun_churches', 'prepare_procedural')

__all__ = ['TrainBatches', 'coordinate_grid', 'landscape', 'panorama', *_BUILDER_NAMES]


def __getattr__(name):
  if name in _BUILDER_NAMES or name == 'builders':
    import importlib  # import_module: `from cips_jax.data import builders` would recurse here
    builders = importlib.import_module('cips_jax.data.builders')
    return builders if name == 'builders' else getattr(builders, name)
  raise AttributeError(f'module cips_jax.data has no attribute {name!r}')
