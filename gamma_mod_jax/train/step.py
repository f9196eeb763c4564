"""The training step as a pure function of pytrees, ready for `jax.jit` with shardings.

State: parameters, optimizer state, step, the count of skipped non-finite updates (total
and in a row). One call consumes one (micro-)batch; with gradient accumulation optax's
MultiSteps applies the update every k calls.

Under jax.jit with shardings (pjit) the batch is the global batch and the step is written
as for one device. Under jax.pmap (`axis_name`) each device sees its part of the batch;
the loss is normalised by the global number of supervised tokens and gradients are
averaged with pmean, so both compute the same update as one device on the whole batch.
"""

from __future__ import annotations

from typing import Any, Dict, Optional

import flax.struct
import jax
import jax.numpy as jnp
import optax
from flax import nnx

from gamma_mod_jax import token_types as tt
from gamma_mod_jax.mod.routing import total_routing_loss
from gamma_mod_jax.models.mllm import answer_positions
from gamma_mod_jax.token_types import IGNORE_INDEX
from gamma_mod_jax.train.distill import DistillSpec, teacher_answer_logits, tempered_kl, top1_matches

BATCH_KEYS = ("input_ids", "attention_mask", "pixel_values", "token_types", "labels")


@flax.struct.dataclass
class TrainState:
    params: Any                 # nnx.State of the nnx.Param variables
    opt_state: Any
    step: jax.Array             # number of step calls done (micro-batches)
    nonfinite_total: jax.Array  # step calls skipped: loss, gradients, update or new state not finite
    nonfinite_run: jax.Array    # ... in a row (reset by a finite step)


def masked_nll_sum(logits, labels):
    """Sum of the negative log-likelihood over positions whose label is not IGNORE_INDEX
    (logits and labels aligned), and the number of such positions."""
    valid = labels != IGNORE_INDEX
    nll = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), jnp.where(valid, labels, 0))
    return jnp.sum(nll * valid), jnp.sum(valid)


def masked_mean_nll(logits, labels):
    """Mean negative log-likelihood over positions whose label is not IGNORE_INDEX
    (logits and labels aligned), and the number of such positions."""
    total, count = masked_nll_sum(logits, labels)
    return total / jnp.maximum(count, 1), count


def next_token_loss(logits_bsv, labels_bs):
    """LLaVA's LM loss: token t predicts label t+1, mean over supervised tokens."""
    return masked_mean_nll(logits_bsv[:, :-1], labels_bs[:, 1:])


def init_train_state(params, tx) -> TrainState:
    state = TrainState(params=params, opt_state=tx.init(params), step=jnp.zeros((), jnp.int32),
                       nonfinite_total=jnp.zeros((), jnp.int32), nonfinite_run=jnp.zeros((), jnp.int32))
    # Fresh buffers for every leaf: optax may hand out one constant twice, and the state is
    # donated to the step (a buffer cannot be donated twice).
    return jax.tree.map(lambda x: jnp.array(x, copy=True), state)


