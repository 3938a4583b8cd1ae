"""The trainer's device layout: one mesh axis, "data"; batches split on it, the rest replicated.

The one source of the mesh and the two shardings the set-up, the train step and evaluation
use, and of the host -> device batch placement.
"""

import jax
import numpy as np

DATA_AXIS = "data"
DATA = jax.sharding.PartitionSpec(DATA_AXIS)  # batches: leading dimension split over devices
REPLICATED = jax.sharding.PartitionSpec()  # parameters, optimizer state, rng, metrics
# Batches of k micro-batches ``[k, rows, ...]`` (gradient accumulation): rows split.
MICRO_DATA = jax.sharding.PartitionSpec(None, DATA_AXIS)


def make_mesh(config) -> jax.sharding.Mesh:
  """The first ``config.mesh_devices`` devices (0: all) on the "data" axis."""
  devices = jax.devices()[: config.mesh_devices or None]
  return jax.sharding.Mesh(np.array(devices), (DATA_AXIS,))


def replicated(mesh: jax.sharding.Mesh) -> jax.sharding.NamedSharding:
  """The same whole array on every device of ``mesh``."""
  return jax.sharding.NamedSharding(mesh, REPLICATED)


def data_sharding(mesh: jax.sharding.Mesh) -> jax.sharding.NamedSharding:
  """Rows (the leading dimension) split over the devices of ``mesh``."""
  return jax.sharding.NamedSharding(mesh, DATA)


def train_batch_sharding(mesh: jax.sharding.Mesh, grad_accum_steps: int = 1
                         ) -> jax.sharding.NamedSharding:
  """The sharding of a training batch: `data_sharding`, or with ``grad_accum_steps`` > 1
  (batches ``[k, rows, ...]``) the rows (second dimension) split over the devices."""
  if grad_accum_steps == 1:
    return data_sharding(mesh)
  return jax.sharding.NamedSharding(mesh, MICRO_DATA)


def global_batch(batch: dict, sharding: jax.sharding.Sharding) -> dict:
  """Host numpy batch (this process's rows) -> arrays sharded over the mesh's data axis."""
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in batch.items()}


def shared_batch(batch: dict, sharding: jax.sharding.Sharding) -> dict:
  """Host numpy batch that every process holds whole -> the same rows, sharded over the mesh.

  Each process places only the rows of its own devices, so the global array is ``batch``
  (not one copy per host) and the work is split over all devices.
  """
  def put(v):
    v = np.asarray(v)
    return jax.make_array_from_callback(v.shape, sharding, lambda index: v[index])
  return {k: put(v) for k, v in batch.items()}
