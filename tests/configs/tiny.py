"""A tiny training config for the end-to-end tests: 8x8 CIPSskip, 16-wide, batch
4.
"""

from cips_jax import configs


def get_config():
  config = configs.reference_config()
  m = config.model
  m.size, m.hidden_size, m.style_dim, m.n_mlp = 8, 16, 16, 1
  m.max_channels, m.d_max_channels = 16, 16
  d = config.data
  d.name, d.data_dir = 'procedural_landscapes/s32', '/tmp/cips_jax_test_data'
  d.resolution, d.crop = 8, 8
  t = config.train
  t.global_batch_size, t.num_steps, t.r1_every = 4, 40, 4
  log = config.logging
  log.log_every, log.sample_every, log.checkpoint_every = 5, 20, 20
  log.num_samples, log.keep_checkpoints = 4, 20
  return config
