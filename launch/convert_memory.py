"""Peak resident memory of `launch.convert` on a synthetic multi-GB checkpoint.

    python -m launch.convert_memory --gb 2.5 --shard-gb 0.75 --workdir /tmp/convert_memory

Writes a LLaVA-1.5-shaped safetensors checkpoint of random weights (a widened LLM, the
tiny vision tower) in shards, converts it in a child process, and prints the child's peak
RSS against the bound the converter promises: 1.5 x the largest shard + the largest
tensor, over the interpreter's own baseline (a child that imports the same modules and
converts nothing). The last output line is JSON with every figure. Removes its files.
"""

from __future__ import annotations

import dataclasses
import json
import os
import resource
import shutil
import subprocess
import sys

import numpy as np

from launch._common import parse_args, parser as make_parser


def synthetic_config(target_bytes: float):
    """A LLaVA-1.5 config whose fp32 weights take about `target_bytes`."""
    from gamma_mod_jax.api import model_config

    cfg = model_config("configs/llava15_7b.py:tiny")
    hidden, ffn, vocab = 2048, 5504, 32000
    per_layer = (4 * hidden * hidden + 3 * hidden * ffn + 2 * hidden) * 4
    layers = max(1, int(round((target_bytes - 2 * vocab * hidden * 4) / per_layer)))
    llm = dataclasses.replace(cfg.llm, hidden_size=hidden, intermediate_size=ffn, vocab_size=vocab,
                              num_hidden_layers=layers, num_attention_heads=16, num_key_value_heads=16)
    return dataclasses.replace(cfg, llm=llm)


def write_synthetic(directory: str, cfg, shard_bytes: float, seed: int = 0):
    """Random weights under the original keys, in safetensors shards of about `shard_bytes`."""
    from gamma_mod_jax.api import abstract_model
    from gamma_mod_jax.convert.hf_config import hf_config_from_mllm
    from gamma_mod_jax.convert.hf_files import SafetensorsShardWriter
    from gamma_mod_jax.convert.keymap import expected_torch_shapes, mllm_keymap

    shapes = expected_torch_shapes(abstract_model(cfg), mllm_keymap(cfg.family))
    groups, size = [[]], 0
    for key in sorted(shapes):
        nbytes = int(np.prod(shapes[key])) * 4
        if groups[-1] and size + nbytes > shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(key)
        size += nbytes
    os.makedirs(directory)
    writer = SafetensorsShardWriter(directory, len(groups))
    rng = np.random.default_rng(seed)
    for i, keys in enumerate(groups, 1):
        writer.write({k: rng.standard_normal(shapes[k], dtype=np.float32) * 0.02 for k in keys})
        print(f"  wrote shard {i}/{len(groups)}", flush=True)
    writer.finish(hf_config_from_mllm(cfg))
    return {k: int(np.prod(v)) * 4 for k, v in shapes.items()}


def child_peak_rss(argv) -> int:
    """Peak RSS in bytes of a child process (it must be the only child waited for so far)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    subprocess.run(argv, check=True)
    after = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    if after <= before:
        raise RuntimeError("the child's peak RSS did not exceed an earlier child's; run the measurements "
                           "from a fresh process in increasing order")
    return after * 1024  # Linux reports KiB


def main(argv=None):
    parser = make_parser(__doc__)
    parser.add_argument("--gb", type=float, default=2.5, help="checkpoint size (fp32) in GB")
    parser.add_argument("--shard-gb", type=float, default=0.75, help="safetensors shard size in GB")
    parser.add_argument("--workdir", default="/tmp/gamma_mod_convert_memory", help="scratch folder for the synthetic checkpoint (removed)")
    args = parse_args(parser, argv)
    if os.path.exists(args.workdir):
        parser.error(f"--workdir {args.workdir} exists; give a new directory")
    src, dst = os.path.join(args.workdir, "src"), os.path.join(args.workdir, "ours")
    try:
        cfg = synthetic_config(args.gb * 1e9)
        print(f"writing a synthetic {cfg.llm.num_hidden_layers}-layer checkpoint to {src}", flush=True)
        tensor_bytes = write_synthetic(src, cfg, args.shard_gb * 1e9)
        shards = [os.path.join(src, f) for f in os.listdir(src) if f.endswith(".safetensors")]
        largest_shard = max(os.path.getsize(s) for s in shards)
        total = sum(os.path.getsize(s) for s in shards)
        baseline = child_peak_rss([sys.executable, "-c", "import jax, orbax.checkpoint, safetensors; "
                                   "import gamma_mod_jax.convert.checkpoint, launch.convert"])
        peak = child_peak_rss([sys.executable, "-m", "launch.convert", "--checkpoint", src, "--out", dst])
        largest_tensor = max(tensor_bytes.values())
        bound = 1.5 * largest_shard + largest_tensor
        figures = {"checkpoint_bytes": total, "num_shards": len(shards), "largest_shard_bytes": largest_shard,
                   "largest_tensor_bytes": largest_tensor, "baseline_rss_bytes": baseline, "peak_rss_bytes": peak,
                   "peak_over_baseline_bytes": peak - baseline, "bound_bytes": bound,
                   "within_bound": peak - baseline <= bound}
        gib = 2**30
        print(f"checkpoint {total / gib:.2f} GiB in {len(shards)} shards (largest {largest_shard / gib:.2f} GiB, "
              f"largest tensor {largest_tensor / gib:.2f} GiB)")
        print(f"peak RSS {peak / gib:.2f} GiB = baseline {baseline / gib:.2f} GiB + {(peak - baseline) / gib:.2f} GiB; "
              f"bound 1.5 x shard + tensor = {bound / gib:.2f} GiB -> "
              f"{'within' if figures['within_bound'] else 'ABOVE'} the bound")
        print(json.dumps(figures))
    finally:
        shutil.rmtree(args.workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
