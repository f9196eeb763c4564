"""Vision-tower pre-training by image classification: a stand-in for CLIP / ConvNeXt
pre-training when a model is built from scratch (the `make demo` run), so that stage-2
training starts from image features that already separate what the questions ask about.

Linear heads on the mean of the tower's output tokens, one softmax cross-entropy per label
kind (e.g. colour and shape); label -1 = unknown, left out of that kind's loss. Only the
vision tower's parameters change; the heads are thrown away.
"""

from __future__ import annotations

import time
from typing import Callable, Dict, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from gamma_mod_jax.train.optim import learning_rate_schedule
from gamma_mod_jax.train.step import IGNORE_INDEX, masked_mean_nll


class _Heads(nnx.Module):
    def __init__(self, dim: int, num_classes: Sequence[int], rngs: nnx.Rngs):
        self.heads = nnx.List([nnx.Linear(dim, n, rngs=rngs) for n in num_classes])


def pretrain_vision(model, images: np.ndarray, labels: np.ndarray, num_classes: Sequence[int], *, steps: int,
                    batch_size: int = 64, learning_rate: float = 2e-3, warmup_steps: int = 20, seed: int = 0,
                    eval_images: np.ndarray | None = None, eval_labels: np.ndarray | None = None,
                    log: Callable[[str], None] = print) -> Dict[str, object]:
    """Trains `model.vision` in place. images [n, S, S, 3] preprocessed; labels [n, kinds]
    int (-1 unknown). Returns {"loss": final loss, "accuracy": per kind on the eval set
    (or the training images), "seconds"}."""
    labels = np.asarray(labels, np.int32)
    if labels.ndim != 2 or labels.shape != (len(images), len(num_classes)):
        raise ValueError(f"labels must be [{len(images)}, {len(num_classes)}], got {labels.shape}")
    targets = np.where(labels < 0, IGNORE_INDEX, labels)  # unknown: left out of the loss
    started = time.perf_counter()
    dim = model.config.mm_hidden_size
    pair = nnx.List([model.vision, _Heads(dim, num_classes, nnx.Rngs(seed))])
    schedule = learning_rate_schedule(learning_rate=learning_rate, num_steps=steps, warmup_steps=warmup_steps)
    optimizer = nnx.Optimizer(pair, optax.adamw(schedule, weight_decay=0.0), wrt=nnx.Param)

    def logits(pair, x):
        pooled = pair[0](x).mean(axis=1)
        return [head(pooled) for head in pair[1].heads]

    @nnx.jit
    def step(pair, optimizer, x, y):
        def loss_fn(pair):
            return sum(masked_mean_nll(out, y[:, k])[0] for k, out in enumerate(logits(pair, x)))

        loss, grads = nnx.value_and_grad(loss_fn)(pair)
        optimizer.update(pair, grads)
        return loss

    @nnx.jit
    def predict(pair, x):
        return jnp.stack([out.argmax(-1) for out in logits(pair, x)], axis=-1)

    def accuracy():
        xs, ys = (eval_images, eval_labels) if eval_images is not None else (images, labels)
        preds = np.concatenate([np.asarray(predict(pair, jnp.asarray(xs[i:i + 256]))) for i in range(0, len(xs), 256)])
        ys = np.asarray(ys)
        return [float(np.mean(preds[ys[:, k] >= 0, k] == ys[ys[:, k] >= 0, k])) for k in range(len(num_classes))]

    rng = np.random.default_rng(seed)
    loss = float("nan")
    for i in range(steps):
        idx = rng.integers(0, len(images), batch_size)
        loss = float(step(pair, optimizer, jnp.asarray(images[idx]), jnp.asarray(targets[idx])))
        if not np.isfinite(loss):
            raise FloatingPointError(f"vision pre-training: non-finite loss at step {i}")
        if (i + 1) % max(steps // 4, 1) == 0:
            log(f"vision pre-training step {i + 1}/{steps}: loss {loss:.3f}")
    return {"loss": loss, "accuracy": accuracy(), "seconds": time.perf_counter() - started}
