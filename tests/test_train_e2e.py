"""Training end to end: several devices, exact resume after SIGKILL and SIGTERM,
guards.
"""

from __future__ import annotations

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import jax
import numpy as np
from PIL import Image
import pytest

from cips_jax import errors
from cips_jax import sampling
from cips_jax import train
from cips_jax import train_state
import support
from support import final_state
from support import tiny_config

TINY_STEPS = (
  120  # conftest's tiny_run: the uninterrupted run the others are compared with
)


def run_main(workdir, data_dir, *extra, wait=True):
  command = [
    sys.executable,
    '-m',
    'cips_jax.main',
    f'--workdir={workdir}',
    *support.tiny_run_flags(data_dir, TINY_STEPS),
    *extra,
  ]
  process = subprocess.Popen(
    command,
    cwd=support.REPO,
    stdout=subprocess.PIPE,
    stderr=subprocess.STDOUT,
    text=True,
  )
  if wait:
    output, _ = process.communicate(timeout=600)
    return process.returncode, output
  return process


def wait_for_checkpoint(workdir, step, process, timeout=300):
  path = pathlib.Path(workdir) / 'checkpoints' / str(step)
  start = time.time()
  while not (path / 'state').exists() or any(
    pathlib.Path(workdir, 'checkpoints').glob('*tmp*')
  ):
    assert process.poll() is None, process.stdout.read()
    assert time.time() - start < timeout, 'no checkpoint appeared'
    time.sleep(0.02)


def assert_identical(state_a, state_b):
  leaves_a, leaves_b = (
    jax.tree_util.tree_leaves(state_a),
    jax.tree_util.tree_leaves(state_b),
  )
  assert len(leaves_a) == len(leaves_b)
  for a, b in zip(leaves_a, leaves_b):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.fixture(scope='module')
def uninterrupted(tiny_run):
  return tiny_run[0]


def test_run_writes_what_a_user_watches(uninterrupted, data_dir):
  step, state = final_state(
    tiny_config(data_dir, **{'train.num_steps': TINY_STEPS}), uninterrupted
  )
  assert step == 120 and int(state.step) == 120
  samples = sorted(os.listdir(uninterrupted / 'samples'))
  assert samples[-1] == 'step_0000120.png' and len(samples) == 6
  events = list((uninterrupted / 'tensorboard').glob('events.out.tfevents.*'))
  assert events and events[0].stat().st_size > 1000


def test_profile_steps_write_a_trace_that_tensorboard_opens(uninterrupted):
  # conftest's tiny_run sets --config.logging.profile_steps=2: the trace
  # starts after the process's first two steps (compilation) and covers the
  # next two, under TensorBoard's profile plugin folder.
  profile_dir = pathlib.Path(uninterrupted, 'tensorboard', 'plugins', 'profile')
  files = list(profile_dir.glob('*/*.xplane.pb'))
  assert len(files) == 1, files
  profile = jax.profiler.ProfileData.from_file(str(files[0]))
  steps = sorted(
    dict(event.stats)['step_num']
    for plane in profile.planes
    for line in plane.lines
    for event in line.events
    if event.name == 'train'
  )
  assert steps == [2, 3]


def test_resume_after_sigkill_is_bit_exact(uninterrupted, data_dir, tmp_path):
  process = run_main(tmp_path, data_dir, wait=False)
  wait_for_checkpoint(tmp_path, 40, process)
  process.send_signal(signal.SIGKILL)
  process.wait()
  assert process.returncode == -signal.SIGKILL
  killed_at = max(
    int(p.name)
    for p in (tmp_path / 'checkpoints').iterdir()
    if p.name.isdigit()
  )
  assert killed_at < 120  # it really stopped mid-way
  code, output = run_main(tmp_path, data_dir)
  assert code == 0, output
  assert f'resuming {tmp_path} from step {killed_at}' in output
  config = tiny_config(data_dir, **{'train.num_steps': 120})
  assert_identical(
    final_state(config, tmp_path)[1], final_state(config, uninterrupted)[1]
  )


def test_sigterm_saves_and_resumes_exactly(uninterrupted, data_dir, tmp_path):
  process = run_main(tmp_path, data_dir, wait=False)
  wait_for_checkpoint(tmp_path, 20, process)
  process.send_signal(signal.SIGTERM)
  output, _ = process.communicate(timeout=300)
  assert process.returncode == 0, output
  assert 'stopped by SIGTERM' in output
  config = tiny_config(data_dir, **{'train.num_steps': 120})
  stopped_at, _ = final_state(config, tmp_path)
  assert 20 <= stopped_at < 120
  code, output = run_main(tmp_path, data_dir)
  assert code == 0, output
  assert_identical(
    final_state(config, tmp_path)[1], final_state(config, uninterrupted)[1]
  )


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(
  data_dir, tmp_path
):
  # R1 in every step: one step program per run to compile.
  train.train_and_evaluate(
    tiny_config(data_dir, **{'train.num_steps': 10, 'train.r1_every': 1}),
    str(tmp_path),
  )
  exploding = tiny_config(
    data_dir,
    **{
      'train.num_steps': 40,
      'train.g_lr': 1e30,
      'train.d_lr': 1e30,
      'train.r1_every': 1,
    },
  )
  with pytest.raises(FloatingPointError, match='non-finite training metrics'):
    train.train_and_evaluate(exploding, str(tmp_path))
  step, state = final_state(tiny_config(data_dir), tmp_path)
  assert step == 10
  assert all(np.all(np.isfinite(x)) for x in jax.tree_util.tree_leaves(state))


