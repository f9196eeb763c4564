"""Input batches for analysis runs (ARank) from a data spec string.

    random       random prompts in the LLaVA token layout: BOS, a system prompt, one image
                 placeholder, a question of random length, right padding; fresh seeded
                 images (standard normal, i.e. CLIP-normalised noise)
    npz:<path>   a .npz file holding the model's inputs with a leading sample axis:
                 input_ids [N, t], attention_mask [N, t], pixel_values [N, S, S, 3] and
                 optionally token_types [N, t]; batches are taken in order

Every batch is a dict of numpy arrays named as `LlavaModel.__call__`'s arguments. The
samples do not depend on the batch size; the last batch holds the remainder.
"""

from __future__ import annotations

import os
from typing import Dict, Iterator

import numpy as np

from gamma_mod_jax.models.config import MLLMConfig
from gamma_mod_jax.mod.config import MoDConfig

REQUIRED_KEYS = ("input_ids", "attention_mask", "pixel_values")
OPTIONAL_KEYS = ("token_types",)
# Random prompts: question lengths are drawn from this range (then right padded to the top).
QUESTION_TOKENS = (4, 32)
FIRST_TEXT_ID = 3  # ids below are special tokens (pad / unk, BOS, EOS)

Batch = Dict[str, np.ndarray]


def batches_from_spec(spec: str, cfg: MLLMConfig, *, batch_size: int, num_samples: int,
                      seed: int = 0) -> Iterator[Batch]:
    """Batches of `num_samples` samples for model `cfg` from `spec` ('random' or
    'npz:<path>'). The spec and the file are checked at once (ValueError naming the
    problem); the returned iterator then yields ceil(num_samples / batch_size) batches."""
    if num_samples is None or int(num_samples) < 1:
        raise ValueError(f"no samples: num_samples must be at least 1, got {num_samples}")
    if int(batch_size) < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    num_samples, batch_size = int(num_samples), int(batch_size)
    if spec == "random":
        return _random_batches(cfg, batch_size, num_samples, seed)
    if spec.startswith("npz:"):
        arrays = load_npz_samples(spec[len("npz:"):], cfg, num_samples)
        return _slices(arrays, batch_size, num_samples)
    raise ValueError(f"unknown data spec {spec!r}: expected 'random' or 'npz:<path>'")


def random_prompt_layout(cfg: MLLMConfig):
    """(system prompt tokens, text length t) of the random prompts: BOS + system prompt +
    image placeholder + the longest question. The system prompt has the MoD config's
    length (the official 35-token vicuna_v1 prompt by default)."""
    system = (cfg.mod or MoDConfig()).system_tokens
    return system, 1 + system + 1 + QUESTION_TOKENS[1]


def _random_batches(cfg: MLLMConfig, batch_size: int, num_samples: int, seed: int) -> Iterator[Batch]:
    rng = np.random.default_rng(seed)
    system, t = random_prompt_layout(cfg)
    size = cfg.input_image_size
    lo = FIRST_TEXT_ID
    if cfg.llm.vocab_size <= lo:
        raise ValueError(f"vocab_size {cfg.llm.vocab_size} leaves no ordinary token ids")
    for start in range(0, num_samples, batch_size):
        b = min(batch_size, num_samples - start)
        ids = np.full((b, t), cfg.llm.pad_token_id, np.int32)
        mask = np.zeros((b, t), np.int32)
        pixels = np.empty((b, size, size, 3), np.float32)
        for i in range(b):  # one example at a time: the samples do not depend on batch_size
            question = int(rng.integers(QUESTION_TOKENS[0], QUESTION_TOKENS[1] + 1))
            n = 1 + system + 1 + question
            ids[i, :n] = rng.integers(lo, cfg.llm.vocab_size, size=n)
            ids[i, 0] = cfg.llm.bos_token_id
            ids[i, 1 + system] = cfg.image_token_index
            mask[i, :n] = 1
            pixels[i] = rng.standard_normal((size, size, 3), dtype=np.float32)
        yield {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels}


