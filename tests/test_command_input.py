"""What the commands do with numbers that are not numbers, sizes that would eat
the machine, and interruptions: one line each, and nothing half-written.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import signal
import subprocess
import sys

import numpy as np
from PIL import Image
import pytest

from cips_jax import errors
from cips_jax import images
from cips_jax import memory_plan
from cips_jax import pictures
import support


@pytest.mark.parametrize(
  'flag, value, message',
  [
    ('scale', float('nan'), 'must be a finite number'),
    ('scale', float('inf'), 'must be a finite number'),
    ('scale', 0.0, 'must be positive'),
    ('fps', float('nan'), 'must be a finite number'),
    ('fps', 0.0, r'must be in \(0, 1000\]'),
    ('fps', float('inf'), 'must be a finite number'),
    ('truncation_psi', float('nan'), 'must be a finite number'),
    ('softness', float('-inf'), 'must be a finite number'),
    ('fixation', 'nan,nan', r'expected x,y in \[-1, 1\]'),
    ('fixation', 'inf,0', r'expected x,y in \[-1, 1\]'),
    ('seed', 2**64, r'must be in \[0, 2\*\*32\)'),
    ('seed', -1, r'must be in \[0, 2\*\*32\)'),
  ],
)
def test_numeric_options_are_checked(flag, value, message):
  options = dataclasses.replace(pictures.Options(), **{flag: value})
  with pytest.raises(errors.OptionError, match=f'--{flag}=.*: {message}'):
    pictures.check('grid', 'out.png', options)


@dataclasses.dataclass
class _Generator:  # what the memory plan reads of a generator
  size: int = 32
  style_dim: int = 128
  cylindrical: bool = False


@pytest.mark.parametrize(
  'mode, options, flag',
  [
    ('grid', {'num_images': 10_000_000}, '--num_images=10000000'),
    ('superres', {'scale': 1000.0}, '--scale=1000.0'),
    ('interpolate', {'frames': 10_000_000}, '--frames=10000000'),
    ('foveated', {'height': 100_000}, '--height=100000'),
  ],
)
def test_outputs_larger_than_the_machine_are_refused_before_rendering(
  mode, options, flag
):
  request = pictures.Options(**options)
  with pytest.raises(errors.OptionError, match=f'^{flag}.*would need about'):
    pictures.check_output_memory(mode, _Generator(), request)
  # The plan: pixels x the bytes each costs, checked by hand for one case.
  if mode == 'superres':
    assert pictures.planned_output_bytes(mode, _Generator(), request) == (
      32_000 * 32_000 * 36
    )


def test_ordinary_outputs_pass_the_plan():
  for mode in pictures.MODES:
    pictures.check_output_memory(mode, _Generator(), pictures.Options())
  assert memory_plan.host_memory_bytes() > 1 << 30


def test_an_interrupted_gif_leaves_the_previous_one(tmp_path, monkeypatch):
  out = tmp_path / 'walk.gif'
  frames = np.zeros((3, 8, 8, 3), np.uint8)
  images.save_gif(out, frames)
  before = out.read_bytes()

  def interrupted(self, fp, *args, **kwargs):
    del self, args, kwargs
    with open(fp, 'wb') as f:  # a part written, then Ctrl-C
      f.write(b'GIF89a half')
    raise KeyboardInterrupt

  monkeypatch.setattr(Image.Image, 'save', interrupted)
  with pytest.raises(KeyboardInterrupt):
    images.save_gif(out, frames + 255)
  with pytest.raises(KeyboardInterrupt):
    images.save_png(tmp_path / 'grid.png', frames[0])
  assert out.read_bytes() == before
  assert sorted(os.listdir(tmp_path)) == ['walk.gif']


def _command(*args, timeout=300):
  return support.run_python('-m', *args, timeout=timeout)


def test_ctrl_c_is_one_line_and_status_130(exported_generators, tmp_path):
  process = subprocess.Popen(
    [
      sys.executable,
      '-m',
      'cips_jax.sample',
      f'--checkpoint={exported_generators[False]}',
      '--mode=interpolate',
      '--frames=20000',  # minutes of work, 0.7 GB planned
      '--height=32',
      '--chunk_size=16',  # a chunk a fraction of a second: a prompt stop
      f'--out={tmp_path / "walk.gif"}',
    ],
    cwd=support.REPO,
    stderr=subprocess.PIPE,
  )
  try:
    # The progress bar's first draw (it ends in a carriage return, not a
    # newline): the command is at work, past start-up.
    seen = b''
    while b'rendering frames' not in seen:
      chunk = os.read(process.stderr.fileno(), 4096)
      assert chunk, seen.decode(errors='replace')[-2000:]  # ended before
      seen += chunk
    process.send_signal(signal.SIGINT)
    _, rest = process.communicate(timeout=120)
    stderr = (seen + rest).decode(errors='replace')
  finally:
    process.kill()
  assert process.returncode == 130, stderr[-2000:]
  assert (
    stderr.strip().splitlines()[-1].endswith('cips_jax.sample: interrupted')
  )
  assert 'Traceback' not in stderr
  assert not (tmp_path / 'walk.gif').exists()


def test_an_empty_workdir_and_a_huge_resolution_are_refused(tmp_path):
  train = _command(
    'cips_jax.main', f'--config={support.TINY_CONFIG}', '--workdir='
  )
  assert train.returncode == 1
  assert train.stderr.strip().splitlines()[-1] == (
    'cips_jax.main: error: --workdir is empty: name a folder for the '
    'checkpoints and logs'
  )
  (tmp_path / 'photos').mkdir()
  data = _command(
    'cips_jax.data',
    'folder',
    str(tmp_path / 'photos'),
    f'--data_dir={tmp_path / "data"}',
    '--resolution=100000',
  )
  assert data.returncode == 1
  assert '--resolution=100000: must be in [1, 8192]' in data.stderr
  assert not (tmp_path / 'data').exists()


# Each command's own flags, a few of each that --help must list.
OWN_FLAGS = {
  'cips_jax.main': ('--config', '--workdir', '--num_processes'),
  'cips_jax.sample': (
    '--checkpoint',
    '--num_images',
    '--truncation_psi',
    '--seed',
    '--scale',
    '--frames',
    '--which',
  ),
  'cips_jax.evaluate': ('--workdir', '--checkpoint', '--batch_size', '--seed'),
  'cips_jax.convert': ('--checkpoint', '--output', '--[no]to_torch'),
  'cips_jax.data': ('--data_dir', '--resolution', '--background'),
}


@pytest.mark.parametrize('command', sorted(OWN_FLAGS))
def test_help_lists_the_commands_own_flags_and_exits_0(command):
  result = _command(command, '--help', timeout=120)
  assert result.returncode == 0, result.stderr[-2000:]
  for flag in OWN_FLAGS[command]:
    assert f'\n  {flag}' in result.stdout, (flag, result.stdout)
  # Not the 170 flags of absl, orbax and jax: those stay in --helpfull.
  assert '--jax_' not in result.stdout and '--helpfull' in result.stdout


def test_a_command_prints_its_own_lines_only(tmp_path):
  # As a user runs it: without the suite's JAX_PLATFORMS=cpu, jax probes every
  # backend it has (libtpu, from the `tpu` extra, writes to stderr when no TPU
  # is there).
  env = {
    k: v
    for k, v in os.environ.items()
    if k not in ('JAX_PLATFORMS', 'CIPS_JAX_VERBOSE')
  }
  out = tmp_path / 'grid.png'
  result = support.run_python(
    '-m',
    'cips_jax.sample',
    f'--checkpoint={support.REPO / "pretrained" / "noto_emoji"}',
    '--mode=grid',
    '--num_images=4',
    f'--out={out}',
    cwd=tmp_path,
    env=env,
    timeout=300,
  )
  assert result.returncode == 0, result.stderr[-2000:]
  # stdout: the one JSON line; stderr: the render's progress bar, no other
  # line (absl's INFO lines look like 'I1207 00:50:09.00 123 file.py:42] ...').
  (line,) = result.stdout.splitlines()
  assert json.loads(line)['out'] == str(out)
  drawn = [s for s in re.split(r'[\r\n]+', result.stderr) if s.strip()]
  assert drawn and all(s.startswith('rendering ') for s in drawn), drawn
  assert out.exists()
  # CIPS_JAX_VERBOSE=1 brings them back (orbax's, for one).
  verbose = support.run_python(
    '-m',
    'cips_jax.sample',
    f'--checkpoint={support.REPO / "pretrained" / "noto_emoji"}',
    '--mode=grid',
    '--num_images=4',
    f'--out={tmp_path / "again.png"}',
    env=dict(os.environ, CIPS_JAX_VERBOSE='1'),
  )
  assert verbose.returncode == 0 and 'orbax' in verbose.stderr


# A command whose main leaves behind what a failed orbax restore leaves (see
# cli._drop_closed_loop_callbacks), then one error of its own of each kind.
_ABANDONED_READS = r"""
import asyncio, gc, sys
from cips_jax import cli

