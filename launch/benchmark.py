"""Dense vs γ-MoD speed: `python -m launch.benchmark --config configs/benchmark.py[:arg] --out results.json`.

Prefill (capacity and threshold routing), a training step, decoding at batch 1 and 8 and
KV-cache bytes, on the same random weights (or a γ-MoD checkpoint's, `--checkpoint DIR`)."""

from __future__ import annotations

import json
import sys

from gamma_mod_jax.config_file import load_config
from gamma_mod_jax.eval.benchmark import run_benchmark
from gamma_mod_jax.io_utils import write_json_atomic
from launch._common import parse_args, parser as make_parser


def main(argv=None):
    parser = make_parser(__doc__)
    parser.add_argument("--config", default="configs/benchmark.py", help="benchmark config: configs/<file>.py[:arg]")
    parser.add_argument("--out", default="results.json", help="results JSON to write")
    parser.add_argument("--checkpoint", help="benchmark this γ-MoD model (a model directory or a launch.train workdir) instead of random weights; "
                                             "--config then gives only batch size, repeats and decode settings")
    args = parse_args(parser, argv)
    config = load_config(args.config)
    model = None
    if args.checkpoint:
        from gamma_mod_jax.convert.checkpoint import load_checkpoint
        try:
            model = load_checkpoint(args.checkpoint)
            if model.config.mod is None:
                raise ValueError(f"{args.checkpoint}: not a γ-MoD model (its config has no mod block)")
        except (ValueError, OSError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    results = run_benchmark(config, checkpoint_model=model)
    write_json_atomic(args.out, results)  # never a half-written results file
    keys = ("prefill", "prefill_threshold", "train_step", "kv_cache", "decode", "compile_s")
    summary = {k: {f: v for f, v in results[k].items() if not f.endswith(("per_layer", "times_s"))}
               for k in keys}
    print(json.dumps(summary, default=float)[:4000])
    return 0


if __name__ == "__main__":
    sys.exit(main())
