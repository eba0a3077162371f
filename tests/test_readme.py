"""Every command in README.md, run at tiny sizes, so the README cannot drift
from the code.

The commands are read from the README's code blocks (lines starting with
`python`, `pip` or `bash`). Each is run as written, with three kinds of change
only:
- placeholders become files made here: DATA, PHOTOS/, FFHQ/, photo.jpg,
  churches.pt (the reference-format checkpoint of a 4x4 model in tests/data),
  HOST0, and /tmp/... workdirs move under pytest's tmp_path;
- flags appended at the end (absl keeps the last value) shrink the run: a
  16-wide 8x8 model for two training steps, 8 images for FID, 5 inversion steps,
  `--smoke` for the benchmarks; folder data sets are prepared at 16 pixels
  instead of 256;
- commands that need what CI lacks are run to their clear refusal: `data lsun`
  without TensorFlow, `device_check.sh` without an accelerator.
A README command this file does not know fails
`test_every_readme_command_is_exercised`.
"""

from __future__ import annotations

import concurrent.futures
import io
import json
import pathlib
import re
import shlex
import shutil
import subprocess
import sys

import lmdb
import numpy as np
from packaging.requirements import Requirement
from PIL import Image
import pytest

from cips_jax import checkpoints
from cips_jax import torch_pickle
from cips_jax.data import procedural
import support

HERE = pathlib.Path(__file__).parent
REPO = HERE.parent
README = REPO / 'README.md'
REFERENCE_PT = HERE / 'data' / 'cips_skip_s4_checkpoint.pt'

TINY_TRAINING = [
  '--config.model.size=8',
  '--config.model.hidden_size=16',
  '--config.model.style_dim=16',
  '--config.model.n_mlp=1',
  '--config.model.max_channels=16',
  '--config.model.d_max_channels=16',
  '--config.data.resolution=8',
  '--config.data.crop=8',
  '--config.train.global_batch_size=4',
  '--config.train.r1_every=1',
  # One EMA decay for every recipe: the quickstart, churches and FFHQ runs then
  # compile the same programs, once (the session's compilation cache).
  '--config.train.ema_decay=0.999',
  '--config.train.num_steps=2',
  '--config.logging.log_every=1',
  '--config.logging.sample_every=2',
  '--config.logging.num_samples=4',
  '--config.logging.checkpoint_every=2',
  '--config.logging.swd_num_images=0',
  '--config.logging.eval_every_steps=0',
]


def readme_commands() -> list[str]:
  """Shell commands of the README's code blocks, split at `&&`, comments
  dropped.
  """
  commands, fenced = [], False
  for line in README.read_text().splitlines():
    if line.lstrip().startswith('```'):
      fenced = not fenced
      continue
    if fenced or not line.startswith('    '):
      continue
    text = re.split(r'\s{2,}#', line.strip())[0].strip()
    if re.match(r'(python|pip|bash) ', text):
      commands.extend(part.strip() for part in text.split('&&'))
  return commands


