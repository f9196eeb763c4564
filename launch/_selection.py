"""The layer-selection flags `launch.convert` and `launch.adapt` share (one definition)."""

from __future__ import annotations

from gamma_mod_jax.mod.arank import DEFAULT_TIES, TIES


def add_selection_arguments(parser, *, required: bool) -> None:
    what = parser.add_mutually_exclusive_group(required=required)
    what.add_argument("--arank", default=None, help="layer selection file: a γ-MoD config.json, an ARank JSON "
                      "(launch.arank) or the official ARank log")
    what.add_argument("--mod-layers", default=None, help="the γ-MoD layers by hand, 0-based ranges and lists "
                      "('3-30', '3-5,7')")
    rule = parser.add_mutually_exclusive_group()
    rule.add_argument("--keep-dense", type=int, default=None,
                      help="ARank files: the N highest-ARank layers stay dense (the official log's default: 4; "
                      "an ARank JSON's default: its own selection)")
    rule.add_argument("--threshold", type=float, default=None, help="ARank files: layers with ARank >= X stay dense")
    parser.add_argument("--ties", choices=[t.replace("_", "-") for t in TIES], default=DEFAULT_TIES.replace("_", "-"),
                        help="--keep-dense with equal ARank values at the cut: later-mod keeps exactly N dense, the "
                        "later of equal layers becoming γ-MoD first; stay-dense keeps every tied layer dense "
                        "(the paper's wording)")
    parser.add_argument("--routing-ratio", type=float, default=0.5,
                        help="γ-MoD: share of the routable (image + system) tokens skipping each MoD layer")
    parser.add_argument("--seed", type=int, default=0, help="seed of the router initialisation")


def wants_selection(args) -> bool:
    return args.arank is not None or args.mod_layers is not None


def mod_config_from_args(args, num_layers: int, log=print):
    """The MoDConfig the selection flags ask for (other γ-MoD options at their defaults);
    ValueError for a bad or empty selection, before any weight is read."""
    from gamma_mod_jax.mod.config import MoDConfig
    from gamma_mod_jax.mod.layer_selection import select_mod_layers

    if not 0.0 <= args.routing_ratio < 1.0:
        raise ValueError(f"--routing-ratio must be in [0, 1), got {args.routing_ratio}")
    layers, origin = select_mod_layers(num_layers=num_layers, selection=args.arank, mod_layers=args.mod_layers,
                                       keep_dense=args.keep_dense, threshold=args.threshold,
                                       ties=args.ties.replace("-", "_"))
    log(f"γ-MoD layers {list(layers)} from {origin}")
    return MoDConfig(layers=layers, routing_ratio=args.routing_ratio)
