"""Dense model -> γ-MoD model, with the MoD layers an ARank selection (or a list by hand) names.

    python -m launch.adapt --src DENSE_DIR_OR_WORKDIR --arank arank.json --dst GAMMA_DIR \
        [--routing-ratio 0.5] [--keep-dense N | --threshold X] [--ties later-mod|stay-dense] [--seed 0]
    python -m launch.adapt --src DENSE_DIR_OR_WORKDIR --mod-layers 3-30 --dst GAMMA_DIR

--src: a model directory or a launch.train workdir / checkpoint. --arank: a γ-MoD
config.json, an ARank JSON from launch.arank (its own selection, or with --keep-dense /
--threshold a new one from its per-layer statistics) or the official ARank log;
--mod-layers: 0-based ranges and lists. The selection is checked before any weight is
read (none or all layers γ-MoD: exit 2). Every weight is copied unchanged and the shared
router is initialised as the γ-MoD model's initialisation at --seed draws it
(gamma_mod_jax/models/adapt.py); every other γ-MoD option keeps its default
(gamma_mod_jax/mod/config.py). --dst must not exist; it is written atomically.
`launch.convert --src ... --arank ...` does the same.
"""

from __future__ import annotations

import argparse
import os
import sys


def run(args, log=print):
    from gamma_mod_jax.convert.checkpoint import resolve_model, write_model
    from gamma_mod_jax.convert.hf_files import CheckpointError
    from launch._selection import mod_config_from_args

    if os.path.exists(args.dst):
        raise CheckpointError(f"{args.dst}: already exists; refusing to overwrite it")
    source = resolve_model(args.src, log)
    if source.config.mod is not None:
        raise ValueError(f"{source.describe()}: already a γ-MoD model (MoD layers {list(source.config.mod.layers)})")
    num_layers = source.config.llm.num_hidden_layers
    mod = mod_config_from_args(args, num_layers, log)
    cfg = write_model(source, args.dst, mod=mod, seed=args.seed, log=log)
    dense_layers = [i for i in range(num_layers) if i not in mod.layers]
    log(f"{args.src} -> {args.dst}: γ-MoD layers {list(mod.layers)}, dense layers {dense_layers}, "
        f"routing ratio {args.routing_ratio}")
    return cfg


def main(argv=None):
    from launch._selection import add_selection_arguments

    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--src", required=True, help="dense model directory, or a launch.train workdir / checkpoint")
    parser.add_argument("--dst", required=True, help="γ-MoD model directory to create")
    add_selection_arguments(parser, required=True)
    args = parser.parse_args(argv)
    try:
        run(args)
    except ValueError as e:  # CheckpointError and CheckpointIntegrityError are ValueErrors
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
