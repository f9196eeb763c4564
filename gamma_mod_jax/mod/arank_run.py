"""ARank of a dense model over a stream of input batches.

Every batch runs through one jitted forward pass with `attention_map_ranks` as the
attention probe: each decoder layer's maps are reduced to ranks [batch, heads] inside
the pass, so no layer's maps outlive that layer. The per-sample values (mean over
heads) are collected by `ARankAccumulator`.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Callable, Iterable, Mapping, Optional

import jax
import numpy as np
from flax import nnx

from gamma_mod_jax.mod.arank import ARankAccumulator, attention_map_ranks, select_dense_layers
from gamma_mod_jax.progress import progress

MODEL_INPUTS = ("input_ids", "attention_mask", "pixel_values", "token_types")


def check_selection_rule(num_layers: int, *, keep_dense=None, threshold=None) -> None:
    """Raises ValueError now, before any forward pass, for a rule `select_dense_layers`
    would refuse at the end (keep_dense outside 1..num_layers, both or neither given)."""
    select_dense_layers([0.0] * num_layers, keep_dense=keep_dense, threshold=threshold)


def _batch_ranks(graphdef, state, batch):
    """Per dense layer: ARank [b, heads]; and the spliced token validity [b, L]."""
    model = nnx.merge(graphdef, state)
    embeds, valid, types, _ = model.embed_multimodal(batch["input_ids"], batch["attention_mask"],
                                                     batch["pixel_values"], batch.get("token_types"))
    # The logits are unused: XLA drops the LM head.
    _, _, aux = model.llm(inputs_embeds=embeds, attention_mask=valid, token_types=types,
                          attention_probe=attention_map_ranks)
    return aux["attention_probe"], valid


def _fill_batch(batch: Mapping[str, np.ndarray], size: int) -> dict:
    """A short (last) batch repeated up to `size` rows, so it reuses the compiled pass;
    the extra rows' results are dropped."""
    return {k: np.concatenate([v, np.repeat(v[-1:], size - len(v), axis=0)]) for k, v in batch.items()}


def compute_arank(model, batches: Iterable[Mapping[str, np.ndarray]], *, log: Callable[[str], None] = print,
                  num_samples: Optional[int] = None, keep_dense=None, threshold=None):
    """Per-layer ARank statistics (`ARankAccumulator.layer_statistics()`: one dict per
    layer with mean, std and per_sample) of a dense LlavaModel over `batches` (dicts of
    the model's inputs). `num_samples`: the expected total, for the progress lines only.
    `keep_dense` / `threshold`: the selection rule to be applied afterwards, checked
    against the model's layer count before anything runs.

    Compiles once per batch shape (a shorter last batch is filled up to the first
    batch's size). Raises ValueError for a γ-MoD model, a bad rule, or no samples.
    """
    cfg = model.config
    num_layers = cfg.llm.num_hidden_layers
    if cfg.mod is not None and cfg.mod.enabled:
        raise ValueError(f"ARank is measured on a dense model; this one has γ-MoD layers {list(cfg.mod.layers)} "
                         "(the paper measures the stage-1 dense model)")
    if keep_dense is not None or threshold is not None:
        check_selection_rule(num_layers, keep_dense=keep_dense, threshold=threshold)
    graphdef, state = nnx.split(model)
    ranks_fn = jax.jit(functools.partial(_batch_ranks, graphdef))
    acc = ARankAccumulator(num_layers)
    width, done, shapes = None, 0, set()
    for batch in batches:
        batch = {k: np.asarray(v) for k, v in batch.items() if k in MODEL_INPUTS}
        b = batch["input_ids"].shape[0]
        if b == 0:
            continue
        width = width or b
        batch = _fill_batch(batch, width) if b < width else batch
        shape = batch["input_ids"].shape
        with progress(f"compiling the ARank pass for batch shape {shape}", log) if shape not in shapes \
                else contextlib.nullcontext():
            ranks, valid = ranks_fn(state, batch)
            ranks, valid = [np.asarray(r)[:b] for r in ranks], np.asarray(valid)[:b]
        shapes.add(shape)
        acc.add(ranks, valid)
        done += b
        log(f"ARank: {done}/{num_samples if num_samples is not None else '?'} samples")
    if done == 0:
        raise ValueError("ARank: no samples: the data gave no batches")
    if acc.num_samples < done:
        log(f"ARank: {done - acc.num_samples} of {done} samples had no valid token and were left out")
    return acc.layer_statistics()