def load_npz_samples(path: str, cfg: MLLMConfig, num_samples: int) -> Dict[str, np.ndarray]:
    """The first `num_samples` samples of a .npz file, checked against the model config."""
    if not os.path.isfile(path):
        raise ValueError(f"{path}: data file not found")
    try:
        f = np.load(path, allow_pickle=False)
    except Exception as e:  # neither .npy nor .npz, or pickled objects
        raise ValueError(f"{path}: not a readable .npz file ({type(e).__name__}: {e})") from None
    if not hasattr(f, "files"):
        raise ValueError(f"{path}: a single .npy array, not a .npz file of named arrays")
    try:
        with f:
            arrays = {k: f[k] for k in f.files if k in REQUIRED_KEYS + OPTIONAL_KEYS}
            present = sorted(f.files)
    except Exception as e:  # a corrupt or pickled member
        raise ValueError(f"{path}: unreadable array in the .npz file ({type(e).__name__}: {e})") from None
    missing = [k for k in REQUIRED_KEYS if k not in arrays]
    if missing:
        raise ValueError(f"{path}: missing array(s) {missing}; the file holds {present} "
                         f"(expected {list(REQUIRED_KEYS)}, optionally {list(OPTIONAL_KEYS)})")
    _check_npz_arrays(path, arrays, cfg)
    total = arrays["input_ids"].shape[0]
    if num_samples > total:
        raise ValueError(f"{path}: holds {total} samples, {num_samples} requested")
    out = {"input_ids": arrays["input_ids"][:num_samples].astype(np.int32),
           "attention_mask": arrays["attention_mask"][:num_samples].astype(np.int32),
           "pixel_values": arrays["pixel_values"][:num_samples].astype(np.float32)}
    if "token_types" in arrays:
        out["token_types"] = arrays["token_types"][:num_samples].astype(np.int32)
    return out


def _check_npz_arrays(path: str, arrays: Dict[str, np.ndarray], cfg: MLLMConfig) -> None:
    ids = arrays["input_ids"]
    if ids.ndim != 2:
        raise ValueError(f"{path}: input_ids must be [samples, tokens], got shape {ids.shape}")
    n, t = ids.shape
    size = cfg.input_image_size
    want = {"attention_mask": (n, t), "token_types": (n, t), "pixel_values": (n, size, size, 3)}
    for key, shape in want.items():
        if key in arrays and arrays[key].shape != shape:
            raise ValueError(f"{path}: {key} has shape {arrays[key].shape}, expected {shape} "
                             f"(input_ids is {ids.shape}; images are {size}x{size} NHWC for this model)")
    for key in ("input_ids", "attention_mask", "token_types"):
        if key in arrays and not np.issubdtype(arrays[key].dtype, np.integer):
            raise ValueError(f"{path}: {key} must hold integers, got {arrays[key].dtype}")
    if not np.issubdtype(arrays["pixel_values"].dtype, np.floating):
        raise ValueError(f"{path}: pixel_values must be floating point (CLIP-normalised), "
                         f"got {arrays['pixel_values'].dtype}")
    bad = (ids != cfg.image_token_index) & ((ids < 0) | (ids >= cfg.llm.vocab_size))
    if bad.any():
        sample, pos = map(int, np.argwhere(bad)[0])
        raise ValueError(f"{path}: input_ids[{sample}, {pos}] = {int(ids[sample, pos])} is outside the vocabulary "
                         f"[0, {cfg.llm.vocab_size}) and is not the image placeholder {cfg.image_token_index}")
    mask = arrays["attention_mask"]
    if not np.isin(mask, (0, 1)).all():
        raise ValueError(f"{path}: attention_mask must hold only 0 and 1")
    if (np.diff(mask, axis=1) > 0).any():
        sample = int(np.argwhere((np.diff(mask, axis=1) > 0).any(axis=1))[0, 0])
        raise ValueError(f"{path}: attention_mask[{sample}] is not right-padded (a 1 follows a 0)")


def _slices(arrays: Dict[str, np.ndarray], batch_size: int, num_samples: int) -> Iterator[Batch]:
    for start in range(0, num_samples, batch_size):
        yield {k: v[start:start + batch_size] for k, v in arrays.items()}
