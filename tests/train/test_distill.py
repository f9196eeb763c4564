"""Distillation from a frozen teacher (gamma_mod_jax/train/distill.py): the tempered KL
against a naive NumPy one, the answer positions, a student equal to its teacher, teacher
gradients never computed (compiled FLOPs), and the trainer with a `_distill` recipe."""

import dataclasses
import functools
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from gamma_mod_jax import api as gm
from gamma_mod_jax.config_file import load_config
from gamma_mod_jax.convert.checkpoint import save_checkpoint
from gamma_mod_jax.models.mllm import answer_positions
from gamma_mod_jax.train.distill import DistillSpec, load_teacher, teacher_answer_logits, tempered_kl, top1_matches
from gamma_mod_jax.train.metrics import read_metrics
from gamma_mod_jax.train.step import IGNORE_INDEX, init_train_state, loss_and_metrics, train_step
from gamma_mod_jax.train.trainer import train
from tests.conftest import rel_err
from tests.parallel.helpers import child_env, result_line, run
from tests.parallel.test_sharded_step import check_equal
from tests.parallel.synthetic_data import batch as synthetic_batch
from tests.train.test_trainer import synthetic_iterator

RECIPE = "llava15_7b_mod0.3"  # the cheaper tower


def naive_kl(teacher, student, mask, temperature, direction):
    """T^2 x sum over masked rows of KL, float64, one row at a time."""
    total = 0.0
    for t_row, s_row, m in zip(teacher.reshape(-1, teacher.shape[-1]), student.reshape(-1, student.shape[-1]),
                               mask.reshape(-1)):
        if not m:
            continue
        p_t = np.exp(t_row / temperature - np.max(t_row / temperature))
        p_t /= p_t.sum()
        p_s = np.exp(s_row / temperature - np.max(s_row / temperature))
        p_s /= p_s.sum()
        p, q = (p_t, p_s) if direction == "forward" else (p_s, p_t)
        total += float(np.sum(p * (np.log(p) - np.log(q))))
    return temperature ** 2 * total, int(mask.sum())


@pytest.mark.parametrize("direction", ["forward", "reverse"])
@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_tempered_kl_equals_a_naive_numpy_kl(rng, direction, temperature):
    teacher = rng.standard_normal((3, 7, 33)) * 3
    student = rng.standard_normal((3, 7, 33)) * 3
    mask = rng.random((3, 7)) < 0.6
    got, count = tempered_kl(jnp.asarray(teacher, jnp.float32), jnp.asarray(student, jnp.float32), jnp.asarray(mask),
                             temperature, direction)
    want, want_count = naive_kl(teacher.astype(np.float32).astype(np.float64),
                                student.astype(np.float32).astype(np.float64), mask, temperature, direction)
    assert int(count) == want_count > 0
    assert abs(float(got) - want) <= 1e-6 * abs(want), (float(got), want)
    matches = top1_matches(jnp.asarray(teacher), jnp.asarray(student), jnp.asarray(mask))
    assert int(matches) == int(np.sum((teacher.argmax(-1) == student.argmax(-1)) & mask))


def test_answer_positions_are_the_rows_predicting_supervised_labels(rng):
    labels = np.where(rng.random((4, 20)) < 0.3, rng.integers(0, 50, (4, 20)), IGNORE_INDEX).astype(np.int32)
    labels[3] = IGNORE_INDEX  # an example without answers
    for k in (20, 3):
        positions, valid = answer_positions(jnp.asarray(labels), k)
        for b in range(4):
            want = [p for p in range(19) if labels[b, p + 1] != IGNORE_INDEX][:k]
            assert np.asarray(positions[b])[np.asarray(valid[b])].tolist() == want
            assert int(np.sum(valid[b])) == len(want)


def _models(tmp_path, router_weight="straight_through", routing_ratio=0.0):
    """A dense tiny teacher saved as a checkpoint, and a γ-MoD student adapted from it."""
    config = load_config(f"configs/train.py:{RECIPE},tiny")
    student_cfg = gm.model_config(config.model)
    dense_cfg = dataclasses.replace(student_cfg, mod=None)
    dense = gm.build_model(dense_cfg, seed=3)
    save_checkpoint(str(tmp_path / "dense"), dense)
    mod = dataclasses.replace(student_cfg.mod, routing_ratio=routing_ratio, router_weight=router_weight)
    student = gm.adapt_to_gamma_mod(dense, mod, seed=1)
    config.init_checkpoint = str(tmp_path / "dense")
    config.distill.update(coef=1.0, temperature=2.0)
    return config, student


def _batch(model_cfg, size=2):
    return {k: jnp.asarray(v) for k, v in synthetic_batch(0, size, model_cfg.input_image_size).items()}