class Sandbox:
  """The placeholder files and the substitutions that point README commands at
  them.
  """

  def __init__(self, root: pathlib.Path, data_dir: pathlib.Path):
    self.root, self.data_dir = root, data_dir
    self.out = root / 'out'
    self.out.mkdir()
    for name, count, shape in (
      ('photos', 5, (20, 28)),
      ('ffhq_images', 4, (18, 18)),
    ):
      folder = root / name
      folder.mkdir()
      for seed in range(count):
        Image.fromarray(procedural.landscape(seed, *shape)).save(
          folder / f'{seed}.png'
        )
    Image.fromarray(procedural.landscape(99, 16, 16)).save(root / 'photo.jpg')
    # LSUN's layout: image id -> encoded image.
    with lmdb.open(
      str(root / 'church_outdoor_train_lmdb'), map_size=1 << 22
    ) as db:
      with db.begin(write=True) as transaction:
        for seed in range(6):
          encoded = io.BytesIO()
          Image.fromarray(procedural.landscape(seed, 20, 24)).save(
            encoded, format='WEBP'
          )
          transaction.put(f'church{seed:03d}'.encode(), encoded.getvalue())
    shutil.copy(REFERENCE_PT, root / 'churches.pt')
    self.port = support.free_port()

  def substitute(self, command: str) -> list[str]:
    r = str(self.root)
    for old, new in (
      ('/tmp/', f'{r}/workdirs/'),
      ('PHOTOS/', f'{r}/photos/'),
      ('church_outdoor_train_lmdb/', f'{r}/church_outdoor_train_lmdb/'),
      ('FFHQ/', f'{r}/ffhq_images/'),
      ('photo.jpg', f'{r}/photo.jpg'),
      ('churches.pt', f'{r}/churches.pt'),
      ('exported/', f'{r}/exported/'),
      ('quickstart_run.pt', f'{self.out}/quickstart_run.pt'),
      ('HOST0:1234', f'127.0.0.1:{self.port}'),
      # The model in the box, from the checkout; the pictures go to out/.
      ('pretrained/noto_emoji', str(REPO / 'pretrained' / 'noto_emoji')),
      ('--resolution=256', '--resolution=16'),
    ):
      command = command.replace(old, new)
    # The session's data root: its procedural sets are already prepared.
    command = re.sub(r'\bDATA\b', str(self.data_dir), command)
    return shlex.split(command)

  def shrink(self, argv: list[str]) -> list[str]:
    """Flags appended to a substituted command."""
    if argv[:3] == ['python', '-m', 'cips_jax.main']:
      extra = TINY_TRAINING + [f'--config.data.data_dir={self.data_dir}']
      if any(a.startswith('--config.train.continue_from=') for a in argv):
        # It continues a 2-step run: two more steps.
        extra += ['--config.train.num_steps=4']
      return argv + extra
    if argv[:3] == ['python', '-m', 'cips_jax.evaluate']:
      return argv + ['--num_samples=8', '--num_real=8', '--batch_size=8']
    if (
      argv[:3] == ['python', '-m', 'cips_jax.sample']
      and '--mode=invert' in argv
    ):
      return argv + ['--steps=5']
    if argv[:2] == ['python', 'benchmarks/run_all.py']:
      return argv + ['--smoke']
    return argv


def run(argv, cwd, timeout=600):
  argv = [sys.executable if argv[0] == 'python' else argv[0]] + argv[1:]
  return subprocess.run(
    argv, cwd=cwd, capture_output=True, text=True, timeout=timeout
  )


def _continues(command):
  return '--config.train.continue_from=' in command


def _is_main(command, config=None):
  return command.startswith('python -m cips_jax.main') and (
    config is None or config in command
  )


@pytest.fixture(scope='module')
def results(tmp_path_factory, data_dir):
  """Runs every python/bash README command once; {command: CompletedProcess}."""
  sandbox = Sandbox(tmp_path_factory.mktemp('readme'), data_dir)
  commands = [
    c
    for c in readme_commands()
    if not c.startswith('pip ') and c != 'bash .ci/run'
  ]
  outcome = {}

  def go(command, cwd=None):
    argv = sandbox.shrink(sandbox.substitute(command))
    # From the checkout, as the README says, where a command names a file in it.
    in_repo = 'benchmarks/' in command or 'experiments/' in command
    outcome[command] = run(argv, cwd or (REPO if in_repo else sandbox.out))
    return outcome[command]

  # The benchmark suite's smoke run (the longest command, ~40 s) reads nothing
  # the others write: it starts now, beside everything, and fills the time a
  # core would otherwise wait (the data, the quickstart alone).
  benchmarks = [c for c in commands if c.startswith('python benchmarks/')]
  with concurrent.futures.ThreadPoolExecutor(1) as beside:
    benchmarked = beside.submit(lambda: [go(c) for c in benchmarks])
    # First what the others read: the data, the quickstart and panorama
    # workdirs, the photos' data sets.
    first = [
      c
      for c in commands
      if c.startswith(
        ('python -m cips_jax.data procedural', 'python -m cips_jax.data lmdb')
      )
    ]
    for command in first:
      go(command)
    two_processes = [c for c in commands if '--num_processes=2' in c]
    # Continued runs read what a convert command writes from another run.
    continued = [c for c in commands if _continues(c)]
    training = [
      c
      for c in commands
      if _is_main(c) and c not in two_processes and c not in continued
    ]
    folders = [
      c for c in commands if c.startswith('python -m cips_jax.data folder')
    ]
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
      list(pool.map(go, folders))
      # The quickstart first, alone: the runs of the same architecture find its
      # programs compiled.
      go(training[0])
      list(pool.map(go, training[1:]))
      # The two processes of one run must start together.
      with concurrent.futures.ThreadPoolExecutor(2) as together:
        list(together.map(go, two_processes))
      # The evaluations one after the other, beside the rest: the second finds
      # the Inception network compiled in the session's cache.
      evaluations = [
        c for c in commands if c.startswith('python -m cips_jax.eval')
      ]
      rest = [
        c
        for c in commands
        if c not in outcome
        and c not in benchmarks
        and c not in evaluations
        and c not in continued
      ]

      def then_continue(command):
        go(command)
        if '--to_torch' in command:  # what the continued runs start from
          for other in continued:
            go(other)

      in_turn = pool.submit(lambda: [go(c) for c in evaluations])
      list(pool.map(then_continue, rest))
      in_turn.result()
    benchmarked.result()
  return sandbox, outcome


