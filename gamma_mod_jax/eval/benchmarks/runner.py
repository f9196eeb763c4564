"""Runs one benchmark: prompts encoded as LLaVA's vicuna_v1 template and CLIP preprocessing
give them, greedy answers in fixed batches and length buckets, answers written as they come
(resumable), then submission files, offline scores and the routing / FLOPs / speed summary.

`Answerer` is the one place the model is called: a batch of encoded prompts in, answer texts
and per-prompt routing counts out.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from typing import Dict, List, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gamma_mod_jax import token_types as tt
from gamma_mod_jax.eval.benchmarks import readers
from gamma_mod_jax.eval.benchmarks.answers import AnswerFile, answer_record, write_submission
from gamma_mod_jax.eval.benchmarks.report import routing_summary
from gamma_mod_jax.eval.benchmarks.scoring import score_benchmark
from gamma_mod_jax.io_utils import atomic_write
from gamma_mod_jax.progress import progress
from gamma_mod_jax.token_types import IMAGE_TOKEN_INDEX

GENERATION_KEYS = ("input_ids", "attention_mask", "token_types", "pixel_values")


class SkipQuestion(Exception):
    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def encode_question(question: readers.Question, tokenizer, image_size: int, max_len: int) -> dict:
    """An eval example {"id", "input_ids", "token_types", "pixel_values"}; SkipQuestion
    (missing / unreadable image, over-long prompt) naming the file or the question."""
    from gamma_mod_jax.data.conversation import BadRecord, encode_prompt
    from gamma_mod_jax.data.image import preprocess_image

    try:
        image = question.load_image()
    except FileNotFoundError as e:
        raise SkipQuestion(readers.MISSING_IMAGE, str(e)) from None
    except ValueError as e:
        raise SkipQuestion(readers.UNREADABLE_IMAGE, str(e)) from None
    try:
        enc = encode_prompt(question.prompt, tokenizer, has_image=image is not None, image_token_index=IMAGE_TOKEN_INDEX)
    except BadRecord as e:
        raise SkipQuestion(readers.NO_QUESTION, f"question {question.key}: {e}") from None
    if len(enc["input_ids"]) > max_len:
        raise SkipQuestion(readers.OVER_LONG, f"question {question.key}: {len(enc['input_ids'])} prompt tokens > "
                                              f"the largest bucket {max_len}")
    pixels = (np.zeros((image_size, image_size, 3), np.float32) if image is None
              else np.asarray(preprocess_image(image, image_size), np.float32))
    return {"id": question.key, "input_ids": np.asarray(enc["input_ids"], np.int32),
            "token_types": np.asarray(enc["token_types"], np.int32), "pixel_values": pixels}


class Answerer:
    """Greedy answers of `model` for batches of encoded prompts, each padded to `batch_size`
    rows and the smallest bucket that fits (one compilation per bucket). For γ-MoD models each
    prompt also gets its routing counts under the model's inference routing: tokens per type
    and skipped (token, MoD layer) pairs per type."""

    def __init__(self, model, tokenizer, *, batch_size: int, buckets: Sequence[int], max_new_tokens: int):
        self.model, self.tokenizer = model, tokenizer
        self.batch_size, self.buckets, self.max_new_tokens = batch_size, tuple(buckets), max_new_tokens
        self.eos = model.config.llm.eos_token_id
        self.mod_layers = tuple(model.config.mod.layers) if model.config.mod is not None else ()
        self._seen_buckets = set()
        self._routing = None
        if self.mod_layers:
            graphdef, _ = nnx.split(model)
            routing = model.inference_routing

            @jax.jit
            def routing_counts(state, batch):
                out = nnx.merge(graphdef, state)(batch["input_ids"], batch["attention_mask"], batch["pixel_values"],
                                                 batch["token_types"], routing=routing)
                types = out.token_types  # [b, L]
                skipped = jnp.sum(~out.mod_aux["selected"], axis=0)  # [b, L]: MoD layers skipped per token
                tokens = {name: jnp.sum(types == t, axis=1) for t, name in tt.NAMES.items() if t != tt.PADDING}
                skips = {name: jnp.sum(jnp.where(types == t, skipped, 0), axis=1)
                         for t, name in tt.NAMES.items() if t != tt.PADDING}
                return tokens, skips

            self._routing = routing_counts

    def __call__(self, examples: List[dict]):
        """(texts, per-example metadata, generation seconds, whether this batch compiled)."""
        from gamma_mod_jax.data.pipeline import collate_prompts

        batch = collate_prompts(examples, batch_size=self.batch_size, buckets=self.buckets)
        device_batch = {k: jnp.asarray(batch[k]) for k in GENERATION_KEYS}
        shape = batch["input_ids"].shape
        compiled = shape not in self._seen_buckets
        self._seen_buckets.add(shape)
        from gamma_mod_jax.models.generate import generate

        start = time.perf_counter()
        with progress(f"compiling generation for batch shape {shape}") if compiled else contextlib.nullcontext():
            tokens = np.asarray(generate(self.model, device_batch, max_new_tokens=self.max_new_tokens,
                                         eos_id=self.eos))
        seconds = time.perf_counter() - start
        texts = [self.tokenizer.decode([int(t) for t in row if int(t) != self.eos], skip_special_tokens=True).strip()
                 for row in tokens[:len(examples)]]
        n_image = self.model.config.num_image_tokens
        meta = [{"seq_len": int(len(e["input_ids"]) + (n_image - 1 if np.any(e["input_ids"] == IMAGE_TOKEN_INDEX)
                                                         else 0))} for e in examples]
        if self._routing is not None:
            _, state = nnx.split(self.model)
            counts, skips = jax.device_get(self._routing(state, device_batch))
            for i, m in enumerate(meta):
                m["tokens"] = {k: int(v[i]) for k, v in counts.items()}
                m["skipped"] = {k: int(v[i]) for k, v in skips.items()}
        return texts, meta, seconds, compiled


def _merge_skips(path: str, current: Dict[str, Dict[str, str]]) -> Dict[str, Dict[str, str]]:
    """reason -> {id: message}, kept across resumed runs in `path`."""
    merged: Dict[str, Dict[str, str]] = {}
    if os.path.exists(path):
        try:
            with open(path, encoding="utf-8") as f:
                merged = json.load(f)
        except json.JSONDecodeError:
            merged = {}
    for reason, items in current.items():
        merged.setdefault(reason, {}).update(items)
    with atomic_write(path) as f:
        json.dump(merged, f, indent=2, sort_keys=True)
    return merged


def run_benchmark(bench: readers.Benchmark, answerer: Answerer, out_dir: str, *, model_id: str,
                  image_size: int, limit: Optional[int] = None, progress: bool = True, data_root: str = "") -> dict:
    """Answers `bench` into `out_dir`/answers.jsonl (continuing a previous run there), writes
    the submission files and returns {"scores" (None: not scored offline), "note",
    "num_questions", "num_answered", "skipped" {reason: count}, "skipped_ids", "routing",
    "samples_per_s", "files"}."""
    from tqdm import tqdm

    os.makedirs(out_dir, exist_ok=True)
    questions = bench.questions[:limit] if limit is not None else bench.questions
    answer_file = AnswerFile(os.path.join(out_dir, "answers.jsonl"))
    skips: Dict[str, Dict[str, str]] = {}
    timed_seconds, timed_examples = 0.0, 0
    max_len = answerer.buckets[-1]
    bar = tqdm(total=len(questions), desc=bench.name, unit="q", disable=not progress or None)
    try:
        for start in range(0, len(questions), answerer.batch_size):
            # Batches are fixed slices of the question list, so a resumed run pads every
            # remaining prompt exactly as the uninterrupted run would.
            chunk = questions[start:start + answerer.batch_size]
            if all(q.key in answer_file.done for q in chunk):
                bar.update(len(chunk))
                continue
            good, examples = [], []
            for q in chunk:
                try:
                    examples.append(encode_question(q, answerer.tokenizer, image_size, max_len))
                    good.append(q)
                except SkipQuestion as s:
                    skips.setdefault(s.reason, {})[q.key] = str(s)
            if examples:
                texts, meta, seconds, compiled = answerer(examples)
                if not compiled:
                    timed_seconds += seconds
                    timed_examples += len(examples)
                answer_file.append([answer_record(q, text, model_id, m) for q, text, m in zip(good, texts, meta)
                                    if q.key not in answer_file.done])
            bar.update(len(chunk))
    finally:
        bar.close()
        answer_file.close()
    all_skips = _merge_skips(os.path.join(out_dir, "skipped.json"), skips)
    for reason, ids in bench.skipped.items():
        all_skips.setdefault(reason, {}).update({i: "in the question file" for i in ids})
    keys = {q.key for q in questions}
    records = [r for k, r in answer_file.done.items() if k in keys]
    answers = {r["metadata"]["key"]: r["text"] for r in records}
    files = [answer_file.path] + write_submission(bench, answers, out_dir, data_root)
    scores = score_benchmark(bench.name, questions, answers) if bench.scored_offline else None
    note = bench.note or ("" if scores is not None else "no offline scorer: files only")
    if scores is not None and scores["num_scored"] == 0:
        scores, note = None, "no answered question has ground truth: nothing scored"
    return {"scores": scores, "note": note, "num_questions": len(questions), "num_answered": len(answers),
            "skipped": {reason: len(ids) for reason, ids in sorted(all_skips.items())},
            "skipped_ids": {reason: sorted(ids) for reason, ids in sorted(all_skips.items())},
            "routing": routing_summary([r["metadata"] for r in records], answerer.model.config),
            "samples_per_s": timed_examples / timed_seconds if timed_seconds > 0 else None,
            "files": files}
