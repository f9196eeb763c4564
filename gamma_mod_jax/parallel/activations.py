"""Activation sharding constraints by logical names, through the parameters' rules table.

Models mark block boundaries with `constrain(x, ("batch", "length", "embed"))`. Outside
an `activation_sharding(mesh, rules)` context (the default: one device, pmap, tests) that
is the identity; inside it (the pjit trainer traces its step there) it is
`jax.lax.with_sharding_constraint` to the PartitionSpec the rules give those names
(parallel/sharding.py: `logical_to_spec`, with its divisibility fallback), so XLA's
propagation is pinned where it matters instead of guessing between layers.

Logical names of activations: batch (examples), length (sequence positions), embed (the
residual width), heads (attention heads), kv_heads, mlp (MLP hidden units), vocab
(logits); a name the rules do not list stays whole.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Optional, Sequence

import jax
from jax.sharding import NamedSharding

from gamma_mod_jax.parallel.logical import rules_dict
from gamma_mod_jax.parallel.sharding import logical_to_spec

_ACTIVE = contextvars.ContextVar("gamma_mod_jax_activation_sharding", default=None)


@contextlib.contextmanager
def activation_sharding(mesh: jax.sharding.Mesh, rules=None):
    """Within this context `constrain` pins activations onto `mesh` by `rules` (None: the
    default rules). Enter it around the tracing of a jitted step."""
    token = _ACTIVE.set((mesh, rules_dict(rules) if not isinstance(rules, dict) else rules))
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def constrain(x, logical: Sequence[Optional[str]]):
    """x with a sharding constraint from its dimensions' logical names (one per dimension)
    when an `activation_sharding` context is active; x itself otherwise."""
    active = _ACTIVE.get()
    if active is None:
        return x
    if len(logical) != x.ndim:
        raise ValueError(f"activation of shape {x.shape} given {len(logical)} logical names {tuple(logical)}")
    mesh, table = active
    spec = logical_to_spec(logical, x.shape, mesh, table, what="activation")
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))
