"""LSUN Churches 256: the reference recipe exactly.

CIPSskip, the paper's FID 2.92 model.

    python -m cips_jax.main --config=experiments/churches.py --workdir=$WORKDIR

Data: prepare LSUN's church_outdoor_train_lmdb (or the LMDB the official
prepare_data.py wrote) once, without TensorFlow (`pip install -e '.[lmdb]'`):
    python -m cips_jax.data lmdb church_outdoor_train_lmdb/ --data_dir=$DATA \
        --resolution=256 --name=church_outdoor
then add --config.data.data_dir=$DATA. (The TFDS catalog builder, `python -m
cips_jax.data lsun`, needs TensorFlow to prepare; train on it with
--config.data.name=lsun/church_outdoor.)
Hardware: the reference used 8 GPUs x batch 4 (global batch 32) for about two
weeks; the same global batch runs on any number of devices that divides it.
Compiled by XLA:TPU at 4 images per device (docs/tpu_compile.md), with the
per-image styles as modulated activations, this config as shipped (float32)
fits a v4-8 (14.3 of the 15.25 GiB XLA allocates from per TensorCore), a v5e-8
(14.4 of 15.75), a v5p-8 (36.9 of 95.7, at 4 per chip; its 4 chips take 8 each
at the recipe's batch) and a v6e-8 (29.4 of 31.25). On v4 and v5e XLA
rematerializes to fit, which costs FLOPs (15% more than the program v5p
compiles); more chips (a v5e-16 or v4-32 at 2 per device) leave it room;
train.remat=True does not (XLA then needs more). On TPUs 'auto' folds the
styles into the weights, which needs less: 8.4 GiB on a v5e chip in bfloat16.
On GPUs the plan asks about 29 GiB per device: 8 GPUs of 40 GB or more, or
bfloat16 (--config.train.compute_dtype=bfloat16, 15 GiB) with
--config.train.remat=True on smaller ones.
Expected result: FID about 2.9 at 50k samples after the full 1.2M steps (38.4M
images), as the paper reports; sample grids every 500 steps, checkpoints every
20k, FID and KID every 50k steps in TensorBoard (eval/fid, eval/kid).
"""

from cips_jax import configs


def get_config():
  config = configs.reference_config()
  # FID/KID of 50k EMA samples (Inception weights: see the README; 0 turns it
  # off)
  config.logging.eval_every_steps = 50_000
  return config
