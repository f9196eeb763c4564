"""Dense model -> γ-MoD model, with the MoD layers an ARank selection (or a list by hand) names.

    python -m launch.adapt --checkpoint DENSE_DIR_OR_WORKDIR --arank arank.json --out GAMMA_DIR \
        [--routing-ratio 0.5] [--keep-dense N | --threshold X] [--ties later-mod|stay-dense] [--seed 0]
    python -m launch.adapt --checkpoint DENSE_DIR_OR_WORKDIR --mod-layers 3-30 --out GAMMA_DIR

--checkpoint: a model directory or a launch.train workdir / checkpoint. --arank: a γ-MoD
config.json, an ARank JSON from launch.arank (its own selection, or with --keep-dense /
--threshold a new one from its per-layer statistics) or the official ARank log;
--mod-layers: 0-based ranges and lists. The selection is checked before any weight is
read (none or all layers γ-MoD: exit 2). Every weight is copied unchanged and the shared
router is initialised as the γ-MoD model's initialisation at --seed draws it
(gamma_mod_jax/models/adapt.py); every other γ-MoD option keeps its default
(gamma_mod_jax/mod/config.py). --out must not exist; it is written atomically.
`launch.convert --checkpoint ... --arank ...` does the same.
"""

from __future__ import annotations

import os
import sys

from launch._common import parse_args, parser as make_parser


def run(args, log=print):
    from gamma_mod_jax.convert.checkpoint import resolve_model, write_model
    from gamma_mod_jax.convert.hf_files import CheckpointError
    from launch._selection import mod_config_from_args

    if os.path.exists(args.out):
        raise CheckpointError(f"{args.out}: already exists; refusing to overwrite it")
    source = resolve_model(args.checkpoint, log)
    if source.config.mod is not None:
        raise ValueError(f"{source.describe()}: already a γ-MoD model (MoD layers {list(source.config.mod.layers)})")
    num_layers = source.config.llm.num_hidden_layers
    mod = mod_config_from_args(args, num_layers, log)
    cfg = write_model(source, args.out, mod=mod, seed=args.seed, log=log)
    dense_layers = [i for i in range(num_layers) if i not in mod.layers]
    log(f"{args.checkpoint} -> {args.out}: γ-MoD layers {list(mod.layers)}, dense layers {dense_layers}, "
        f"routing ratio {args.routing_ratio}")
    return cfg


def main(argv=None):
    from launch._selection import add_selection_arguments

    parser = make_parser(__doc__)
    parser.add_argument("--checkpoint", required=True, help="the dense model: a model directory, or a launch.train "
                        "workdir / checkpoint")
    parser.add_argument("--out", required=True, help="γ-MoD model directory to create (must not exist)")
    add_selection_arguments(parser, required=True)
    args = parse_args(parser, argv)
    try:
        run(args)
    except ValueError as e:  # CheckpointError and CheckpointIntegrityError are ValueErrors
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
