"""Evaluates a checkpoint by greedy generation: the paper's benchmarks, or a VQA split.

    python -m launch.evaluate --benchmark gqa,sqa,textvqa --data playground/data/eval \
        --checkpoint /ckpt/gmod --tokenizer /ckpt/vicuna-7b-v1.5 --out results/gmod \
        [--inference threshold|capacity] [--batch-size N] [--limit N] [--compare /ckpt/dense]
    python -m launch.evaluate --checkpoint /ckpt/gmod --tokenizer /ckpt/vicuna-7b-v1.5 \
        --data easy_vqa --split test [--limit 1000] [--inference threshold|capacity] --out results.json

--benchmark: names (comma-separated, or `all`) of gqa, sqa, textvqa, pope, mme, mmbench, seed,
mmmu, vqav2, vizwiz, mmvet read from LLaVA's evaluation layout under --data (see
gamma_mod_jax/eval/benchmarks/readers.py); writes <out>/<bench>/answers.jsonl (resumable),
the submission files, <out>/scores.json and <out>/table.md (--compare: the second
checkpoint's answers under <out>/compare/, both rows and their difference in the table).

--data: `easy_vqa`, or `llava_json:<file.json>[,<image dir>]` (the first human turn is the
question, the assistant's reply the reference answer). The results JSON holds accuracy,
the number of examples, for γ-MoD models the skip ratio under the inference routing, and
every prediction. Written atomically; errors exit with status 2.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys

from launch._common import parse_args, parser as make_parser


def data_section(spec: str, split: str, buckets) -> dict:
    if spec == "easy_vqa":
        return {"source": "easy_vqa", "split": split, "buckets": tuple(buckets)}
    if spec.startswith("llava_json:"):
        path, _, image_dir = spec[len("llava_json:"):].partition(",")
        return {"source": "llava_json", "json_path": path, "image_dir": image_dir or None, "split": split,
                "buckets": tuple(buckets)}
    raise ValueError(f"--data {spec!r}: expected 'easy_vqa' or 'llava_json:<file>[,<image dir>]'")


def load_model(checkpoint: str, inference):
    """The model of `checkpoint` (a model directory or a launch.train workdir / checkpoint),
    its γ-MoD inference routing replaced by `inference` when given."""
    from gamma_mod_jax.convert.checkpoint import load_checkpoint, resolve_model

    source = resolve_model(checkpoint)
    cfg = source.config
    if inference and cfg.mod is not None:
        cfg = dataclasses.replace(cfg, mod=dataclasses.replace(cfg.mod, inference=inference))
    return load_checkpoint(source, config=cfg)


def model_label(checkpoint: str, model) -> str:
    name = os.path.basename(os.path.normpath(checkpoint))
    return name if model.config.mod is None else f"{name} (γ-MoD, {model.inference_routing})"


def run_benchmarks(args) -> int:
    """--benchmark mode: every named benchmark for the checkpoint (and --compare's)."""
    from gamma_mod_jax.data.tokenizer import load_tokenizer
    from gamma_mod_jax.eval.benchmarks import readers
    from gamma_mod_jax.eval.benchmarks.report import markdown_table
    from gamma_mod_jax.eval.benchmarks.runner import Answerer, run_benchmark
    from gamma_mod_jax.io_utils import atomic_write, write_json_atomic

    names = readers.BENCHMARK_NAMES if args.benchmark == "all" else tuple(n for n in args.benchmark.split(",") if n)
    unknown = [n for n in names if n not in readers.READERS]
    if unknown or not names:
        raise ValueError(f"unknown benchmark {', '.join(unknown) or args.benchmark!r}; expected names from "
                         f"{', '.join(readers.BENCHMARK_NAMES)} or 'all'")
    if (args.questions or args.images) and len(names) != 1:
        raise ValueError("--questions / --images name one benchmark's files: give one --benchmark with them")
    buckets = tuple(sorted(int(b) for b in (args.buckets or "128,256,512,1024").split(",") if b))
    benches = [readers.read_benchmark(n, args.data, questions=args.questions, images=args.images,
                                      mmbench_rounds=args.mmbench_rounds) for n in names]
    tokenizer = load_tokenizer(args.tokenizer)
    rows, doc = [], {"data": args.data, "limit": args.limit, "models": []}
    for checkpoint, out in [(args.checkpoint, args.out)] + ([(args.compare, os.path.join(args.out, "compare"))]
                                                            if args.compare else []):
        model = load_model(checkpoint, args.inference)
        answerers = {}  # one per answer length (a static shape of generation)
        label = model_label(checkpoint, model)
        results = {}
        for bench in benches:
            length = args.max_new_tokens or readers.MAX_NEW_TOKENS.get(bench.name, 16)
            if length not in answerers:
                answerers[length] = Answerer(model, tokenizer, batch_size=args.batch_size, buckets=buckets,
                                             max_new_tokens=length)
            results[bench.name] = run_benchmark(bench, answerers[length], os.path.join(out, bench.name),
                                                model_id=os.path.basename(os.path.normpath(checkpoint)),
                                                image_size=model.config.input_image_size, limit=args.limit,
                                                data_root=args.data)
            r = results[bench.name]
            skipped = ", ".join(f"{k} {v}" for k, v in r["skipped"].items()) or "none"
            print(f"{label} {bench.name}: {r['num_answered']}/{r['num_questions']} answered; skipped: {skipped}; "
                  + (f"score {r['scores']['headline']:.2f}" if r["scores"] else r["note"]), file=sys.stderr)
        rows.append((label, results))
        doc["models"].append({"checkpoint": checkpoint, "label": label, "inference": model.inference_routing
                              if model.config.mod is not None else None, "benchmarks": results})
    table = markdown_table(rows)
    doc["table"] = table
    write_json_atomic(os.path.join(args.out, "scores.json"), doc)
    with atomic_write(os.path.join(args.out, "table.md")) as f:
        f.write(table)
    print(table)
    return 0


def main(argv=None) -> int:
    parser = make_parser(__doc__)
    parser.add_argument("--checkpoint", required=True, help="a model directory, or a launch.train workdir / checkpoint")
    parser.add_argument("--tokenizer", required=True, help="a local tokenizer directory")
    parser.add_argument("--data", required=True, help="--benchmark: LLaVA's playground/data/eval folder; "
                        "else 'easy_vqa' or 'llava_json:<file>[,<image dir>]'")
    parser.add_argument("--benchmark", default=None, help="benchmark name(s), comma-separated, or 'all'")
    parser.add_argument("--compare", default=None, help="--benchmark: a second model (directory or workdir) on the same questions")
    parser.add_argument("--questions", default=None, help="--benchmark: another question file than the layout's")
    parser.add_argument("--images", default=None, help="--benchmark: another image folder than the layout's")
    parser.add_argument("--mmbench-rounds", choices=("all", "first"), default="all",
                        help="MMBench: every rotation of the options (circular evaluation) or the first "
                        "only (LLaVA's script default)")
    parser.add_argument("--split", default="test", help="data split (without --benchmark)")
    parser.add_argument("--limit", type=int, default=None, help="evaluate the first N questions only")
    parser.add_argument("--batch-size", type=int, default=32, help="questions generated together")
    parser.add_argument("--buckets", default=None, help="prompt lengths to pad to (one compile each; default "
                        "64,128,256, with --benchmark 128,256,512,1024)")
    parser.add_argument("--max-new-tokens", type=int, default=None, help="default 8 (--benchmark: 16, MM-Vet's free-form answers 512)")
    parser.add_argument("--inference", choices=("threshold", "capacity"), default=None,
                        help="γ-MoD inference routing (default: the checkpoint's config)")
    parser.add_argument("--out", required=True, help="results JSON (--benchmark: an output folder)")
    args = parse_args(parser, argv)
    if args.benchmark:
        try:
            return run_benchmarks(args)
        except (ValueError, OSError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    args.buckets = args.buckets or "64,128,256"
    args.max_new_tokens = args.max_new_tokens or 8

    from gamma_mod_jax.data.pipeline import make_eval_examples
    from gamma_mod_jax.data.tokenizer import load_tokenizer
    from gamma_mod_jax.eval.vqa import evaluate_vqa
    from gamma_mod_jax.io_utils import write_json_atomic

    try:
        buckets = tuple(sorted(int(b) for b in args.buckets.split(",") if b))
        data = data_section(args.data, args.split, buckets)
        model = load_model(args.checkpoint, args.inference)
        cfg = model.config
        tokenizer = load_tokenizer(args.tokenizer)
        examples = make_eval_examples(data, tokenizer=tokenizer, image_size=cfg.input_image_size, limit=args.limit)
        result = evaluate_vqa(model, examples, tokenizer, batch_size=args.batch_size, buckets=buckets,
                              max_new_tokens=args.max_new_tokens)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    result.update(checkpoint=args.checkpoint, data=args.data, split=args.split)
    write_json_atomic(args.out, result)
    summary = {k: result[k] for k in ("accuracy", "num_examples", "skip_ratio") if k in result}
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
