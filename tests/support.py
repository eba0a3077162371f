"""Helpers the tests share (plain functions; fixtures are in conftest.py).

Test modules and the scripts they run in subprocesses import this module; no
test module imports another.
"""

from __future__ import annotations

import os
import pathlib
import re
import socket
import subprocess
import sys

import jax
import numpy as np
from PIL import Image

from cips_jax import checkpoints
from cips_jax import configs
from cips_jax import data
from cips_jax import grids
from cips_jax import models
from cips_jax import parallel
from cips_jax import summary
from cips_jax import train_state

TESTS = pathlib.Path(__file__).resolve().parent
REPO = TESTS.parent
DATA = TESTS / 'data'
TINY_CONFIG = TESTS / 'configs' / 'tiny.py'
# A reference training checkpoint (4x4)
REFERENCE_PT = DATA / 'cips_skip_s4_checkpoint.pt'


def tiny_config(data_dir, **overrides):
  """tests/configs/tiny.py (an 8x8 CIPSskip, 16 wide, batch 4) reading
  `data_dir`.

  overrides: {'section.field': value}, e.g. tiny_config(d, **{'train.num_steps':
    5}).
  """
  config = configs.from_file(TINY_CONFIG)
  config.data.data_dir = str(data_dir)
  for dotted, value in overrides.items():
    section, key = dotted.split('.')
    config[section][key] = value
  return config


def fake_batch(config, seed=0):
  """A training batch of uniform noise images on the training grid."""
  rng = np.random.default_rng(seed)
  b, c = config.train.global_batch_size, config.data.crop
  coords = np.broadcast_to(np.asarray(grids.uniform(c, c)), (b, c, c, 2))
  return {
    'image': rng.uniform(-1, 1, (b, c, c, 3)).astype(np.float32),
    'coords': np.ascontiguousarray(coords, dtype=np.float32),
  }


def tiny_generator(cylindrical=False, arch=models.CIPSskip, seed=0):
  """A 16x16, 32-wide generator and its variables."""
  gen = arch(
    size=16,
    hidden_size=32,
    style_dim=32,
    n_mlp=2,
    max_channels=32,
    cylindrical=cylindrical,
  )
  return gen, models.init(gen, jax.random.PRNGKey(seed))


def free_port() -> int:
  """A TCP port nobody listens on now (for jax.distributed's coordinator)."""
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def environment_with_devices(count: int) -> dict[str, str]:
  """This process's environment, with XLA simulating `count` CPU devices (other
  XLA flags kept).
  """
  flags = os.environ.get('XLA_FLAGS', '')
  return dict(
    os.environ,
    XLA_FLAGS=f'{flags} --xla_force_host_platform_device_count={count}',
  )


def run_python(
  *args, cwd=REPO, env=None, timeout=600
) -> subprocess.CompletedProcess:
  """`python *args` in a subprocess (text output captured)."""
  return subprocess.run(
    [sys.executable, *map(str, args)],
    cwd=cwd,
    env=env,
    capture_output=True,
    text=True,
    timeout=timeout,
  )


# The events of a TensorBoard folder, as the library reads them.
read_events = summary.read_events


def summary_values(events) -> list:
  """(step, value) of every summary value in `events`."""
  return [
    (event.step, value)
    for event in events
    if event.HasField('summary')
    for value in event.summary.value
  ]


def tiny_run_flags(data_dir, num_steps: int) -> list[str]:
  """Flags of `python -m cips_jax.main` (from the repository root) for the tiny
  config.
  """
  return [
    f'--config={TINY_CONFIG}',
    f'--config.data.data_dir={data_dir}',
    f'--config.train.num_steps={num_steps}',
  ]


def final_state(config, workdir):
  """(step, train state) of the latest checkpoint of a run, restored on local
  devices.
  """
  gen, disc = train_state.build_models(config)
  g_tx, d_tx = train_state.make_optimizers(config)
  abstract = jax.eval_shape(
    lambda: train_state.create_state(gen, disc, g_tx, d_tx, 0)
  )
  manager = checkpoints.TrainCheckpoints(
    os.path.join(workdir, 'checkpoints'), keep=20, config=config
  )
  return manager.latest_step(), manager.restore_latest(
    abstract, parallel.replicated(parallel.make_mesh())
  )


# An absl log line: 'I1207 12:23:14.747187 140243546286976 main.py:82] ...'.
_ABSL_LINE = re.compile(r'^[IWEF]\d{4} [\d:.]+\s+\d+ ([\w.]+):\d+\] ')
_PACKAGE_FILES = {path.name for path in (REPO / 'cips_jax').rglob('*.py')}
# What the libraries print on their own: tfds's preparation lines, jax's and
# libtpu's backend probing.
_FOREIGN_MARKERS = (
  'Downloading and preparing',
  'downloaded and prepared',
  'Unable to initialize backend',
  'libtpu',
  'TPU_',
  'InitGoogle',
  'orbax',
)


def foreign_console_lines(text: str) -> list[str]:
  """The lines of a command's console output that cips_jax did not write.

  Absl log lines from files outside the package, and lines with a known
  marker of the libraries' chatter; progress bars (drawn with carriage
  returns) count as lines of their own.
  """
  foreign = []
  for line in re.split(r'[\r\n]+', text):
    match = _ABSL_LINE.match(line)
    if (match and match.group(1) not in _PACKAGE_FILES) or any(
      marker in line for marker in _FOREIGN_MARKERS
    ):
      foreign.append(line)
  return foreign


def prepare_emoji(root, count: int = 16, first: int = 0):
  """`count` of tests/data's 32x32 Noto emoji (from index `first`), prepared.

  Written as PNGs to ROOT/png and prepared like the card's data set (`python
  -m cips_jax.data folder ... --resolution=32`) as image_folder/noto_emoji
  under ROOT/data; returns that data root.
  """
  folder = root / 'png'
  folder.mkdir(parents=True, exist_ok=True)
  images = np.load(DATA / 'noto_emoji_32.npz')['images']
  images = images[first : first + count]
  for i, image in enumerate(images):
    Image.fromarray(image).save(folder / f'{i:03d}.png')
  data.prepare_image_folder(folder, root / 'data', 32, 'noto_emoji')
  return root / 'data'
