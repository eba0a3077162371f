"""A tiny training config for the end-to-end tests: 8x8 CIPSskip, 16-wide, batch
4.

The tests set `data.data_dir` to the session's temporary data folder
(`support.tiny_config`, `support.tiny_run_flags`); nothing here names a fixed
path.
"""

from cips_jax import configs


def get_config():
  config = configs.reference_config()
  m = config.model
  m.size, m.hidden_size, m.style_dim, m.n_mlp = 8, 16, 16, 1
  m.max_channels, m.d_max_channels = 16, 16
  config.data.name = 'procedural_landscapes/s32'
  d = config.data
  d.resolution, d.crop = 8, 8
  t = config.train
  t.global_batch_size, t.num_steps, t.r1_every = 4, 40, 4
  log = config.logging
  log.log_every, log.sample_every, log.checkpoint_every = 5, 20, 20
  log.num_samples, log.keep_checkpoints = 4, 20
  return config
