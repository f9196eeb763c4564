"""Analytic FLOPs of a config for planning compute.

    python -m launch.flops --config configs/llava_hr_7b.py --seq-len 1400 --skip-ratio 0.379

The last output line is JSON: {"tflops_paper": ..., "tflops_full": ..., ...}. MoD layers
come from --mod-layers ("3-30" or "3,4,5"), else the config's model.mod.layers, else
the released choice (all but layers 0, 1, 2 and the last).
"""

from __future__ import annotations

import argparse
import json
import sys

from gamma_mod_jax.api import model_config
from gamma_mod_jax.mod.flops import default_mod_layers, full_model_breakdown, paper_tflops
from launch._common import parse_args, parser as make_parser


def parse_layers(text: str) -> tuple:
    """'3-30' or '3,4,5' (or a mix: '3-5,9') -> sorted layer indices."""
    layers = set()
    try:
        for part in filter(None, text.split(",")):
            lo, dash, hi = part.partition("-")
            layers.update(range(int(lo), int(hi) + 1) if dash else [int(lo)])
    except ValueError:
        raise argparse.ArgumentTypeError(f"--mod-layers: expected e.g. '3-30' or '3,4,5', got {text!r}") from None
    return tuple(sorted(layers))


def main(argv=None):
    parser = make_parser(__doc__)
    parser.add_argument("--config", required=True, help="configs/<file>.py[:arg]")
    parser.add_argument("--seq-len", type=int, default=1400, help="sequence length (image and text tokens)")
    parser.add_argument("--skip-ratio", type=float, default=0.0, help="share of the whole sequence skipping a MoD layer")
    parser.add_argument("--mod-layers", type=parse_layers, default=None, help="γ-MoD layers, 0-based (3-30 or 3,4,5; default: the config's, else the released choice)")
    args = parse_args(parser, argv)
    cfg = model_config(args.config)
    layers = args.mod_layers
    if layers is None:
        layers = cfg.mod.layers if cfg.mod is not None and cfg.mod.layers else default_mod_layers(cfg.llm.num_hidden_layers)
    if args.seq_len <= 0:
        parser.error(f"--seq-len must be positive, got {args.seq_len}")
    try:
        paper = paper_tflops(cfg.llm, args.seq_len, layers, args.skip_ratio)
        breakdown = full_model_breakdown(cfg, args.seq_len, args.skip_ratio, layers)
    except ValueError as e:
        parser.error(str(e))
    print(f"{args.config}: {args.seq_len} tokens, skip ratio {args.skip_ratio}, "
          f"{len(layers)} MoD layers of {cfg.llm.num_hidden_layers}")
    for name, value in breakdown.items():
        print(f"  {name:<16} {value:10.4f} TFLOPs")
    full = sum(breakdown.values())
    print(f"  {'full model':<16} {full:10.4f} TFLOPs   (paper convention, decoder only: {paper:.4f})")
    print(json.dumps({"tflops_paper": round(paper, 6), "tflops_full": round(full, 6),
                      "breakdown": {k: round(v, 6) for k, v in breakdown.items()}}))


if __name__ == "__main__":
    sys.exit(main())
