"""The trainer on the tiny model with a synthetic Grain dataset: metrics, resume with the
same losses, freeze rules, gradient accumulation, non-finite guard, SIGTERM, adaptation."""

import json
import os
import signal

import grain
import jax
import numpy as np
import pytest
from flax import nnx

from gamma_mod_jax import api as gm
from gamma_mod_jax.config_file import load_config
from gamma_mod_jax.convert.checkpoint import save_checkpoint
from gamma_mod_jax.convert.keymap import param_paths
from gamma_mod_jax.train.metrics import read_metrics
from gamma_mod_jax.train.optim import path_string
from gamma_mod_jax.train.trainer import TrainingError, model_for_training, train
from tests.parallel.synthetic_data import example as synthetic_example


def example(index: int, image_size: int, seed: int, poison=()):
    """The parallelism tests' synthetic sample; a `poison`ed index gets NaN pixels."""
    item = synthetic_example(index, image_size, seed)
    if index in poison:
        item["pixel_values"][:] = np.nan
    return item


def synthetic_iterator(batch_size, seed=0, poison=(), size=64):
    def make(config, model_cfg):
        ds = grain.MapDataset.range(size).shuffle(seed=seed).map(
            lambda i: example(int(i), model_cfg.input_image_size, seed, poison))
        return iter(ds.repeat(None).batch(batch_size, drop_remainder=True).to_iter_dataset())
    return make


class ForwardingIterator:
    """A test iterator around `inner` whose checkpointed state is the inner one's (the
    trainer saves and restores it); subclasses change only what `__next__` does."""

    def __init__(self, inner):
        self.inner = inner

    def __next__(self):
        return next(self.inner)

    def get_state(self):
        return self.inner.get_state()

    def set_state(self, state):
        self.inner.set_state(state)


def tiny_config(recipe="llava_hr_7b_mod0.5,tiny", **train):
    config = load_config(f"configs/train.py:{recipe}")
    config.train.update(train)
    return config


def losses(workdir):
    return [(r["step"], r["loss"]) for r in read_metrics(workdir)]


def test_training_writes_metrics_and_resumes_with_the_same_losses(tmp_path):
    config = tiny_config(num_steps=6, checkpoint_every=3)
    full = train(config, str(tmp_path / "full"), make_data_iterator=synthetic_iterator(2), log=lambda *_: None)
    assert full["status"] == "finished" and full["step"] == 6
    records = read_metrics(tmp_path / "full")
    assert [r["step"] for r in records] == list(range(1, 7))
    for key in ("loss", "lm_loss", "routing_loss", "skip_ratio", "tokens_per_sec", "step_time", "learning_rate",
                "grad_norm", "skip_ratio_per_layer"):
        assert key in records[0], key
    assert 0.05 < records[0]["skip_ratio"] < 0.7 and records[0]["routing_loss"] > 0
    assert os.listdir(tmp_path / "full" / "tensorboard")
    # the same run stopped (SIGTERM) after 2 steps and resumed: the signal comes with the 3rd
    # batch, drawn ahead while step 2 runs; the checkpoint of step 2 hands that batch back
    stopped = train(config, str(tmp_path / "resumed"), make_data_iterator=terminating_iterator(synthetic_iterator(2), 3),
                    log=lambda *_: None)
    assert stopped["status"] == "stopped by SIGTERM" and stopped["step"] == 2
    resumed = train(config, str(tmp_path / "resumed"), make_data_iterator=synthetic_iterator(2), log=lambda *_: None)
    assert resumed["step"] == 6
    got, want = losses(tmp_path / "resumed"), losses(tmp_path / "full")
    assert [s for s, _ in got] == [s for s, _ in want]
    np.testing.assert_allclose([l for _, l in got], [l for _, l in want], rtol=1e-5)


def test_stage1_freeze_rules_train_only_projector_and_fusion(tmp_path):
    config = tiny_config("llava_hr_7b_stage1,tiny", num_steps=2)
    before = {path_string(p): np.asarray(v.get_value()) for p, v in param_paths(model_for_training(config, log=print))}
    out = train(config, str(tmp_path), make_data_iterator=synthetic_iterator(2), log=lambda *_: None)
    after = {path_string(p): np.asarray(v) for p, v in
             jax.tree_util.tree_flatten_with_path(out["state"].params.to_pure_dict())[0]}
    changed = {k for k in before if not np.array_equal(before[k], after[k])}
    assert changed, "nothing trained"
    assert all(k.startswith(("projector/", "vision/fusion/")) for k in changed), sorted(changed)[:5]
    assert {k for k in before if k.startswith("projector/")} <= changed


def test_frozen_parameters_get_no_gradient_computation():
    """Stage 1 with the freeze mask: the same update as differentiating everything (frozen
    updates are zero either way) for fewer compiled FLOPs (no weight gradients of the LLM
    and towers)."""
    import functools

    import jax.numpy as jnp

    from gamma_mod_jax.train.optim import make_optimizer
    from gamma_mod_jax.train.step import init_train_state, train_step

    import optax

    config = tiny_config("llava_hr_7b_stage1,tiny", num_steps=2)
    model = model_for_training(config, log=lambda *_: None)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    _, _, mask = make_optimizer(config.optim, params, 2)
    # Plain SGD on the trained leaves: the update is the gradient itself (Adam would blow
    # float rounding of near-zero gradients up to full steps of either sign).
    tx = optax.multi_transform({True: optax.sgd(1.0), False: optax.set_to_zero()}, mask)
    batch = next(synthetic_iterator(2)(config, model.config))
    batch = {k: jnp.asarray(v) for k, v in batch.items()}
    results = {}
    for name, trainable in (("all", None), ("masked", mask)):
        step = jax.jit(functools.partial(train_step, graphdef=graphdef, rest=rest, tx=tx, trainable=trainable))
        state = init_train_state(params, tx)
        compiled = step.lower(state, batch).compile()
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        new_state, metrics = compiled(state, batch)
        results[name] = (float(cost["flops"]), new_state.params, float(metrics["loss"]))
    (flops_all, p_all, loss_all), (flops_masked, p_masked, loss_masked) = results["all"], results["masked"]
    assert loss_all == loss_masked
    for a, b in zip(jax.tree.leaves(p_all), jax.tree.leaves(p_masked)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-7)
    assert flops_masked < 0.85 * flops_all, (flops_masked, flops_all)


