"""Plain data parallelism with jax.pmap (config.parallelism = "pmap").

Every local device holds a full copy of the train state (a leading axis of size
jax.local_device_count() on each leaf); each process's batch is split over its local
devices; the step averages gradients with jax.lax.pmean over AXIS (which spans the
devices of every process). Checkpoints hold one copy as global arrays replicated on a
mesh of all devices, the same layout-free format as the pjit trainer's, so either can
restore the other's checkpoints.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

AXIS = "batch"  # pmap's axis name, used by the step's pmean / psum


def _local_mesh() -> jax.sharding.Mesh:
    return jax.sharding.Mesh(np.asarray(jax.local_devices()), (AXIS,))


def replicate(tree):
    """One copy per local device: leaves [n_local, ...], laid out for pmap."""
    mesh = _local_mesh()
    n = mesh.devices.size

    def put(x):
        host = np.asarray(x)
        stacked = np.broadcast_to(host[None], (n,) + host.shape)
        return jax.device_put(stacked, NamedSharding(mesh, P(AXIS)))

    return jax.tree.map(put, tree)


def first_copy(x) -> np.ndarray:
    """Host value of one copy of a replicated pmap leaf [n_local, ...]."""
    return np.asarray(x.addressable_shards[0].data).reshape(x.shape[1:])


def unreplicate(tree, mesh: jax.sharding.Mesh):
    """pmap state -> global arrays replicated on `mesh` (the checkpoint layout)."""
    sharding = NamedSharding(mesh, P())

    def put(x):
        host = first_copy(x)
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

    return jax.tree.map(put, tree)


def from_global(tree):
    """Global replicated arrays (a restored checkpoint) -> pmap state."""
    return replicate(jax.tree.map(lambda x: np.asarray(x.addressable_shards[0].data), tree))


def split_batch(batch):
    """A process-local batch [B, ...] -> [n_local, B / n_local, ...] on the local devices."""
    mesh = _local_mesh()
    n = mesh.devices.size
    out = {}
    for key, value in batch.items():
        value = np.asarray(value)
        if value.shape[0] % n:
            raise ValueError(f"pmap: the per-process batch of {value.shape[0]} examples does not split over "
                             f"{n} local devices; make data.batch_size a multiple of {n}")
        out[key] = jax.device_put(value.reshape((n, value.shape[0] // n) + value.shape[1:]),
                                  NamedSharding(mesh, P(AXIS)))
    return out


def unreplicate_metrics(metrics):
    """pmap metrics [n_local, ...] (equal on every device) -> host values of one copy."""
    return jax.tree.map(first_copy, metrics)
