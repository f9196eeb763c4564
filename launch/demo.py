"""The main job on an embedded default: `make demo`.

Today it builds the tiny LLaVA-HR (random weights), prints its parameter counts,
runs a batch of mixed prompts (image at different positions, a text-only one)
through the full forward pass and greedy generation, turns the same weights into a
γ-MoD model and reports its routing (skip ratio per layer and token type) and the
analytic FLOPs of LLaVA-HR-7B dense vs γ-MoD, and writes `<out>/report.json`.
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
from gamma_mod_jax.mod.flops import default_mod_layers, paper_tflops
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
    # The same weights as a γ-MoD model (layers 1-2 of 4 routed, the official rule).
    gamma = gm.build_model(f"{args.config},mod" if ":" in args.config else f"{args.config}:mod", seed=0)
    state = gm.export_torch_state_dict(model)
    state.update({k: v for k, v in gm.export_torch_state_dict(gamma).items() if "router" in k})
    gm.load_torch_state_dict(gamma, state)
    gamma_out = jax.jit(lambda m, x: m(**x))(gamma, batch)
    llm7b = gm.model_config("configs/llava_hr_7b.py").llm
    layers7b = default_mod_layers(llm7b.num_hidden_layers)
    report = {
        "config": args.config,
        "parameters": dict(counts),
        "spliced_length": int(out.logits.shape[1]),
        "image_tokens_per_example": [int((row == tt.IMAGE).sum()) for row in types],
        "generated": np.asarray(tokens).tolist(),
        "gamma_mod": {
            "mod_layers": list(gamma.llm.mod_layers),
            "skip_ratio_per_layer": np.asarray(gamma_out.mod_aux["skip_ratio"]).round(4).tolist(),
            "skip_image_per_layer": np.asarray(gamma_out.mod_aux["skip_image"]).round(4).tolist(),
            "skip_question_per_layer": np.asarray(gamma_out.mod_aux["skip_question"]).round(4).tolist(),
            "routing_loss_per_layer": np.asarray(gamma_out.mod_aux["routing_loss"]).round(4).tolist(),
        },
        "tflops_dense_7b_1400": round(paper_tflops(llm7b, 1400, layers7b, 0.0), 2),
        "tflops_gamma_mod_7b_1400_skip_0.379": round(paper_tflops(llm7b, 1400, layers7b, 0.379), 2),
        "forward_seconds_incl_compile": round(forward_s, 3),
        "generate_seconds_incl_compile": round(generate_s, 3),
    }
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "report.json"), "w") as f:
        json.dump(report, f, indent=2)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
