"""ARank per decoder layer of a dense model, and the dense / γ-MoD layer selection.

    python -m launch.arank --config configs/llava_hr_7b.py:tiny [--checkpoint DIR] \
        --data random|npz:PATH --num-samples N [--batch-size B] [--seed S] \
        [--keep-dense 4 | --threshold X] --out arank.json [--plot arank.png]

--checkpoint: a dense model (a model directory, or a launch.train workdir / checkpoint);
its config must equal --config's model config (either may be given alone). Without one the weights are random (for
trying the tool only). The JSON (format gamma_mod_jax.arank/v1) holds per-layer mean,
std and per-sample values, the rule and its selection; `launch.adapt` reads it. The
default rule is the paper's: the 4 highest-ARank layers stay dense; of layers with equal
ARank at the cut the later becomes γ-MoD first (`--ties`, gamma_mod_jax/mod/arank.py).
"""

from __future__ import annotations

import dataclasses
import sys

from gamma_mod_jax import api as gm
from gamma_mod_jax.convert.hf_files import CheckpointError
from gamma_mod_jax.data.synthetic import batches_from_spec
from gamma_mod_jax.io_utils import atomic_write, write_json_atomic
from gamma_mod_jax.mod.arank import DEFAULT_TIES, TIES, arank_report
from gamma_mod_jax.mod.arank_run import compute_arank
from launch._common import parse_args, parser as make_parser

DEFAULT_KEEP_DENSE = 4


def config_differences(a, b, prefix: str = "") -> list:
    """Dotted names of the fields where two (nested) config dataclasses differ, with both values."""
    if dataclasses.is_dataclass(a) and dataclasses.is_dataclass(b) and type(a) is type(b):
        out = []
        for field in dataclasses.fields(a):
            out += config_differences(getattr(a, field.name), getattr(b, field.name), f"{prefix}{field.name}.")
        return out
    return [] if a == b else [f"{prefix.rstrip('.')} ({a!r} vs {b!r})"]


def load_model(config_spec, checkpoint, *, seed: int = 0, log=print):
    """The model to analyse: the checkpoint (checked against the config when both are
    given) or, with the config alone, random weights."""
    from gamma_mod_jax.convert.checkpoint import load_checkpoint, resolve_model

    cfg = gm.model_config(config_spec) if config_spec else None
    if checkpoint is None:
        if cfg is None:
            raise ValueError("give --config, --checkpoint or both")
        print(f"warning: no --checkpoint: ARank of randomly initialised weights (seed {seed}); "
              "the selection means nothing for a trained model", file=sys.stderr)
        return gm.build_model(cfg, seed=seed)
    source = resolve_model(checkpoint, log)  # a model directory or a launch.train workdir / checkpoint
    saved = source.config  # compared before any weight is read
    if cfg is not None:
        diff = config_differences(cfg, saved)
        if diff:
            raise ValueError(f"{checkpoint}: its model config does not match --config {config_spec}: "
                             f"{'; '.join(diff)} (--config vs checkpoint)")
    model = load_checkpoint(source, config=saved)
    log(f"loaded {source.describe()}")
    return model


