"""The device mesh: three named axes, sizes from the config.

    config.mesh = dict(data=-1, fsdp=1, tensor=1)   # -1: all remaining devices

`data` replicates parameters and splits the batch; `fsdp` splits the batch and shards
parameters and optimizer state (gathered per use); `tensor` splits attention heads,
MLP hidden units and the vocabulary. Devices are laid out process-major with `tensor`
innermost, so each process's devices form a block of whole (data, fsdp) coordinates
whenever tensor divides the local device count: each process then feeds its own rows
of the batch.
"""

from __future__ import annotations

import math
from typing import Mapping, Optional, Sequence

import jax
import numpy as np

MESH_AXES = ("data", "fsdp", "tensor")
DEFAULT_MESH = {"data": -1, "fsdp": 1, "tensor": 1}


def mesh_shape(mesh_cfg: Optional[Mapping[str, int]], num_devices: int) -> dict:
    """{axis: size} for `num_devices` devices; at most one size may be -1 (the rest)."""
    sizes = dict(DEFAULT_MESH)
    unknown = sorted(set(mesh_cfg or {}) - set(MESH_AXES))
    if unknown:
        raise ValueError(f"mesh axes {unknown} are unknown; the mesh has {MESH_AXES}")
    sizes.update({k: int(v) for k, v in (mesh_cfg or {}).items()})
    free = [k for k, v in sizes.items() if v == -1]
    if len(free) > 1:
        raise ValueError(f"mesh {sizes}: at most one axis may be -1, got {free}")
    bad = [k for k, v in sizes.items() if v == 0 or v < -1]
    if bad:
        raise ValueError(f"mesh {sizes}: sizes must be positive or -1, got {bad}")
    fixed = math.prod(v for v in sizes.values() if v != -1)
    if free:
        if num_devices % fixed:
            raise ValueError(f"mesh {sizes}: {num_devices} devices are not divisible by the fixed axes' "
                             f"product {fixed}")
        sizes[free[0]] = num_devices // fixed
    if math.prod(sizes.values()) != num_devices:
        raise ValueError(f"mesh {sizes} needs {math.prod(sizes.values())} devices, {num_devices} are available")
    return sizes


def make_mesh(mesh_cfg: Optional[Mapping[str, int]] = None,
              devices: Optional[Sequence[jax.Device]] = None) -> jax.sharding.Mesh:
    """The (data, fsdp, tensor) mesh over `devices` (default: every device of every
    process), process-major. Axis types are Auto: shardings come from the jit's
    in/out shardings and XLA's propagation, and with_sharding_constraint is a hint."""
    devices = list(jax.devices() if devices is None else devices)
    devices.sort(key=lambda d: (d.process_index, d.id))
    sizes = mesh_shape(mesh_cfg, len(devices))
    grid = np.asarray(devices, dtype=object).reshape([sizes[a] for a in MESH_AXES])
    auto = jax.sharding.AxisType.Auto
    return jax.sharding.Mesh(grid, MESH_AXES, axis_types=(auto,) * len(MESH_AXES))


def describe(mesh: jax.sharding.Mesh) -> str:
    shape = " x ".join(f"{name}={size}" for name, size in mesh.shape.items())
    return f"mesh {shape} ({mesh.devices.size} devices, {jax.process_count()} process(es))"
