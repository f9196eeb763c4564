"""Optimizer construction: per-group learning-rate multipliers and the freeze rules together."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from gamma_mod_jax.train.optim import make_optimizer


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
