"""Converts checkpoints between the original PyTorch code and ours.

    python -m launch.convert --src <hf dir> --dst <dir> [--arank <file>] [--dtype bf16|fp32]
                             [--vision-config <file>]
    python -m launch.convert --export [--format original|hf-llava] --src <our checkpoint> --dst <hf dir>

Import reads an HF-style directory (config.json plus `model*.safetensors` or
`pytorch_model*.bin`, sharded with an index or single) of LLaVA-1.5, LLaVA-HR, Mini-Gemini,
γ-MoD, or transformers' LlavaForConditionalGeneration (either key layout), and writes an
Orbax checkpoint with `model_config.json` and `config.py` (an ml-collections config) beside
it. Vision-tower settings the weights do not fix (head count, LayerNorm eps) come from the
checkpoint, `--vision-config`, the tower `mm_vision_tower` names (local directory or local
HF cache) or a table of public towers; otherwise the conversion stops and says so.
`--arank` turns a dense checkpoint into a γ-MoD one: MoD layers from a γ-MoD config.json,
our ARank JSON or the official ARank log (rule: --keep-dense N, default 4, or --threshold
X), the shared router initialised as the MoD config says.
`--export` writes our checkpoint back as safetensors shards + index + config.json, in the
original layout or (`--format hf-llava`, LLaVA-1.5 only) as transformers' Llava.
Both directions stream tensor by tensor and write atomically: on any error nothing is
left at --dst and the exit status is 2 (130 on Ctrl-C or SIGTERM, after removing the
temporary directory; one left by a harder kill is removed by the next run to --dst).
config.json is checked field by field before any weight is read; integer tensors and
NaN/Inf values are errors (`--allow-nonfinite` keeps non-finite ones).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

DTYPES = {"bf16": "bfloat16", "bfloat16": "bfloat16", "fp32": "float32", "float32": "float32"}


def _parser():
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--src", required=True, help="HF-style directory (or our checkpoint with --export)")
    parser.add_argument("--dst", required=True, help="new directory to write (must not exist)")
    parser.add_argument("--export", action="store_true", help="our checkpoint -> HF-style safetensors directory")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                        help="parameter/compute dtype of the imported model (default: as in the source)")
    parser.add_argument("--arank", default=None, help="γ-MoD config.json, ARank JSON or official ARank log")
    rule = parser.add_mutually_exclusive_group()
    rule.add_argument("--keep-dense", type=int, default=None, help="keep the N highest-ARank layers dense (default 4)")
    rule.add_argument("--threshold", type=float, default=None, help="keep layers with ARank >= X dense")
    parser.add_argument("--routing-ratio", type=float, default=0.5, help="share of routable tokens skipped (γ-MoD)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the router initialisation")
    parser.add_argument("--max-shard-gb", type=float, default=5.0, help="--export: largest safetensors shard")
    parser.add_argument("--format", choices=("original", "hf-llava"), default="original",
                        help="--export: 'original' (the LLaVA / LLaVA-HR / MGM / γ-MoD code's layout) or 'hf-llava' "
                             "(transformers' LlavaForConditionalGeneration; LLaVA-1.5 only)")
    parser.add_argument("--image-token-index", type=int, default=None,
                        help="--export --format hf-llava: image token id, when the model's placeholder (e.g. -200) "
                             "lies outside the vocabulary")
    parser.add_argument("--vision-config", default=None,
                        help="vision-tower settings the checkpoint lacks: the tower's config.json, or JSON "
                             '{"clip": {"num_attention_heads": N, "layer_norm_eps": X}, "convnext": {"layer_norm_eps": X}}')
    parser.add_argument("--allow-nonfinite", action="store_true",
                        help="import tensors holding NaN or Inf (an error by default)")
    return parser


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    from gamma_mod_jax.convert.checkpoint import WriteInterrupted, convert_hf_checkpoint, export_hf_checkpoint
    from gamma_mod_jax.convert.hf_config import num_llm_layers, validate_hf_config
    from gamma_mod_jax.convert.hf_files import read_json
    from gamma_mod_jax.convert.vision_towers import read_vision_config
    from gamma_mod_jax.mod.config import MoDConfig
    from gamma_mod_jax.mod.layer_selection import read_layer_selection

    try:
        if args.export:
            if args.arank or args.dtype or args.allow_nonfinite or args.vision_config:
                raise ValueError("--arank, --dtype, --allow-nonfinite and --vision-config apply to import, not --export")
            export_hf_checkpoint(args.src, args.dst, format=args.format, image_token_index=args.image_token_index,
                                 max_shard_bytes=int(args.max_shard_gb * 2**30))
            return 0
        if args.format != "original" or args.image_token_index is not None:
            raise ValueError("--format and --image-token-index apply to --export")
        vision_config = read_vision_config(args.vision_config) if args.vision_config else None
        mod = None
        if args.arank:
            config_path = os.path.join(args.src, "config.json")
            hf_config = read_json(config_path)
            validate_hf_config(hf_config, config_path)
            num_layers = num_llm_layers(hf_config)
            layers, origin = read_layer_selection(args.arank, num_layers=num_layers, keep_dense=args.keep_dense,
                                                  threshold=args.threshold)
            print(f"MoD layers {list(layers)} from {origin}")
            mod = MoDConfig(layers=layers, routing_ratio=args.routing_ratio)
        elif args.keep_dense is not None or args.threshold is not None:
            raise ValueError("--keep-dense / --threshold need --arank")
        cfg = convert_hf_checkpoint(args.src, args.dst, dtype=DTYPES.get(args.dtype), mod=mod, seed=args.seed,
                                    allow_nonfinite=args.allow_nonfinite, vision_config=vision_config)
        print(json.dumps({"dst": os.path.abspath(args.dst), "family": cfg.family,
                          "mod_layers": [] if cfg.mod is None else list(cfg.mod.layers)}))
        return 0
    except (ValueError, OSError) as e:  # CheckpointError, StateDictMismatchError are ValueErrors
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (WriteInterrupted, KeyboardInterrupt):
        print(f"error: interrupted; nothing was written at {os.path.abspath(args.dst)}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