def test_gradient_accumulation_equals_the_large_batch(tmp_path):
    """Two micro-batches of 2 with equal supervised-token counts = one batch of 4."""
    def fixed(batch_size):
        def make(config, model_cfg):
            items = [example(i, model_cfg.input_image_size, 0) for i in range(4)]
            for item in items:  # same supervised count everywhere: mean of means = global mean
                item["labels"][:] = -100
                item["labels"][8:12] = item["input_ids"][8:12]
            ds = grain.MapDataset.source(items).batch(batch_size)
            return iter(ds.to_iter_dataset())
        return make

    results = []
    recipe = "llava15_7b_mod0.3,tiny"  # the cheaper tower: two compilations here
    for batch_size, accumulation in ((4, 1), (2, 2)):
        config = tiny_config(recipe, num_steps=1)
        config.optim.accumulation_steps = accumulation
        # eps >> |g| turns Adam's first step into lr * g, so the update shows the gradient's
        # scale (Adam alone is scale invariant and would hide a sum-instead-of-mean bug).
        config.optim.eps = 1.0
        config.optim.learning_rate = 1.0
        out = train(config, str(tmp_path / f"a{accumulation}"), make_data_iterator=fixed(batch_size),
                    log=lambda *_: None)
        results.append(jax.tree.leaves(out["state"].params.to_pure_dict()))
    init = jax.tree.leaves(nnx.state(model_for_training(tiny_config(recipe), log=lambda *_: None), nnx.Param).to_pure_dict())
    deltas = [[np.asarray(p, np.float64) - np.asarray(i, np.float64) for p, i in zip(r, init)] for r in results]
    assert max(float(np.abs(d).max()) for d in deltas[0]) > 1e-4  # the update is visible
    for large, accumulated in zip(*deltas):
        np.testing.assert_allclose(accumulated, large, rtol=1e-3, atol=1e-7)


def test_nonfinite_steps_are_skipped_then_stop_at_exactly_the_limit(tmp_path):
    # batch 1: example order is shuffled, so poison every example after the first two steps:
    # steps 3 and 4 are non-finite, the limit of 2 is reached at step 4, before its checkpoint
    config = tiny_config(num_steps=8, checkpoint_every=2, max_nonfinite_in_a_row=2)
    order = list(grain.MapDataset.range(64).shuffle(seed=0))
    poison = set(int(i) for i in order[2:])
    with pytest.raises(TrainingError, match="2 non-finite steps in a row .* at step 4.*checkpoints/2"):
        train(config, str(tmp_path), make_data_iterator=synthetic_iterator(1, poison=poison), log=lambda *_: None)
    records = read_metrics(tmp_path)
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert records[-1]["nonfinite_total"] == 2
    assert records[1]["finite"] is True and records[2]["finite"] is False
    assert sorted(int(d) for d in os.listdir(tmp_path / "checkpoints") if d.isdigit()) == [2]


def terminating_iterator(make_inner, at_draw):
    """Data whose `at_draw`-th batch request sends this process SIGTERM (then serves the batch)."""
    def make(config_, model_cfg):
        inner = make_inner(config_, model_cfg)

        class Terminating(ForwardingIterator):
            drawn = 0

            def __next__(self):
                Terminating.drawn += 1
                if Terminating.drawn == at_draw:
                    os.kill(os.getpid(), signal.SIGTERM)
                return next(self.inner)

        return Terminating(inner)
    return make


def test_sigterm_saves_and_stops_cleanly(tmp_path):
    config = tiny_config(num_steps=6, checkpoint_every=100)
    # the 2nd batch is drawn (ahead) while step 1 runs: the run stops after step 1
    out = train(config, str(tmp_path), make_data_iterator=terminating_iterator(synthetic_iterator(2), 2),
                log=lambda *_: None)
    assert out["status"] == "stopped by SIGTERM" and out["step"] == 1
    assert "1" in os.listdir(tmp_path / "checkpoints")


def test_dense_checkpoint_is_adapted_to_the_gamma_mod_config(tmp_path):
    dense_cfg = gm.model_config("configs/llava_hr_7b.py:tiny")
    dense = gm.build_model(dense_cfg, seed=3)
    save_checkpoint(str(tmp_path / "dense"), dense)
    config = tiny_config()
    config.init_checkpoint = str(tmp_path / "dense")
    model = model_for_training(config, log=lambda *_: None)
    assert model.config.mod.layers == (1, 2)
    theirs = dict(param_paths(dense))
    for path, var in param_paths(model):
        if path[:2] != ("llm", "router"):
            np.testing.assert_array_equal(np.asarray(var.get_value()), np.asarray(theirs[path].get_value()))
    config.model.llm["hidden_size"] = 32
    with pytest.raises(ValueError, match=r"cannot be made .*: llm\.hidden_size \(checkpoint 64, config 32\)"):
        model_for_training(config, log=lambda *_: None)
