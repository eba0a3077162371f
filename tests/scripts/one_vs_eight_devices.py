"""Two training steps on one device and on eight, from the same state and batch.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 \
        python tests/scripts/one_vs_eight_devices.py DATA_DIR

Prints a JSON line: the device count, both runs' metrics per step and the
largest relative difference between their final states.
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
  sys.argv[1], **{'train.global_batch_size': 8, 'train.r1_every': 1}
)
gen, disc = train_state.build_models(config)
g_tx, d_tx = train_state.make_optimizers(config)
# Host copies: each mesh gets its own buffers (the step donates them).
state = jax.tree_util.tree_map(
  np.asarray, train_state.create_state(gen, disc, g_tx, d_tx, 0)
)
batch = fake_batch(config)
results = {}
for name, devices in (('one', jax.devices()[:1]), ('eight', jax.devices())):
  mesh = parallel.make_mesh(devices)
  models = train.step_models(config, gen, disc, g_tx, d_tx, mesh)
  step_fn = train.jit_train_step(models)
  s = jax.device_put(state, parallel.replicated(mesh))
  outs = []
  # Two steps, both with R1 (a superset of the plain step): one program per
  # mesh to compile.
  for step in range(2):
    with_r1 = step % config.train.r1_every == 0
    s, out = step_fn(
      s, parallel.global_batch(batch, mesh), models=models, with_r1=with_r1
    )
    outs.append({k: float(v) for k, v in out.items()})
  results[name] = (s, outs)
(one, one_out), (eight, eight_out) = results['one'], results['eight']
diffs = []
for a, b in zip(
  jax.tree_util.tree_leaves(one), jax.tree_util.tree_leaves(eight)
):
  a, b = np.asarray(a), np.asarray(b)
  diffs.append(float(np.max(np.abs(a - b) / (np.abs(a) + 1e-3))))
print(
  json.dumps(
    {
      'devices': jax.device_count(),
      'one': one_out,
      'eight': eight_out,
      'max_param_rel_diff': max(diffs),
    }
  )
)
