"""γ-MoD layers vs a naive per-example reference written from the reference document."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gamma_mod_jax import token_types as tt
from gamma_mod_jax.mod.config import ALWAYS_KEEP, MoDConfig
from gamma_mod_jax.models.config import LlamaConfig
from gamma_mod_jax.models.llama import Llama
from tests.conftest import rel_err

CFG = LlamaConfig(vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2)
ROUTABLE = 10  # image + system tokens in the layout below


def causal_mask(token_valid_bs):
    """[batch, q, k]: causal, keys restricted to valid (non-padding) tokens."""
    s = token_valid_bs.shape[1]
    return jnp.tril(jnp.ones((s, s), bool))[None] & token_valid_bs[:, None, :]


def make_batch(rng, b=3, s=18):
    """Image (6) + system (4) prefix, then question/answer, right padding of varying length."""
    ids = rng.integers(3, CFG.vocab_size, size=(b, s)).astype(np.int32)
    lengths = [s, s - 3, s - 6][:b]
    types = np.zeros((b, s), np.int32)
    for row, n in enumerate(lengths):
        types[row, :6] = tt.IMAGE
        types[row, 6:10] = tt.SYSTEM
        types[row, 10:n] = tt.QUESTION
        types[row, 10 + (n - 10) // 2:n] = tt.ANSWER
    mask = (types != tt.PADDING).astype(np.int32)
    return jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(types)


def build(rng, **mod_kw):
    mod = MoDConfig(layers=(1, 3), num_routable_tokens=ROUTABLE, **mod_kw)
    model = Llama(CFG, mod=mod, rngs=nnx.Rngs(int(rng.integers(1 << 30))))
    # A router with a wider spread of p than its init, yet far from saturating at 1.0.
    model.router.kernel.set_value(jnp.asarray(rng.standard_normal((CFG.hidden_size, 2)) * 0.3, jnp.float32))
    return model


def naive_forward(model, ids, mask, types, routing):
    """One example at a time, dynamic gathers with numpy indices: the method as written in
    gamma_mod.md (top-k of p + forced, sorted, renumbered or original positions, causal
    among the selected with padding masked, p scaling the MLP or the block, scatter).
    Also returns the smallest float64 margin of any routing decision (the gap at the top-k
    boundary, or |p - threshold|): below float32 noise the two sides may legitimately differ."""
    cfg = model.mod
    b, s = ids.shape
    logits_out, losses = [], []
    margin = np.inf
    nll_sum, nll_count = np.zeros(len(cfg.layers)), np.zeros(len(cfg.layers))
    for row in range(b):
        x = model.embed(ids[row:row + 1])
        valid = np.asarray(mask[row]).astype(bool)
        ty = np.asarray(types[row])
        for i, layer in enumerate(model.layers):
            if i not in cfg.layers:
                x, _ = layer(x, jnp.arange(s)[None], causal_mask(jnp.asarray(valid)[None]))
                continue
            j = cfg.layers.index(i)
            router_logits = np.asarray(model.router(layer.input_layernorm(x))[0], np.float64)
            p = np.exp(router_logits[:, 1]) / np.exp(router_logits).sum(-1)
            if routing == "capacity":
                forced = np.isin(ty, ALWAYS_KEEP[cfg.always_keep])
                if cfg.skip_padding_first:
                    forced &= ty != tt.PADDING
                priority = p + forced
                if cfg.skip_padding_first:
                    priority = np.where(ty == tt.PADDING, p - 2, priority)
                k = s - (int(cfg.routing_ratio * ROUTABLE) if s > ROUTABLE else 0)
                order = np.argsort(-priority, kind="stable")
                if k < s:
                    margin = min(margin, priority[order[k - 1]] - priority[order[k]])
                sel = np.sort(order[:k])
                target = np.zeros(s, bool)
                target[sel] = True
                logp = router_logits - np.log(np.exp(router_logits).sum(-1, keepdims=True))
                nll = -np.where(target, logp[:, 1], logp[:, 0])
                weight = (ty != tt.PADDING) if cfg.skip_padding_first else np.ones(s, bool)
                nll_sum[j] += (nll * weight).sum()
                nll_count[j] += weight.sum()
            else:
                sel = np.nonzero((p > cfg.prefill_threshold) & valid)[0]
                margin = min(margin, np.abs(p - cfg.prefill_threshold)[valid].min())
            if len(sel) == 0:
                continue
            xs = x[:, sel]
            pos = np.arange(len(sel)) if cfg.positions == "renumbered" else sel
            sub_mask = np.tril(np.ones((len(sel), len(sel)), bool)) & valid[sel][None, :]
            h, _, _ = layer.attention_branch(xs, jnp.asarray(pos)[None], jnp.asarray(sub_mask)[None])
            w = jnp.asarray(p[sel], jnp.float32)[None, :, None]
            if cfg.router_weight == "straight_through":
                w = jnp.ones_like(w)
            if cfg.router_scales == "mlp":
                out = h + w * layer.mlp_branch(h)
            else:
                out = xs + w * (h + layer.mlp_branch(h) - xs)
            x = x.at[:, sel].set(out)
        logits_out.append(np.asarray(model.lm_head(model.norm(x)))[0])
    return np.stack(logits_out), nll_sum / np.maximum(nll_count, 1), margin


def well_separated_case(rng, routing, tries=10, **mod_kw):
    """Model, batch and naive result for a fresh draw whose routing decisions all clear float32
    noise by 1e-4 (a near tie at the top-k boundary picks either token, both correct)."""
    for _ in range(tries):
        model = build(rng, **mod_kw)
        ids, mask, types = make_batch(rng)
        ref_logits, ref_loss, margin = naive_forward(model, ids, mask, types, routing)
        if margin > 1e-4:
            return model, (ids, mask, types), ref_logits, ref_loss
    raise AssertionError(f"{tries} random draws all had a routing decision within 1e-4 of a tie")


OPTION_GRID = list(itertools.product(tuple(ALWAYS_KEEP), ("renumbered", "original"), ("mlp", "block"),
                                     (False, True)))


@pytest.mark.parametrize("always_keep,positions,router_scales,skip_padding_first", OPTION_GRID)
def test_capacity_routing_matches_naive_reference(rng, always_keep, positions, router_scales, skip_padding_first):
    model, (ids, mask, types), ref_logits, ref_loss = well_separated_case(
        rng, "capacity", always_keep=always_keep, positions=positions, router_scales=router_scales,
        skip_padding_first=skip_padding_first, routing_ratio=0.5)
    logits, _, aux = model(ids, attention_mask=mask, token_types=types)
    assert rel_err(logits, ref_logits) < 1e-5
    np.testing.assert_allclose(np.asarray(aux["routing_loss"]), ref_loss, rtol=1e-5)
    # Exactly int(0.5 * 10) = 5 tokens skip each MoD layer in every example.
    assert np.all(np.asarray(aux["selected"]).sum(-1) == ids.shape[1] - 5)


@pytest.mark.parametrize("positions,router_scales", list(itertools.product(("renumbered", "original"), ("mlp", "block"))))
def test_threshold_routing_matches_naive_reference(rng, positions, router_scales):
    for _ in range(10):  # a draw whose router keeps some tokens and skips others (the test really routes)
        model, (ids, mask, types), ref_logits, _ = well_separated_case(
            rng, "threshold", positions=positions, router_scales=router_scales, prefill_threshold=0.5)
        logits, _, aux = model(ids, attention_mask=mask, token_types=types, routing="threshold")
        kept = np.asarray(aux["selected"])
        if 0 < kept.sum() < kept.size:
            break
    assert 0 < kept.sum() < kept.size, "10 random routers all kept every token or none"
    assert rel_err(logits, ref_logits) < 1e-5


def test_all_tokens_kept_equals_dense_model(rng):
    model = build(rng, routing_ratio=0.0, router_weight="straight_through")
    dense = Llama(CFG, rngs=nnx.Rngs(0))
    nnx.update(dense, nnx.filter_state(nnx.state(model, nnx.Param), lambda path, _: path[0] != "router"))
    ids, mask, types = make_batch(rng)
    got, _, aux = model(ids, attention_mask=mask, token_types=types)
    want, _, _ = dense(ids, attention_mask=mask)
    np.testing.assert_array_equal(np.asarray(aux["selected"]).all(), True)
    assert rel_err(got, want) < 1e-6


def test_router_gets_gradient_from_both_paths(rng):
    model = build(rng)
    ids, mask, types = make_batch(rng)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    probe = jnp.asarray(rng.standard_normal((ids.shape[0], ids.shape[1], CFG.vocab_size)), jnp.float32)

    def losses(p):
        logits, _, aux = nnx.merge(graphdef, p, rest)(ids, attention_mask=mask, token_types=types)
        return jnp.sum(logits * probe), jnp.sum(aux["routing_loss"])

    lm_grad = jax.grad(lambda p: losses(p)[0])(params)["router"]["kernel"][...]
    aux_grad = jax.grad(lambda p: losses(p)[1])(params)["router"]["kernel"][...]
    assert float(jnp.linalg.norm(lm_grad)) > 1e-6
    assert float(jnp.linalg.norm(aux_grad)) > 1e-6


def test_straight_through_weight_keeps_router_gradient(rng):
    model = build(rng, router_weight="straight_through")
    ids, mask, types = make_batch(rng)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    probe = jnp.asarray(rng.standard_normal((ids.shape[0], ids.shape[1], CFG.vocab_size)), jnp.float32)
    grad = jax.grad(lambda p: jnp.sum(nnx.merge(graphdef, p, rest)(ids, attention_mask=mask,
                                                                     token_types=types)[0] * probe))(params)
    assert float(jnp.linalg.norm(grad["router"]["kernel"][...])) > 1e-6


def test_prefill_then_decode_equals_full_forward_under_threshold_routing(rng):
    # Equal prefill and decode thresholds make the two inference rules one rule. Buckets of
    # 8, 12, 16 and 18 tokens: the prefill computes and caches a bucket of kept tokens.
    model = build(rng, prefill_threshold=0.5, decode_threshold=0.5, threshold_buckets=(0.25, 0.5, 0.75, 1.0),
                  threshold_bucket_multiple=4)
    ids, mask, types = make_batch(rng, b=2)
    steps = 4
    caches = model.init_caches(2, ids.shape[1], steps, "threshold")
    logits, caches, _ = model(ids, attention_mask=mask, token_types=types, caches=caches, routing="threshold")
    lengths = np.asarray(mask.sum(1))
    new_tokens = rng.integers(3, CFG.vocab_size, size=(2, steps)).astype(np.int32)
    decoded = []
    for t in range(steps):
        step_logits, caches, _ = model(jnp.asarray(new_tokens[:, t:t + 1]), caches=caches,
                                       token_types=jnp.full((2, 1), tt.ANSWER), routing="threshold")
        decoded.append(np.asarray(step_logits[:, 0]))
    decoded = np.stack(decoded, 1)
    for row in range(2):
        n = lengths[row]
        full_ids = np.concatenate([np.asarray(ids[row, :n]), new_tokens[row]])[None]
        full_types = np.concatenate([np.asarray(types[row, :n]), np.full(steps, tt.ANSWER)])[None]
        full, _, _ = model(jnp.asarray(full_ids), token_types=jnp.asarray(full_types), routing="threshold")
        assert rel_err(decoded[row], np.asarray(full[0, n:])) < 1e-5
        assert rel_err(np.asarray(logits[row, :n]), np.asarray(full[0, :n])) < 1e-5


def test_decode_skip_writes_no_cache_entry(rng):
    model = build(rng, decode_threshold=1.1)  # p < 1.1 always: every decode token skips MoD layers
    ids, mask, types = make_batch(rng, b=2)
    caches = model.init_caches(2, ids.shape[1], 2)
    _, caches, _ = model(ids, attention_mask=mask, token_types=types, caches=caches, routing="threshold")
    before = [np.asarray(c.length) for c in caches]
    _, caches, _ = model(jnp.asarray([[5], [6]]), caches=caches, token_types=jnp.full((2, 1), tt.ANSWER),
                         routing="threshold")
    for i, c in enumerate(caches):
        grew = 0 if i in model.mod.layers else 1
        np.testing.assert_array_equal(np.asarray(c.length), before[i] + grew)


def test_forward_compiles_once_per_bucket(rng):
    model = build(rng)
    graphdef, state = nnx.split(model)
    traces = []

    @jax.jit
    def forward(state, ids, mask, types):
        traces.append(1)
        return nnx.merge(graphdef, state)(ids, attention_mask=mask, token_types=types)[0]

    for _ in range(3):
        ids, mask, types = make_batch(rng)
        forward(state, ids, mask, types)
    assert len(traces) == 1
