"""The main job on an embedded default (`make demo`): the whole γ-MoD adaptation on easy-VQA.

    python -m launch.demo --out out/demo [--quick]

1. builds a word tokenizer for easy-VQA (the dataset ships inside the `easy-vqa` package),
2. trains a small dense LLaVA-HR from scratch (configs/demo.py),
3. evaluates it on the easy-VQA test split by greedy generation,
4. computes ARank per layer on training samples and keeps the highest-ARank layers dense,
5. adapts the dense model to γ-MoD (shared router, the other layers routed) and fine-tunes it,
6. evaluates the γ-MoD model, times prefill dense vs γ-MoD, counts FLOPs,
and writes `<out>/report.json`, `<out>/report.md` and PNG plots (loss curves, ARank per
layer, skip ratio per layer). Each stage prints an estimate of the time left (the reference
machine's stage times, configs/demo.py `demo.reference_seconds`, scaled by how fast the
stages so far ran here); the report names the machine and each stage's wall and CPU seconds.
`--quick` runs a few steps of each stage (a first look, a smoke test): its figures are not
the README's, and its output and report say so. `--seed` sets every seed (model init, data
order, vision pre-training); the same seed on the same machine gives the same accuracies
and layer choices.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time

import numpy as np

from launch._common import parse_args, parser as make_parser

QUICK_NOTE = ("--quick: a few steps per stage, for a first look; these figures are not the README's "
              "(run `make demo` for those)")
REPORT_KEYS = ("dense.accuracy", "gamma_mod.accuracy", "gamma_mod.skip_ratio", "prefill_speedup", "tflops_dense",
               "tflops_gamma_mod")


def machine_info() -> dict:
    """What the timings were measured on: CPU model, cores usable, JAX backend and devices."""
    import platform

    import jax

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"cpu": cpu, "cores": cores, "jax_backend": jax.default_backend(),
            "jax_devices": [str(d) for d in jax.devices()], "jax_version": jax.__version__,
            "python": platform.python_version(), "platform": platform.platform()}


class StageClock:
    """Wall and CPU seconds per stage, and an estimate of the time left at each stage start.

    `plan` lists (stage name, reference seconds): the stage's time on the reference machine
    (configs/demo.py `demo.reference_seconds`, per step times the step counts). The estimate
    scales the remaining stages' reference seconds by how long the finished stages took
    here against their reference (1 before any stage finished)."""

    def __init__(self, plan, log=print):
        self.plan = list(plan)
        self.log = log
        self.stages = []
        self._current = None
        self._started = time.perf_counter()

    def speed(self) -> float:
        done = [(s["seconds"], s["reference_seconds"]) for s in self.stages if s["reference_seconds"] > 0]
        ref = sum(r for _, r in done)
        return sum(t for t, _ in done) / ref if ref > 0 else 1.0

    def estimate_left(self, from_index: int) -> float:
        return self.speed() * sum(r for _, r in self.plan[from_index:])

    def start(self, index: int, text: str) -> None:
        self.finish()
        name, reference = self.plan[index]
        elapsed = time.perf_counter() - self._started
        scale = self.speed()
        basis = (f"reference times x {scale:.2f}, the speed measured so far" if self.stages
                 else "reference machine's times")
        self.log(f"\n== {text} ({elapsed:.0f} s in; this stage ~{scale * reference:.0f} s, "
                 f"~{self.estimate_left(index):.0f} s left in all: {basis})", flush=True)
        self._current = {"name": name, "reference_seconds": reference, "wall": time.perf_counter(),
                         "cpu": time.process_time()}

    def finish(self) -> None:
        if self._current is not None:
            c = self._current
            self.stages.append({"name": c["name"], "seconds": round(time.perf_counter() - c["wall"], 2),
                                "cpu_seconds": round(time.process_time() - c["cpu"], 2),
                                "reference_seconds": c["reference_seconds"]})
            self._current = None

    def total(self) -> dict:
        return {"seconds": round(time.perf_counter() - self._started, 2),
                "cpu_seconds": round(sum(s["cpu_seconds"] for s in self.stages), 2)}


def _prepare_out(out: str) -> None:
    """A fresh output directory; a previous demo's output is replaced, anything else refused."""
    if os.path.exists(out) and os.listdir(out):
        if not os.path.exists(os.path.join(out, "report.json")) and not os.path.exists(os.path.join(out, "dense")):
            raise SystemExit(f"error: {out} exists and is not a previous demo output; choose another --out")
        shutil.rmtree(out)
    os.makedirs(out, exist_ok=True)