def test_every_readme_command_is_exercised():
  commands = readme_commands()
  assert len(commands) >= 25, commands
  known = (
    'python -m cips_jax.main ',
    'python -m cips_jax.data ',
    'python -m cips_jax.sample ',
    'python -m cips_jax.evaluate ',
    'python -m cips_jax.convert ',
    'python benchmarks/run_all.py',
    'bash benchmarks/device_check.sh',
    'bash .ci/run',
    'pip install ',
  )
  unknown = [c for c in commands if not c.startswith(known)]
  assert not unknown, f'README commands this test does not run: {unknown}'


def test_pip_and_ci_commands_are_what_ci_runs():
  ci = (REPO / '.ci' / 'run').read_text()
  setup = (REPO / 'setup.py').read_text()
  pip = [c for c in readme_commands() if c.startswith('pip ')]
  assert 'bash .ci/run' in readme_commands()
  assert 'python3 -m pytest -q tests' in ci  # the README's test command
  for command in pip:
    if command == 'pip install -e .':
      assert "-e '.[test" in ci  # a superset of the plain install
    elif command == "pip install -e '.[lsun]'":
      assert "'lsun': [" in setup
    elif command == "pip install -e '.[tensorboard]'":
      assert "'tensorboard': ['tensorboard']" in setup
    elif command == "pip install -e '.[lmdb]'":
      # CI installs the test extra, which includes lmdb.
      assert "'lmdb': [" in setup and "'lmdb'," in setup
    else:
      assert command.split('pip install ')[1] in ci, command


def _ok(results, command):
  process = results[1][command]
  assert process.returncode == 0, (command, process.stderr[-3000:])
  return process


def _commands(prefix):
  return [c for c in readme_commands() if c.startswith(prefix)]


@pytest.mark.parametrize('command', _commands('python -m cips_jax.main'))
def test_training_commands(results, command):
  sandbox, _ = results
  _ok(results, command)
  workdir = pathlib.Path(sandbox.substitute(command)[4].split('=', 1)[1])
  last = 4 if _continues(command) else 2
  assert (workdir / 'checkpoints' / str(last)).is_dir(), sorted(
    workdir.rglob('*')
  )[:20]
  if _continues(command):
    assert 'continuing the reference run' in results[1][command].stderr
  assert list((workdir / 'samples').glob('step_*.png'))


@pytest.mark.parametrize('command', _commands('python -m cips_jax.data'))
def test_data_commands(results, command):
  process = results[1][command]
  if ' lsun ' in command:
    try:
      import tensorflow  # noqa: F401

      pytest.fail(
        'TensorFlow is installed here: this test expects the refusal without it'
      )
    except ImportError:
      pass
    assert process.returncode == 1 and '[lsun]' in process.stderr, (
      process.stderr[-2000:]
    )
    assert 'Traceback' not in process.stderr
    return
  _ok(results, command)
  assert 'train images' in process.stdout