class Completion:
  # Python reports an error raised in __del__ as unraisable, as it does
  # tensorstore's callbacks on orbax's closed loop.
  def __init__(self, loop):
    self.loop = loop
  def __del__(self):
    self.loop.call_soon_threadsafe(print)

class OtherProblem:
  def __del__(self):
    raise RuntimeError('another loop problem')

def main(argv):
  loop = asyncio.new_event_loop()
  loop.close()
  Completion(loop)
  OtherProblem()
  async def reads():
    running = asyncio.get_running_loop()
    read = running.create_future()
    read.set_exception(ValueError('OUT_OF_RANGE: Error reading "x/.zarray"'))
    own = running.create_future()
    own.set_exception(ValueError('a bug of our own'))
    del read, own
    gc.collect()
  asyncio.run(reads())

cli.run(main, 'abandoned')
"""


def test_a_failed_restores_abandoned_reads_print_nothing():
  result = support.run_python('-c', _ABANDONED_READS)
  assert result.returncode == 0, result.stderr[-2000:]
  assert 'Event loop is closed' not in result.stderr
  assert 'OUT_OF_RANGE' not in result.stderr
  # Errors that are not a checkpoint read's still reach the console.
  assert 'a bug of our own' in result.stderr
  assert 'another loop problem' in result.stderr
