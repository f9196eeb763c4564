"""Evaluates a checkpoint on a VQA split by greedy generation (exact match of the answer).

    python -m launch.evaluate --checkpoint /ckpt/gmod --tokenizer /ckpt/vicuna-7b-v1.5 \
        --data easy_vqa --split test [--limit 1000] [--inference threshold|capacity] --out results.json

--data: `easy_vqa`, or `llava_json:<file.json>[,<image dir>]` (the first human turn is the
question, the assistant's reply the reference answer). The results JSON holds accuracy,
the number of examples, for γ-MoD models the skip ratio under the inference routing, and
every prediction. Written atomically; errors exit with status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys


def data_section(spec: str, split: str, buckets) -> dict:
    if spec == "easy_vqa":
        return {"source": "easy_vqa", "split": split, "buckets": tuple(buckets)}
    if spec.startswith("llava_json:"):
        path, _, image_dir = spec[len("llava_json:"):].partition(",")
        return {"source": "llava_json", "json_path": path, "image_dir": image_dir or None, "split": split,
                "buckets": tuple(buckets)}
    raise ValueError(f"--data {spec!r}: expected 'easy_vqa' or 'llava_json:<file>[,<image dir>]'")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--checkpoint", required=True, help="our checkpoint directory")
    parser.add_argument("--tokenizer", required=True, help="a local tokenizer directory")
    parser.add_argument("--data", required=True)
    parser.add_argument("--split", default="test")
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--buckets", default="64,128,256", help="prompt lengths to pad to (one compile each)")
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--inference", choices=("threshold", "capacity"), default=None,
                        help="γ-MoD inference routing (default: the checkpoint's config)")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)

    from gamma_mod_jax.convert.checkpoint import load_checkpoint, read_model_config
    from gamma_mod_jax.data.pipeline import make_eval_examples
    from gamma_mod_jax.data.tokenizer import load_tokenizer
    from gamma_mod_jax.eval.vqa import evaluate_vqa
    from launch.arank import write_json_atomic

    try:
        buckets = tuple(sorted(int(b) for b in args.buckets.split(",") if b))
        data = data_section(args.data, args.split, buckets)
        cfg = read_model_config(args.checkpoint)
        if args.inference and cfg.mod is not None:
            cfg = dataclasses.replace(cfg, mod=dataclasses.replace(cfg.mod, inference=args.inference))
        model = load_checkpoint(args.checkpoint, config=cfg)
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
