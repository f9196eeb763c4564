"""Dense checkpoint -> γ-MoD checkpoint, with the MoD layers an ARank report selects.

    python -m launch.adapt --src DENSE_DIR --arank arank.json --dst GAMMA_DIR \
        [--routing-ratio 0.5] [--keep-dense N | --threshold X] [--seed 0]

The MoD layers are the report's `mod_layers`, or with --keep-dense / --threshold a new
selection from its per-layer statistics. Every weight is copied unchanged and the
shared router is freshly initialised; every other γ-MoD option keeps its default
(gamma_mod_jax/mod/config.py). --dst must not exist; it is written atomically.
"""

from __future__ import annotations

import argparse
import os
import sys

from gamma_mod_jax import api as gm
from gamma_mod_jax.convert.hf_files import CheckpointError
from gamma_mod_jax.mod.arank import mod_layers_from_arank_json
from gamma_mod_jax.mod.config import MoDConfig


def run(args, log=print):
    from gamma_mod_jax.convert.checkpoint import load_checkpoint, save_checkpoint

    if os.path.exists(args.dst):
        raise CheckpointError(f"{args.dst}: already exists; refusing to overwrite it")
    if not 0.0 <= args.routing_ratio < 1.0:
        raise ValueError(f"--routing-ratio must be in [0, 1), got {args.routing_ratio}")
    if not os.path.isfile(args.arank):
        raise ValueError(f"{args.arank}: ARank file not found")
    if not os.path.isdir(args.src):
        raise CheckpointError(f"{args.src}: checkpoint directory not found")
    dense = load_checkpoint(args.src)
    if dense.config.mod is not None and dense.config.mod.enabled:
        raise ValueError(f"{args.src}: already a γ-MoD model (MoD layers {list(dense.config.mod.layers)})")
    num_layers = dense.config.llm.num_hidden_layers
    mod_layers = mod_layers_from_arank_json(args.arank, num_layers=num_layers, keep_dense=args.keep_dense,
                                            threshold=args.threshold)
    if not mod_layers:
        raise ValueError(f"{args.arank}: the selection has no γ-MoD layers (every layer stays dense)")
    if len(mod_layers) == num_layers:
        raise ValueError(f"{args.arank}: the selection makes all {num_layers} layers γ-MoD layers; "
                         "at least one must stay dense")
    mod = MoDConfig(layers=tuple(mod_layers), routing_ratio=args.routing_ratio)
    gamma = gm.adapt_to_gamma_mod(dense, mod, seed=args.seed)
    save_checkpoint(args.dst, gamma)
    dense_layers = [i for i in range(num_layers) if i not in mod_layers]
    log(f"{args.src} -> {args.dst}: γ-MoD layers {list(mod_layers)}, dense layers {dense_layers}, "
        f"routing ratio {args.routing_ratio}")
    return gamma


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--src", required=True, help="dense checkpoint directory (save_checkpoint format)")
    parser.add_argument("--arank", required=True, help="ARank JSON from launch.arank")
    parser.add_argument("--dst", required=True, help="γ-MoD checkpoint directory to create")
    parser.add_argument("--routing-ratio", type=float, default=MoDConfig.routing_ratio,
                        help="share of the routable (image + system) tokens skipping each MoD layer")
    rule = parser.add_mutually_exclusive_group()
    rule.add_argument("--keep-dense", type=int, help="reselect: the N highest-ARank layers stay dense")
    rule.add_argument("--threshold", type=float, help="reselect: layers with ARank >= X stay dense")
    parser.add_argument("--seed", type=int, default=0, help="router initialisation seed")
    args = parser.parse_args(argv)
    try:
        run(args)
    except (ValueError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
