"""Converts checkpoints between the original PyTorch code and ours, and training output to models.

    python -m launch.convert --checkpoint <hf dir> --out <dir> [--arank <file> | --mod-layers 3-30] [--dtype bf16|fp32]
                             [--vision-config <file>]
    python -m launch.convert --checkpoint <workdir | workdir/checkpoints/N> --out <dir> [--arank <file> | --mod-layers ...]
    python -m launch.convert --export [--format original|hf-llava] --checkpoint <model dir or workdir> --out <hf dir>

Import reads an HF-style directory (config.json plus `model*.safetensors` or
`pytorch_model*.bin`, sharded with an index or single) of LLaVA-1.5, LLaVA-HR, Mini-Gemini,
γ-MoD, or transformers' LlavaForConditionalGeneration (either key layout), and writes an
Orbax checkpoint with `model_config.json` and `config.py` (an ml-collections config) beside
it: a model directory, the format every launcher reads. Vision-tower settings the weights
do not fix (head count, LayerNorm eps) come from the checkpoint, `--vision-config`, the
tower `mm_vision_tower` names (local directory or local HF cache) or a table of public
towers; otherwise the conversion stops and says so. A launch.train workdir (its `model/`,
else its newest verified checkpoint) or one training checkpoint
(`<workdir>/checkpoints/<step>`) is written as a model directory the same way.
`--arank` / `--mod-layers` turn a dense model into a γ-MoD one: MoD layers from a γ-MoD
config.json, our ARank JSON or the official ARank log (rule: --keep-dense N, default 4,
or --threshold X), or named by hand; the shared router initialised as the MoD config says.
`--export` writes our model back as safetensors shards + index + config.json, in the
original layout or (`--format hf-llava`, LLaVA-1.5 only) as transformers' Llava.
Every direction streams and writes atomically: on any error nothing is
left at --out and the exit status is 2 (130 on Ctrl-C or SIGTERM, after removing the
temporary directory; one left by a harder kill is removed by the next run to --out).
config.json is checked field by field before any weight is read; integer tensors and
NaN/Inf values are errors (`--allow-nonfinite` keeps non-finite ones).
"""

from __future__ import annotations

import json
import os
import sys

from launch._common import parse_args, parser as make_parser, progress

DTYPES = {"bf16": "bfloat16", "bfloat16": "bfloat16", "fp32": "float32", "float32": "float32"}


def _parser():
    from launch._selection import add_selection_arguments

    parser = make_parser(__doc__)
    parser.add_argument("--checkpoint", required=True, help="the input model: an HF-style directory, a launch.train "
                        "workdir or training checkpoint, or (with --export) a model directory or workdir")
    parser.add_argument("--out", required=True, help="new directory to write (must not exist)")
    parser.add_argument("--export", action="store_true", help="our model -> HF-style safetensors directory")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                        help="parameter/compute dtype of the imported model (default: as in the source)")
    add_selection_arguments(parser, required=False)
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


def _is_ours(src: str) -> bool:
    """A model directory or launch.train output (else: an HF-style directory to import)."""
    from gamma_mod_jax.convert.checkpoint import (MODEL_CONFIG_FILE, TRAINING_CHECKPOINTS_DIR,
                                                  TRAINING_MODEL_DIR)

    src = os.path.abspath(src)
    return (any(os.path.exists(os.path.join(src, name)) for name in
                (MODEL_CONFIG_FILE, TRAINING_CHECKPOINTS_DIR, TRAINING_MODEL_DIR))
            or os.path.basename(os.path.dirname(src)) == TRAINING_CHECKPOINTS_DIR)


def main(argv=None) -> int:
    args = parse_args(_parser(), argv)
    from gamma_mod_jax.convert.checkpoint import (WriteInterrupted, convert_hf_checkpoint, export_hf_checkpoint,
                                                  resolve_model, write_model)
    from gamma_mod_jax.convert.hf_config import num_llm_layers, validate_hf_config
    from gamma_mod_jax.convert.hf_files import CheckpointError, read_json
    from gamma_mod_jax.convert.vision_towers import read_vision_config
    from launch._selection import mod_config_from_args, wants_selection

    try:
        if os.path.exists(args.out):
            raise CheckpointError(f"{args.out}: already exists; refusing to overwrite it")
        if args.export:
            if wants_selection(args) or args.dtype or args.allow_nonfinite or args.vision_config:
                raise ValueError("--arank, --mod-layers, --dtype, --allow-nonfinite and --vision-config apply to "
                                 "import, not --export")
            with progress(f"exporting {args.checkpoint} -> {args.out}"):
                export_hf_checkpoint(args.checkpoint, args.out, format=args.format,
                                     image_token_index=args.image_token_index,
                                     max_shard_bytes=int(args.max_shard_gb * 2**30))
            return 0
        if args.format != "original" or args.image_token_index is not None:
            raise ValueError("--format and --image-token-index apply to --export")
        if not wants_selection(args) and (args.keep_dense is not None or args.threshold is not None):
            raise ValueError("--keep-dense / --threshold need --arank")
        if not _is_ours(args.checkpoint) and not os.path.isfile(os.path.join(args.checkpoint, "config.json")):
            raise CheckpointError(f"{args.checkpoint}: not a model; expected a model directory (model_config.json + params/), "
                                  "a launch.train workdir (model/ or checkpoints/<step>/) or an HF-style directory "
                                  "(config.json + weights) to import")
        if _is_ours(args.checkpoint):
            if args.dtype or args.allow_nonfinite or args.vision_config:
                raise ValueError("--dtype, --allow-nonfinite and --vision-config apply to importing HF-style "
                                 "directories")
            source = resolve_model(args.checkpoint)
            mod = mod_config_from_args(args, source.config.llm.num_hidden_layers) if wants_selection(args) else None
            with progress(f"writing {source.describe()} -> {args.out}"):
                cfg = write_model(source, args.out, mod=mod, seed=args.seed)
        else:
            vision_config = read_vision_config(args.vision_config) if args.vision_config else None
            mod = None
            if wants_selection(args):
                config_path = os.path.join(args.checkpoint, "config.json")
                hf_config = read_json(config_path)
                validate_hf_config(hf_config, config_path)
                mod = mod_config_from_args(args, num_llm_layers(hf_config))
            with progress(f"converting {args.checkpoint} -> {args.out}"):
                cfg = convert_hf_checkpoint(args.checkpoint, args.out, dtype=DTYPES.get(args.dtype), mod=mod,
                                            seed=args.seed, allow_nonfinite=args.allow_nonfinite,
                                            vision_config=vision_config)
        print(json.dumps({"out": os.path.abspath(args.out), "family": cfg.family,
                          "mod_layers": [] if cfg.mod is None else list(cfg.mod.layers)}))
        return 0
    except (ValueError, OSError) as e:  # CheckpointError, StateDictMismatchError are ValueErrors
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (WriteInterrupted, KeyboardInterrupt):
        print(f"error: interrupted; nothing was written at {os.path.abspath(args.out)}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
