r"""Noto Emoji, the recipe chosen by measurement: DiffAugment at width 64.

experiments/emoji.py with the winner of the equal-time ablation
(docs/emoji_ablation.md: FID 125.0 after 22 minutes on one core, against
327.1 for emoji.py's own recipe):
- DiffAugment's colour, translation and cutout policies on the reals and
  fakes D sees, with StyleGAN2-ADA's EMA ramp-up of 0.05;
- width 64 in G and D (hidden size and channels; the style stays 128): at
  this budget more steps beat a wider network, 1.57 steps/s on one core
  against 0.6 at width 128;
- R1 gamma 0.01, StyleGAN2-ADA's rule for this size (0.0002 * 32^2 / 16).

Data as in experiments/emoji.py (noto_emoji, 32x32); then

    python -m cips_jax.main --config=experiments/emoji_diffaug.py \
        --workdir=/tmp/emoji_diffaug --config.data.data_dir=DATA
    python -m cips_jax.evaluate --workdir=/tmp/emoji_diffaug \
        --num_samples=3786 --num_real=3786

`train.num_steps` is an upper bound: the model in the box,
pretrained/noto_emoji, is this run stopped at its wall-clock budget (SIGTERM,
which saves a checkpoint); its model card gives the step, the time and the
CPU. The FID curve during training is of 500 samples against all 3,786 emoji,
whose statistics the evaluate command then reuses from the run's fid_stats/.

Measured (the model in the box): stopped at 135 minutes on both cores of the
project's 2-core AMD EPYC, at step 18,236 (about 2.25 steps/s, statistics and
evaluations included); by the evaluate command on all 3,786 emoji against
3,786 samples, FID 72.2 and KID 0.0391 +- 0.0014 (the first model, emoji.py's
recipe: 104.1 and 0.0595).
"""

import pathlib

from cips_jax import configs


def get_config():
  # experiments/ is a folder of config files, not a package: the base
  # recipe is read from its file, as the training command would.
  config = configs.from_file(pathlib.Path(__file__).with_name('emoji.py'))
  m = config.model
  m.hidden_size = m.max_channels = m.d_max_channels = 64
  t = config.train
  t.augment = 'color,translation,cutout'
  t.ema_rampup = 0.05
  t.r1_gamma = 0.01
  t.num_steps = 30_000
  log = config.logging
  log.checkpoint_every = 1000
  log.eval_every_steps = 3000
  log.eval_num_samples = 500
  log.eval_num_real = 3786
  return config
