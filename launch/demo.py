"""The main job on an embedded default: `make demo`.

Today it builds the tiny LLaVA-HR (random weights), prints its parameter counts,
runs a batch of mixed prompts (image at different positions, a text-only one)
through the full forward pass and greedy generation, and writes a small report.
The full γ-MoD adaptation on easy-VQA replaces this as training lands.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from gamma_mod_jax import api as gm
from gamma_mod_jax import token_types as tt
from launch.inspect import count_parameters

DEFAULT_CONFIG = "configs/llava_hr_7b.py:tiny"


def main(argv=None):
    parser = argparse.ArgumentParser(description="tiny LLaVA-HR smoke run")
    parser.add_argument("--config", default=DEFAULT_CONFIG)
    parser.add_argument("--out", default="out/demo")
    args = parser.parse_args(argv)
    cfg = gm.model_config(args.config)
    counts = count_parameters(cfg)
    print(f"config {args.config}: {sum(counts.values()):,} parameters "
          + ", ".join(f"{k} {v:,}" for k, v in counts.items() if v))
    model = gm.build_model(cfg, seed=0)
    rng = np.random.default_rng(0)
    b, t = 3, 12
    ids = rng.integers(3, cfg.llm.vocab_size, size=(b, t)).astype(np.int32)
    lengths = np.array([12, 9, 6])
    ids[0, 0] = ids[1, 4] = cfg.image_token_index  # image first, image in the middle, text only
    mask = (np.arange(t)[None] < lengths[:, None]).astype(np.int32)
    ids = np.where(mask == 1, ids, cfg.llm.pad_token_id)
    size = cfg.input_image_size
    pixels = rng.standard_normal((b, size, size, 3)).astype(np.float32)
    batch = {"input_ids": jnp.asarray(ids), "attention_mask": jnp.asarray(mask), "pixel_values": jnp.asarray(pixels)}
    start = time.perf_counter()
    out = jax.jit(lambda m, x: m(**x))(model, batch)
    jax.block_until_ready(out.logits)
    forward_s = time.perf_counter() - start
    start = time.perf_counter()
    tokens = gm.generate(model, batch, max_new_tokens=8, eos_id=cfg.llm.eos_token_id)
    generate_s = time.perf_counter() - start
    types = np.asarray(out.token_types)
    report = {
        "config": args.config,
        "parameters": dict(counts),
        "spliced_length": int(out.logits.shape[1]),
        "image_tokens_per_example": [int((row == tt.IMAGE).sum()) for row in types],
        "generated": np.asarray(tokens).tolist(),
        "forward_seconds_incl_compile": round(forward_s, 3),
        "generate_seconds_incl_compile": round(generate_s, 3),
    }
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "report.json"), "w") as f:
        json.dump(report, f, indent=2)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
