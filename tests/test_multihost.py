"""Multi-host training, proven on one machine: two processes joined by
jax.distributed.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np

import support

SCRIPT = support.TESTS / 'scripts' / 'train_two_steps.py'


def load_leaves(path):
  with np.load(path) as data:
    return [data[f'arr_{i}'] for i in range(len(data.files))]


def test_two_processes_train_like_one(data_dir, tmp_path):
  """2 processes x 2 CPU devices = a 4-device global mesh; two steps with R1.

  Both processes must end with bit-identical states (the replicated parameters
  are one array), equal to a single process with 4 devices on the same global
  batch up to the order of float32 reductions (as in the 8-device test: 1e-4
  relative to max(|p|, 1e-3)).
  """
  port = str(support.free_port())
  env = support.environment_with_devices(2)
  workers = [
    subprocess.Popen(
      [sys.executable, SCRIPT, '2', str(i), port, data_dir, tmp_path],
      cwd=support.REPO,
      env=env,
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
    )
    for i in range(2)
  ]
  outputs = [worker.communicate(timeout=600) for worker in workers]
  for worker, (out, err) in zip(workers, outputs):
    assert worker.returncode == 0, err[-3000:]
  reports = [json.loads(out.strip().splitlines()[-1]) for out, _ in outputs]
  assert [r['process'] for r in reports] == [0, 1]
  assert all(
    r['processes'] == 2 and r['devices'] == 4 and r['local'] == 2
    for r in reports
  )

  single_env = support.environment_with_devices(4)
  single = support.run_python(
    SCRIPT, '1', '0', '0', data_dir, tmp_path, env=single_env
  )
  assert single.returncode == 0, single.stderr[-3000:]

  first = load_leaves(tmp_path / 'state_2_0.npz')
  second = load_leaves(tmp_path / 'state_2_1.npz')
  reference = load_leaves(tmp_path / 'state_1_0.npz')
  assert len(first) == len(second) == len(reference) > 10
  for a, b in zip(first, second):
    np.testing.assert_array_equal(a, b)
  for a, r in zip(first, reference):
    assert np.max(np.abs(a - r) / (np.abs(r) + 1e-3)) < 1e-4
  # The run wrote one checkpoint at step 2, readable like any other.
  assert (tmp_path / 'run2' / 'checkpoints' / '2').is_dir()
