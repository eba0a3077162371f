"""The reference training recipe as an ml_collections config.

The files in experiments/ start from it. Every field is documented where it is
set. Values are the reference's (`docs/reference.md` section 3): CIPSskip 256,
global batch 32, Adam with StyleGAN2's lazy-regularisation corrections, R1 gamma
10 every 16 steps, EMA half-life of 10k images at batch 32.
"""

from __future__ import annotations

import importlib.util
import os

import ml_collections

BASE_LR = 0.002
# the reference rescales G's Adam as if G had a lazy regulariser every 4 steps
G_REG_EVERY = 4
D_REG_EVERY = 16  # R1 interval


def lazy_regularisation_adam(
  reg_every: int,
) -> tuple[float, tuple[float, float]]:
  """(lr, betas) of StyleGAN2's Adam correction c = k / (k + 1).

  Returns lr * c and betas ** c.
  """
  ratio = reg_every / (reg_every + 1)
  return BASE_LR * ratio, (0.0**ratio, 0.99**ratio)


def from_file(path: str | os.PathLike) -> ml_collections.ConfigDict:
  """`get_config()` of a config file such as experiments/emoji.py.

  The file is read as the training command's --config flag reads it, so one
  config file can build on another (experiments/ is not a package).
  """
  spec = importlib.util.spec_from_file_location('config_file', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def reference_config() -> ml_collections.ConfigDict:
  """The reference's recipe for CIPSskip at 256x256 (LSUN Churches, FFHQ)."""
  config = ml_collections.ConfigDict()

  config.model = model = ml_collections.ConfigDict()
  model.arch = 'CIPSskip'  # 'CIPSskip' (the main model) or 'CIPSres'
  model.size = 256  # embedding table side; depth = log2(size) - 1 pairs
  model.hidden_size = 512  # Fourier-feature and embedding width
  model.style_dim = 512  # z and w width
  model.n_mlp = 8  # mapping network depth
  model.lr_mlp = 0.01  # mapping network learning-rate multiplier
  model.channel_multiplier = 2
  # '' = leaky ReLU (every released model), 'sin', 'sinrelu'
  model.activation = ''
  model.max_channels = 512  # cap on G's widths (512 = reference)
  model.d_max_channels = 512  # cap on D's widths (512 = reference)
  model.d_n_first_layers = 0  # extra 3x3 convolutions at D's input
  # embedding lookup when sampling (reference eval path)
  model.embedding_mode = 'bilinear'
  # x is an angle over [-1, 1): 360-degree panoramas; the data are then
  # panoramas, cropped with wrap-around
  model.cylindrical = False

  config.data = data = ml_collections.ConfigDict()
  # the prepared data set (`python -m cips_jax.data`): LSUN Churches from its
  # LMDB (`data lmdb ... --name=church_outdoor`; 'lsun/church_outdoor' from the
  # TFDS catalog builder); procedural_landscapes/* are generated on first use
  data.name = 'image_folder/church_outdoor'
  data.data_dir = '~/tensorflow_datasets'  # where tfds prepared it
  # side of the training frame and its coordinate grid; larger images are
  # randomly cropped to it
  data.resolution = 256
  data.crop = 256  # side of the patches D sees (multi-scale if < resolution)
  data.flip = True  # random horizontal flips (pixels only, as the reference)

  config.train = train = ml_collections.ConfigDict()
  train.seed = 0
  train.global_batch_size = 32  # 8 GPUs x 4 in the reference
  train.num_steps = 1_200_000
  g_lr, g_betas = lazy_regularisation_adam(G_REG_EVERY)
  d_lr, d_betas = lazy_regularisation_adam(D_REG_EVERY)
  train.g_lr = g_lr  # 0.0016
  train.g_betas = g_betas  # (0, 0.99 ** 0.8)
  train.d_lr = d_lr  # 0.002 * 16 / 17
  train.d_betas = d_betas  # (0, 0.99 ** (16 / 17))
  train.r1_gamma = 10.0
  train.r1_every = D_REG_EVERY
  # half-life of 10k images at batch 32, per step
  train.ema_decay = 0.5 ** (32 / 10_000)
  # > 0: the EMA's half-life grows as ema_rampup x the images seen, up to
  # ema_decay's (StyleGAN2-ADA's ramp-up, 0.05 there); 0 = a fixed decay
  train.ema_rampup = 0.0
  # DiffAugment for small data sets: 'color', 'translation' and/or 'cutout',
  # comma-separated, applied in that order to every batch D sees, real or
  # generated (cips_jax/augment.py); '' = none, as the reference
  train.augment = ''
  train.compute_dtype = 'float32'  # 'bfloat16' for matmuls/convolutions in bf16
  train.remat = False  # recompute each G layer in the backward pass
  # how a per-image style reaches the pixels: 'activations' (scaled around
  # each product), 'weights' (folded into one kernel per image, the
  # reference's form) or 'auto' (the faster one measured on this backend)
  train.per_image_form = 'auto'
  # False = D sees RGB only (the reference's --img2dis)
  train.d_input_coords = False
  # 'table_on_full_grid': the table itself when training on the full
  # size x size grid, bilinear on patches and other grids (the reference's
  # reads); or 'bilinear', 'aligned', 'table' always
  train.embedding_mode = 'table_on_full_grid'
  # a .pt or exported generator to start G and EMA from
  train.init_generator_from = ''
  # a reference (PyTorch) training checkpoint .pt to continue: G, D, EMA, both
  # Adam states and the step (a workdir's own checkpoint takes precedence)
  train.continue_from = ''
  # split the coordinate-embedding tables (and their Adam moments) by rows over
  # the devices instead of replicating
  train.shard_embedding = False

  config.logging = logging = ml_collections.ConfigDict()
  logging.log_every = 100  # scalars to TensorBoard and the console
  logging.sample_every = 500  # EMA sample grid (PNG + TensorBoard)
  logging.num_samples = 16  # latents in the sample grid
  logging.checkpoint_every = 20_000
  logging.keep_checkpoints = 3
  # > 0: sliced Wasserstein distance at the start and end
  logging.swd_num_images = 0
  # > 0: FID and KID of EMA samples every N steps and at the end (needs the
  # Inception weights: see the README)
  logging.eval_every_steps = 0
  # generated images per evaluation (the standard 50k)
  logging.eval_num_samples = 50_000
  # real images in the cached statistics (all, if fewer)
  logging.eval_num_real = 50_000
  # '' = look in the usual places (cips_jax.metrics.inception)
  logging.inception_weights = ''
  # > 0: a profiler trace of this many steps (after the process's first two,
  # which compile), in tensorboard/plugins/profile/ for TensorBoard's profiler
  logging.profile_steps = 0
  return config


# Values that configs saved by earlier versions hold, by their new names.
_RENAMED_VALUES = {
  ('train', 'embedding_mode'): {'reference': 'table_on_full_grid'}
}


# Fields added since the first release, with the value that keeps a run
# saved before them training as it did.
_ADDED_FIELDS = {('train', 'ema_rampup'): 0.0, ('train', 'augment'): ''}


def upgraded(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """A saved config with the values earlier versions wrote under other names
  renamed (train.embedding_mode 'reference' is now 'table_on_full_grid') and
  the fields they lacked set to what they then did (no augmentation, a fixed
  EMA decay)."""
  for (section, field), renames in _RENAMED_VALUES.items():
    if section in config and field in config[section]:
      value = config[section][field]
      if isinstance(value, str) and value in renames:
        config[section][field] = renames[value]
  for (section, field), value in _ADDED_FIELDS.items():
    if section in config and field not in config[section]:
      config[section][field] = value
  return config
