"""Optimizer construction: per-group learning-rate multipliers and the freeze rules together,
meaning the same with scanned layers (model.scan_layers) on and off."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx

from gamma_mod_jax.convert.keymap import param_paths
from gamma_mod_jax.models.llama import Llama
from gamma_mod_jax.train.optim import count_trainable, make_optimizer
from tests.models.test_scan_layers import CFG5, MOD, llama_pair


class Tiny(nnx.Module):
    def __init__(self, rngs):
        self.vision = nnx.Linear(3, 4, rngs=rngs)
        self.projector = nnx.Linear(4, 4, rngs=rngs)
        self.llm = nnx.Linear(4, 2, rngs=rngs)


def _cfg(**kw):
    c = dict(learning_rate=1e-2, warmup_ratio=0.0, weight_decay=0.0, b1=0.9, b2=0.999, eps=1e-12, grad_clip_norm=0.0,
             accumulation_steps=1, freeze=(("llm/.*", False), (".*", True)))
    c.update(kw)
    return ml_collections.ConfigDict(c)


def test_lr_multipliers_scale_each_group_and_frozen_stays_frozen(rng):
    params = nnx.state(Tiny(nnx.Rngs(int(rng.integers(1 << 30)))), nnx.Param)
    grads = jax.tree.map(lambda p: jnp.asarray(rng.standard_normal(p.shape), p.dtype), params)
    tx, _, _ = make_optimizer(_cfg(lr_multipliers=(("vision/.*", 10.0), ("llm/.*", 3.0))), params, num_steps=100)
    updates, _ = tx.update(grads, tx.init(params), params)
    # Adam's first step is -lr * g / |g| per element (bias-corrected moments): the size of
    # each update is the group's learning rate.
    for name, lr in (("vision", 1e-1), ("projector", 1e-2), ("llm", 0.0)):
        got = np.asarray(updates[name]["kernel"][...])
        want = -lr * np.sign(np.asarray(grads[name]["kernel"][...]))
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-12)


def test_clipping_counts_only_trained_parameters(rng):
    params = nnx.state(Tiny(nnx.Rngs(int(rng.integers(1 << 30)))), nnx.Param)
    # The frozen LLM's gradients are huge: they must not shrink the trained ones.
    grads = jax.tree_util.tree_map_with_path(
        lambda path, p: jnp.asarray(rng.standard_normal(p.shape) * (1e6 if "llm" in str(path) else 1), p.dtype),
        params)
    clip = 1e-3
    tx, _, _ = make_optimizer(_cfg(grad_clip_norm=clip, b1=0.0, b2=0.0, eps=1e6), params, num_steps=100)
    updates, _ = tx.update(grads, tx.init(params), params)
    trained = {k: grads[k] for k in ("vision", "projector")}
    scale = min(1.0, clip / float(optax.tree.norm(trained)))
    # b1=b2=0, huge eps: the update is -lr * clipped g / eps, linear in the clipped gradient.
    got = np.asarray(updates["vision"]["kernel"][...])
    want = -1e-2 * scale * np.asarray(grads["vision"]["kernel"][...]) / 1e6
    np.testing.assert_allclose(got, want, rtol=1e-4)


def _random_like(model, rng):
    """The model's parameters replaced by N(0, 1) draws (a stand-in for gradients)."""
    for _, var in param_paths(model):
        var.set_value(jnp.asarray(rng.standard_normal(np.shape(var.get_value())), jnp.float32))
    return model


# Layers 0-1 dense, 2-3 γ-MoD, 4 dense (tests/models/test_scan_layers.py CFG5): rules that
# select whole runs, written for per-layer names, with a group learning rate and decay.
RULES = dict(freeze=(("layers/[01]/.*", False), ("layers/4/mlp/.*", False), ("router/.*", True),
                     ("layers/.*", True), (".*", False)),
             lr_multipliers=(("layers/[23]/self_attn/.*", 5.0),), weight_decay=0.1)


def test_rules_mean_the_same_with_scan_on_and_off(rng):
    """The same per-layer rules on the loop and the scanned model: the same trained
    parameters (counted by hand) and the same first AdamW update, which is, per element,
    -lr * multiplier * (sign(g) + decay * p) on trained parameters (decay on matrices
    only: a stacked run's [layers, d] norm scales are vectors) and 0 on frozen ones."""
    loop, scanned = llama_pair(rng)
    grads_loop = _random_like(Llama(CFG5, mod=MOD, rngs=nnx.Rngs(1)), rng)
    grads_scan = Llama(CFG5, mod=MOD, scan_layers=True, rngs=nnx.Rngs(1))
    theirs = dict(param_paths(grads_scan))
    for path, var in param_paths(grads_loop):
        theirs[path].set_value(np.asarray(var.get_value()))
    size = lambda module: sum(int(x.size) for x in jax.tree.leaves(nnx.state(module, nnx.Param)))
    layer4 = loop.layers[4]
    want_trained = (size(loop.layers[2]) + size(loop.layers[3]) + size(loop.router) + size(layer4.self_attn)
                    + size(layer4.input_layernorm) + size(layer4.post_attention_layernorm))
    lr, decay = 1e-2, 0.1
    views = {}
    for model, grads in ((loop, grads_loop), (scanned, grads_scan)):
        params = nnx.state(model, nnx.Param)
        tx, _, mask = make_optimizer(_cfg(**RULES), params, num_steps=100)
        assert count_trainable(params, mask) == (want_trained, size(model))
        updates, _ = tx.update(nnx.state(grads, nnx.Param), tx.init(params), params)
        view = Llama(CFG5, mod=MOD, scan_layers=model is scanned, rngs=nnx.Rngs(2))
        nnx.update(view, updates)
        views[model is scanned] = {path: np.asarray(var.get_value()) for path, var in param_paths(view)}
    p = {path: np.asarray(var.get_value()) for path, var in param_paths(loop)}
    g = {path: np.asarray(var.get_value()) for path, var in param_paths(grads_loop)}
    for path in p:
        name = "/".join(map(str, path))
        layer = path[1] if path[0] == "layers" else None
        trained = name.startswith("router/") or (layer in (2, 3)) or (layer == 4 and path[2] != "mlp")
        multiplier = 5.0 if layer in (2, 3) and path[2] == "self_attn" else 1.0
        want = -lr * multiplier * (np.sign(g[path]) + decay * p[path] * (p[path].ndim >= 2)) if trained else 0 * p[path]
        for scan in (False, True):
            np.testing.assert_allclose(views[scan][path], want, rtol=1e-5, atol=1e-9, err_msg=f"{name} scan={scan}")


@pytest.mark.parametrize("rules", [dict(freeze=(("layers/2/.*", True), (".*", False))),
                                   dict(freeze=((".*", True),), lr_multipliers=(("layers/3/.*", 0.1),))])
def test_rules_splitting_a_scanned_run_are_refused(rng, rules):
    """Layer 2 without layer 3 (one stacked run): fine in the loop, refused when scanned
    with an error naming the run's parameter and each layer's decision."""
    loop, scanned = llama_pair(rng)
    make_optimizer(_cfg(**rules), nnx.state(loop, nnx.Param), num_steps=10)
    with pytest.raises(ValueError, match=r"layers_stacked/1/.*layers/2/.*layers/3/.*scan_layers=False"):
        make_optimizer(_cfg(**rules), nnx.state(scanned, nnx.Param), num_steps=10)
