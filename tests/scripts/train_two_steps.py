"""Two training steps of the tiny config, as one of several processes or alone.

    python tests/scripts/train_two_steps.py \
        NUM_PROCESSES PROCESS_ID PORT DATA_DIR WORKDIR

Several processes join through jax.distributed on 127.0.0.1:PORT (gloo
collectives). Each saves its own copy of every leaf of the final state to
WORKDIR/state_<N>_<ID>.npz and prints a JSON line with its process index, the
process count and the device counts.
"""

import json
import pathlib
import sys

import jax

num_processes, process_id, port = map(int, sys.argv[1:4])
data_dir, workdir = sys.argv[4:6]
if num_processes > 1:
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  jax.distributed.initialize(
    coordinator_address=f'127.0.0.1:{port}',
    num_processes=num_processes,
    process_id=process_id,
  )

import numpy as np  # noqa: E402

from cips_jax import train  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from support import tiny_config  # noqa: E402

config = tiny_config(
  data_dir,
  **{
    'train.global_batch_size': 8,
    'train.num_steps': 2,
    'train.r1_every': 1,  # one step program to compile, with R1
    'logging.checkpoint_every': 2,
    'logging.sample_every': 2,
  },
)
state = train.train_and_evaluate(config, f'{workdir}/run{num_processes}')
# This process's own copy of every (replicated) leaf of the final state.
leaves = [
  np.asarray(leaf.addressable_data(0))
  for leaf in jax.tree_util.tree_leaves(state)
]
np.savez(f'{workdir}/state_{num_processes}_{process_id}.npz', *leaves)
print(
  json.dumps(
    {
      'process': jax.process_index(),
      'processes': jax.process_count(),
      'devices': jax.device_count(),
      'local': jax.local_device_count(),
    }
  )
)
