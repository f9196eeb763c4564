"""Greedy generation from a checkpoint (dense or γ-MoD).

    python -m launch.generate --checkpoint DIR --tokenizer DIR --image IMG --prompt TEXT
    python -m launch.generate --checkpoint DIR --tokenizer DIR --jsonl FILE [--out answers.jsonl]

The prompt is built the way training builds it (vicuna_v1, "<image>" put first when an image
is given), the image preprocessed as in training (padded to a square, resized, CLIP-normalised).
A single prompt streams its answer to stdout. A JSONL file holds one object per line with
"prompt" (or "question"), "image" (a path, relative to the file's folder; omit or null for
text only) and optionally "id"; the answers go to --out (or stdout) as JSONL, in input order,
generated --batch-size prompts at a time padded to --buckets lengths (one compilation per
bucket). A bad line (no prompt, an image that is missing or unreadable, a prompt over the
largest bucket) is reported with its line number and written as {"id", "line", "error"};
every other line is still answered, and the exit status is then 2. Prints prefill ms,
decode tokens/s and, for γ-MoD models, the prompt's skip ratio per token type.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Dict, List, Tuple

from gamma_mod_jax.io_utils import atomic_write
from launch._common import parse_args as parse_launcher_args, parser as make_parser, progress


class InputError(ValueError):
    """Bad command-line input (exit status 2)."""


def parse_args(argv=None):
    parser = make_parser(__doc__)
    parser.add_argument("--checkpoint", required=True, help="a model directory (launch.convert, launch.adapt) or a launch.train workdir / checkpoint")
    parser.add_argument("--tokenizer", required=True, help="a local tokenizer directory")
    parser.add_argument("--prompt", help="one question to answer (streamed)")
    parser.add_argument("--image", help="image file for --prompt (omit for a text-only prompt)")
    parser.add_argument("--jsonl", help="a JSONL file of {\"prompt\", \"image\"[, \"id\"]} lines")
    parser.add_argument("--out", help="where the JSONL answers go (default: stdout)")
    parser.add_argument("--batch-size", type=int, default=8, help="prompts generated together (JSONL)")
    parser.add_argument("--buckets", default="64,128,256", help="prompt lengths to pad to, comma-separated")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="tokens generated per prompt at most")
    parser.add_argument("--inference", choices=("threshold", "capacity"), default=None,
                        help="γ-MoD inference routing (default: the checkpoint's config, officially threshold)")
    args = parse_launcher_args(parser, argv)
    if (args.prompt is None) == (args.jsonl is None):
        raise InputError("give either --prompt [--image IMG] or --jsonl FILE")
    if args.image is not None and args.prompt is None:
        raise InputError("--image goes with --prompt (a JSONL file names its images per line)")
    if args.batch_size < 1 or args.max_new_tokens < 1:
        raise InputError(f"--batch-size and --max-new-tokens must be >= 1, got {args.batch_size}, "
                         f"{args.max_new_tokens}")
    try:
        args.buckets = tuple(sorted(int(b) for b in args.buckets.split(",") if b.strip()))
    except ValueError:
        raise InputError(f"--buckets {args.buckets!r}: expected comma-separated integers") from None
    if not args.buckets or args.buckets[0] < 1:
        raise InputError(f"--buckets {args.buckets!r}: expected positive lengths")
    return args


def read_jsonl(path: str) -> List[Tuple[int, dict]]:
    """(line number, request) for every non-blank line; a line that is not a JSON object
    becomes {"error": ...} so that it is reported in order with the answers."""
    if not os.path.isfile(path):
        raise InputError(f"--jsonl {path}: file not found")
    requests = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
                if not isinstance(obj, dict):
                    raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
            except ValueError as e:
                obj = {"error": f"not a JSON object ({e})"}
            requests.append((number, obj))
    if not requests:
        raise InputError(f"--jsonl {path}: no requests in the file")
    return requests


def encode_request(request: dict, where: str, *, tokenizer, cfg, image_dir: str, max_len: int) -> dict:
    """A generation example (as `collate_prompts` takes it) for one request; BadRecord-style
    ValueError naming `where` when it cannot be answered."""
    from gamma_mod_jax.data.conversation import BadRecord, encode_prompt
    from gamma_mod_jax.data.image import load_image, preprocess_image

    if request.get("error"):
        raise ValueError(f"{where}: {request['error']}")
    prompt = request.get("prompt", request.get("question"))
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError(f"{where}: no prompt (a non-empty \"prompt\" string)")
    image = request.get("image")
    if image is not None and not isinstance(image, str):
        raise ValueError(f"{where}: \"image\" must be a path string or null")
    try:
        enc = encode_prompt(prompt, tokenizer, has_image=image is not None,
                            image_token_index=cfg.image_token_index)
        size = cfg.input_image_size
        pixels = preprocess_image(load_image(os.path.join(image_dir, image)), size) if image else None
    except BadRecord as e:
        raise ValueError(f"{where}: {e}") from None
    import numpy as np
    if pixels is None:
        pixels = np.zeros((size, size, 3), np.float32)
    elif pixels.shape != (size, size, 3):
        raise ValueError(f"{where}: image {image} preprocessed to {pixels.shape}, the model takes {(size, size, 3)}")
    if len(enc["input_ids"]) > max_len:
        raise ValueError(f"{where}: prompt of {len(enc['input_ids'])} tokens is longer than the largest bucket "
                         f"{max_len} (--buckets)")
    return {"input_ids": enc["input_ids"], "token_types": enc["token_types"], "pixel_values": pixels}


def skip_by_type(aux, cfg) -> Dict[str, float]:
    """Mean over MoD layers of the prompt's skip ratios ({} for a dense model)."""
    import numpy as np
    if cfg.mod is None or not aux:
        return {}
    return {k: round(float(np.mean(np.asarray(v))), 4) for k, v in aux.items() if k.startswith("skip_")}