def plot_arank(report: dict, path: str) -> None:
    """Bar chart of mean ARank per layer (std as error bars), dense and MoD layers in two colours."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = report["layers"]
    dense = set(report["dense_layers"])
    x = [s["layer"] for s in layers]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.3 * len(x) + 2), 4))
    for is_dense, colour, label in ((True, "tab:blue", "dense"), (False, "tab:orange", "γ-MoD")):
        sel = [s for s in layers if (s["layer"] in dense) == is_dense]
        if sel:
            ax.bar([s["layer"] for s in sel], [s["mean"] for s in sel], yerr=[s["std"] for s in sel], capsize=2,
                   color=colour, label=f"{label} ({len(sel)})")
    rule = report["rule"]
    rule_text = f"keep {rule['n']} dense, ties {rule.get('ties', 'stay_dense')}" if rule["type"] == "keep_dense" else f"threshold {rule['value']}"
    ax.set_xlabel("decoder layer")
    ax.set_ylabel("ARank (mean over samples, ± std)")
    n = report["num_samples"]
    ax.set_title(f"ARank per layer, {n} sample{'' if n == 1 else 's'}, {rule_text}")
    ax.set_xticks(x)
    ax.tick_params(axis="x", labelsize=7)
    top = max((s["mean"] + s["std"] for s in layers), default=1.0)
    ax.set_ylim(0, 1.2 * top if top > 0 else 1.0)  # headroom for the legend
    ax.legend(loc="upper center", ncol=2)
    fig.tight_layout()
    try:
        with atomic_write(path, "wb") as f:
            fig.savefig(f, format="png", dpi=120)
    finally:
        plt.close(fig)


def check_keep_dense(keep_dense, num_layers: int) -> None:
    if keep_dense is not None and not 1 <= keep_dense <= num_layers:
        raise ValueError(f"--keep-dense {keep_dense}: must be between 1 and the number of layers; "
                         f"the model has {num_layers} layers")


def run(args, log=print) -> dict:
    if args.keep_dense is None and args.threshold is None:
        args.keep_dense = DEFAULT_KEEP_DENSE
    if args.num_samples < 1:
        raise ValueError(f"no samples: --num-samples must be at least 1, got {args.num_samples}")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {args.batch_size}")
    data = dict(batch_size=args.batch_size, num_samples=args.num_samples, seed=args.seed)
    batches = None
    if args.config:  # check the rule and the data before loading anything
        cfg = gm.model_config(args.config)
        check_keep_dense(args.keep_dense, cfg.llm.num_hidden_layers)
        batches = batches_from_spec(args.data, cfg, **data)
    model = load_model(args.config, args.checkpoint, seed=args.seed, log=log)
    cfg = model.config
    check_keep_dense(args.keep_dense, cfg.llm.num_hidden_layers)
    if batches is None:
        batches = batches_from_spec(args.data, cfg, **data)
    rule = dict(keep_dense=args.keep_dense, threshold=args.threshold)
    stats = compute_arank(model, batches, log=log, num_samples=args.num_samples, **rule)
    report = arank_report(stats, **rule, ties=args.ties.replace("-", "_"))
    report["source"] = {"config": args.config, "checkpoint": args.checkpoint, "data": args.data,
                        "seed": args.seed, "batch_size": args.batch_size}
    write_json_atomic(args.out, report)
    log(f"wrote {args.out}")
    if args.plot:
        plot_arank(report, args.plot)
        log(f"wrote {args.plot}")
    width = len(str(len(stats) - 1))
    for s in stats:
        kind = "dense" if s["layer"] in report["dense_layers"] else "MoD"
        log(f"  layer {s['layer']:>{width}}  ARank {s['mean']:9.3f} ± {s['std']:7.3f}  {kind}")
    if not report["mod_layers"]:
        print("warning: the rule keeps every layer dense: no γ-MoD layers selected", file=sys.stderr)
    if not report["dense_layers"]:
        print("warning: the rule keeps no layer dense; a γ-MoD model needs at least one", file=sys.stderr)
    log(f"dense layers {report['dense_layers']}, γ-MoD layers {report['mod_layers']}")
    return report


def main(argv=None):
    parser = make_parser(__doc__)
    parser.add_argument("--config", help="configs/<file>.py[:arg] (model config)")
    parser.add_argument("--checkpoint", help="dense model: a model directory or a launch.train workdir / checkpoint")
    parser.add_argument("--data", required=True, help="'random' or 'npz:<path>'")
    parser.add_argument("--num-samples", type=int, required=True, help="samples the ARank is averaged over")
    parser.add_argument("--batch-size", type=int, default=4, help="samples per forward pass")
    parser.add_argument("--seed", type=int, default=0, help="data seed (and weight seed without --checkpoint)")
    rule = parser.add_mutually_exclusive_group()
    rule.add_argument("--keep-dense", type=int, help=f"the N highest-ARank layers stay dense (default {DEFAULT_KEEP_DENSE})")
    rule.add_argument("--threshold", type=float, help="layers with ARank >= X stay dense")
    parser.add_argument("--ties", choices=[t.replace("_", "-") for t in TIES], default=DEFAULT_TIES.replace("_", "-"),
                        help="--keep-dense with equal ARank values at the cut: later-mod keeps exactly N dense, the "
                        "later of equal layers becoming γ-MoD first; stay-dense keeps every tied layer dense "
                        "(the paper's wording)")
    parser.add_argument("--out", required=True, help="ARank JSON to write")
    parser.add_argument("--plot", help="PNG bar chart to write")
    args = parse_args(parser, argv)
    if args.config is None and args.checkpoint is None:
        parser.error("give --config, --checkpoint or both")
    try:
        run(args)
    except (ValueError, CheckpointError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
