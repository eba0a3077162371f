"""360-degree panoramas: a cylindrical CIPS trained on windows of panoramas.

Its panoramas render seamlessly.

Design. The horizontal coordinate is an angle: x in [-1, 1) covers the full 360
degrees of a panorama W pixels wide (column c sits at x = -1 + 2c / W),
y = linspace(-1, 1, H) as usual. The generator is built with `cylindrical=True`:
its Fourier features see (cos pi x, sin pi x, y), so every learned frequency is
periodic in x, and its coordinate-embedding table wraps along x. Training takes
H x H windows at any horizontal offset of the panorama (wrapping around the
seam), with the window's own angular coordinates; D sees the window's pixels
only. Because the model is a periodic function of the angle, x = -1 and x = 1
are the same place and a render of the whole circle closes without a seam: no
blending or padding is involved.

    python -m cips_jax.main --config=experiments/panorama.py --workdir=$WORKDIR

Data: the embedded procedural panoramas (64 x 256, generated on first use), or
your own equirectangular panoramas with --config.data.name=image_folder/NAME
(prepare them with the folder builder at --resolution=H; they must span 360
degrees).
Hardware: one GPU (30k steps at batch 16 of 64 x 64 windows), or any TPU slice
of docs/tpu_compile.md (XLA:TPU compiles the step at 2 windows per device into
under 0.4 GiB per device on v4, v5e, v5p and v6e); not yet trained to
convergence in this project, so the expectation is unmeasured. A 64-wide version
(hidden/style/channels 64, n_mlp 2, batch 8) trained 1200 steps in 20 min on 2
CPU cores gives blurry panoramas whose wrap-around step is 1.01-1.28x the mean
column step (README, "Sample").
Expected result: sample grids under WORKDIR/samples/ show whole 64 x 256
panoramas (the grid x = -1 + 2c / 256); x = -1 and x = 1 render identical pixels
(tested), so the seam column is no different from any other column boundary.
"""

from cips_jax import configs


def get_config():
  config = configs.reference_config()
  m = config.model
  m.size, m.hidden_size, m.style_dim, m.n_mlp = 64, 128, 128, 4
  m.max_channels, m.d_max_channels = 128, 128
  m.cylindrical = True
  d = config.data
  d.name = 'procedural_landscapes/panorama_s64'
  d.resolution, d.crop = 64, 64
  d.flip = True  # a mirrored panorama is still a panorama
  t = config.train
  t.global_batch_size = 16
  t.num_steps = 30_000
  t.ema_decay = 0.5 ** (t.global_batch_size / 5000)
  t.embedding_mode = 'bilinear'
  log = config.logging
  log.log_every, log.sample_every, log.checkpoint_every = 100, 1000, 5000
  log.swd_num_images = 256
  return config