def loss_and_metrics(params, graphdef, rest, batch, axis_name=None, distill: Optional[DistillSpec] = None,
                     teacher=None) -> tuple:
    """(objective, metrics) of one batch. Without `axis_name` the batch is the global
    batch (jit: a sharded global array). With it (pmap) the batch is this device's part
    of the global batch and the objective is this device's share, scaled so that its
    mean over the devices (and the mean of its gradients, jax.lax.pmean) is the global
    batch's loss: the LM loss is normalised by the global count of supervised tokens,
    as one large batch would be. Metrics are then global values on every device.
    `distill` and `teacher` (the teacher's answer logits and their validity, from
    distill.teacher_answer_logits): the objective adds distill.coef x the tempered KL on
    the answer tokens, normalised like the LM loss (see gamma_mod_jax/train/distill.py)."""
    model = nnx.merge(graphdef, params, rest)
    out = model(batch["input_ids"], batch["attention_mask"], batch["pixel_values"], batch.get("token_types"),
                batch["labels"], routing="capacity")
    mod = model.llm.mod
    routing_loss = total_routing_loss(out.mod_aux, mod) if mod is not None else jnp.float32(0.0)
    if axis_name is None:
        lm_loss, num_tokens = next_token_loss(out.logits, out.labels)
        objective = lm_loss + routing_loss
        metrics: Dict[str, jax.Array] = {"lm_loss": lm_loss, "supervised_tokens": num_tokens,
                                         "tokens": jnp.sum(out.attention_mask), "routing_loss": routing_loss}
        if mod is not None:
            for name, value in out.mod_aux.items():
                if name.startswith("skip_"):
                    metrics[name] = jnp.mean(value)  # mean over MoD layers
            metrics["skip_ratio_per_layer"] = out.mod_aux["skip_ratio"]
    else:
        nll_sum, count = masked_nll_sum(out.logits[:, :-1], out.labels[:, 1:])
        num_tokens = jax.lax.psum(count, axis_name)  # labels only: no gradient flows here
        devices = jax.lax.psum(1, axis_name)
        share = nll_sum / jnp.maximum(num_tokens, 1)
        # Routing losses are means over equally sized device batches: their pmean is global.
        objective = devices * share + routing_loss
        sg = jax.lax.stop_gradient
        metrics = {"lm_loss": jax.lax.psum(sg(share), axis_name), "supervised_tokens": num_tokens,
                   "tokens": jax.lax.psum(jnp.sum(out.attention_mask), axis_name),
                   "routing_loss": jax.lax.pmean(sg(routing_loss), axis_name)}
        if mod is not None:
            metrics.update(_global_skip_metrics(out.mod_aux["selected"], out.token_types, axis_name))
    if mod is None:
        metrics["skip_ratio"] = jnp.float32(0.0)
    metrics["loss"] = metrics["lm_loss"] + metrics["routing_loss"]
    if distill is not None:
        term, distill_metrics = _distill_term(out, teacher, distill, axis_name)
        objective = objective + distill.coef * term
        metrics.update(distill_metrics)
        metrics["loss"] = metrics["loss"] + distill.coef * metrics["distill_loss"]
    return objective, metrics


def _distill_term(out, teacher, distill: DistillSpec, axis_name) -> tuple:
    """The KL term of the objective (this device's share under pmap, as the LM loss) and
    the metrics distill_loss (T^2-scaled mean KL over answer tokens), teacher_agreement
    (top-1 match rate of teacher and student there) and distill_tokens."""
    teacher_logits, teacher_valid = teacher
    positions, student_valid = answer_positions(out.labels, teacher_logits.shape[1])
    student_logits = jnp.take_along_axis(out.logits, positions[..., None], axis=1)    # [b, k, vocab]
    mask = student_valid & teacher_valid
    kl_sum, count = tempered_kl(teacher_logits, student_logits, mask, distill.temperature, distill.kl)
    matches = top1_matches(teacher_logits, jax.lax.stop_gradient(student_logits), mask)
    if axis_name is None:
        term = kl_sum / jnp.maximum(count, 1)
        return term, {"distill_loss": term, "teacher_agreement": matches / jnp.maximum(count, 1),
                      "distill_tokens": count}
    total = jax.lax.psum(count, axis_name)
    share = kl_sum / jnp.maximum(total, 1)
    devices = jax.lax.psum(1, axis_name)
    return devices * share, {"distill_loss": jax.lax.psum(jax.lax.stop_gradient(share), axis_name),
                             "teacher_agreement": jax.lax.psum(matches, axis_name) / jnp.maximum(total, 1),
                             "distill_tokens": total}