def test_a_diverged_update_on_a_checkpoint_step_is_not_saved(
  data_dir, tmp_path
):
  # Step 0's losses are computed before its update, so they are finite; the
  # update with an infinite learning rate is not, and the checkpoint due
  # after it (the last step) must not be written.
  config = tiny_config(
    data_dir,
    **{'train.num_steps': 1, 'train.g_lr': float('inf'), 'train.r1_every': 1},
  )
  with pytest.raises(
    errors.DivergedError,
    match=r'after step 1 holds non-finite values \(in ema_params, g_params\)'
    r'.*no checkpoint was written',
  ):
    train.train_and_evaluate(config, str(tmp_path))
  assert os.listdir(tmp_path / 'checkpoints') == []


def test_resuming_with_another_architecture_names_the_difference(
  data_dir, tmp_path
):
  train.train_and_evaluate(
    tiny_config(data_dir, **{'train.num_steps': 5}), str(tmp_path)
  )
  other = tiny_config(
    data_dir, **{'train.num_steps': 10, 'model.hidden_size': 32}
  )
  with pytest.raises(
    ValueError, match=r'model\.hidden_size: checkpoint 16, config 32'
  ):
    train.train_and_evaluate(other, str(tmp_path))
  assert final_state(tiny_config(data_dir), tmp_path)[0] == 5  # nothing lost


def test_a_finished_run_says_so_instead_of_resuming(data_dir, tmp_path, caplog):
  train.train_and_evaluate(
    tiny_config(data_dir, **{'train.num_steps': 2}), str(tmp_path)
  )
  caplog.set_level('WARNING')
  state = train.train_and_evaluate(
    tiny_config(data_dir, **{'train.num_steps': 1}), str(tmp_path)
  )
  assert int(state.step) == 2
  assert (
    'already holds step 2 >= train.num_steps = 1: nothing to train'
    in caplog.text
  )
  assert sorted(os.listdir(tmp_path / 'checkpoints')) == ['2']


def test_bad_config_on_the_command_line_names_the_field(data_dir, tmp_path):
  code, output = run_main(tmp_path, data_dir, '--config.data.crop=6')
  assert code != 0 and 'config.data.crop = 6: must be a power of two' in output
  code, output = run_main(tmp_path, data_dir, '--config.data.crops=8')
  assert code != 0 and 'crops' in output  # the config is locked against typos


def test_eight_devices_match_one_device(data_dir):
  """One step on 8 simulated devices equals one device on the same global batch.

  The only difference is the order of float32 reductions (batch means and the
  gradient all-reduce over 8 shards instead of one sum): relative differences of
  a few 1e-7 in the gradients. Adam's first steps normalise updates to about
  lr * sign(g), which can amplify them for parameters whose gradient is ~0,
  hence a parameter tolerance of 1e-4 relative to max(|p|, 1e-3); losses agree
  to 1e-5.
  """
  env = support.environment_with_devices(8)
  script = support.TESTS / 'scripts' / 'one_vs_eight_devices.py'
  result = support.run_python(script, data_dir, env=env)
  assert result.returncode == 0, result.stderr[-3000:]
  report = json.loads(result.stdout.strip().splitlines()[-1])
  assert report['devices'] == 8
  for one, eight in zip(report['one'], report['eight']):
    for key in one:
      assert eight[key] == pytest.approx(one[key], rel=1e-5, abs=1e-6), key
  assert report['max_param_rel_diff'] < 1e-4


def test_panorama_training_renders_the_whole_cylinder(data_dir, tmp_path):
  """The cylindrical path end to end: wrapped windows, a periodic generator, 360
  samples.
  """
  config = tiny_config(
    data_dir,
    **{
      'train.num_steps': 2,
      'logging.sample_every': 2,
      'logging.checkpoint_every': 2,
      'logging.swd_num_images': 8,
    },
  )
  config.model.cylindrical = True
  config.data.name = 'procedural_landscapes/panorama_s64'
  config.train.embedding_mode = 'bilinear'
  config.data.resolution, config.data.crop = 8, 8
  state = train.train_and_evaluate(config, str(tmp_path / 'run'))
  assert int(state.step) == 2
  grid = np.asarray(
    Image.open(tmp_path / 'run' / 'samples' / 'step_0000002.png')
  )
  # 4 samples in a 2 x 2 grid of 8-row, 256-column panoramas (1-pixel borders).
  assert grid.shape[:2] == (2 * 8 + 3, 2 * 256 + 3)
  # The generator is periodic in x: x = -1 and x = 1 render the same pixels.
  gen, _ = train_state.build_models(config)
  z = jax.random.normal(jax.random.key(0), (2, gen.style_dim))
  edges = np.zeros((8, 2, 2), np.float32)
  edges[:, 0, 0], edges[:, 1, 0] = -1.0, 1.0
  edges[..., 1] = np.linspace(-1, 1, 8)[:, None]
  img = np.asarray(
    sampling.generate(gen, {'params': state.ema_params}, z, edges)
  )
  np.testing.assert_allclose(img[:, :, 0], img[:, :, 1], atol=1e-5)
