r"""The training command.

    python -m cips_jax.main --config=experiments/churches.py --workdir=DIR \
        [--config.train.global_batch_size=64 ...]

Running the same command with the same workdir resumes from the latest
checkpoint. On several processes (TPU pods, multi-node GPU), each process runs
the same command; it joins the others through `jax.distributed.initialize()`
(auto-detected on TPU pods and SLURM, or given by --coordinator_address /
--num_processes / --process_id).
"""

from __future__ import annotations

import os
import sys

from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

from cips_jax import cli
from cips_jax import errors
from cips_jax import host_malloc
from cips_jax import train

_CONFIG = config_flags.DEFINE_config_file(
  'config',
  None,
  'An ml_collections config file (experiments/*.py).',
  lock_config=True,
)
_WORKDIR = flags.DEFINE_string(
  'workdir', None, 'Directory for checkpoints, logs and samples.'
)
_COORDINATOR = flags.DEFINE_string(
  'coordinator_address', None, 'host:port of process 0, for multi-process runs.'
)
_NUM_PROCESSES = flags.DEFINE_integer(
  'num_processes', None, 'Number of processes.'
)
_PROCESS_ID = flags.DEFINE_integer('process_id', None, 'Index of this process.')
flags.mark_flags_as_required(['config', 'workdir'])

# Environments where jax.distributed.initialize() finds its peers by itself.
_CLUSTER_VARIABLES = (
  'SLURM_NTASKS',
  'OMPI_COMM_WORLD_SIZE',
  'TPU_WORKER_HOSTNAMES',
  'JAX_COORDINATOR_ADDRESS',
)


def _runs_as_one_of_several_processes() -> bool:
  if _NUM_PROCESSES.value is not None:
    return _NUM_PROCESSES.value > 1
  for name in _CLUSTER_VARIABLES:
    value = os.environ.get(name, '')
    if name == 'TPU_WORKER_HOSTNAMES' and ',' in value:
      return True
    if name != 'TPU_WORKER_HOSTNAMES' and value and value != '1':
      return True
  return False


def main(argv):
  cli.no_positional_arguments(argv)
  if not _WORKDIR.value.strip():
    # An empty --workdir would train into the current folder.
    raise errors.OptionError(
      '--workdir is empty: name a folder for the checkpoints and logs'
    )
  if _runs_as_one_of_several_processes():
    jax.distributed.initialize(
      coordinator_address=_COORDINATOR.value,
      num_processes=_NUM_PROCESSES.value,
      process_id=_PROCESS_ID.value,
    )
  cli.start_devices()
  config = _CONFIG.value
  logging.info('python %s, jax %s', sys.version.split()[0], jax.__version__)
  logging.vlog(
    1,
    'host malloc keeps and reuses freed memory (cips_jax.host_malloc): %s',
    host_malloc.configured,
  )
  logging.info(
    'process %d of %d; %d local devices, %d in all: %s',
    jax.process_index(),
    jax.process_count(),
    jax.local_device_count(),
    jax.device_count(),
    jax.devices(),
  )
  m, t = config.model, config.train
  logging.info(
    'training a %s-%d, %d wide, on %s for %d steps at batch %d in %s '
    '(--verbosity=1 logs the whole config)',
    m.arch,
    m.size,
    m.hidden_size,
    config.data.name,
    t.num_steps,
    t.global_batch_size,
    _WORKDIR.value,
  )
  logging.vlog(1, 'config:\n%s', config)
  # Checks the config (config_validation) before anything compiles.
  train.train_and_evaluate(config, _WORKDIR.value)


if __name__ == '__main__':
  cli.run(main, 'cips_jax.main', devices_first=False)
