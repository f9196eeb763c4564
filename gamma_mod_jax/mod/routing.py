"""Token routing for MoD layers as pure, static-shape functions.

Shapes: b = batch, s = sequence, k = tokens computed by a MoD layer (static).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from gamma_mod_jax import token_types as tt
from gamma_mod_jax.mod.config import ALWAYS_KEEP, MoDConfig


def router_probabilities(router_logits_bs2):
    """p = softmax(logits)[..., 1]: the probability of computing a token (class 1)."""
    return jax.nn.softmax(router_logits_bs2.astype(jnp.float32), axis=-1)[..., 1]


def forced_mask(token_types_bs, cfg: MoDConfig):
    """Tokens that every MoD layer computes, whatever the router says."""
    forced = jnp.isin(token_types_bs, jnp.asarray(ALWAYS_KEEP[cfg.always_keep] or (-1,), jnp.int32))
    if cfg.skip_padding_first:
        forced = forced & (token_types_bs != tt.PADDING)
    return forced


def selection_priority(p_bs, token_types_bs, cfg: MoDConfig):
    """Score whose top-k is the official selection (top-k of p + 1 on forced tokens);
    padding first out when `skip_padding_first`. We add 2, not 1: the same order, except
    that a routable p that rounds to 1.0 in float32 can no longer tie a forced token."""
    priority = p_bs + 2.0 * forced_mask(token_types_bs, cfg).astype(p_bs.dtype)
    if cfg.skip_padding_first:
        priority = jnp.where(token_types_bs == tt.PADDING, p_bs - 4.0, priority)
    return priority


def select_top_k(priority_bs, k: int):
    """Indices [b, k] of the k highest priorities, sorted so causal order is kept,
    and the boolean membership mask [b, s]."""
    _, index = jax.lax.top_k(priority_bs, k)
    index = jnp.sort(index, axis=-1).astype(jnp.int32)
    selected = jnp.zeros(priority_bs.shape, bool)
    selected = jax.vmap(lambda row, i: row.at[i].set(True))(selected, index)
    return index, selected


def compact_order(keep_bs):
    """Indices [b, s] that put kept tokens first in their original order, then the rest:
    threshold routing with static shapes (kept tokens are compacted, the tail is masked)."""
    return jnp.argsort(~keep_bs, axis=-1, stable=True).astype(jnp.int32)


def threshold_bucket_sizes(seq_len: int, cfg: MoDConfig) -> tuple:
    """Static token counts a threshold-routed MoD layer may compute at this sequence
    length: each of `cfg.threshold_buckets` (fractions of the sequence) rounded up to a
    multiple of `cfg.threshold_bucket_multiple`, at most seq_len, ascending and distinct.
    The largest is seq_len (the fractions end at 1.0), so no kept token is ever dropped."""
    m = cfg.threshold_bucket_multiple
    sizes = {min(seq_len, -(-math.ceil(f * seq_len) // m) * m) for f in cfg.threshold_buckets}
    return tuple(sorted(sizes))


def routing_loss(router_logits_bs2, selected_bs, loss_mask_bs=None):
    """2-class cross-entropy of the router logits against top-k membership (1 = selected),
    averaged over the (optionally masked) positions, as the official code does over all."""
    logp = jax.nn.log_softmax(router_logits_bs2.astype(jnp.float32), axis=-1)
    nll = -jnp.where(selected_bs, logp[..., 1], logp[..., 0])
    if loss_mask_bs is None:
        return jnp.mean(nll)
    weights = loss_mask_bs.astype(jnp.float32)
    return jnp.sum(nll * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def skip_statistics(selected_bs, token_types_bs):
    """Skipped share per token type (over tokens of that type in the batch), and
    over all real (non-padding) tokens: {name: scalar}."""
    skipped = (~selected_bs).astype(jnp.float32)
    stats = {}
    for type_id, name in tt.NAMES.items():
        of_type = (token_types_bs == type_id).astype(jnp.float32)
        stats[f"skip_{name}"] = jnp.sum(skipped * of_type) / jnp.maximum(jnp.sum(of_type), 1.0)
    real = (token_types_bs != tt.PADDING).astype(jnp.float32)
    stats["skip_ratio"] = jnp.sum(skipped * real) / jnp.maximum(jnp.sum(real), 1.0)
    return stats


def total_routing_loss(mod_aux, cfg: MoDConfig):
    """The term added to the LM loss: coefficient x sum over MoD layers (0 when dense)."""
    if not mod_aux:
        return jnp.float32(0.0)
    return cfg.aux_loss_coef * jnp.sum(mod_aux["routing_loss"])
