"""LSUN Churches 256: the reference recipe exactly.

CIPSskip, the paper's FID 2.92 model.

    python -m cips_jax.main --config=experiments/churches.py --workdir=$WORKDIR

Data: prepare once with `python -m cips_jax.data lsun --data_dir=$DATA` (needs
the `lsun` extra, `pip install -e '.[lsun]'`: the tfds catalog builder uses
TensorFlow to prepare; reading for training does not), then add
--config.data.data_dir=$DATA.
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
