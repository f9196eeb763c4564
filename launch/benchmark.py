"""Dense vs γ-MoD speed: `python -m launch.benchmark --config configs/benchmark.py[:arg] --out results.json`.

Prefill (capacity and threshold routing), a training step, decoding at batch 1 and 8 and
KV-cache bytes, on the same random weights."""

from __future__ import annotations

import argparse
import json
import os
import tempfile

from gamma_mod_jax.config_file import load_config
from gamma_mod_jax.eval.benchmark import run_benchmark


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", default="configs/benchmark.py")
    parser.add_argument("--out", default="results.json")
    args = parser.parse_args(argv)
    config = load_config(args.config)
    results = run_benchmark(config)
    out_dir = os.path.dirname(os.path.abspath(args.out))
    os.makedirs(out_dir, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=out_dir, delete=False, suffix=".tmp") as f:
        json.dump(results, f, indent=2)
    os.replace(f.name, args.out)  # never a half-written results file
    keys = ("prefill", "prefill_threshold", "train_step", "kv_cache", "decode", "compile_s")
    summary = {k: {f: v for f, v in results[k].items() if not f.endswith(("per_layer", "times_s"))}
               for k in keys}
    print(json.dumps(summary, default=float)[:4000])


if __name__ == "__main__":
    main()
