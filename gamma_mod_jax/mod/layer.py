"""A decoder block run as a γ-MoD layer: route, gather, compute, scatter back.

`block` is any pre-norm decoder block exposing `input_layernorm(x)`,
`attention_branch(x, positions, mask, cache, token_valid) -> (x + attn, cache, probs)`
and `mlp_branch(h)` (the LLaMA layer in `gamma_mod_jax/models/llama.py`); `router`
maps normalised hidden states [b, s, d] to logits [b, s, 2]. Tokens that are not
computed pass through unchanged on the residual path.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from gamma_mod_jax import token_types as tt
from gamma_mod_jax.mod import routing
from gamma_mod_jax.mod.config import MoDConfig


def gather_tokens(x_bs_, index_bk):
    """x[b, index[b, j]] for [b, s] or [b, s, d] arrays."""
    idx = index_bk if x_bs_.ndim == 2 else index_bk[..., None]
    return jnp.take_along_axis(x_bs_, idx, axis=1)


def scatter_tokens(x_bsd, index_bk, values_bkd):
    """x with rows index[b, j] replaced by values[b, j]."""
    return jax.vmap(lambda x, i, v: x.at[i].set(v))(x_bsd, index_bk, values_bkd.astype(x_bsd.dtype))


def _compute_gathered(block, x_bsd, p_bs, index_bk, key_valid_bk, update_bk, positions_bs, cfg: MoDConfig,
                      cache):
    """Runs the block on the gathered tokens, scales by the router weight, and scatters the
    results back where update_bk. Keys (and cache slots) are valid where key_valid_bk.
    Returns (x, cache)."""
    x_sel = gather_tokens(x_bsd, index_bk)
    weight = gather_tokens(p_bs, index_bk)[..., None]
    if cfg.router_weight == "straight_through":
        weight = 1.0 + weight - jax.lax.stop_gradient(weight)
    weight = weight.astype(x_sel.dtype)
    if cfg.positions == "renumbered":
        # Official: the computed tokens are numbered 0..k-1 (continuing the layer's own
        # cache length when decoding from a prefilled cache).
        start = jnp.zeros((x_bsd.shape[0],), jnp.int32) if cache is None else cache.length
        pos = start[:, None] + jnp.cumsum(update_bk, axis=1, dtype=jnp.int32) - 1
        pos = jnp.maximum(pos, 0)
    else:
        pos = gather_tokens(positions_bs, index_bk)
    if cache is None:
        # Causal in gathered (sorted) order, keys restricted to the valid ones.
        h, _, _ = block.attention_branch(x_sel, pos, key_valid_bk[:, None, :])
    else:
        h, cache, _ = block.attention_branch(x_sel, pos, None, cache, key_valid_bk)
    if cfg.router_scales == "mlp":  # official: h + p * MLP(LN2(h))
        out = h + weight * block.mlp_branch(h)
    else:  # MoD paper: x + p * (block(x) - x)
        out = x_sel + weight * (h + block.mlp_branch(h) - x_sel)
    out = jnp.where(update_bk[..., None], out, x_sel)
    return scatter_tokens(x_bsd, index_bk, out), cache


def route_logits(block, router, x_bsd):
    """Router logits [b, s, 2] from the block's own input RMSNorm (float32)."""
    return router(block.input_layernorm(x_bsd)).astype(jnp.float32)


def mod_layer_capacity(block, router, x_bsd, positions_bs, token_valid_bs, token_types_bs, cfg: MoDConfig,
                       num_skipped: int, cache=None):
    """Training-time (and capacity inference) routing: the top s - num_skipped tokens by
    router priority are computed. Returns (x, cache, aux) with aux holding the routing
    loss, the selection mask and skip statistics."""
    logits = route_logits(block, router, x_bsd)
    p = routing.router_probabilities(logits)
    k = x_bsd.shape[1] - num_skipped
    index, selected = routing.select_top_k(routing.selection_priority(p, token_types_bs, cfg), k)
    # Like the official code, every selected token is computed (selected padding too) and
    # padding is masked out as a key.
    x_out, cache = _compute_gathered(block, x_bsd, p, index, gather_tokens(token_valid_bs, index),
                                     jnp.ones_like(index, bool), positions_bs, cfg, cache)
    loss_mask = (token_types_bs != tt.PADDING) if cfg.skip_padding_first else None
    aux = {"routing_loss": routing.routing_loss(logits, selected, loss_mask), "selected": selected,
           **routing.skip_statistics(selected, token_types_bs)}
    return x_out, cache, aux


def mod_layer_threshold(block, router, x_bsd, positions_bs, token_valid_bs, token_types_bs, cfg: MoDConfig,
                        threshold: float, cache=None):
    """Inference routing of the official code, static-shape and batched: a token is
    computed when p > threshold (prefill) or p >= threshold (a single decode token,
    which otherwise skips the layer and writes no cache entry). Computed tokens are
    compacted to the front in order, so renumbered positions are their rank.

    Prefill computes only a static bucket of k tokens (`routing.threshold_bucket_sizes`),
    the smallest covering the batch's largest kept count, chosen at run time with
    `lax.switch`: one executable serves every input. Decoding skips the layer's compute
    (`lax.cond`) when no example of the batch keeps its token. aux also holds `probability`
    [b, s] (the router's p)."""
    logits = route_logits(block, router, x_bsd)
    p = routing.router_probabilities(logits)
    s = x_bsd.shape[1]
    if s == 1 and cache is not None:
        keep = (p >= threshold) & token_valid_bs
        index = jnp.zeros_like(keep, jnp.int32)

        def compute(x, cache):
            return _compute_gathered(block, x, p, index, keep, keep, positions_bs, cfg, cache)

        x_out, cache = jax.lax.cond(jnp.any(keep), compute, lambda x, cache: (x, cache), x_bsd, cache)
    else:
        keep = (p > threshold) & token_valid_bs
        order = routing.compact_order(keep)
        sizes = routing.threshold_bucket_sizes(s, cfg)

        def compute_bucket(k):
            def compute(x, cache):
                index = order[:, :k]
                kept = gather_tokens(keep, index)
                return _compute_gathered(block, x, p, index, kept, kept, positions_bs, cfg, cache)
            return compute

        branches = [compute_bucket(k) for k in sizes]
        if len(branches) == 1:
            x_out, cache = branches[0](x_bsd, cache)
        else:
            largest = jnp.max(jnp.sum(keep, axis=1, dtype=jnp.int32))
            bucket = jnp.searchsorted(jnp.asarray(sizes, jnp.int32), largest, side="left")
            x_out, cache = jax.lax.switch(bucket, branches, x_bsd, cache)
    aux = {"selected": keep, "probability": p, **routing.skip_statistics(keep, token_types_bs)}
    return x_out, cache, aux
