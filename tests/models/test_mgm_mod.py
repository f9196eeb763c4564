"""γ-MoD with the Mini-Gemini code's options (configs/mgm_hd_7b.py:mod) vs a naive
per-example reference written from mini_gemini.md §4: only image tokens are routable,
half the prefix skips (k = s - int(0.5 * prefix)), a sequence no longer than the prefix
keeps ceil(s / 2), xavier router init, decode always computes the layer."""

import math

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gamma_mod_jax import api as gm
from gamma_mod_jax import token_types as tt
from gamma_mod_jax.mod.config import MoDConfig
from gamma_mod_jax.models.config import LlamaConfig
from gamma_mod_jax.models.llama import Llama
from tests.mod.test_mod_layer import causal_mask
from tests.conftest import rel_err

CFG = LlamaConfig(vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=4, num_attention_heads=4)
MGM = dict(gm.load_config("configs/mgm_hd_7b.py:tiny,mod").model.mod)
MGM_NO_HD = dict(gm.load_config("configs/mgm_hd_7b.py:tiny,nohd,mod").model.mod)
IMAGE_TOKENS = 8


def build(rng, routable, options=MGM, **overrides):
    mod = MoDConfig.from_dict({**options, "layers": (1, 3), "num_routable_tokens": routable, **overrides})
    model = Llama(CFG, mod=mod, rngs=nnx.Rngs(int(rng.integers(1 << 30))))
    model.router.kernel.set_value(jnp.asarray(rng.standard_normal((CFG.hidden_size, 2)) * 0.3, jnp.float32))
    return model


def make_batch(rng, b=2, s=16):
    """System (2), image (8), question / answer, right padding of varying length."""
    ids = rng.integers(3, CFG.vocab_size, size=(b, s)).astype(np.int32)
    types = np.full((b, s), tt.PADDING, np.int32)
    for row, n in enumerate([s, s - 3][:b]):
        types[row, :n] = tt.QUESTION
        types[row, :2] = tt.SYSTEM
        types[row, 2:2 + IMAGE_TOKENS] = tt.IMAGE
        types[row, 2 + IMAGE_TOKENS + 2:n] = tt.ANSWER
    return jnp.asarray(ids), jnp.asarray((types != tt.PADDING).astype(np.int32)), jnp.asarray(types)


def naive(model, ids, mask, types, choose):
    """One example at a time; `choose(p, types, valid)` gives the computed positions of a MoD
    layer. Returns logits, the mean routing loss per MoD layer (against the choice) and the
    smallest margin of a top-k decision."""
    b, s = ids.shape
    out, nll = [], np.zeros(len(model.mod.layers))
    margin = [np.inf]
    for row in range(b):
        x = model.embed(ids[row:row + 1])
        valid, ty = np.asarray(mask[row]).astype(bool), np.asarray(types[row])
        for i, layer in enumerate(model.layers):
            if i not in model.mod.layers:
                x, _ = layer(x, jnp.arange(s)[None], causal_mask(jnp.asarray(valid)[None]))
                continue
            logits = np.asarray(model.router(layer.input_layernorm(x))[0], np.float64)
            p = np.exp(logits[:, 1]) / np.exp(logits).sum(-1)
            sel = choose(p, ty, valid, margin)
            target = np.isin(np.arange(s), sel)
            logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
            nll[model.mod.layers.index(i)] += -np.where(target, logp[:, 1], logp[:, 0]).mean() / b
            sub_mask = np.tril(np.ones((len(sel), len(sel)), bool)) & valid[sel][None]
            h, _, _ = layer.attention_branch(x[:, sel], jnp.arange(len(sel))[None], jnp.asarray(sub_mask)[None])
            x = x.at[:, sel].set(h + jnp.asarray(p[sel], jnp.float32)[None, :, None] * layer.mlp_branch(h))
        out.append(np.asarray(model.lm_head(model.norm(x)))[0])
    return np.stack(out), nll, margin[0]


def mgm_top_k(routable, forced_unless=tt.IMAGE):
    """Past the prefix: +1 on every token but the image; short branch: +1 where the label is
    -100 (every token but the answers), the official `mod_token_prob_mask`."""
    def choose(p, ty, valid, margin):
        s = len(p)
        k = s - int(0.5 * routable) if s > routable else math.ceil(s / 2)
        priority = p + (ty != forced_unless)
        order = np.argsort(-priority, kind="stable")
        margin[0] = min(margin[0], priority[order[k - 1]] - priority[order[k]])
        return np.sort(order[:k])
    return choose


