"""Runs of identical layers as one `jax.lax.scan` over stacked parameters (`scan_layers`).

A Python loop over layers traces and compiles every layer again: compile time grows with
depth. A scan traces one layer per run of identical layers (same module, same static
behaviour: dense or γ-MoD, no hook in between) and compiles it once.

A stacked run is an ordinary module of the layer's class whose parameters carry a leading
[count] axis; it lives in the parent under `<name>_stacked/<run>` instead of
`<name>/<layer>` (e.g. `llm/layers_stacked/1/mlp/up_proj/kernel` [26, 4096, 11008] for
layers 3..28). `gamma_mod_jax.convert.keymap.param_paths` shows it as the per-layer
parameters again, so checkpoints, conversions and exports keep per-layer keys.
"""

from __future__ import annotations

from typing import Callable, Hashable, List, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
from flax import nnx

STACKED_SUFFIX = "_stacked"


def layer_runs(kinds: Sequence[Hashable]) -> Tuple[Tuple[int, int, Hashable], ...]:
    """Maximal runs of equal consecutive kinds: ((start, count, kind), ...)."""
    runs = []
    for i, kind in enumerate(kinds):
        if runs and runs[-1][2] == kind:
            start, count, _ = runs[-1]
            runs[-1] = (start, count + 1, kind)
        else:
            runs.append((i, 1, kind))
    return tuple(runs)


def stack_layers(layers: Sequence[nnx.Module]) -> nnx.Module:
    """One module of the layers' (shared) structure whose parameters are theirs stacked
    along a new leading axis. Built from ordinary per-layer inits, so a scanned model
    drawn from a seed has exactly the weights of the unscanned one from that seed."""
    splits = [nnx.split(layer) for layer in layers]
    graphdef = splits[0][0]
    if any(other != graphdef for other, _ in splits[1:]):
        raise ValueError(f"layers of one scanned run differ in structure ({type(layers[0]).__name__})")
    stack = lambda *xs: jnp.stack(xs)
    states = [state for _, state in splits]
    return nnx.merge(graphdef, jax.tree.map(stack, *states))


def scan_stack(stack: nnx.Module, body: Callable, carry, xs=None, *, remat: bool = False, policy=None):
    """(carry, ys) of `body(layer, carry, x) -> (carry, y)` applied layer by layer of a
    stacked run (`x`: the slice of `xs` for that layer, e.g. its KV cache; ys stacked).
    remat: recompute each layer's activations in the backward pass (`policy`: which to
    keep, a jax.checkpoint policy; None saves nothing)."""
    graphdef, state = nnx.split(stack)

    def step(carry, inputs):
        layer_state, x = inputs
        return body(nnx.merge(graphdef, layer_state), carry, x)

    if remat:
        # prevent_cse is not needed inside a scan (and would block optimisations there).
        step = jax.checkpoint(step, policy=policy, prevent_cse=False)
    return jax.lax.scan(step, carry, (state, xs))


def unstack(tree, count: int) -> list:
    """[tree[j] for each of the `count` layers] of a tree with a leading layer axis."""
    return [jax.tree.map(lambda a, j=j: a[j], tree) for j in range(count)]


def stacked_at(path: Sequence) -> Optional[int]:
    """Index of the `<name>_stacked` key in a parameter's path (None: not in a stacked run)."""
    return next((i for i, p in enumerate(path) if str(p).endswith(STACKED_SUFFIX)), None)


def per_layer_paths(items: Sequence[Tuple[tuple, int]]) -> List[List[tuple]]:
    """The per-layer paths each parameter stands for, given (path, leading size) of every
    parameter of a model: [path] for an ordinary one; for `<name>_stacked/<run>/rest` (a
    stacked run of `count` layers) [`<name>/<start + j>/rest` for j < count], where a
    container's runs number their layers on from 0 in run order (models/scan.py layout).
    The one place that knows how stacked paths map to layers (key map, freeze rules)."""
    counts = {}
    for path, count in items:
        at = stacked_at(path)
        if at is not None:
            counts.setdefault(tuple(path[:at + 1]), {})[int(path[at + 1])] = count
    starts = {}
    for container, runs in counts.items():
        start = 0
        for run in sorted(runs):
            starts[container, run] = start
            start += runs[run]
    out = []
    for path, count in items:
        at = stacked_at(path)
        if at is None:
            out.append([tuple(path)])
            continue
        container, run = tuple(path[:at + 1]), int(path[at + 1])
        name, start, rest = str(container[-1])[:-len(STACKED_SUFFIX)], starts[container, run], tuple(path[at + 2:])
        out.append([container[:-1] + (name, start + j) + rest for j in range(count)])
    return out
