r"""FFHQ 1024 as the reference's progressive model.

The 256 architecture fine-tuned on 1024. The released "ffhq1024" checkpoint is a
CIPSskip-256 (a 256^2 embedding table) rendered on a 1024^2 coordinate grid.
This config continues a 256 model on multi-scale 256x256 patches of the 1024
grid (the reference's --coords_size 1024 --crop 256): D sees 256 patches, either
a local full-resolution window or the whole image strided down, and G learns to
be sharp at 1024 while its embedding is read bilinearly.

    python -m cips_jax.data folder $FFHQ_IMAGES --name=ffhq1024 \
        --resolution=1024 --data_dir=$DATA
    python -m cips_jax.main --config=experiments/ffhq1024.py \
        --workdir=$WORKDIR --config.data.data_dir=$DATA \
        --config.train.init_generator_from=$FFHQ256_WORKDIR_EXPORT_OR_ffhq256.pt

Hardware: 8 GPUs, or a TPU v4-8, v5e-8, v5p-8 or v6e-8 (batch 32 of 256
patches: the shapes, cost and memory of churches.py's step in bfloat16, which
XLA:TPU compiles at 4 images per device into 14.1, 14.9, 40.3 and 30.3 GiB of
15.25, 15.75, 95.7 and 31.25; docs/tpu_compile.md).
Expected result: the reference reports FID 10.07 at 1024 for its progressive
model.
"""

from cips_jax import configs


def get_config():
  config = configs.reference_config()
  d = config.data
  d.name = 'image_folder/ffhq1024'
  d.resolution, d.crop = 1024, 256
  config.train.num_steps = 200_000
  config.train.compute_dtype = 'bfloat16'
  # FID/KID in TensorBoard (0 turns it off)
  config.logging.eval_every_steps = 50_000
  return config
