"""Data parallelism.

A one-axis device mesh, shardings, and host-local -> global batches.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import jax
from jax.experimental import multihost_utils
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np

from cips_jax import errors
from cips_jax import platforms

DATA_AXIS = 'data'


def make_mesh(devices=None) -> Mesh:
  """A mesh over all devices (of every process) with the single axis 'data'."""
  devices = np.asarray(jax.devices() if devices is None else devices)
  # Flat: one data-parallel axis over every device of every process. Auto axes
  # let jit propagate shardings from the arguments' placements.
  return Mesh(
    devices.reshape(-1), (DATA_AXIS,), axis_types=(jax.sharding.AxisType.Auto,)
  )


def replicated(mesh: Mesh) -> NamedSharding:
  """Every device holds the whole array (parameters, optimizer states, EMA)."""
  # P() names no mesh axis. The models are small enough (44M parameters for
  # CIPSskip-256) that data parallelism needs no model sharding.
  return NamedSharding(mesh, P())


def _is_embedding_table(path, leaf) -> bool:
  last = path[-1] if path else None
  # Dict entries carry .key, attributes .name; the Adam moments mirror the
  # params tree, so their 'embedding' leaves match too.
  name = getattr(last, 'key', getattr(last, 'name', None))
  return name == 'embedding' and getattr(leaf, 'ndim', 0) == 3


def state_shardings(
  state: Any, mesh: Mesh, shard_embedding: bool = False
) -> Any:
  """A sharding for every leaf of a train state (arrays or ShapeDtypeStructs).

  Everything is replicated, except, with `shard_embedding`, the
  coordinate-embedding tables (size, size, hidden) of G and its EMA and their
  Adam moments: their rows are split over the 'data' axis, so each device stores
  1/n of them (the 1024 model's table alone is 537M parameters). XLA gathers
  what each step's lookups need.
  """
  # Leading axis = the table's rows (y): equal shares of rows per device.
  split = NamedSharding(mesh, P(DATA_AXIS))
  whole = replicated(mesh)

  def rule(path, leaf):
    if shard_embedding and _is_embedding_table(path, leaf):
      if leaf.shape[0] % mesh.size:
        raise errors.InputError(
          f'cannot split an embedding table of {leaf.shape[0]} rows over '
          f'{mesh.size} devices'
        )
      return split
    return whole

  return jax.tree_util.tree_map_with_path(rule, state)


@contextlib.contextmanager
def tracing_over(mesh: Mesh) -> Iterator[None]:
  """A context to trace a program jitted over `mesh` in.

  jit's shardings alone do not name the mesh while a program is traced; under
  this context `jax.sharding.get_abstract_mesh()` does, so code that XLA
  cannot partition by itself (the fused Pallas kernel: Mosaic and Triton
  calls are opaque to it) splits itself over the 'data' axis
  (`splittable_data_shards`). The program is built for the platform of the
  mesh's devices, so the per-platform choices are made for it while tracing
  (`platforms.built_for`).
  """
  backend = mesh.devices.flat[0].platform
  with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
    with platforms.built_for(backend):
      yield


def splittable_data_shards() -> int:
  """How many shards the 'data' axis of the mesh being traced over has.

  1 outside `tracing_over`, and inside a shard_map over 'data' (each device
  already holds its own shard there).
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or DATA_AXIS not in mesh.axis_names:
    return 1
  if mesh.axis_types[mesh.axis_names.index(DATA_AXIS)] == (
    jax.sharding.AxisType.Manual
  ):
    return 1
  return mesh.shape[DATA_AXIS]


def batch_sharded(mesh: Mesh) -> NamedSharding:
  """The leading (batch) axis is split across the 'data' axis."""
  return NamedSharding(mesh, P(DATA_AXIS))


def divisible_by_devices(count: int, mesh: Mesh) -> int:
  """`count` (images, pixels) rounded up to a multiple of the device count.

  Every device then gets an equal share.
  """
  # -(-a // b) is ceil(a / b) in integers.
  return -(-count // mesh.size) * mesh.size


def to_host(array: jax.Array) -> np.ndarray:
  """A (possibly batch-sharded, multi-process) array as one numpy array."""
  if jax.process_count() > 1:
    # tiled: concatenate the processes' rows instead of stacking a new axis.
    array = multihost_utils.process_allgather(array, tiled=True)
  return np.asarray(array)


def global_batch(local: Any, mesh: Mesh) -> Any:
  """Host-local arrays (this process's rows) -> global arrays over 'data'.

  The global arrays are sharded over the 'data' axis. Each leaf has shape
  (global_batch / process_count, ...) on every process; the result is
  (global_batch, ...), process i's rows being rows
  [i * local, (i + 1) * local).
  """
  sharding = batch_sharded(mesh)
  # Each process hands over only its own rows; no data crosses hosts.
  return jax.tree_util.tree_map(
    lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)),
    local,
  )
