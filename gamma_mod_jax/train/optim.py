"""Optimiser of a training run: AdamW with warmup + cosine, weight decay, gradient
clipping, regex freeze rules and gradient accumulation, all from optax.

Freeze rules are `(regex, trainable)` pairs matched in order against each parameter's
path joined by "/" (e.g. `projector/fc1/kernel`, `llm/layers/3/mlp/up_proj/kernel`); the
first match decides, and a parameter no rule matches is an error (a typo in a rule must
not silently freeze or train the whole model).

Rules (freeze and learning-rate multipliers) always see per-layer names, with
`model.scan_layers` on or off: a stacked run's parameter (`llm/layers_stacked/1/...`,
models/scan.py) is matched as each of the layers it holds (`llm/layers/3/...`,
`llm/layers/4/...`, ...), so a rule means the same either way. A stacked parameter is
one array with one optimizer label, so rules must decide alike for all layers of a run;
rules that do not (e.g. train layers 3-5 of a scanned run of layers 3-30) are refused
with an error naming the run and its layers (train with scan_layers off, or select whole
runs: dense 0-2, γ-MoD 3..n-2, the last layer).
"""

from __future__ import annotations

import re
from typing import Sequence, Tuple

import jax
import optax
from flax import nnx

from gamma_mod_jax.models.scan import per_layer_paths, stacked_at
from gamma_mod_jax.parallel.sharding import path_string


def _apply_rules(params_state, rules, convert, on_no_match, what: str):
    """A pytree like `params_state` of `convert(value)` of the first `(regex, value)` rule
    whose regex matches the parameter's path in full; `on_no_match(name)` otherwise. A
    stacked run's parameter is decided by its per-layer names (module docstring)."""
    compiled = [(re.compile(pattern), convert(value)) for pattern, value in rules]

    def decide(name):
        for pattern, value in compiled:
            if pattern.fullmatch(name):
                return value
        return on_no_match(name)

    flat, treedef = jax.tree_util.tree_flatten_with_path(params_state)
    paths = [tuple(path_string(path).split("/")) for path, _ in flat]
    sizes = [leaf.shape[0] if stacked_at(path) is not None else 0 for path, (_, leaf) in zip(paths, flat)]
    values = []
    for path, layers in zip(paths, per_layer_paths(list(zip(paths, sizes)))):
        names = ["/".join(map(str, layer)) for layer in layers]
        decided = [decide(name) for name in names]
        if any(d != decided[0] for d in decided):
            per_layer = ", ".join(f"{name}: {d}" for name, d in zip(names, decided))
            raise ValueError(f"{what} rules decide differently for the layers of one scanned run "
                             f"({'/'.join(path)} holds {per_layer}); a stacked run (model.scan_layers) is one "
                             f"array: write rules that select whole runs, or set model.scan_layers=False")
        values.append(decided[0])
    return jax.tree_util.tree_unflatten(treedef, values)


def trainable_mask(params_state, rules: Sequence[Tuple[str, bool]]):
    """A pytree of bools like `params_state`: True where the parameter is trained."""
    def no_rule(name):
        raise ValueError(f"no freeze rule matches parameter {name!r}; add a catch-all rule like ('.*', False)")

    return _apply_rules(params_state, rules, bool, no_rule, "freeze")


def learning_rate_schedule(*, learning_rate: float, num_steps: int, warmup_ratio: float = 0.0,
                           warmup_steps: int | None = None, end_ratio: float = 0.0):
    """Linear warmup then cosine decay to `end_ratio * learning_rate` at `num_steps`
    (optimizer updates, i.e. after gradient accumulation)."""
    warmup = int(warmup_steps if warmup_steps is not None else round(warmup_ratio * num_steps))
    warmup = min(max(warmup, 0), max(num_steps - 1, 0))
    return optax.warmup_cosine_decay_schedule(init_value=0.0, peak_value=learning_rate, warmup_steps=warmup,
                                              decay_steps=max(num_steps, 1), end_value=learning_rate * end_ratio)


def lr_multiplier_tree(params_state, multipliers: Sequence[Tuple[str, float]]):
    """Per-parameter learning-rate multipliers from `(regex, multiplier)` pairs matched like
    the freeze rules (first match decides); parameters no rule matches get 1.0."""
    return _apply_rules(params_state, multipliers, float, lambda name: 1.0, "lr_multipliers")


def make_optimizer(optim_cfg, params_state, num_steps: int):
    """optax transformation for `params_state` (an nnx.State of the parameters).

    optim_cfg fields: learning_rate, warmup_ratio, weight_decay, b1, b2, eps, grad_clip_norm
    (0 = off), accumulation_steps, freeze (list of (regex, trainable)), and optionally
    lr_multipliers (list of (regex, multiplier): a parameter group's learning rate is
    `multiplier * learning_rate`, like LLaVA's mm_projector_lr / mm_vision_tower_lr)."""
    schedule = learning_rate_schedule(learning_rate=optim_cfg.learning_rate, num_steps=num_steps,
                                      warmup_ratio=optim_cfg.warmup_ratio)
    mask = trainable_mask(params_state, optim_cfg.freeze)
    multipliers = lr_multiplier_tree(params_state, optim_cfg.get("lr_multipliers", ()) or ())
    # One AdamW per distinct multiplier of a trained parameter (repr keeps the label exact).
    group = lambda m: f"lr*{m!r}"
    labels = jax.tree.map(lambda t, m: group(m) if t else "freeze", mask, multipliers)
    # No weight decay on vectors (norm scales, biases), as the HF Trainer does for LLaVA;
    # a stacked run's leading layer axis does not count (its norm scales are [layers, d]).
    def decay_mask(params):
        def per_layer_ndim(path, x):
            return x.ndim - (stacked_at(path_string(path).split("/")) is not None)
        return jax.tree_util.tree_map_with_path(lambda path, x: per_layer_ndim(path, x) >= 2, params)

    def adamw(m):
        lr = schedule if m == 1.0 else (lambda step: m * schedule(step))
        return optax.adamw(lr, b1=optim_cfg.b1, b2=optim_cfg.b2, eps=optim_cfg.eps,
                           weight_decay=optim_cfg.weight_decay, mask=decay_mask)

    trained = {m for t, m in zip(jax.tree.leaves(mask), jax.tree.leaves(multipliers)) if t}
    groups = {group(m): adamw(m) for m in trained}
    groups["freeze"] = optax.set_to_zero()
    chain = []
    if optim_cfg.grad_clip_norm and optim_cfg.grad_clip_norm > 0:
        # The norm of the trained parameters' gradients only.
        chain.append(optax.masked(optax.clip_by_global_norm(optim_cfg.grad_clip_norm), mask))
    chain.append(optax.multi_transform(groups, labels))
    tx = optax.chain(*chain)
    if optim_cfg.accumulation_steps > 1:
        tx = optax.MultiSteps(tx, every_k_schedule=optim_cfg.accumulation_steps)
    return tx, schedule, mask


def count_trainable(params_state, mask) -> Tuple[int, int]:
    sizes = jax.tree.map(lambda x: int(x.size), params_state)
    total = sum(jax.tree.leaves(sizes))
    trained = sum(s for s, m in zip(jax.tree.leaves(sizes), jax.tree.leaves(mask)) if m)
    return trained, total