def _global_skip_metrics(selected_nbs, token_types_bs, axis_name) -> Dict[str, jax.Array]:
    """routing.skip_statistics over the global batch from per-device parts: skipped
    counts and token counts are summed over devices before dividing; then the mean over
    MoD layers (skip_<type>, skip_ratio) and skip_ratio per layer."""
    skipped = (~selected_nbs).astype(jnp.float32)                       # [n_mod, b, s]
    psum = lambda x: jax.lax.psum(x, axis_name)
    out = {}
    for type_id, name in tt.NAMES.items():
        of_type = (token_types_bs == type_id).astype(jnp.float32)
        ratio = psum(jnp.sum(skipped * of_type, axis=(1, 2))) / jnp.maximum(psum(jnp.sum(of_type)), 1.0)
        out[f"skip_{name}"] = jnp.mean(ratio)
    real = (token_types_bs != tt.PADDING).astype(jnp.float32)
    per_layer = psum(jnp.sum(skipped * real, axis=(1, 2))) / jnp.maximum(psum(jnp.sum(real)), 1.0)
    out["skip_ratio"] = jnp.mean(per_layer)
    out["skip_ratio_per_layer"] = per_layer
    return out


def _frozen_as_constants(params, trainable):
    """Frozen parameters behind stop_gradient: their gradients are exact zeros, so XLA
    drops the weight-gradient products (stage 1 trains the projector alone)."""
    if trainable is None:
        return params
    return jax.tree.map(lambda p, t: p if t else jax.lax.stop_gradient(p), params, trainable)


def all_finite(tree) -> jax.Array:
    """True when every floating-point element of `tree` is finite (integer leaves, such as
    optimizer step counts, cannot hold NaN). One fused reduction per leaf, on device."""
    leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(jnp.result_type(x), jnp.inexact)]
    if not leaves:
        return jnp.bool_(True)
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))


def train_step(state: TrainState, batch, teacher_params=None, *, graphdef, rest, tx, axis_name=None, trainable=None,
               distill: Optional[DistillSpec] = None) -> tuple:
    """One micro-batch: gradients, the optimizer update, a non-finite guard. Returns
    (new state, metrics). The update is applied only when the loss, the gradients, the
    update and the new parameters and optimizer state are all finite; otherwise
    parameters and optimizer state stay as they were and the skip is counted
    (`nonfinite_total`, `nonfinite_run`, both on device). This is not
    optax.apply_if_finite: that one looks at the incoming gradients only (a NaN learning
    rate or a corrupt optimizer moment passes it) and applies the update anyway after
    its limit of consecutive errors; here the trainer stops the run at the limit instead.
    `axis_name`: under jax.pmap, the mapped axis; gradients are averaged over it (see
    loss_and_metrics). `trainable`: optional pytree of Python bools like params (the
    freeze rules' mask); frozen parameters get no gradient computation (their optimizer
    updates are zero either way). `distill` with `teacher_params`: the frozen teacher runs
    forward once, outside the differentiated function (no teacher gradients exist), and
    its answer logits enter the objective (see loss_and_metrics)."""
    teacher = None if distill is None else teacher_answer_logits(distill, teacher_params, batch)
    objective = lambda params: loss_and_metrics(_frozen_as_constants(params, trainable), graphdef, rest, batch,
                                                axis_name, distill, teacher)
    (_, metrics), grads = jax.value_and_grad(objective, has_aux=True)(state.params)
    if axis_name is not None:
        grads = jax.lax.pmean(grads, axis_name)
    loss = metrics["loss"]
    grad_norm = optax.tree.norm(grads)
    inputs_finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    # Zeroed gradients keep NaN out of the optimizer's arithmetic (MultiSteps accumulates them).
    grads = jax.tree.map(lambda g: jnp.where(inputs_finite, g, jnp.zeros_like(g)), grads)
    updates, new_opt_state = tx.update(grads, state.opt_state, state.params)
    new_params = optax.apply_updates(state.params, updates)
    finite = inputs_finite & all_finite(updates) & all_finite(new_params) & all_finite(new_opt_state)
    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
    one = jnp.ones((), jnp.int32)
    new_state = TrainState(
        params=keep(new_params, state.params), opt_state=keep(new_opt_state, state.opt_state),
        step=state.step + one, nonfinite_total=state.nonfinite_total + jnp.where(finite, 0, one),
        nonfinite_run=jnp.where(finite, 0, state.nonfinite_run + one))
    metrics.update(grad_norm=grad_norm, finite=finite, nonfinite_run=new_state.nonfinite_run)
    return new_state, metrics
