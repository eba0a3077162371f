r"""The shipped panorama model: a small cylindrical CIPS trained on a CPU.

A 64-wide version of experiments/panorama.py (hidden, style and channel
widths 64, a 2-layer mapping network), trained on 32 x 32 patches of the
64 x 64 windows of the procedural 360-degree panoramas: the reference's
patch training, 4x fewer pixels per step than whole windows. Its EMA
generator is the second model in the box, pretrained/panorama_cpu (model
card: pretrained/panorama_cpu/README.md):

    python -m cips_jax.main --config=experiments/panorama_cpu.py \
        --workdir=/tmp/panorama_cpu
    python -m cips_jax.convert --checkpoint=/tmp/panorama_cpu \
        --output=pretrained/panorama_cpu

Hardware: the project's 2-core CPU; the model card gives the measured time.
Data: the embedded procedural panoramas (64 x 256, generated on first use).
Expected result: blurry panoramas (a sky, a glow at the horizon, dark
ground) that close without a seam at any budget: the generator is periodic
in x by construction.
"""

import pathlib

from cips_jax import configs


def get_config():
  # experiments/ is a folder of config files, not a package: the base
  # recipe is read from its file, as the training command would.
  config = configs.from_file(pathlib.Path(__file__).with_name('panorama.py'))
  m = config.model
  m.hidden_size = m.style_dim = m.max_channels = m.d_max_channels = 64
  m.n_mlp = 2
  config.data.crop = 32  # 32 x 32 patches of the 64 x 64 windows
  t = config.train
  t.global_batch_size = 8
  t.num_steps = 3000
  t.ema_decay = 0.5 ** (t.global_batch_size / 1000)  # a short run
  log = config.logging
  log.log_every, log.sample_every, log.checkpoint_every = 100, 500, 250
  log.num_samples = 8
  log.swd_num_images = 128
  return config
