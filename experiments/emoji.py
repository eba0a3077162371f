r"""Noto Emoji: a CIPSskip-32 on the 3,786 emoji of Google's Noto set, on a CPU.

The data are the 64x64 PNGs of the npm package emoji-datasource-google
(Noto Emoji, Apache License 2.0), composited on white and resized to 32x32:

    npm pack emoji-datasource-google@16.0.0
    tar xzf emoji-datasource-google-16.0.0.tgz
    python -m cips_jax.data folder package/img/google/64 --data_dir=DATA \
        --resolution=32 --name=noto_emoji
    python -m cips_jax.main --config=experiments/emoji.py --workdir=/tmp/emoji \
        --config.data.data_dir=DATA

Hardware: the project's 2-core CPU. Measured: 83 minutes for the whole run
(5,000 steps at about 1.15 steps/s, the real images' Inception statistics once
and five FID evaluations of 500 samples), 80,000 images seen.
Result: samples a person reads as emoji (round faces, people, hands and
objects on white, blurry at this budget); the sliced Wasserstein distance of
EMA samples falls 15x (912.8 -> 61.6), FID of 500 samples against 2,000 real
emoji 291.5 (step 1000) -> 135.2 (step 5000). Its EMA generator was the first
model in the box (pretrained/noto_emoji up to commit 0c7ae0e): by the evaluate
command on all 3,786 emoji against 3,786 samples, FID 104.1 and KID 0.0595 +-
0.0016. The model in the box now comes from experiments/emoji_diffaug.py, this
recipe with the changes that won the equal-time ablation
(benchmarks/emoji_ablation.py, whose variants are overrides of this file).
"""

from cips_jax import configs


def get_config():
  config = configs.reference_config()
  m = config.model
  m.size, m.hidden_size, m.style_dim, m.n_mlp = 32, 128, 128, 4
  m.max_channels, m.d_max_channels = 128, 128
  d = config.data
  d.name, d.data_dir = 'image_folder/noto_emoji', '~/tensorflow_datasets'
  d.resolution, d.crop = 32, 32
  d.flip = False  # emoji are not mirror-symmetric (text, flags, hands)
  t = config.train
  t.global_batch_size = 16
  t.num_steps = 5000
  # R1 as StyleGAN2-ADA scales it for small images (0.0002 * side^2 / batch
  # is about 0.01 here; 10 is the 256^2 recipe's): a little more, for a short
  # run on a small set.
  t.r1_gamma = 0.1
  t.ema_decay = 0.5 ** (t.global_batch_size / 5_000)
  log = config.logging
  log.log_every, log.sample_every, log.checkpoint_every = 100, 1000, 1000
  log.num_samples = 36
  log.swd_num_images = 512
  # FID/KID of 500 samples against 2,000 real emoji every 1,000 steps: the
  # curve in pretrained/noto_emoji/ (the model card's final figures come from
  # the evaluate command on more images).
  log.eval_every_steps = 1000
  log.eval_num_samples = 500
  log.eval_num_real = 2000
  return config