@pytest.mark.parametrize('command', _commands('python -m cips_jax.sample'))
def test_sample_commands(results, command):
  sandbox, _ = results
  report = json.loads(_ok(results, command).stdout.strip().splitlines()[-1])
  out = sandbox.out / sandbox.substitute(command)[-1].split('=', 1)[1]
  assert out.exists() and out.stat().st_size > 100, report
  with Image.open(out) as image:
    assert np.asarray(image.convert('RGB')).std() > 0


@pytest.mark.parametrize('command', _commands('python -m cips_jax.evaluate'))
def test_evaluate_commands(results, command):
  report = json.loads(_ok(results, command).stdout.strip().splitlines()[-1])
  assert np.isfinite(report['fid']) and report['num_fake'] == 8


def test_convert_commands(results):
  from_torch, to_torch = _commands('python -m cips_jax.convert')
  sandbox, _ = results
  _ok(results, from_torch)
  gen, variables = checkpoints.load_generator(
    str(sandbox.root / 'exported' / 'churches')
  )
  assert gen.size == 4 and 'params' in variables
  assert '--to_torch' in to_torch
  _ok(results, to_torch)
  run = torch_pickle.load(sandbox.out / 'quickstart_run.pt')
  assert set(run) == {'g', 'd', 'g_ema', 'g_optim', 'd_optim', 'step'}
  assert run['step'] == 2


def test_benchmark_commands(results):
  (suite,) = _commands('python benchmarks/run_all.py')
  report = json.loads(_ok(results, suite).stdout)
  assert report['smoke'] and report['train_step'] and report['generator_256']
  (device,) = _commands('bash benchmarks/device_check.sh')
  process = results[1][device]
  assert process.returncode != 0 and 'no accelerator' in process.stderr, (
    process.stderr[-2000:]
  )


def test_constraints_pin_every_requirement_within_its_bounds():
  pins = {}
  for line in (REPO / 'constraints.txt').read_text().splitlines():
    if line and not line.startswith('#'):
      name, version = line.split('==')
      pins[re.sub(r'[-_.]+', '-', name).lower()] = version
  setup = (REPO / 'setup.py').read_text()
  extras = re.findall(r"'(?:test|tpu)': \[([^\]]*)\]", setup)
  wanted = [
    line.split('#')[0].strip()
    for line in (REPO / 'requirements.txt').read_text().splitlines()
  ] + re.findall(r"'([^']+)'", ' '.join(extras))
  for text in filter(None, wanted):
    requirement = Requirement(text)
    name = re.sub(r'[-_.]+', '-', requirement.name).lower()
    assert name in pins, f'{name} is not pinned in constraints.txt'
    assert requirement.specifier.contains(pins[name]), (text, pins[name])
  assert 'libtpu' in pins  # what jax[tpu] brings
  assert '-c constraints.txt' in (REPO / '.ci' / 'run').read_text()


def test_the_library_example_runs_on_the_model_in_the_box(tmp_path):
  text = README.read_text()
  section = text[text.index('## Use it as a library') :]
  block = section[section.index('```python\n') + 10 :]
  block = block[: block.index('```')]
  assert "loading.open_generator('pretrained/noto_emoji')" in block
  script = tmp_path / 'example.py'
  script.write_text(
    block.replace(
      "'pretrained/noto_emoji'", repr(str(REPO / 'pretrained' / 'noto_emoji'))
    )
  )
  process = run(['python', str(script)], tmp_path, timeout=300)
  assert process.returncode == 0, process.stderr[-3000:]
  with Image.open(tmp_path / 'samples.png') as grid:
    assert min(grid.size) > 2 * 32  # eight 32x32 samples, tiled
  with Image.open(tmp_path / 'big.png') as big:
    assert big.size == (256, 256)
    assert np.asarray(big).std() > 0


def test_commands_print_only_their_own_lines(results):
  noisy = {}
  for command, process in results[1].items():
    if command.startswith('python -m cips_jax') and process.returncode == 0:
      lines = support.foreign_console_lines(process.stdout + process.stderr)
      if lines:
        noisy[command] = lines[:5]
  assert not noisy, noisy
