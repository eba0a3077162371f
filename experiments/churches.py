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
weeks; the same global batch runs on any number of devices that divides it
(8 GPUs, a TPU v3-8, a v4-32 pod slice with one process per host). bfloat16
compute (--config.train.compute_dtype=bfloat16) and --config.train.remat=True
let 256x256 batches fit on smaller accelerators.
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
