"""Inference that skips compute: bucketed threshold prefill against the full-compute
threshold path and the naive per-example reference, one compilation across buckets, the
decode skip under lax.cond against the masked result, capacity-sized KV caches."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gamma_mod_jax import token_types as tt
from gamma_mod_jax.mod import routing
from gamma_mod_jax.mod.layer import _compute_gathered, mod_layer_threshold
from gamma_mod_jax.models.llama import Llama
from tests.conftest import rel_err
from tests.mod.test_mod_layer import CFG, build, make_batch, naive_forward

# s = 18: buckets of 8, 12, 16 and 18 tokens (fractions rounded up to multiples of 4).
BUCKETS = dict(threshold_buckets=(0.25, 0.5, 0.75, 1.0), threshold_bucket_multiple=4)


def with_mod(model, **changes):
    """The same weights under a changed MoD config."""
    other = Llama(CFG, mod=dataclasses.replace(model.mod, **changes), rngs=nnx.Rngs(0))
    nnx.update(other, nnx.state(model))
    return other


def test_bucket_sizes_round_up_and_end_at_the_sequence():
    cfg = build(np.random.default_rng(0), **BUCKETS).mod
    assert routing.threshold_bucket_sizes(18, cfg) == (8, 12, 16, 18)
    default = dataclasses.replace(cfg, threshold_buckets=(0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 0.875, 1.0),
                                  threshold_bucket_multiple=64)
    # 1400 tokens: 175 -> 192, 350 -> 384, 525 -> 576, 700 -> 704, 875 -> 896, 1050 -> 1088, 1225 -> 1280
    assert routing.threshold_bucket_sizes(1400, default) == (192, 384, 576, 704, 896, 1088, 1280, 1400)
    assert routing.threshold_bucket_sizes(40, default) == (40,)


def test_bucketed_threshold_equals_full_compute_and_naive_and_compiles_once(rng):
    model = build(rng, prefill_threshold=0.5, **BUCKETS)
    full = with_mod(model, threshold_buckets=(1.0,))  # today's path: all s tokens, tail masked
    sizes = np.array(routing.threshold_bucket_sizes(18, model.mod))
    traces = []

    def make_forward(m):
        graphdef = nnx.graphdef(m)

        @jax.jit
        def forward(state, ids, mask, types):
            traces.append(1)
            logits, _, aux = nnx.merge(graphdef, state)(ids, attention_mask=mask, token_types=types,
                                                       routing="threshold")
            return logits, aux["selected"]
        return forward

    fast, slow = make_forward(model), make_forward(full)
    buckets_used, compared_naive = set(), 0
    for spread in (0.3, 1.0, 2.0, 4.0, 8.0):
        # Router spreads from narrow to wide move the kept counts across bucket edges.
        kernel = rng.standard_normal((CFG.hidden_size, 2)) * spread
        model.router.kernel.set_value(jnp.asarray(kernel, jnp.float32))
        full.router.kernel.set_value(jnp.asarray(kernel, jnp.float32))
        ids, mask, types = make_batch(rng)
        logits, selected = fast(nnx.state(model), ids, mask, types)
        want, want_selected = slow(nnx.state(full), ids, mask, types)
        np.testing.assert_array_equal(np.asarray(selected), np.asarray(want_selected))
        valid = np.asarray(mask).astype(bool)
        assert rel_err(np.asarray(logits)[valid], np.asarray(want)[valid]) < 1e-5
        largest = np.asarray(selected).sum(-1).max(-1)  # per MoD layer
        buckets_used.update(int(np.searchsorted(sizes, n)) for n in largest)
        if compared_naive == 2:  # the naive reference runs eagerly: two draws are enough
            continue
        ref, _, margin = naive_forward(model, ids, mask, types, "threshold")
        if margin > 1e-4:  # no p within float32 noise of the threshold
            compared_naive += 1
            assert rel_err(np.asarray(logits)[valid], ref[valid]) < 1e-5
    assert len(buckets_used) >= 3, buckets_used
    assert compared_naive == 2
    assert len(traces) == 2 and fast._cache_size() == 1 and slow._cache_size() == 1


def test_decode_skip_under_cond_equals_masked_result(rng):
    model = build(rng)
    layer = model.layers[1]
    b = 3
    x = jnp.asarray(rng.standard_normal((b, 1, CFG.hidden_size)), jnp.float32)
    cache = model.init_caches(b, 6)[1]
    # A prefilled cache: random keys and values, different lengths per example.
    lengths = np.array([2, 4, 3])
    cache = dataclasses.replace(
        cache, k=jnp.asarray(rng.standard_normal(cache.k.shape), jnp.float32),
        v=jnp.asarray(rng.standard_normal(cache.v.shape), jnp.float32),
        valid=jnp.asarray(np.arange(6)[None] < lengths[:, None]), length=jnp.asarray(lengths, jnp.int32))
    valid = jnp.ones((b, 1), bool)
    types = jnp.full((b, 1), tt.ANSWER)
    p = np.asarray(routing.router_probabilities(model.router(layer.input_layernorm(x))))[:, 0]
    for threshold in (1.1, float(np.median(p))):  # no example keeps its token; some do
        out, new_cache, aux = mod_layer_threshold(layer, model.router, x, None, valid, types, model.mod, threshold,
                                                  cache)
        keep = jnp.asarray(p >= threshold)[:, None]
        want, want_cache = _compute_gathered(layer, x, jnp.asarray(p)[:, None], jnp.zeros((b, 1), jnp.int32), keep,
                                             keep, None, model.mod, cache)
        np.testing.assert_array_equal(np.asarray(aux["selected"]), np.asarray(keep))
        assert rel_err(out, want) < 1e-6
        np.testing.assert_array_equal(np.asarray(new_cache.valid), np.asarray(want_cache.valid))
        np.testing.assert_array_equal(np.asarray(new_cache.length), np.asarray(want_cache.length))
        slots = np.asarray(want_cache.valid)
        assert rel_err(np.swapaxes(new_cache.k, 1, 2)[slots], np.swapaxes(want_cache.k, 1, 2)[slots]) < 1e-6
        assert rel_err(np.swapaxes(new_cache.v, 1, 2)[slots], np.swapaxes(want_cache.v, 1, 2)[slots]) < 1e-6
    # The skip is a real branch, not a mask.
    jaxpr = jax.make_jaxpr(lambda x, c: mod_layer_threshold(layer, model.router, x, None, valid, types, model.mod,
                                                            0.5, c)[0])(x, cache)
    assert "cond" in str(jaxpr)


def test_capacity_sized_caches_give_the_same_tokens_as_full_caches(rng):
    model = build(rng)
    ids, mask, types = make_batch(rng)
    b, s = ids.shape
    steps = 4
    small = model.init_caches(b, s, steps, "capacity")
    big = model.init_caches(b, s, steps)
    kept = s - int(model.mod.routing_ratio * 10)  # 10 routable tokens in make_batch's layout
    for i, (c_small, c_big) in enumerate(zip(small, big)):
        assert c_big.max_len == s + steps
        assert c_small.max_len == (kept + steps if i in model.mod.layers else s + steps)
    runs = []
    for caches in (small, big):
        logits, caches, _ = model(ids, attention_mask=mask, token_types=types, caches=caches, last_only=True)
        tokens, step_logits = [jnp.argmax(logits[:, 0], -1)], [logits[:, 0]]
        for _ in range(steps - 1):
            logits, caches, _ = model(tokens[-1][:, None], caches=caches, token_types=jnp.full((b, 1), tt.ANSWER))
            tokens.append(jnp.argmax(logits[:, 0], -1))
            step_logits.append(logits[:, 0])
        runs.append((np.stack(tokens, 1), np.stack(step_logits, 1)))
    np.testing.assert_array_equal(runs[0][0], runs[1][0])
    assert rel_err(runs[0][1], runs[1][1]) < 1e-5
    # last_only: the LM head at each example's last real token equals the full logits there.
    full, _, _ = model(ids, attention_mask=mask, token_types=types)
    last = np.asarray(mask).sum(1) - 1
    assert rel_err(runs[1][1][:, 0], np.asarray(full)[np.arange(b), last]) < 1e-5
