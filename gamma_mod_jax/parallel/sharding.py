"""Logical axis names -> PartitionSpecs and NamedShardings on a mesh; host values and
process-local batches -> global jax.Arrays.

A dimension whose size is not divisible by the product of its mesh axes falls back
to replication for that dimension (logged once per (name, size, axes)); a mesh axis
already used by an earlier dimension of the same array, or of size 1, is dropped.
"""

from __future__ import annotations

import logging
import math
from typing import Callable, Dict, Optional, Sequence, Tuple

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from gamma_mod_jax.parallel.logical import batch_logical_axes, param_logical_axes, rules_dict

_log = logging.getLogger(__name__)
_LOGGED: set = set()


def _log_once(key, message: str, log: Optional[Callable[[str], None]]) -> None:
    if key in _LOGGED:
        return
    _LOGGED.add(key)
    (log or _log.warning)(message)


def logical_to_spec(logical: Sequence[Optional[str]], shape: Sequence[int], mesh: jax.sharding.Mesh, rules,
                    *, what: str = "array", log: Optional[Callable[[str], None]] = None) -> P:
    """PartitionSpec of an array with these logical dimension names on `mesh`."""
    table = rules if isinstance(rules, dict) else rules_dict(rules)
    used: set = set()
    spec = []
    for name, size in zip(logical, shape):
        axes = table.get(name, ()) if name else ()
        missing = [a for a in axes if a not in mesh.shape]
        if missing:
            raise ValueError(f"sharding rule for {name!r} names mesh axes {missing} the mesh lacks "
                             f"(it has {tuple(mesh.shape)})")
        axes = tuple(a for a in axes if a not in used and mesh.shape[a] > 1)
        ways = math.prod(mesh.shape[a] for a in axes)
        if axes and size % ways:
            _log_once((name, size, axes), f"sharding: {what} dimension {name!r} of size {size} is not divisible "
                      f"by mesh axes {axes} ({ways} ways); replicated along it (logged once)", log)
            axes = ()
        used.update(axes)
        spec.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    while spec and spec[-1] is None:
        spec.pop()
    return P(*spec)


def path_string(path) -> str:
    """'llm/layers/3/mlp/up_proj/kernel' from a jax key path (an nnx Variable's trailing
    `.value` is dropped)."""
    parts = []
    for key in path:
        for attr in ("key", "idx", "name"):
            if hasattr(key, attr):
                parts.append(str(getattr(key, attr)))
                break
        else:
            parts.append(str(key))
    if parts and parts[-1] == "value":
        parts.pop()
    return "/".join(parts)


def param_specs(params, mesh: jax.sharding.Mesh, rules=None, *, log=None):
    """A PartitionSpec for every leaf of a parameter tree (an nnx.State or nested dict
    of arrays / ShapeDtypeStructs), from its path through PARAM_AXES and `rules`."""
    table = rules_dict(rules) if not isinstance(rules, dict) else rules

    def spec(path, leaf):
        name = path_string(path)
        logical = param_logical_axes(name, len(leaf.shape))
        if logical is None:
            _log_once(("param", name), f"sharding: no logical axes for parameter {name} {tuple(leaf.shape)}; "
                      "replicated", log)
            return P()
        return logical_to_spec(logical, leaf.shape, mesh, table, what=f"parameter {name}", log=log)

    return jax.tree_util.tree_map_with_path(spec, params)


def param_shardings(params, mesh: jax.sharding.Mesh, rules=None, *, log=None):
    """NamedShardings of a parameter tree (see param_specs)."""
    return jax.tree.map(lambda s: NamedSharding(mesh, s), param_specs(params, mesh, rules, log=log),
                        is_leaf=lambda x: isinstance(x, P))


