"""Nothing lost: one run per workdir, damaged checkpoints named and set aside,
configs too large for the machine refused, and errors as one line.

The lock is tested with real processes: a second run on a workdir is refused
while the first trains, and a killed run's lock is taken over.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from cips_jax import config_validation
from cips_jax import configs
from cips_jax import errors
from cips_jax import loading
from cips_jax import train
from cips_jax import train_state
from cips_jax import workdir_lock
import support
from support import final_state
from support import tiny_config

TINY_RUN_STEPS = 120  # conftest's tiny_run


def main_args(workdir, data_dir, num_steps, *extra):
  """Arguments of `python -m cips_jax.main` on the tiny config."""
  return [
    '-m',
    'cips_jax.main',
    f'--workdir={workdir}',
    *support.tiny_run_flags(data_dir, num_steps),
    *extra,
  ]


def lock_holder(workdir) -> dict:
  try:
    return json.loads((pathlib.Path(workdir) / 'lock').read_text())
  except (OSError, ValueError):
    return {}


def steps_saved(workdir) -> list[int]:
  """The committed checkpoint steps of a workdir (none while it is created)."""
  try:
    return [
      int(p.name)
      for p in (pathlib.Path(workdir) / 'checkpoints').iterdir()
      if p.name.isdigit()
    ]
  except FileNotFoundError:
    return []


def test_a_second_run_is_refused_and_a_killed_runs_lock_taken_over(
  data_dir, tmp_path
):
  first = subprocess.Popen(
    [sys.executable, *main_args(tmp_path, data_dir, 1_000_000)],
    cwd=support.REPO,
    stdout=subprocess.DEVNULL,
    stderr=subprocess.DEVNULL,
  )
  try:
    start = time.time()
    while not (tmp_path / 'checkpoints' / '20').exists():
      assert first.poll() is None, 'the first run stopped'
      assert time.time() - start < 300, 'the first run made no checkpoint'
      time.sleep(0.1)
    assert lock_holder(tmp_path)['pid'] == first.pid
    # The same command with another seed: before the lock, both trained and
    # the second's checkpoints replaced the first's.
    second = support.run_python(
      *main_args(tmp_path, data_dir, 1_000_000, '--config.train.seed=1'),
      timeout=120,
    )
    assert second.returncode == 1, second.stderr[-2000:]
    message = second.stderr.strip().splitlines()[-1]
    assert message.startswith('cips_jax.main: error: ')
    assert f'process {first.pid} on {socket.gethostname()}' in message
    assert 'is in use by another training run' in message
    assert first.poll() is None, 'the refused run stopped the first'
  finally:
    first.send_signal(signal.SIGKILL)
    first.wait()
  # A killed run cannot release its lock; the next one takes it over. The kill
  # may land mid-save, leaving orbax's '<step>.orbax-checkpoint-tmp' folder.
  latest = max(steps_saved(tmp_path))
  third = support.run_python(
    *main_args(tmp_path, data_dir, latest + 2), timeout=300
  )
  assert third.returncode == 0, third.stderr[-3000:]
  assert f'taking over the lock of process {first.pid}' in third.stderr
  assert lock_holder(tmp_path) == {}  # released at the end
  assert str(latest + 2) in os.listdir(tmp_path / 'checkpoints')


def test_readers_beside_a_run_that_prunes_every_step(data_dir, tmp_path):
  # A checkpoint every step, only the last kept: every save prunes the step
  # before. Before, readers called the pruned step damaged, and convert's
  # reader moved checkpoints aside in the live run's workdir.
  run = subprocess.Popen(
    [
      sys.executable,
      *main_args(
        tmp_path,
        data_dir,
        1_000_000,
        '--config.logging.checkpoint_every=1',
        '--config.logging.keep_checkpoints=1',
      ),
    ],
    cwd=support.REPO,
    stdout=subprocess.DEVNULL,
    stderr=subprocess.DEVNULL,
  )
  try:
    start = time.time()
    while not steps_saved(tmp_path) or max(steps_saved(tmp_path)) < 5:
      assert run.poll() is None, 'the run stopped'
      assert time.time() - start < 300, 'the run made no checkpoint'
      time.sleep(0.1)
    # Each reader gets the newest step it can read, whatever the run prunes
    # meanwhile, and none moves or writes anything.
    read = []
    for _ in range(6):
      read.append(int(train_state.restore_run(str(tmp_path))[3].step))
      gen, _ = loading.open_generator(str(tmp_path))
      assert gen.size == 8
    assert read == sorted(read) and read[-1] > 5, read
    assert run.poll() is None, 'the run stopped'
  finally:
    run.send_signal(signal.SIGKILL)
    run.wait()
  assert set(os.listdir(tmp_path)) <= {
    'checkpoints',
    'lock',
    'samples',
    'tensorboard',
  }


def our_traceback(stderr: str) -> bool:
  """Whether stderr holds a traceback through cips_jax's code."""
  return f'File "{support.REPO / "cips_jax"}' in stderr


