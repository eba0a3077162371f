r"""FFHQ 256: the reference recipe on FFHQ.

CIPSskip; the paper reports FID 4.38.

    python -m cips_jax.data folder $FFHQ_IMAGES --name=ffhq --resolution=256 \
        --data_dir=$DATA
    python -m cips_jax.main --config=experiments/ffhq256.py --workdir=$WORKDIR \
        --config.data.data_dir=$DATA

Hardware: as churches.py (global batch 32; 8 GPUs, or a TPU v4-8, v5e-8,
v5p-8 or v6e-8: the same programs as churches, compiled in
docs/tpu_compile.md).
Expected result: FID about 4.4 at 50k samples after 1.2M steps.
"""

from cips_jax import configs


def get_config():
  config = configs.reference_config()
  d = config.data
  d.name = 'image_folder/ffhq'
  # FID/KID in TensorBoard (0 turns it off)
  config.logging.eval_every_steps = 50_000
  return config
