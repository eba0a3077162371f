r"""Quickstart: a small CIPS on 32x32 procedural landscapes.

It trains on a laptop CPU in minutes.

    python -m cips_jax.main --config=experiments/quickstart.py \
        --workdir=/tmp/cips_quickstart

Hardware: 2 CPU cores are enough (8 min 41 s on the project's 2-core machine,
data generation included; 2.6 steps/s).
Data: the embedded procedural landscapes (generated on first use, no download).
Expected result: sample grids under WORKDIR/samples/ show the data's sky
gradients, glowing horizons and dark ground (blurry at this budget), and the
sliced Wasserstein distance between EMA samples and real images, logged at the
start and the end, falls about 7x (976.8 -> 132.7).
"""

from cips_jax import configs


def get_config():
  config = configs.reference_config()
  m = config.model
  m.size, m.hidden_size, m.style_dim, m.n_mlp = 32, 64, 64, 2
  m.max_channels, m.d_max_channels = 64, 64
  d = config.data
  d.name, d.data_dir = 'procedural_landscapes/s32', '~/tensorflow_datasets'
  d.resolution, d.crop = 32, 32
  t = config.train
  t.global_batch_size = 16
  t.num_steps = 1300
  # a shorter half-life for a short run
  t.ema_decay = 0.5 ** (t.global_batch_size / 2000)
  log = config.logging
  log.log_every, log.sample_every, log.checkpoint_every = 50, 500, 1000
  log.num_samples = 16
  log.swd_num_images = 256
  return config
