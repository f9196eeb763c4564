"""VQA evaluation by greedy generation: exact match of the normalised answer, the way
LLaVA's short-answer benchmarks are scored ("Answer the question using a single word")."""

from __future__ import annotations

import re
import statistics
import time
from typing import Dict, Iterable, List, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gamma_mod_jax.models.generate import generate
from gamma_mod_jax.progress import progress

GENERATION_KEYS = ("input_ids", "attention_mask", "token_types", "pixel_values")


def normalise_answer(text: str) -> str:
    text = text.lower().strip()
    text = re.sub(r"[^\w\s]", " ", text)
    return " ".join(text.split())


def _batches(examples: Iterable[dict], batch_size: int, buckets: Optional[Sequence[int]]):
    from gamma_mod_jax.data.pipeline import collate_prompts

    chunk: List[dict] = []
    for example in examples:
        chunk.append(example)
        if len(chunk) == batch_size:
            yield chunk, collate_prompts(chunk, batch_size=batch_size, buckets=buckets)
            chunk = []
    if chunk:
        yield chunk, collate_prompts(chunk, batch_size=batch_size, buckets=buckets)


def evaluate_vqa(model, examples: Iterable[dict], tokenizer, *, batch_size: int = 32,
                 buckets: Optional[Sequence[int]] = None, max_new_tokens: int = 4, log=None) -> Dict[str, object]:
    """Accuracy of `model` on eval examples (gamma_mod_jax.data.pipeline.make_eval_examples):
    {"accuracy", "num_examples", "predictions": [{id, question, answer, prediction, correct}],
    "samples_per_s" (generation, batches that did not compile; absent when all did), and for
    γ-MoD models "skip_ratio" (share of real prompt tokens skipping a MoD layer under
    the model's inference routing, mean over layers and prompts)}. Every batch is padded to
    `batch_size` rows and a bucket length, so generation compiles once per bucket
    (a progress line each, through `log`; default stderr)."""
    predictions, skip = [], []
    timed_seconds, timed_examples, shapes = 0.0, 0, set()
    eos = model.config.llm.eos_token_id
    forward = None
    if model.config.mod is not None:
        graphdef, state = nnx.split(model)
        routing = model.inference_routing

        @jax.jit
        def forward(state, batch):
            out = nnx.merge(graphdef, state)(batch["input_ids"], batch["attention_mask"], batch["pixel_values"],
                                             batch["token_types"], routing=routing)
            return out.mod_aux["skip_ratio"]  # [MoD layers]
    for chunk, batch in _batches(examples, batch_size, buckets):
        device_batch = {k: jnp.asarray(batch[k]) for k in GENERATION_KEYS}
        start = time.perf_counter()
        if batch["input_ids"].shape in shapes:  # batches that compiled are not timed
            tokens = np.asarray(generate(model, device_batch, max_new_tokens=max_new_tokens, eos_id=eos))
            timed_seconds += time.perf_counter() - start
            timed_examples += len(chunk)
        else:
            with progress(f"compiling generation for batch shape {batch['input_ids'].shape}", log=log):
                tokens = np.asarray(generate(model, device_batch, max_new_tokens=max_new_tokens, eos_id=eos))
        shapes.add(batch["input_ids"].shape)
        if forward is not None:
            # Skip ratio over the real examples only: run the batch without filler rows counted.
            skip.append((float(np.mean(np.asarray(forward(state, device_batch)))), len(chunk)))
        for example, row in zip(chunk, tokens):
            text = tokenizer.decode([int(t) for t in row if int(t) != eos], skip_special_tokens=True)
            correct = normalise_answer(text) == normalise_answer(example["answer"])
            predictions.append({"id": example["id"], "question": example["question"], "answer": example["answer"],
                                "prediction": text.strip(), "correct": bool(correct)})
    if not predictions:
        raise ValueError("no evaluation examples")
    result = {"accuracy": float(np.mean([p["correct"] for p in predictions])), "num_examples": len(predictions),
              "predictions": predictions}
    if timed_seconds > 0:
        result["samples_per_s"] = timed_examples / timed_seconds
    if skip:
        result["skip_ratio"] = float(sum(s * n for s, n in skip) / sum(n for _, n in skip))
    return result


def time_prefill(model, batch: Dict[str, np.ndarray], *, repeats: int = 10) -> float:
    """Median seconds of the jitted full forward (prefill) over `batch`, after a warm-up."""
    graphdef, state = nnx.split(model)
    routing = model.inference_routing

    @jax.jit
    def forward(state, batch):
        return nnx.merge(graphdef, state)(batch["input_ids"], batch["attention_mask"], batch["pixel_values"],
                                          batch["token_types"], routing=routing).logits

    device_batch = {k: jnp.asarray(batch[k]) for k in GENERATION_KEYS}
    jax.block_until_ready(forward(state, device_batch))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(forward(state, device_batch))
        times.append(time.perf_counter() - start)
    return statistics.median(times)