@pytest.mark.parametrize("layout,routable", [("hd", IMAGE_TOKENS), ("hd", 24), ("no_hd", 2880)])
def test_mgm_capacity_routing_matches_naive_reference(rng, layout, routable):
    """HD: image-only routing past the prefix, the short rule when s <= 24; non-HD: the
    official 2880-position prefix, so the short rule with answers first out."""
    options, forced_unless = (MGM, tt.IMAGE) if layout == "hd" else (MGM_NO_HD, tt.ANSWER)
    assert (routable == 2880) == (layout == "no_hd") and MGM_NO_HD["num_routable_tokens"] == 2880
    for _ in range(10):  # redraw until no top-k decision is a float32 near-tie
        model = build(rng, routable, options)
        ids, mask, types = make_batch(rng)
        want, want_loss, margin = naive(model, ids, mask, types, mgm_top_k(routable, forced_unless))
        if margin > 1e-4:
            break
    logits, _, aux = model(ids, attention_mask=mask, token_types=types)
    assert rel_err(logits, want) < 1e-5
    np.testing.assert_allclose(np.asarray(aux["routing_loss"]), want_loss, rtol=1e-5)
    kept = np.asarray(aux["selected"]).sum(-1)
    assert np.all(kept == (16 - IMAGE_TOKENS // 2 if routable == IMAGE_TOKENS else 8))
    skipped = ~np.asarray(aux["selected"])
    if routable == IMAGE_TOKENS:  # only image tokens skip
        assert not np.any(skipped & (np.asarray(types) != tt.IMAGE)[None])
    if layout == "no_hd":  # 8 of 16 skip: the answers (4 and 1 of them), then the lowest p
        assert np.all(skipped[:, np.asarray(types) == tt.ANSWER])


def test_mgm_router_init_is_xavier_uniform(rng):
    kernel = np.asarray(Llama(CFG, mod=MoDConfig.from_dict({**MGM, "layers": (1,)}), rngs=nnx.Rngs(3)).router.kernel)
    bound = math.sqrt(6 / (CFG.hidden_size + 2))
    assert np.abs(kernel).max() <= bound and np.abs(kernel).max() > 0.8 * bound  # torch default: 1/sqrt(32)
    assert np.abs(kernel).max() > 1 / math.sqrt(CFG.hidden_size)


@pytest.mark.slow  # eager naive reference over two sequence lengths: ~60 s on 2 cores
def test_mgm_decode_always_computes_the_layer(rng):
    """Prefill keeps p > 0.5 (a threshold that really routes); each decoded token runs every
    MoD layer, its MLP scaled by p, and attends to the kept prefix: the naive reference over
    prefix + token with that selection."""
    model = build(rng, IMAGE_TOKENS, prefill_threshold=0.5)
    ids, mask, types = make_batch(rng)
    ids, mask, types = ids[:, :14], mask[:, :14], types[:, :14]
    caches = model.init_caches(2, 15)
    _, caches, _ = model(ids, attention_mask=mask, token_types=types, caches=caches, routing="threshold")
    token = rng.integers(3, CFG.vocab_size, size=(2, 1)).astype(np.int32)
    step, _, aux = model(jnp.asarray(token), caches=caches, token_types=jnp.full((2, 1), tt.ANSWER),
                         routing="threshold")
    assert np.asarray(aux["selected"]).all()
    prefill_kept = []

    def choose(p, ty, valid, margin):
        n = int(valid.sum()) - 1  # the decoded token is last
        kept = [j for j in range(n) if valid[j] and p[j] > 0.5]
        prefill_kept.append(len(kept))
        return np.array(kept + [n])

    lengths = np.asarray(mask.sum(1))
    for row in range(2):
        n = lengths[row]
        full_ids = np.concatenate([np.asarray(ids[row, :n]), token[row]])[None]
        full_types = np.concatenate([np.asarray(types[row, :n]), [tt.ANSWER]])[None]
        want, _, _ = naive(model, jnp.asarray(full_ids), jnp.ones_like(jnp.asarray(full_ids)), full_types, choose)
        assert rel_err(np.asarray(step[row, 0]), want[0, -1]) < 1e-5
    assert min(prefill_kept) < 14 and max(prefill_kept) > 0  # the prefill really routed


@pytest.mark.slow  # compiles a training step: ~70 s on 2 cores
def test_tiny_gamma_mod_mgm_recipe_trains_with_the_towers_frozen(tmp_path):
    """configs/train_mgm.py:mgm_hd_7b_mod0.5,tiny: two steps; only image tokens skip, both towers
    stay frozen, the LLM, the router and patch info mining train."""
    import jax

    from gamma_mod_jax.convert.keymap import param_paths
    from gamma_mod_jax.train.metrics import read_metrics
    from gamma_mod_jax.train.optim import path_string
    from gamma_mod_jax.train.trainer import model_for_training, train
    from tests.train.test_trainer import synthetic_iterator

    config = gm.load_config("configs/train_mgm.py:mgm_hd_7b_mod0.5,tiny")
    config.train.num_steps = 2
    assert config.model.mod.always_keep == "all_but_image" and config.optim.learning_rate > 0
    before = {path_string(p): np.asarray(v.get_value()) for p, v in param_paths(model_for_training(config, log=print))}
    out = train(config, str(tmp_path), make_data_iterator=synthetic_iterator(2), log=lambda *_: None)
    after = {path_string(p): np.asarray(v) for p, v in
             jax.tree_util.tree_flatten_with_path(out["state"].params.to_pure_dict())[0]}
    changed = {k for k in before if not np.array_equal(before[k], after[k])}
    assert not any(k.startswith(("vision/clip/", "vision/aux/")) for k in changed)
    for prefix in ("vision/mining/", "projector/", "llm/layers/", "llm/router/"):
        assert any(k.startswith(prefix) for k in changed), prefix
    record = read_metrics(tmp_path)[0]
    assert record["skip_image"] > 0 and record["skip_question"] == 0 and record["skip_system"] == 0