def _plot_losses(out: str, runs: dict) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from gamma_mod_jax.train.metrics import read_metrics

    fig, ax = plt.subplots(figsize=(7, 4))
    offset = 0  # the fine-tuning runs all start where dense training ended
    for name, workdir in runs.items():
        records = read_metrics(workdir)
        steps = [offset + r["step"] for r in records]
        ax.plot(steps, [r["lm_loss"] for r in records], label=f"{name}: LM loss")
        if name == "γ-MoD":
            ax.plot(steps, [r["routing_loss"] for r in records], label=f"{name}: routing loss", linestyle="--")
        if name == "dense" and steps:
            offset = steps[-1]
    ax.set_xlabel("optimizer step (dense training, then γ-MoD fine-tuning)")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.legend()
    fig.tight_layout()
    path = os.path.join(out, "loss.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _plot_skip(out: str, layers, skip) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.bar([str(i) for i in layers], skip, color="tab:orange")
    ax.set_xlabel("γ-MoD layer")
    ax.set_ylabel("skip ratio (training, last log)")
    ax.set_ylim(0, 1)
    fig.tight_layout()
    path = os.path.join(out, "skip_ratio.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def routing_maps(model, examples):
    """Per example and MoD layer, which image patches the router keeps ([n, layers, g, g] bool)
    under training-time capacity routing, and the display images ([n, S, S, 3] in [0, 1])."""
    import jax.numpy as jnp

    from gamma_mod_jax import token_types as tt
    from gamma_mod_jax.data.image import CLIP_MEAN, CLIP_STD
    from gamma_mod_jax.data.pipeline import collate_prompts

    batch = collate_prompts(examples)
    out = model(jnp.asarray(batch["input_ids"]), jnp.asarray(batch["attention_mask"]),
                jnp.asarray(batch["pixel_values"]), jnp.asarray(batch["token_types"]), routing="capacity")
    selected = np.asarray(out.mod_aux["selected"])  # [layers, b, s]
    types = np.asarray(out.token_types)
    n = model.config.num_image_tokens
    grid = int(round(n ** 0.5))
    maps = np.stack([selected[:, i, types[i] == tt.IMAGE].reshape(-1, grid, grid) for i in range(len(examples))])
    images = np.clip(batch["pixel_values"] * np.asarray(CLIP_STD) + np.asarray(CLIP_MEAN), 0, 1)
    return maps, images


def _plot_routing(out: str, maps, images, layers, questions) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, cols = len(images), 1 + len(layers)
    fig, axes = plt.subplots(rows, cols, figsize=(1.8 * cols, 1.9 * rows), squeeze=False)
    size = images.shape[1]
    for r in range(rows):
        axes[r][0].imshow(images[r])
        axes[r][0].set_title(questions[r][:28], fontsize=6)
        for c, layer in enumerate(layers, 1):
            keep = np.kron(maps[r, c - 1], np.ones((size // maps.shape[-1],) * 2))[:size, :size]
            axes[r][c].imshow(images[r] * (0.25 + 0.75 * keep[..., None]))
            if r == 0:
                axes[r][c].set_title(f"layer {layer}", fontsize=8)
        for ax in axes[r]:
            ax.axis("off")
    fig.suptitle("image patches kept (bright) / skipped (dark) per γ-MoD layer", fontsize=9)
    fig.tight_layout()
    path = os.path.join(out, "routing_maps.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _pretrain_vision(config, model_cfg, demo, out: str, *, quick: bool) -> dict:
    """The towers learn easy-VQA's colours and shapes (labels read off the questions) before
    the LLM sees them, as LLaVA-HR starts from pre-trained CLIP and ConvNeXt; saved as the
    dense run's initial checkpoint."""
    from gamma_mod_jax import api as gm
    from gamma_mod_jax.convert.checkpoint import save_checkpoint
    from gamma_mod_jax.data.easy_vqa import EASY_VQA_COLORS, EASY_VQA_SHAPES, easy_vqa_image_labels, easy_vqa_image_paths
    from gamma_mod_jax.data.image import load_image, preprocess_image
    from gamma_mod_jax.train.vision_pretrain import pretrain_vision

    def arrays(split, limit=None):
        labels, paths = easy_vqa_image_labels(split), easy_vqa_image_paths(split)
        ids = sorted(labels)[:limit]
        images = np.stack([preprocess_image(load_image(paths[i]), model_cfg.input_image_size) for i in ids])
        index = lambda values, v: values.index(v) if v is not None else -1
        y = np.asarray([[index(EASY_VQA_COLORS, labels[i][0]), index(EASY_VQA_SHAPES, labels[i][1])] for i in ids])
        return images.astype(np.float32), y

    images, labels = arrays("train", 256 if quick else None)
    eval_images, eval_labels = arrays("test", 128 if quick else 512)
    model = gm.build_model(config.model, seed=config.seed)
    report = pretrain_vision(model, images, labels, (len(EASY_VQA_COLORS), len(EASY_VQA_SHAPES)),
                             steps=2 if quick else demo.vision_steps, batch_size=demo.vision_batch_size,
                             learning_rate=demo.vision_learning_rate, seed=config.seed,
                             eval_images=eval_images, eval_labels=eval_labels)
    save_checkpoint(os.path.join(out, "vision_pretrained"), model)
    return report


def _spread(values, digits: int = 3) -> str:
    """mean ± standard deviation [lowest, highest] (population std: the runs are all there is)."""
    v = np.asarray(values, np.float64)
    return f"{v.mean():.{digits}f} ± {v.std():.{digits}f} [{v.min():.{digits}f}, {v.max():.{digits}f}]"


def summarize(reports) -> str:
    """The README's demo figures from several runs' report.json (one per seed): the table rows,
    the layer choices, the time per stage, and whether each run met the targets."""
    d = [r["dense"]["accuracy"] for r in reports]
    g = [r["gamma_mod"]["accuracy"] for r in reports]
    lines = [f"seeds {[r.get('seed') for r in reports]}" + (" (--quick runs: not the README's figures)"
                                                          if any(r["quick"] for r in reports) else ""),
             "| model | easy-VQA accuracy | skip ratio (inference) | TFLOPs (paper convention, "
             f"{reports[0]['sequence_length']} tokens) | prefill speed-up, batch 64 |", "|---|---|---|---|---|",
             f"| dense | {_spread(d)} | - | {_spread([r['tflops_dense'] for r in reports], 6)} | 1 |",
             f"| γ-MoD (ratio {reports[0]['gamma_mod']['routing_ratio']}) | {_spread(g)} | "
             f"{_spread([r['gamma_mod']['skip_ratio'] for r in reports])} | "
             f"{_spread([r['tflops_gamma_mod'] for r in reports], 6)} | "
             f"{_spread([r['prefill_speedup'] for r in reports], 2)} |"]
    if all("gamma_mod_distill" in r for r in reports):
        k = [r["gamma_mod_distill"]["accuracy"] for r in reports]
        lines += [f"| γ-MoD + distillation (coef {reports[0]['gamma_mod_distill']['coef']}) | {_spread(k)} | "
                  f"{_spread([r['gamma_mod_distill']['skip_ratio'] for r in reports])} | | |", "",
                  f"γ-MoD + distillation - dense: {_spread(np.subtract(k, d))}"]
    else:
        lines += [""]
    lines += [f"γ-MoD - dense: {_spread(np.subtract(g, d))}",
             "γ-MoD layers: " + "; ".join(f"seed {r.get('seed')}: {r['gamma_mod']['mod_layers']}" for r in reports),
             f"seconds in all: {_spread([r['seconds'] for r in reports], 0)}; CPU seconds "
             f"{_spread([r['cpu_seconds'] for r in reports], 0)}"]
    for i, stage in enumerate(reports[0]["stages"]):
        lines.append(f"  {stage['name']}: {_spread([r['stages'][i]['seconds'] for r in reports], 0)} s, CPU "
                     f"{_spread([r['stages'][i]['cpu_seconds'] for r in reports], 0)} s")
    for r in reports:
        met = {"dense >= 0.92": r["dense"]["accuracy"] >= 0.92,
               "γ-MoD >= dense - 0.015": r["gamma_mod"]["accuracy"] >= r["dense"]["accuracy"] - 0.015,
               "skip >= 0.3": r["gamma_mod"]["skip_ratio"] >= 0.3, "prefill speed-up > 1": r["prefill_speedup"] > 1,
               "under 900 s": r["seconds"] < 900}
        missed = [k for k, ok in met.items() if not ok]
        lines.append(f"seed {r.get('seed')}: " + ("every target met" if not missed else "missed " + ", ".join(missed))
                     + f" (machine: {r['machine']['cpu']}, {r['machine']['cores']} cores)")
    return "\n".join(lines)


def main(argv=None):
    parser = make_parser(__doc__)
    parser.add_argument("--out", default="out/demo", help="output folder (report.md, report.json, plots)")
    parser.add_argument("--summarize", nargs="+", metavar="DIR",
                        help="print the README's figures (mean ± spread) from these demo outputs' report.json")
    parser.add_argument("--quick", action="store_true", help="a few steps per stage (smoke test)")
    parser.add_argument("--seed", type=int, default=0, help="seed of data order and weights")
    parser.add_argument("--config", default="configs/demo.py", help="configs/demo.py[:image=..,steps=..]")
    args = parse_args(parser, argv)
    if args.summarize:
        reports = []
        for directory in args.summarize:
            path = os.path.join(directory, "report.json")
            try:
                with open(path) as f:
                    reports.append(json.load(f))
            except (OSError, ValueError) as e:
                print(f"error: {path}: {e}", file=sys.stderr)
                raise SystemExit(2)
            if "stages" not in reports[-1]:
                print(f"error: {path} has no stage times (a demo from before they were recorded)", file=sys.stderr)
                raise SystemExit(2)
        text = summarize(reports)
        print(text)
        return text

    from flax import nnx

    from gamma_mod_jax import api as gm
    from gamma_mod_jax.config_file import load_config
    from gamma_mod_jax.convert.checkpoint import save_checkpoint
    from gamma_mod_jax.data.easy_vqa import easy_vqa_vocabulary
    from gamma_mod_jax.data.pipeline import collate_prompts, make_eval_examples, make_train_iterator
    from gamma_mod_jax.data.tokenizer import build_word_tokenizer, load_tokenizer
    from gamma_mod_jax.eval.benchmarks.report import vqa_table
    from gamma_mod_jax.eval.vqa import evaluate_vqa, time_prefill
    from gamma_mod_jax.mod.arank import arank_report
    from gamma_mod_jax.mod.arank_run import compute_arank
    from gamma_mod_jax.mod.flops import paper_tflops
    from gamma_mod_jax.train.metrics import read_metrics
    from gamma_mod_jax.train.trainer import train
    from gamma_mod_jax.io_utils import write_json_atomic
    from launch.arank import plot_arank

    out = args.out
    config = load_config(args.config)
    demo = config.demo
    config.seed = args.seed
    if args.quick:
        config.train.num_steps = 4
        config.train.log_every = 1
        demo.vision_steps = min(demo.vision_steps, 2)
        demo.mod_steps = 3
        demo.eval_examples = 32
        demo.eval_batch_size = 16
        demo.arank_batches = 1
    _prepare_out(out)
    if args.quick:
        print(QUICK_NOTE, flush=True)
    clock = StageClock(stage_plan(config))
    clock.start(0, "tokenizer and data")
    tokenizer_dir = os.path.join(out, "tokenizer")
    build_word_tokenizer(easy_vqa_vocabulary(), tokenizer_dir)
    tokenizer = load_tokenizer(tokenizer_dir)
    config.model.llm = dict(config.model.llm, vocab_size=-(-len(tokenizer) // 8) * 8)
    config.data.tokenizer_path = tokenizer_dir
    model_cfg = gm.model_config(config.model)
    sample = next(make_eval_examples(config.data, tokenizer=tokenizer, image_size=model_cfg.input_image_size))
    system_tokens = int(np.sum(sample["token_types"] == 2))
    print(f"easy-VQA: vocabulary {len(tokenizer)} words, {system_tokens} system-prompt tokens, "
          f"{model_cfg.num_image_tokens} image tokens; model {model_cfg.family}, LLM {model_cfg.llm.num_hidden_layers} "
          f"layers x {model_cfg.llm.hidden_size}")

    # Read and preprocessed once: both evaluations, the timing batch and the routing maps use them.
    eval_buckets = tuple(demo.eval_buckets)
    # The test questions as drawn, one per prompt, whatever the training data selects.
    test_cfg = dict(config.data.to_dict(), split="test", easy_vqa_turns=1, easy_vqa_questions="all",
                    buckets=eval_buckets)
    test_examples = list(make_eval_examples(test_cfg, tokenizer=tokenizer, image_size=model_cfg.input_image_size,
                                            limit=demo.eval_examples))

    vision_report = None
    if demo.vision_steps > 0:
        clock.start(1, f"0/5 vision pre-training (colour and shape classification): {demo.vision_steps} steps")
        vision_report = _pretrain_vision(config, model_cfg, demo, out, quick=args.quick)
        config.init_checkpoint = os.path.join(out, "vision_pretrained")
        print(f"vision pre-training: test accuracy colour {vision_report['accuracy'][0]:.3f}, "
              f"shape {vision_report['accuracy'][1]:.3f} ({vision_report['seconds']:.0f} s)")

    clock.start(2, f"1/5 dense training: {config.train.num_steps} steps of {config.data.batch_size}")
    dense_run = train(config, os.path.join(out, "dense"))
    dense = nnx.merge(dense_run["graphdef"], dense_run["state"].params, dense_run["rest"])
    dense_dir = os.path.join(out, "dense_model")
    save_checkpoint(dense_dir, dense)

    clock.start(3, f"2/5 dense evaluation on {demo.eval_examples} test questions")
    dense_eval = evaluate_vqa(dense, test_examples, tokenizer, batch_size=demo.eval_batch_size,
                              buckets=eval_buckets, max_new_tokens=demo.max_new_tokens)
    print(f"dense accuracy {dense_eval['accuracy']:.3f}")

    clock.start(4, "3/5 ARank per layer on training samples")
    batches = make_train_iterator(config.data, tokenizer=tokenizer, image_size=model_cfg.input_image_size,
                                  seed=args.seed + 1)
    arank_batches = [next(batches) for _ in range(demo.arank_batches)]
    stats = compute_arank(dense, arank_batches, keep_dense=demo.keep_dense)
    report_arank = arank_report(stats, keep_dense=demo.keep_dense)
    # Ties (e.g. every layer full rank, usual for a model this small and this briefly
    # trained) are broken by layer order, the later layer becoming γ-MoD first (mod/arank.py).
    mod_layers = tuple(report_arank["mod_layers"])
    write_json_atomic(os.path.join(out, "arank.json"), report_arank)
    plot_arank(report_arank, os.path.join(out, "arank.png"))
    print(f"ARank per layer {[round(s['mean'], 2) for s in stats]}: dense {report_arank['dense_layers']}, "
          f"γ-MoD {list(mod_layers)}")

    clock.start(5, f"4/5 γ-MoD fine-tuning: {demo.mod_steps} steps, routing ratio {demo.routing_ratio}")
    mod_config = config.copy_and_resolve_references()
    mod_config.model.mod = dict(layers=mod_layers, routing_ratio=demo.routing_ratio, system_tokens=system_tokens,
                                inference=demo.inference)
    mod_config.init_checkpoint = dense_dir
    mod_config.train.num_steps = demo.mod_steps
    mod_config.optim.learning_rate = demo.mod_learning_rate
    gamma_run = train(mod_config, os.path.join(out, "gamma_mod"))
    gamma = nnx.merge(gamma_run["graphdef"], gamma_run["state"].params, gamma_run["rest"])
    save_checkpoint(os.path.join(out, "gamma_mod_model"), gamma)

    clock.start(6, "5/5 γ-MoD evaluation, prefill timing, FLOPs")
    gamma_eval = evaluate_vqa(gamma, test_examples, tokenizer, batch_size=demo.eval_batch_size,
                              buckets=eval_buckets, max_new_tokens=demo.max_new_tokens)
    distill_eval = distill_run = None
    if demo.distill_coef > 0:
        clock.start(7, f"γ-MoD fine-tuning with distillation from the dense model: {demo.mod_steps} steps, "
                       f"coef {demo.distill_coef}")
        # The same run as the plain γ-MoD one (steps, data, learning rate, router seed), plus
        # KL(dense || γ-MoD) on the answer tokens; the teacher is init_checkpoint, the dense model.
        distill_config = mod_config.copy_and_resolve_references()
        distill_config.distill.update(coef=demo.distill_coef, temperature=demo.distill_temperature)
        distill_run = train(distill_config, os.path.join(out, "gamma_mod_distill"))
        distilled = nnx.merge(distill_run["graphdef"], distill_run["state"].params, distill_run["rest"])
        distill_eval = evaluate_vqa(distilled, test_examples, tokenizer, batch_size=demo.eval_batch_size,
                                    buckets=eval_buckets, max_new_tokens=demo.max_new_tokens)
        print(f"γ-MoD + distillation accuracy {distill_eval['accuracy']:.3f} (plain γ-MoD {gamma_eval['accuracy']:.3f}, "
              f"dense {dense_eval['accuracy']:.3f})")
    timing_batch = collate_prompts(test_examples[: demo.eval_batch_size], batch_size=demo.eval_batch_size,
                                   buckets=eval_buckets)
    dense_s, gamma_s = time_prefill(dense, timing_batch), time_prefill(gamma, timing_batch)
    seq_len = eval_buckets[-1] - 1 + model_cfg.num_image_tokens
    skip = gamma_eval.get("skip_ratio", 0.0)
    tflops_dense = paper_tflops(model_cfg.llm, seq_len, (), 0.0)
    tflops_gamma = paper_tflops(model_cfg.llm, seq_len, mod_layers, skip)
    last = read_metrics(os.path.join(out, "gamma_mod"))[-1]
    shown = []  # the first four distinct test images (consecutive questions share one)
    for e in test_examples:
        if e["has_image"] and len(shown) < 4 and not any(np.array_equal(e["pixel_values"], s["pixel_values"])
                                                         for s in shown):
            shown.append(e)
    maps, images = routing_maps(gamma, shown)
    report = {
        "dense": {"accuracy": dense_eval["accuracy"], "num_examples": dense_eval["num_examples"],
                  "steps": dense_run["step"], "final_lm_loss": read_metrics(os.path.join(out, "dense"))[-1]["lm_loss"]},
        "gamma_mod": {"accuracy": gamma_eval["accuracy"], "num_examples": gamma_eval["num_examples"],
                      "skip_ratio": skip, "training_skip_ratio": last.get("skip_ratio"),
                      "training_skip_image": last.get("skip_image"), "training_skip_system": last.get("skip_system"),
                      "skip_ratio_per_layer": last.get("skip_ratio_per_layer"), "mod_layers": list(mod_layers),
                      "dense_layers": report_arank["dense_layers"], "routing_ratio": demo.routing_ratio,
                      "steps": gamma_run["step"], "final_lm_loss": last["lm_loss"],
                      "image_patches_kept_per_layer": maps.mean(axis=(0, 2, 3)).round(4).tolist()},
        "arank": [s["mean"] for s in stats],
        "vision_pretraining": vision_report and {"steps": demo.vision_steps, "test_accuracy_colour":
                                                 vision_report["accuracy"][0],
                                                 "test_accuracy_shape": vision_report["accuracy"][1]},
        "prefill_ms_dense": dense_s * 1e3, "prefill_ms_gamma_mod": gamma_s * 1e3,
        "prefill_speedup": dense_s / gamma_s,
        "tflops_dense": tflops_dense, "tflops_gamma_mod": tflops_gamma,
        "flops_ideal_speedup": tflops_dense / tflops_gamma if tflops_gamma else None,
        "sequence_length": seq_len, "quick": args.quick, "seed": args.seed,
        "examples": gamma_eval["predictions"][:8],
        "arank_tie_break": report_arank.get("tie_break"),
    }
    if distill_eval is not None:
        distill_last = read_metrics(os.path.join(out, "gamma_mod_distill"))[-1]
        report["gamma_mod_distill"] = {
            "accuracy": distill_eval["accuracy"], "num_examples": distill_eval["num_examples"],
            "skip_ratio": distill_eval.get("skip_ratio", 0.0), "steps": distill_run["step"],
            "coef": demo.distill_coef, "temperature": demo.distill_temperature,
            "final_lm_loss": distill_last["lm_loss"], "final_distill_loss": distill_last.get("distill_loss"),
            "final_teacher_agreement": distill_last.get("teacher_agreement")}
    if args.quick:
        report["note"] = QUICK_NOTE
    table_rows = [("dense", dense_eval, tflops_dense, None), ("γ-MoD", gamma_eval, tflops_gamma, skip)]
    loss_runs = {"dense": os.path.join(out, "dense"), "γ-MoD": os.path.join(out, "gamma_mod")}
    if distill_eval is not None:
        distill_skip = report["gamma_mod_distill"]["skip_ratio"]
        table_rows.append(("γ-MoD + distillation", distill_eval, paper_tflops(model_cfg.llm, seq_len, mod_layers,
                                                                             distill_skip), distill_skip))
        loss_runs["γ-MoD + distillation"] = os.path.join(out, "gamma_mod_distill")
    report["table"] = vqa_table(table_rows)
    plots = [_plot_losses(out, loss_runs), os.path.join(out, "arank.png")]
    if isinstance(last.get("skip_ratio_per_layer"), list):
        plots.append(_plot_skip(out, mod_layers, last["skip_ratio_per_layer"]))
    plots.append(_plot_routing(out, maps, images, mod_layers, [e["question"] for e in shown]))
    clock.finish()
    report["machine"] = machine_info()
    report["stages"] = clock.stages
    report.update(clock.total())
    write_json_atomic(os.path.join(out, "report.json"), report)
    _write_markdown(out, report, plots)
    rows = [("dense", report["dense"]["accuracy"], "-", f"{tflops_dense:.6f}", f"{dense_s * 1e3:.1f}"),
            ("γ-MoD", report["gamma_mod"]["accuracy"], f"{skip:.3f}", f"{tflops_gamma:.6f}", f"{gamma_s * 1e3:.1f}")]
    if distill_eval is not None:
        rows.append(("+distil", report["gamma_mod_distill"]["accuracy"],
                     f"{report['gamma_mod_distill']['skip_ratio']:.3f}", "", ""))
    print(f"\n{'model':<8}{'accuracy':>10}{'skip':>8}{'TFLOPs':>12}{'prefill ms':>12}")
    for name, acc, sk, tf, ms in rows:
        print(f"{name:<8}{acc:>10.3f}{sk:>8}{tf:>12}{ms:>12}")
    print("\n" + report["table"])
    print(f"prefill speed-up {report['prefill_speedup']:.2f} (FLOPs-ideal {report['flops_ideal_speedup']:.2f}); "
          f"report: {os.path.join(out, 'report.md')}")
    print(_timing_line(report))
    if args.quick:
        print(QUICK_NOTE)
    return report


def stage_plan(config) -> list:
    """(stage name, reference seconds) of the demo's stages at `config`'s step counts."""
    ref, demo = config.demo.reference_seconds, config.demo
    vision = ref.vision_compile + demo.vision_steps * ref.vision_step if demo.vision_steps > 0 else 0.0
    evaluate = ref.eval_compile + demo.eval_examples * ref.eval_example
    return [("setup", ref.setup), ("vision_pretraining", vision),
            ("dense_training", ref.train_compile + config.train.num_steps * ref.dense_step),
            ("dense_evaluation", evaluate), ("arank", ref.arank),
            ("gamma_mod_training", ref.train_compile + demo.mod_steps * ref.mod_step),
            ("gamma_mod_evaluation", evaluate + ref.report)] + (
        [("gamma_mod_distill", ref.train_compile + demo.mod_steps * ref.distill_step + evaluate)]
        if demo.distill_coef > 0 else [])


def _timing_line(report: dict) -> str:
    m = report["machine"]
    stages = ", ".join(f"{s['name']} {s['seconds']:.0f} s" for s in report["stages"])
    return (f"{report['seconds']:.0f} s in all ({report['cpu_seconds']:.0f} CPU s) on {m['cpu']}, {m['cores']} cores, "
            f"jax {m['jax_backend']}: {stages}")


def _write_markdown(out: str, report: dict, plots) -> None:
    from gamma_mod_jax.io_utils import atomic_write

    d, g = report["dense"], report["gamma_mod"]
    lines = [
        "# γ-MoD adaptation on easy-VQA", "",
        "A small LLaVA-HR trained from scratch (dense), ARank per layer, the lowest-ARank layers turned into",
        "γ-MoD layers with one shared router, fine-tuned, both evaluated by greedy generation on the test split.", "",
        "| model | accuracy | skip ratio | TFLOPs (paper convention) | prefill ms |", "|---|---|---|---|---|",
        f"| dense | {d['accuracy']:.3f} | - | {report['tflops_dense']:.6f} | {report['prefill_ms_dense']:.1f} |",
        f"| γ-MoD | {g['accuracy']:.3f} | {g['skip_ratio']:.3f} | {report['tflops_gamma_mod']:.6f} | "
        f"{report['prefill_ms_gamma_mod']:.1f} |"] + ([
        f"| γ-MoD + distillation | {report['gamma_mod_distill']['accuracy']:.3f} | "
        f"{report['gamma_mod_distill']['skip_ratio']:.3f} | | |"] if "gamma_mod_distill" in report else []) + ["",
        f"- dense layers {g['dense_layers']}, γ-MoD layers {g['mod_layers']}, routing ratio {g['routing_ratio']}",
        f"- prefill speed-up {report['prefill_speedup']:.2f}, FLOPs-ideal {report['flops_ideal_speedup']:.2f}",
        f"- {d['num_examples']} test questions, seed {report['seed']}", "",
    ]
    if report["quick"]:
        lines = lines[:2] + [f"**{QUICK_NOTE}**", ""] + lines[2:]
    lines += ["## Machine and time", "", f"- {_timing_line(report)}",
              f"- jax devices {report['machine']['jax_devices']}, jax {report['machine']['jax_version']}, "
              f"Python {report['machine']['python']}, {report['machine']['platform']}", "",
              "| stage | seconds | CPU seconds |", "|---|---|---|"]
    lines += [f"| {s['name']} | {s['seconds']:.1f} | {s['cpu_seconds']:.1f} |" for s in report["stages"]]
    lines += [""]
    lines += ["In the benchmark table's layout (easy-VQA accuracy in percent, samples/s of generation):", "",
              report["table"]]
    lines += [f"![{os.path.basename(p)}]({os.path.basename(p)})" for p in plots]
    lines += ["", "| question | reference | γ-MoD answer |", "|---|---|---|"]
    lines += [f"| {e['question']} | {e['answer']} | {e['prediction']} |" for e in report["examples"]]
    with atomic_write(os.path.join(out, "report.md")) as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
