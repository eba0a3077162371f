"""The coordinate-embedding table split over devices: same step, 1/n of the table each."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import textwrap

import pytest

HERE = pathlib.Path(__file__).parent
REPO = str(HERE.parent)

SCRIPT = textwrap.dedent('''
    import json, sys
    import jax, numpy as np
    sys.path.insert(0, {tests!r})
    from test_train_e2e import tiny_config
    from test_train import fake_batch
    from cips_jax import parallel, train

    config = tiny_config('/unused', **{{'train.global_batch_size': 8}})
    gen, disc = train.build_models(config)
    g_tx, d_tx = train.make_optimizers(config)
    host_state = jax.tree_util.tree_map(np.asarray, train.create_state(gen, disc, g_tx, d_tx, 0))
    batch = fake_batch(config)
    mesh = parallel.make_mesh()
    results, shard_rows = {{}}, {{}}
    for shard in (False, True):
      shardings = parallel.state_shardings(host_state, mesh, shard_embedding=shard)
      steps = train.jit_train_steps(train.make_train_step(config, gen, disc, g_tx, d_tx), mesh,
                                    shardings)
      state = jax.device_put(host_state, shardings)
      outs = []
      for step in range(2):          # step 0 runs R1, step 1 does not
        state, out = steps[step % config.train.r1_every == 0](state, parallel.global_batch(batch, mesh))
        outs.append({{k: float(v) for k, v in out.items()}})
      tables = {{
          'g_params': state.g_params['embedding'], 'ema_params': state.ema_params['embedding'],
          'adam_mu': state.g_opt_state[0].mu['embedding'],
          'adam_nu': state.g_opt_state[0].nu['embedding']}}
      shard_rows[shard] = {{name: [s.data.shape[0] for s in table.addressable_shards]
                           for name, table in tables.items()}}
      results[shard] = (jax.tree_util.tree_map(np.asarray, state), outs)
    (plain, plain_out), (split, split_out) = results[False], results[True]
    diffs = [float(np.max(np.abs(a - b) / (np.abs(a) + 1e-3)))
             for a, b in zip(jax.tree_util.tree_leaves(plain), jax.tree_util.tree_leaves(split))]
    print(json.dumps({{'devices': mesh.size, 'size': config.model.size,
                      'rows_replicated': shard_rows[False], 'rows_split': shard_rows[True],
                      'losses': [plain_out, split_out], 'max_param_rel_diff': max(diffs)}}))
''')


def test_split_embedding_table_gives_the_replicated_step():
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=8')
  result = subprocess.run([sys.executable, '-c', SCRIPT.format(tests=str(HERE))], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  report = json.loads(result.stdout.strip().splitlines()[-1])
  size, devices = report['size'], report['devices']
  assert devices == 8
  for name, rows in report['rows_split'].items():   # each device holds 1/8 of every table
    assert rows == [size // devices] * devices, name
  for name, rows in report['rows_replicated'].items():
    assert rows == [size] * devices, name
  plain, split = report['losses']
  for a, b in zip(plain, split):
    for key in a:
      assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-6), key
  assert report['max_param_rel_diff'] < 1e-4


def test_a_table_that_does_not_split_evenly_is_refused():
  from cips_jax import config_validation
  from test_train_e2e import tiny_config
  config = tiny_config('/unused', **{'train.shard_embedding': True,
                                     'train.global_batch_size': 12})
  with pytest.raises(config_validation.ConfigError, match='model.size = 8: must be divisible'):
    config_validation.validate(config, num_devices=3)
  config_validation.validate(config, num_devices=4)
