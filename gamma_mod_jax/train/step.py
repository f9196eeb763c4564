"""The training step as a pure function of pytrees, ready for `jax.jit` with shardings.

State: parameters, optimizer state, step, the count of skipped non-finite updates (total
and in a row). One call consumes one (micro-)batch; with gradient accumulation optax's
MultiSteps applies the update every k calls.
"""

from __future__ import annotations

from typing import Any, Dict

import flax.struct
import jax
import jax.numpy as jnp
import optax
from flax import nnx

from gamma_mod_jax.mod.routing import total_routing_loss

IGNORE_INDEX = -100
BATCH_KEYS = ("input_ids", "attention_mask", "pixel_values", "token_types", "labels")


@flax.struct.dataclass
class TrainState:
    params: Any                 # nnx.State of the nnx.Param variables
    opt_state: Any
    step: jax.Array             # number of step calls done (micro-batches)
    nonfinite_total: jax.Array  # updates skipped because loss or gradients were not finite
    nonfinite_run: jax.Array    # ... in a row (reset by a finite step)


def masked_mean_nll(logits, labels):
    """Mean negative log-likelihood over positions whose label is not IGNORE_INDEX
    (logits and labels aligned), and the number of such positions."""
    valid = labels != IGNORE_INDEX
    nll = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), jnp.where(valid, labels, 0))
    count = jnp.sum(valid)
    return jnp.sum(nll * valid) / jnp.maximum(count, 1), count


def next_token_loss(logits_bsv, labels_bs):
    """LLaVA's LM loss: token t predicts label t+1, mean over supervised tokens."""
    return masked_mean_nll(logits_bsv[:, :-1], labels_bs[:, 1:])


def init_train_state(params, tx) -> TrainState:
    state = TrainState(params=params, opt_state=tx.init(params), step=jnp.zeros((), jnp.int32),
                       nonfinite_total=jnp.zeros((), jnp.int32), nonfinite_run=jnp.zeros((), jnp.int32))
    # Fresh buffers for every leaf: optax may hand out one constant twice, and the state is
    # donated to the step (a buffer cannot be donated twice).
    return jax.tree.map(lambda x: jnp.array(x, copy=True), state)


def loss_and_metrics(params, graphdef, rest, batch) -> tuple:
    model = nnx.merge(graphdef, params, rest)
    out = model(batch["input_ids"], batch["attention_mask"], batch["pixel_values"], batch.get("token_types"),
                batch["labels"], routing="capacity")
    lm_loss, num_tokens = next_token_loss(out.logits, out.labels)
    metrics: Dict[str, jax.Array] = {"lm_loss": lm_loss, "supervised_tokens": num_tokens,
                                     "tokens": jnp.sum(out.attention_mask)}
    mod = model.llm.mod
    if mod is not None:
        routing_loss = total_routing_loss(out.mod_aux, mod)
        metrics["routing_loss"] = routing_loss
        for name, value in out.mod_aux.items():
            if name.startswith("skip_"):
                metrics[name] = jnp.mean(value)  # mean over MoD layers
        metrics["skip_ratio_per_layer"] = out.mod_aux["skip_ratio"]
    else:
        routing_loss = jnp.float32(0.0)
        metrics["routing_loss"] = routing_loss
        metrics["skip_ratio"] = jnp.float32(0.0)
    loss = lm_loss + routing_loss
    metrics["loss"] = loss
    return loss, metrics


def train_step(state: TrainState, batch, *, graphdef, rest, tx) -> tuple:
    """One micro-batch: gradients, a non-finite guard, the optimizer update. Returns
    (new state, metrics). A non-finite loss or gradient norm leaves parameters and
    optimizer state unchanged and is counted."""
    (loss, metrics), grads = jax.value_and_grad(loss_and_metrics, has_aux=True)(state.params, graphdef, rest, batch)
    grad_norm = optax.global_norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    grads = jax.tree.map(lambda g: jnp.where(finite, g, jnp.zeros_like(g)), grads)
    updates, new_opt_state = tx.update(grads, state.opt_state, state.params)
    new_params = optax.apply_updates(state.params, updates)
    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
    one = jnp.ones((), jnp.int32)
    new_state = TrainState(
        params=keep(new_params, state.params), opt_state=keep(new_opt_state, state.opt_state),
        step=state.step + one, nonfinite_total=state.nonfinite_total + jnp.where(finite, 0, one),
        nonfinite_run=jnp.where(finite, 0, state.nonfinite_run + one))
    metrics.update(grad_norm=grad_norm, finite=finite)
    return new_state, metrics
