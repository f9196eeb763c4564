"""An assumed text-length distribution of LLaVA's training data, for choosing length
buckets and measuring padding waste without the data at hand (with the data, use its
length index: pipeline.length_index).

Mix665k (LLaVA-1.5's instruction mixture) by component, with the record counts of the
LLaVA-1.5 paper (Table 7) and an ASSUMED log-normal text length per component (median,
sigma; vicuna_v1 template, system prompt and image placeholder included, cut at the
largest bucket as `truncation="truncate_right"` would). The medians come from how the
components are laid out: VQA-style sets hold several questions about one image per
conversation (each turn ~20 tokens with "Answer the question using a single word or
phrase."), region sets (RefCOCO, VG) many boxes with coordinates, LLaVA-Instruct long
multi-turn answers, ShareGPT long text-only chats. They give a mean text length of about
370 tokens, i.e. about 1400 tokens per LLaVA-HR sequence with its 1024 image tokens: the
paper's setting. LCS-558K (stage 1): one short BLIP caption per image.
"""

from __future__ import annotations

from typing import Sequence, Tuple

import numpy as np

# (component, records, has_image, median text tokens, sigma of log length)
MIX665K: Tuple[Tuple[str, int, bool, float, float], ...] = (
    ("llava_instruct", 157_712, True, 330.0, 0.55),
    ("sharegpt", 40_688, False, 1100.0, 0.8),
    ("vqav2", 82_783, True, 160.0, 0.35),
    ("gqa", 72_140, True, 280.0, 0.5),
    ("okvqa", 8_998, True, 80.0, 0.3),
    ("ocrvqa", 80_000, True, 220.0, 0.3),
    ("a_okvqa", 66_160, True, 130.0, 0.3),
    ("textcaps", 21_953, True, 80.0, 0.2),
    ("refcoco", 48_447, True, 420.0, 0.5),
    ("vg", 86_417, True, 360.0, 0.5),
)
LCS558K: Tuple[Tuple[str, int, bool, float, float], ...] = (
    ("blip_laion_cc_sbu", 558_128, True, 62.0, 0.15),
)
ASSUMED = {"mix665k": MIX665K, "lcs558k": LCS558K}


def sample_lengths(components: Sequence[Tuple[str, int, bool, float, float]], *, max_length: int,
                   seed: int = 0, min_length: int = 40) -> Tuple[np.ndarray, np.ndarray]:
    """(text lengths int32 [n], has_image bool [n]) of one draw per record of the
    assumed distribution, clipped to [min_length, max_length]."""
    rng = np.random.default_rng(seed)
    lengths, images = [], []
    for _, count, has_image, median, sigma in components:
        draw = np.exp(np.log(median) + sigma * rng.standard_normal(count))
        lengths.append(np.clip(np.rint(draw), min_length, max_length).astype(np.int32))
        images.append(np.full(count, has_image))
    return np.concatenate(lengths), np.concatenate(images)
