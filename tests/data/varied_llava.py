"""A small LLaVA-JSON data set with varied lengths for the batch-plan tests: 48 records
(image first, text-only, two rounds; answers of 1 to ~45 words, most short), one of
them with an image file that does not decode, 8x6 PNG images, a word tokenizer.

With the tiny recipes' template the text lengths run from about 42 to 96 tokens:
`BUCKETS` splits them into four buckets, most examples in the first."""

from __future__ import annotations

import json
import os

import numpy as np
from PIL import Image

from gamma_mod_jax.data.easy_vqa import easy_vqa_vocabulary
from gamma_mod_jax.data.tokenizer import build_word_tokenizer

BUCKETS = (48, 64, 80, 96)
ANSWER_WORDS = "red green blue circle square triangle word and".split()
CORRUPT_ID = "v7"


def write_varied_llava(root: str, n: int = 48, seed: int = 0):
    """Writes root/data.json, root/images/*.png and root/tokenizer; returns (json path,
    image dir, tokenizer directory)."""
    rng = np.random.default_rng(seed)
    image_dir = os.path.join(root, "images")
    os.makedirs(image_dir, exist_ok=True)
    records = []
    for i in range(n):
        # 80% short answers (one bucket), the rest spread over the longer buckets
        words = int(rng.integers(1, 4)) if rng.random() < 0.8 else int(rng.integers(8, 46))
        answer = " ".join(rng.choice(ANSWER_WORDS, size=words))
        rid = f"v{i}"
        kind = i % 5
        if kind == 4:  # text only
            records.append({"id": rid, "conversations": [{"from": "human", "value": "what is the color of red ?"},
                                                         {"from": "gpt", "value": answer}]})
            continue
        image = f"img{i}.png"
        if rid == CORRUPT_ID:
            with open(os.path.join(image_dir, image), "wb") as f:
                f.write(b"not a png")
        else:
            Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).save(os.path.join(image_dir, image))
        turns = [{"from": "human", "value": "<image>\nwhat is the shape ?"}, {"from": "gpt", "value": answer}]
        if kind == 3:
            turns += [{"from": "human", "value": "and the color ?"}, {"from": "gpt", "value": "blue"}]
        records.append({"id": rid, "image": image, "conversations": turns})
    path = os.path.join(root, "data.json")
    with open(path, "w") as f:
        json.dump(records, f)
    tokenizer_dir = os.path.join(root, "tokenizer")
    build_word_tokenizer(sorted(set(easy_vqa_vocabulary()) | set(ANSWER_WORDS)), tokenizer_dir)
    return path, image_dir, tokenizer_dir
