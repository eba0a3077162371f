r"""Landscapes: CIPSres on random 256 crops of larger photos.

CIPSres is the architecture of the released Landscapes model.

    python -m cips_jax.data folder $PHOTOS --name=landscapes --resolution=256 \
        --data_dir=$DATA
    python -m cips_jax.main --config=experiments/landscapes.py \
        --workdir=$WORKDIR --config.data.data_dir=$DATA

Photos are stored with their shorter side at 256 and random 256x256 windows are
cropped at every step (the reference's --to_crop), so wide photos give many
different crops.
Hardware: as churches.py, except a TPU v5e: there XLA:TPU refuses the float32
step at 4 images per chip (16.9 GiB of temporaries, 15.75 available; with
train.remat=True 23.2), so use --config.train.compute_dtype=bfloat16 (14.9
GiB) or 2 images per chip (a v5e-16); docs/tpu_compile.md.
Expected result: the paper reports FID 3.61 on its (unreleased) Flickr
landscapes set; any folder of landscape photos works.
"""

from cips_jax import configs


def get_config():
  config = configs.reference_config()
  config.model.arch = 'CIPSres'
  d = config.data
  d.name = 'image_folder/landscapes'
  # FID/KID in TensorBoard (0 turns it off)
  config.logging.eval_every_steps = 50_000
  return config
