"""Multi-host training, proven on one machine: two processes joined by jax.distributed."""

from __future__ import annotations

import json
import os
import pathlib
import socket
import subprocess
import sys
import textwrap

import numpy as np
import pytest

HERE = pathlib.Path(__file__).parent
REPO = str(HERE.parent)

WORKER = textwrap.dedent('''
    import json, sys
    import jax
    num_processes, process_id, port = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    if num_processes > 1:
      jax.config.update('jax_cpu_collectives_implementation', 'gloo')
      jax.distributed.initialize(coordinator_address=f'127.0.0.1:{{port}}',
                                 num_processes=num_processes, process_id=process_id)
    import numpy as np
    sys.path.insert(0, {tests!r})
    from test_train_e2e import tiny_config
    from cips_jax import train
    config = tiny_config({data!r}, **{{'train.global_batch_size': 8, 'train.num_steps': 2,
                                      'logging.checkpoint_every': 2, 'logging.sample_every': 2}})
    state = train.train_and_evaluate(config, {workdir!r} + f'/run{{num_processes}}')
    # This process's own copy of every (replicated) leaf of the final state.
    leaves = [np.asarray(leaf.addressable_data(0)) for leaf in jax.tree_util.tree_leaves(state)]
    np.savez({workdir!r} + f'/state_{{num_processes}}_{{process_id}}.npz', *leaves)
    print(json.dumps({{'process': jax.process_index(), 'processes': jax.process_count(),
                      'devices': jax.device_count(), 'local': jax.local_device_count()}}))
''')


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def load_leaves(path):
  with np.load(path) as data:
    return [data[f'arr_{i}'] for i in range(len(data.files))]


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  path = tmp_path_factory.mktemp('data')
  from cips_jax import data
  data.prepare_procedural(str(path), 's32')   # once, before the processes start
  return path


def test_two_processes_train_like_one(data_dir, tmp_path):
  """2 processes x 2 CPU devices = a 4-device global mesh; two steps (one with R1).

  Both processes must end with bit-identical states (the replicated parameters are one
  array), equal to a single process with 4 devices on the same global batch up to the
  order of float32 reductions (as in the 8-device test: 1e-4 relative to max(|p|, 1e-3)).
  """
  script = WORKER.format(tests=str(HERE), data=str(data_dir), workdir=str(tmp_path))
  port = str(free_port())
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=2')
  workers = [subprocess.Popen([sys.executable, '-c', script, '2', str(i), port], cwd=REPO,
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for i in range(2)]
  outputs = [worker.communicate(timeout=600) for worker in workers]
  for worker, (out, err) in zip(workers, outputs):
    assert worker.returncode == 0, err[-3000:]
  reports = [json.loads(out.strip().splitlines()[-1]) for out, _ in outputs]
  assert [r['process'] for r in reports] == [0, 1]
  assert all(r['processes'] == 2 and r['devices'] == 4 and r['local'] == 2 for r in reports)

  single_env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=4')
  single = subprocess.run([sys.executable, '-c', script, '1', '0', '0'], cwd=REPO,
                          env=single_env, capture_output=True, text=True, timeout=600)
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
