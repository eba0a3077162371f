"""Data parallelism: a one-axis device mesh, shardings, host-local -> global batches."""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = 'data'


def make_mesh(devices=None) -> Mesh:
  """A mesh over all devices (of every process) with the single axis 'data'."""
  devices = np.asarray(jax.devices() if devices is None else devices)
  return Mesh(devices.reshape(-1), (DATA_AXIS,),
              axis_types=(jax.sharding.AxisType.Auto,))


def replicated(mesh: Mesh) -> NamedSharding:
  """Every device holds the whole array (parameters, optimizer states, EMA)."""
  return NamedSharding(mesh, P())


def batch_sharded(mesh: Mesh) -> NamedSharding:
  """The leading (batch) axis is split across the 'data' axis."""
  return NamedSharding(mesh, P(DATA_AXIS))


def global_batch(local: Any, mesh: Mesh) -> Any:
  """Host-local arrays (this process's rows) -> global arrays sharded over 'data'.

  Each leaf has shape (global_batch / process_count, ...) on every process; the result is
  (global_batch, ...), process i's rows being rows [i * local, (i + 1) * local).
  """
  sharding = batch_sharded(mesh)
  return jax.tree_util.tree_map(
      lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), local)
