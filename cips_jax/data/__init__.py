"""Training data: procedural landscapes, image folders, LSUN, input pipeline.

    from cips_jax import data
    # made on first use:
    source = data.open_source('/data', 'procedural_landscapes/s32')
    # prepared before:
    source = data.load_source('/data', 'image_folder/churches_256')
    batches = data.TrainBatches(
        source, global_batch_size=32, resolution=32, crop=16, seed=0
    )
    batch = batches.batch_at(step)  # {'image', 'coords', 'scale'}

Neither preparing nor reading needs TensorFlow (except preparing LSUN through
the tfds catalog). `builders` holds the tfds builders, `preparation` prepares
data sets (`python -m cips_jax.data` from the shell), `sources` opens them.
"""

from cips_jax.data.builders import ImageFolder
from cips_jax.data.builders import ImageFolderConfig
from cips_jax.data.builders import ProceduralLandscapes
from cips_jax.data.pipeline import TrainBatches
from cips_jax.data.pipeline import coordinate_grid
from cips_jax.data.preparation import prepare_image_folder
from cips_jax.data.preparation import prepare_lmdb
from cips_jax.data.preparation import prepare_lsun_churches
from cips_jax.data.preparation import prepare_procedural
from cips_jax.data.procedural import landscape
from cips_jax.data.procedural import panorama
from cips_jax.data.sources import check_prepared
from cips_jax.data.sources import load_source
from cips_jax.data.sources import open_source

__all__ = [
  'ImageFolder',
  'ImageFolderConfig',
  'ProceduralLandscapes',
  'TrainBatches',
  'check_prepared',
  'coordinate_grid',
  'landscape',
  'load_source',
  'open_source',
  'panorama',
  'prepare_image_folder',
  'prepare_lmdb',
  'prepare_lsun_churches',
  'prepare_procedural',
]
