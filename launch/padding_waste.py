"""Padding waste of a training recipe's length buckets: `python -m launch.padding_waste
--config configs/train.py:llava_hr_7b_mod0.34 [--global-batch 32] [--lengths <index.npz>]`.

Builds the recipe's batch plan (gamma_mod_jax/data/pipeline.py: BatchPlan) for one epoch
over the text lengths of a length index file (the `*.lengths-*.npz` the pipeline caches
beside the data) or, without one, a draw from the assumed distribution
(gamma_mod_jax/data/length_stats.py: mix665k for stage 2, LCS-558K for stage 1), and
prints real / computed tokens for the recipe's buckets and for one bucket at the
maximum length: text positions, and LLM positions (the image placeholder replaced by
the model's image tokens). The last line is JSON."""

from __future__ import annotations

import json

import numpy as np

from launch._common import parse_args, parser as make_parser


def efficiency(plan, num_image_tokens: int) -> dict:
    """Real / computed tokens of all batches of `plan`: text positions and LLM positions."""
    rows, lengths = plan.batches(0, len(plan))
    real = np.where(rows >= 0, plan.lengths[np.maximum(rows, 0)], 0)
    images = np.where(rows >= 0, plan.has_image[np.maximum(rows, 0)], False)
    width = rows.shape[1]
    computed_llm = width * (lengths + num_image_tokens - 1)  # every row is spliced to the same length
    buckets, counts = np.unique(lengths, return_counts=True)
    return {"text": float(real.sum() / (width * lengths.sum())),
            "llm": float((real + images * (num_image_tokens - 1)).sum() / computed_llm.sum()),
            "batches": {int(b): int(c) for b, c in zip(buckets, counts)}}


def main(argv=None):
    parser = make_parser(__doc__)
    parser.add_argument("--config", default="configs/train.py:llava_hr_7b_mod0.34", help="training config: configs/<file>.py[:arg]")
    parser.add_argument("--global-batch", type=int, default=None, help="default: the recipe's data.batch_size")
    parser.add_argument("--lengths", default=None, help="a length index .npz (default: the assumed distribution)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the batch plan (and of the assumed length draw)")
    args = parse_args(parser, argv)

    from gamma_mod_jax import api
    from gamma_mod_jax.config_file import load_config
    from gamma_mod_jax.data import length_stats
    from gamma_mod_jax.data.pipeline import BatchPlan, LengthIndex

    config = load_config(args.config)
    data = config.data
    buckets = tuple(data.buckets)
    if args.lengths:
        with np.load(args.lengths) as f:
            lengths, has_image = f["lengths"], f["has_image"]
        source = args.lengths
    else:
        name = "lcs558k" if "stage1" in args.config else "mix665k"
        lengths, has_image = length_stats.sample_lengths(length_stats.ASSUMED[name], max_length=buckets[-1],
                                                         seed=args.seed)
        source = f"assumed {name} distribution (gamma_mod_jax/data/length_stats.py)"
    index = LengthIndex(lengths, has_image, [""] * len(lengths), {})
    global_batch = args.global_batch or int(data.batch_size)
    num_image_tokens = api.model_config(config.model).num_image_tokens
    result = {"config": args.config, "lengths": source, "records": int(len(lengths)),
              "mean_text_length": float(lengths[lengths >= 0].mean()), "global_batch": global_batch,
              "num_image_tokens": num_image_tokens}
    for name, bs in (("buckets", buckets), ("one_bucket", buckets[-1:])):
        plan = BatchPlan(index, global_batch_size=global_batch, buckets=bs, seed=args.seed, num_epochs=1,
                         drop_remainder=True, truncation="truncate_right",
                         group_by_modality=bool(data.group_by_modality))
        result[name] = dict(efficiency(plan, num_image_tokens), lengths=list(bs))
        e = result[name]
        print(f"{name:10s} {str(bs):48s} real/computed: text {e['text']:.3f}, LLM positions {e['llm']:.3f}; "
              f"batches per length {e['batches']}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