def like_params(tree, params, param_sharding_tree, default):
    """Shardings for a tree holding per-parameter values (optimizer moments, accumulated
    gradients: leaves whose path ends with a parameter's path and that have its shape)
    and other leaves (step counts: `default`)."""
    by_path = {path_string(p): (tuple(leaf.shape), sh) for (p, leaf), sh in
               zip(jax.tree_util.tree_flatten_with_path(params)[0], jax.tree.leaves(
                   param_sharding_tree, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding)))}

    def pick(path, leaf):
        parts = path_string(path).split("/")
        for start in range(len(parts)):
            hit = by_path.get("/".join(parts[start:]))
            if hit is not None:
                return hit[1] if hit[0] == tuple(leaf.shape) else default
        return default

    return jax.tree_util.tree_map_with_path(pick, tree)


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh: jax.sharding.Mesh, shape: Sequence[int], rules=None, *, log=None) -> NamedSharding:
    """Sharding of a global batch array [batch, ...]: examples over the `batch` rule's axes."""
    return NamedSharding(mesh, logical_to_spec(batch_logical_axes(len(shape)), shape, mesh, rules,
                                               what="batch", log=log))


def place(tree, shardings):
    """Host or single-device values -> global arrays with `shardings` (a matching tree).
    Every process must pass the same values (each keeps only its own slices)."""
    if jax.process_count() == 1:
        return jax.device_put(tree, shardings)

    def put(x, sharding):
        host = np.asarray(x)
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

    return jax.tree.map(put, tree, shardings)


def _process_rows(sharding: NamedSharding, global_shape) -> Tuple[int, int]:
    """[lo, hi): the rows of dim 0 this process's devices hold (checked contiguous)."""
    spans = sorted({(idx[0].start or 0, global_shape[0] if idx[0].stop is None else idx[0].stop)
                    for idx in sharding.addressable_devices_indices_map(tuple(global_shape)).values()})
    lo, hi = spans[0][0], spans[0][1]
    for start, stop in spans[1:]:
        if start > hi:
            raise ValueError(f"this process's devices hold non-contiguous batch rows {spans}")
        hi = max(hi, stop)
    return lo, hi


class BatchPlacer:
    """Process-local numpy batches -> global arrays sharded over the batch axes.

    Process p's batch holds global rows [p * B, (p + 1) * B) of the global batch, the
    global batch is their concatenation in process order, and every process passes the
    same local shape at the same step (the data pipeline's batch plan guarantees both:
    the global shape is built from the local one without asking the other processes). When the
    mesh gives a process's devices exactly those rows (the usual case), each process
    hands over only its own data (jax.make_array_from_process_local_data); otherwise
    (e.g. the batch dimension falls back to replication, or tensor spans processes) the
    rows are first all-gathered between processes (logged once)."""

    def __init__(self, mesh: jax.sharding.Mesh, rules=None, *, log=None):
        self.mesh, self.rules, self.log = mesh, rules, log
        self._cache: Dict[Tuple, Tuple[NamedSharding, Tuple[int, int]]] = {}

    def sharding(self, global_shape) -> NamedSharding:
        return self._layout(tuple(global_shape))[0]

    def _layout(self, global_shape):
        if global_shape not in self._cache:
            sharding = batch_sharding(self.mesh, global_shape, self.rules, log=self.log)
            self._cache[global_shape] = (sharding, _process_rows(sharding, global_shape))
        return self._cache[global_shape]

    def __call__(self, batch: Dict[str, np.ndarray]) -> Dict[str, jax.Array]:
        out = {}
        count, index = jax.process_count(), jax.process_index()
        for key, local in batch.items():
            local = np.asarray(local)
            global_shape = (local.shape[0] * count,) + local.shape[1:]
            sharding, (lo, hi) = self._layout(global_shape)
            mine = (index * local.shape[0], (index + 1) * local.shape[0])
            if (lo, hi) != mine:
                from jax.experimental import multihost_utils
                _log_once(("allgather", global_shape[0]), f"sharding: this mesh gives each process batch rows "
                          f"[{lo}, {hi}) instead of its own {mine}; batches are all-gathered between processes "
                          "(slower input; make tensor divide the local device count)", self.log)
                everything = np.asarray(multihost_utils.process_allgather(local, tiled=True))
                local = everything[lo:hi]
            out[key] = jax.make_array_from_process_local_data(sharding, local, global_shape)
        return out
