"""Two training steps with the embedding tables replicated, then split over
devices.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 \
        python tests/scripts/sharded_embedding_steps.py

Prints a JSON line: the rows of each table every device holds, the losses of
both runs and the largest relative difference between their final parameters.
"""

import json
import pathlib
import sys

import jax
import numpy as np

from cips_jax import parallel
from cips_jax import train
from cips_jax import train_state

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from support import fake_batch  # noqa: E402
from support import tiny_config  # noqa: E402

config = tiny_config(
  'data-dir-unused', **{'train.global_batch_size': 8, 'train.r1_every': 1}
)
gen, disc = train_state.build_models(config)
g_tx, d_tx = train_state.make_optimizers(config)
host_state = jax.tree_util.tree_map(
  np.asarray, train_state.create_state(gen, disc, g_tx, d_tx, 0)
)
batch = fake_batch(config)
mesh = parallel.make_mesh()
results, shard_rows = {}, {}
for shard in (False, True):
  shardings = parallel.state_shardings(host_state, mesh, shard_embedding=shard)
  models = train.step_models(config, gen, disc, g_tx, d_tx, mesh)
  step_fn = train.jit_train_step(models, shardings)
  state = jax.device_put(host_state, shardings)
  outs = []
  # Two steps, both with R1 (a superset of the plain step): one program per
  # mesh to compile.
  for step in range(2):
    with_r1 = step % config.train.r1_every == 0
    state, out = step_fn(
      state, parallel.global_batch(batch, mesh), models=models, with_r1=with_r1
    )
    outs.append({k: float(v) for k, v in out.items()})
  tables = {
    'g_params': state.g_params['embedding'],
    'ema_params': state.ema_params['embedding'],
    'adam_mu': state.g_opt_state[0].mu['embedding'],
    'adam_nu': state.g_opt_state[0].nu['embedding'],
  }
  shard_rows[shard] = {
    name: [s.data.shape[0] for s in table.addressable_shards]
    for name, table in tables.items()
  }
  results[shard] = (jax.tree_util.tree_map(np.asarray, state), outs)
(plain, plain_out), (split, split_out) = results[False], results[True]
diffs = [
  float(np.max(np.abs(a - b) / (np.abs(a) + 1e-3)))
  for a, b in zip(
    jax.tree_util.tree_leaves(plain), jax.tree_util.tree_leaves(split)
  )
]
print(
  json.dumps(
    {
      'devices': mesh.size,
      'size': config.model.size,
      'rows_replicated': shard_rows[False],
      'rows_split': shard_rows[True],
      'losses': [plain_out, split_out],
      'max_param_rel_diff': max(diffs),
    }
  )
)