def damage(step_dir: pathlib.Path) -> None:
  """Truncates every array chunk of a checkpoint's state."""
  for chunk in (step_dir / 'state').rglob('d/*'):
    if chunk.is_file():
      with open(chunk, 'r+b') as f:
        f.truncate(10)


def test_a_damaged_checkpoint_is_named_then_set_aside_and_training_resumes(
  tiny_run, data_dir, tmp_path
):
  workdir = tmp_path / 'run'
  shutil.copytree(tiny_run[0], workdir)
  damage(workdir / 'checkpoints' / '120')
  damaged_files = sorted(
    (p.relative_to(workdir / 'checkpoints'), p.read_bytes())
    for p in (workdir / 'checkpoints' / '120').rglob('*')
    if p.is_file()
  )
  # Reading: one line naming the damaged step and the intact one to use.
  sample = support.run_python(
    '-m',
    'cips_jax.sample',
    f'--checkpoint={workdir}',
    '--mode=grid',
    f'--out={tmp_path / "grid.png"}',
  )
  assert sample.returncode == 1
  assert not our_traceback(sample.stderr)
  # Only the error: orbax's abandoned reads (tensorstore completing them on a
  # closed event loop) printed a traceback each, before or after it.
  assert len(sample.stderr.strip().splitlines()) == 1, sample.stderr[:2000]
  message = sample.stderr.strip()
  assert 'the checkpoint at step 120' in message and 'is damaged' in message
  assert f'--checkpoint={workdir / "checkpoints" / "100"}' in message
  assert not (tmp_path / 'grid.png').exists()
  # Training: announced, moved aside untouched, resumed from step 100.
  result = support.run_python(*main_args(workdir, data_dir, TINY_RUN_STEPS))
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'THE CHECKPOINT AT STEP 120 IS DAMAGED' in result.stderr
  # Nor the abandoned reads' tracebacks (asyncio's 'never retrieved').
  assert 'Traceback' not in result.stderr, result.stderr[-3000:]
  assert f'resuming {workdir} from step 100' in result.stderr
  aside = workdir / 'damaged_checkpoints'
  assert damaged_files == sorted(
    (p.relative_to(aside), p.read_bytes())
    for p in (aside / '120').rglob('*')
    if p.is_file()
  )
  # Steps 100 to 120 trained again, exactly as the uninterrupted run did.
  config = tiny_config(data_dir, **{'train.num_steps': TINY_RUN_STEPS})
  step, state = final_state(config, workdir)
  _, expected = final_state(config, tiny_run[0])
  assert step == 120
  for a, b in zip(*map(jax.tree_util.tree_leaves, (state, expected))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_no_intact_checkpoint_refuses_without_starting_afresh(
  data_dir, tmp_path
):
  config = tiny_config(data_dir, **{'train.num_steps': 2})
  train.train_and_evaluate(config, str(tmp_path))
  damage(tmp_path / 'checkpoints' / '2')
  before = sorted(p.name for p in (tmp_path / 'checkpoints').iterdir())
  with pytest.raises(errors.DamagedCheckpointError, match='every checkpoint'):
    train.train_and_evaluate(
      tiny_config(data_dir, **{'train.num_steps': 4}), str(tmp_path)
    )
  assert sorted(p.name for p in (tmp_path / 'checkpoints').iterdir()) == before
  assert not (tmp_path / 'damaged_checkpoints').exists()


@pytest.mark.parametrize(
  'overrides, memory, message',
  [
    # Absurd widths: before, initialisation tried to allocate terabytes.
    ({'model.style_dim': 1_000_000}, None, 'config.model: the run needs'),
    (
      {'train.global_batch_size': 64},
      2 * 10**6,  # the state takes 0.2 MB, the activations at least 3.5 MB
      'config.train.global_batch_size = 64: the run needs',
    ),
  ],
)
def test_configs_larger_than_the_machine_are_refused(
  data_dir, overrides, memory, message
):
  config = tiny_config(data_dir, **overrides)
  with pytest.raises(errors.ConfigError, match=message):
    config_validation.validate(config, num_devices=1, memory_bytes=memory)


def test_the_memory_plan_counts_the_state_exactly(data_dir):
  config = tiny_config(data_dir)
  config_validation.check_fits(config, num_devices=1)  # the tiny run fits
  with pytest.raises(errors.ConfigError, match='config.model'):
    config_validation.check_fits(config, num_devices=1, memory_bytes=1000)


def test_a_missing_data_set_is_named_before_the_memory_plan(tmp_path):
  # The churches recipe (the reference config) on a machine without its data
  # and without the memory: before, the memory plan was reported first.
  config = configs.reference_config()
  config.data.data_dir = str(tmp_path / 'my data')
  with pytest.raises(errors.ConfigError, match='the run needs'):
    config_validation.validate(config, num_devices=1, memory_bytes=10**9)
  with pytest.raises(errors.MissingInputError) as missing:
    config_validation.validate(
      config, num_devices=1, memory_bytes=10**9, check_data=True
    )
  message = str(missing.value)
  folder = tmp_path / 'my data' / 'image_folder' / 'church_outdoor'
  assert f"no prepared data set 'image_folder/church_outdoor' in {folder}" in (
    message
  )
  # The config's values, quoted for the shell: the command pastes as it is
  # but for the folder of images only the user knows.
  flags = (
    f"--data_dir '{tmp_path}/my data' --resolution 256 --name church_outdoor"
  )
  assert f'\n  python -m cips_jax.data folder SOURCE_DIR {flags}\n' in message
  assert f'\n  python -m cips_jax.data lmdb LMDB_PATH {flags}' in message
  assert 'RESOLUTION' not in message and 'NAME' not in message
  # Procedural data sets are made on first use: no refusal for them.
  config.data.name = 'procedural_landscapes/s32'
  with pytest.raises(errors.ConfigError, match='the run needs'):
    config_validation.validate(
      config, num_devices=1, memory_bytes=10**9, check_data=True
    )


def test_a_refused_run_leaves_the_workdir_as_it_found_it(data_dir, tmp_path):
  def refused(workdir, *extra):
    result = support.run_python(
      *main_args(workdir, data_dir, 2, *extra), timeout=300
    )
    assert result.returncode == 1, result.stderr[-3000:]
    assert 'Traceback' not in result.stderr
    # The error, which may go on over a few lines.
    return result.stderr.rpartition('cips_jax.main: error: ')[2].strip()

  # Refused before anything is made: a bad value, data not prepared.
  fresh = tmp_path / 'fresh'
  assert 'config.train.r1_every = 0' in refused(
    fresh, '--config.train.r1_every=0'
  )
  assert not fresh.exists()
  last = refused(
    fresh,
    f'--config.data.data_dir={tmp_path}',
    '--config.data.name=image_folder/x',
  )
  assert last.startswith("no prepared data set 'image_folder/x'")
  assert last.endswith(
    f'python -m cips_jax.data lmdb LMDB_PATH --data_dir {tmp_path} '
    '--resolution 8 --name x'
  )
  assert not fresh.exists()
  # Refused once set up (no generator to start from): the output folders it
  # made, the lock and a workdir it made are removed; what was there stays.
  missing = f'--config.train.init_generator_from={tmp_path / "none"}'
  assert refused(fresh, missing) == f'no checkpoint at {tmp_path / "none"}'
  assert not fresh.exists()
  kept = tmp_path / 'kept'
  (kept / 'samples').mkdir(parents=True)
  (kept / 'notes.txt').write_text('mine')
  refused(kept, missing)
  assert sorted(p.name for p in kept.iterdir()) == ['notes.txt', 'samples']
  assert (kept / 'notes.txt').read_text() == 'mine'
  # Refused because another run holds the lock: its record stays as it was.
  held = workdir_lock.acquire(str(kept))
  try:
    record = (kept / 'lock').read_text()
    assert 'is in use by another training run' in refused(kept)
    assert (kept / 'lock').read_text() == record
    assert sorted(p.name for p in kept.iterdir()) == [
      'lock',
      'notes.txt',
      'samples',
    ]
  finally:
    workdir_lock.release(held)
  assert sorted(p.name for p in kept.iterdir()) == ['notes.txt', 'samples']


CLI_SCRIPT = """
import sys
import jax.numpy as jnp
from cips_jax import cli

def main(argv):
  if 'oom' in argv:
    jnp.zeros((2**42,), jnp.uint8).block_until_ready()
  raise KeyError('a bug')

# As the training command, whose hint names its memory settings.
cli.run(main, 'cips_jax.main')
"""


@pytest.mark.parametrize('case', ['oom', 'bug'])
def test_out_of_memory_is_one_line_and_a_bug_keeps_its_traceback(
  tmp_path, case
):
  script = tmp_path / 'command.py'
  script.write_text(CLI_SCRIPT)
  # absl takes '--' as the end of the flags: the rest stays in argv.
  result = support.run_python(
    script, '--', case, '--config.train.remat=True', timeout=120
  )
  assert result.returncode == 1
  if case == 'oom':
    assert 'Traceback' not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith('cips_jax.main: error: out of memory')
    # What would help, less what the command line already set.
    assert 'lower --config.train.global_batch_size' in last, last
    assert 'set --config.train.compute_dtype=bfloat16' in last, last
    assert 'remat' not in last, last
  else:
    assert 'Traceback' in result.stderr and "KeyError: 'a bug'" in (
      result.stderr
    )


@pytest.mark.parametrize(
  'override, message',
  [
    (
      '--config.train.num_step=3',
      '--config.train.num_step: the config has no field train.num_step (did '
      'you mean train.num_steps?)',
    ),
    (
      '--config.trian.num_steps=3',
      '--config.trian.num_steps: the config has no field trian (did you mean '
      'train?)',
    ),
    (
      '--config.train.foo=3',
      '--config.train.foo: the config has no field train.foo',
    ),
    (
      '--config.train.num_steps.x=3',
      '--config.train.num_steps.x: the config has no field train.num_steps.x '
      '(train.num_steps is a value of type int, not a section)',
    ),
  ],
)
def test_a_misspelt_config_field_is_one_clean_line(
  data_dir, tmp_path, override, message
):
  # Before, ml_collections' KeyError text was shown through two reprs:
  # '\\\'num_step\\\'\\nDid you mean "num_steps" ...' is not a field.
  workdir = tmp_path / 'run'
  result = support.run_python(
    *main_args(workdir, data_dir, 2, override), timeout=120
  )
  assert result.returncode == 1
  assert 'Traceback' not in result.stderr
  last = result.stderr.strip().splitlines()[-1]
  assert last == f'cips_jax.main: error: {message}'
  assert not workdir.exists()