def test_a_student_equal_to_its_teacher_has_zero_kl_and_zero_kl_gradient(tmp_path):
    """γ-MoD with nothing skipped (routing ratio 0) and straight-through router weights
    computes the dense model: the KL is 0 and so is its gradient. The same student with the
    official probability weights (MLPs scaled by p) is not its teacher: both are large."""
    for router_weight in ("straight_through", "probability"):
        config, student = _models(tmp_path / router_weight, router_weight)
        teacher = load_teacher(config, student.config, log=lambda *_: None)
        graphdef, params, rest = nnx.split(student, nnx.Param, ...)
        batch = _batch(student.config)
        teacher_out = teacher_answer_logits(teacher.spec, teacher.params, batch)

        @jax.jit
        def check(params, teacher_out):
            metric = lambda params, name: loss_and_metrics(params, graphdef, rest, batch, None, teacher.spec,
                                                           teacher_out)[1][name]
            kl, kl_grad = jax.value_and_grad(functools.partial(metric, name="distill_loss"))(params)
            lm_grad = jax.grad(functools.partial(metric, name="lm_loss"))(params)
            return kl, optax.tree.norm(kl_grad), optax.tree.norm(lm_grad), metric(params, "teacher_agreement")

        kl, kl_norm, lm_norm, agreement = map(float, check(params, teacher_out))
        if router_weight == "straight_through":
            # zero up to float32 rounding of two forward passes that order their sums differently
            assert abs(kl) < 1e-6 and kl_norm < 1e-6 * lm_norm, (kl, kl_norm, lm_norm)
            assert agreement == 1.0
        else:
            assert kl > 1e-3 and kl_norm > 1e-2 * lm_norm, (kl, kl_norm, lm_norm)


def _flops(compiled) -> float:
    cost = compiled.cost_analysis()
    return float((cost[0] if isinstance(cost, (list, tuple)) else cost)["flops"])


def test_teacher_gradients_are_never_computed_and_its_head_runs_on_answer_rows_only(tmp_path):
    """Compiled FLOPs: step with the teacher = step without it + one teacher forward (its
    backward would add about twice that again); the teacher forward's LM head runs on the
    answer buffer only: a full-logits forward costs 2 x b x (L - k) x hidden x vocab more."""
    config, student = _models(tmp_path, "probability", 0.5)
    teacher = load_teacher(config, student.config, log=lambda *_: None)
    graphdef, params, rest = nnx.split(student, nnx.Param, ...)
    batch = _batch(student.config)
    tx = optax.sgd(1e-3)
    state = init_train_state(params, tx)
    plain = jax.jit(functools.partial(train_step, graphdef=graphdef, rest=rest, tx=tx))
    distilled = jax.jit(functools.partial(train_step, graphdef=graphdef, rest=rest, tx=tx, distill=teacher.spec))
    flops_plain = _flops(plain.lower(state, batch).compile())
    flops_distilled = _flops(distilled.lower(state, batch, teacher.params).compile())
    spec = teacher.spec
    teacher_fwd = _flops(jax.jit(functools.partial(teacher_answer_logits, spec)).lower(teacher.params, batch).compile())

    def full_logits(params, batch):
        return nnx.merge(spec.graphdef, params, spec.rest)(batch["input_ids"], batch["attention_mask"],
                                                           batch["pixel_values"], batch["token_types"]).logits
    teacher_full = _flops(jax.jit(full_logits).lower(teacher.params, batch).compile())
    extra = flops_distilled - flops_plain
    assert abs(extra - teacher_fwd) < 0.25 * teacher_fwd, (extra, teacher_fwd, flops_plain)
    cfg = student.config
    b, t = batch["input_ids"].shape
    seq = t - 1 + cfg.num_image_tokens  # spliced length
    head = 2 * b * (seq - t) * cfg.llm.hidden_size * cfg.llm.vocab_size  # k = t answer rows
    assert rel_err(teacher_full - teacher_fwd, head) < 0.05, (teacher_full, teacher_fwd, head)


def test_distill_recipe_trains_logs_its_metrics_and_refuses_a_teacher_of_another_vocabulary(tmp_path):
    config, _ = _models(tmp_path)
    config = load_config(f"configs/train.py:{RECIPE}_distill,tiny").copy_and_resolve_references()
    assert config.distill.coef > 0 and config.distill.teacher_checkpoint == ""
    config.init_checkpoint = str(tmp_path / "dense")
    config.train.update(num_steps=2, checkpoint_every=100)
    train(config, str(tmp_path / "run"), make_data_iterator=synthetic_iterator(2), log=lambda *_: None)
    records = read_metrics(tmp_path / "run")
    for r in records:
        assert r["distill_loss"] > 0 and 0.0 <= r["teacher_agreement"] <= 1.0 and r["distill_tokens"] > 0
        want = r["lm_loss"] + r["routing_loss"] + config.distill.coef * r["distill_loss"]
        assert abs(r["loss"] - want) < 1e-5 * want
    other = gm.build_model(dataclasses.replace(gm.model_config(config.model), mod=None,
                                               llm=dataclasses.replace(gm.model_config(config.model).llm,
                                                                       vocab_size=264)))
    save_checkpoint(str(tmp_path / "other"), other)
    config.distill.teacher_checkpoint = str(tmp_path / "other")
    with pytest.raises(ValueError, match="other: llm.vocab_size 264 differs from the student's 256"):
        train(config, str(tmp_path / "run2"), make_data_iterator=synthetic_iterator(2), log=lambda *_: None)
    with pytest.raises(ValueError, match="unknown recipe|γ-MoD recipes only"):
        load_config("configs/train.py:llava_hr_7b_stage1_distill")


@pytest.mark.slow
def test_distilled_step_sharded_and_under_pmap_equals_the_single_device_step():
    """8 simulated CPU devices: the teacher sharded by the student's rules (2x2x2 mesh) or
    replicated (pmap) gives the single device's losses, KL and updates."""
    proc = run([sys.executable, "-m", "tests.parallel.step_equality_worker", f"{RECIPE}_distill,tiny", "1x1x1",
                "2x2x2", "pmap"], env=child_env(devices=8), timeout=900)
    report = result_line(proc.stdout)
    check_equal(report, "1x1x1")
    assert all(d > 1e-3 for d in report["1x1x1"]["distill_loss"]), report["1x1x1"]