def run(args, out) -> int:
    import dataclasses

    import jax.numpy as jnp
    import numpy as np

    from gamma_mod_jax.convert.checkpoint import load_checkpoint, resolve_model
    from gamma_mod_jax.data.pipeline import collate_prompts
    from gamma_mod_jax.data.tokenizer import load_tokenizer
    from gamma_mod_jax.models.generate import generate_timed, stream_greedy

    source = resolve_model(args.checkpoint)  # a model directory or a launch.train workdir / checkpoint
    cfg = source.config
    if args.inference and cfg.mod is not None:
        cfg = dataclasses.replace(cfg, mod=dataclasses.replace(cfg.mod, inference=args.inference))
    with progress(f"loading {source.describe()}"):
        model = load_checkpoint(source, config=cfg)
    tokenizer = load_tokenizer(args.tokenizer)
    eos, pad = cfg.llm.eos_token_id, int(tokenizer.pad_token_id or 0)
    keys = ("input_ids", "attention_mask", "token_types", "pixel_values")
    encode = dict(tokenizer=tokenizer, cfg=cfg, max_len=args.buckets[-1])

    if args.prompt is not None:
        try:
            example = encode_request({"prompt": args.prompt, "image": args.image}, "--prompt/--image",
                                     image_dir="", **encode)
        except ValueError as e:
            raise InputError(str(e)) from None
        batch = collate_prompts([example], batch_size=1, buckets=args.buckets, pad_token_id=pad)
        batch = {k: jnp.asarray(batch[k]) for k in keys}
        tokens = []
        for token in stream_greedy(model, batch, max_new_tokens=args.max_new_tokens, eos_id=eos):
            if token == eos:
                break
            tokens.append(token)
            # Decoding the whole answer each time keeps word boundaries right (SentencePiece).
            text = tokenizer.decode(tokens, skip_special_tokens=True)
            print(text[len(tokenizer.decode(tokens[:-1], skip_special_tokens=True)):], end="", flush=True, file=out)
        print(file=out)
        # Timed again with prefill and decoding apart (compiled by now but for the decode loop).
        generate_timed(model, batch, max_new_tokens=args.max_new_tokens, eos_id=eos, pad_id=pad)
        _, timing, aux = generate_timed(model, batch, max_new_tokens=args.max_new_tokens, eos_id=eos, pad_id=pad)
        report(timing, max(len(tokens), 1), skip_by_type(aux, cfg))
        return 0

    image_dir = os.path.dirname(os.path.abspath(args.jsonl))
    answers: Dict[int, dict] = {}
    pending: List[Tuple[int, dict, dict]] = []
    failed = 0
    for number, request in read_jsonl(args.jsonl):
        rid = request.get("id", number)
        try:
            pending.append((number, request, encode_request(request, f"{args.jsonl}:{number}", image_dir=image_dir,
                                                            **encode)))
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            answers[number] = {"id": rid, "line": number, "error": str(e)}
            failed += 1
    totals = {"prefill_s": 0.0, "decode_s": 0.0}
    new_tokens, skips, compiled = 0, [], set()
    for start in range(0, len(pending), args.batch_size):
        chunk = pending[start:start + args.batch_size]
        batch = collate_prompts([e for _, _, e in chunk], batch_size=args.batch_size, buckets=args.buckets,
                                pad_token_id=pad)
        batch = {k: jnp.asarray(batch[k]) for k in keys}
        if batch["input_ids"].shape not in compiled:  # compile first, so the figures time the work only
            compiled.add(batch["input_ids"].shape)
            with progress(f"compiling generation for batch shape {tuple(batch['input_ids'].shape)}"):
                generate_timed(model, batch, max_new_tokens=args.max_new_tokens, eos_id=eos, pad_id=pad)
        tokens, timing, aux = generate_timed(model, batch, max_new_tokens=args.max_new_tokens, eos_id=eos,
                                             pad_id=pad)
        for k in totals:
            totals[k] += timing[k]
        skips.append(skip_by_type(aux, cfg))
        for (number, request, _), row in zip(chunk, np.asarray(tokens)):
            row = [int(t) for t in row]
            ids = row[:row.index(eos)] if eos in row else row
            new_tokens += len(ids)
            answers[number] = {"id": request.get("id", number), "line": number,
                               "answer": tokenizer.decode(ids, skip_special_tokens=True).strip()}
    for number in sorted(answers):
        print(json.dumps(answers[number], ensure_ascii=False), file=out)
    skip = {k: round(float(np.mean([s[k] for s in skips])), 4) for k in (skips[0] if skips else {})}
    report(totals, max(new_tokens, 1), skip, prompts=len(pending))
    if failed:
        print(f"error: {failed} of {len(answers)} lines of {args.jsonl} could not be answered (see above)",
              file=sys.stderr)
        return 2
    return 0


def report(timing, new_tokens: int, skip: Dict[str, float], prompts: int = 1) -> None:
    """Speed and routing figures on stderr (stdout carries the answers)."""
    line = {"prompts": prompts, "prefill_ms": round(timing["prefill_s"] * 1e3, 2),
            "decode_tokens_per_s": round(new_tokens / max(timing["decode_s"], 1e-9), 2)}
    if skip:
        line["prompt_skip"] = skip
    print(json.dumps(line), file=sys.stderr)


def main(argv=None, out=None) -> int:
    try:
        args = parse_args(argv)
        if args.out:
            with atomic_write(args.out) as f:  # never a half-written answers file
                return run(args, f)
        return run(args, out or sys.stdout)
    except (InputError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
