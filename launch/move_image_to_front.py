"""Rewrite a LLaVA JSON file so the image placeholder leads its turn (the official γ-MoD rewrite).

    python -m launch.move_image_to_front --data llava_v1_5_mix665k.json --out mix665k_image_first.json

Every turn whose value ends with "\\n<image>" gets "<image>\\n" in front instead (see
gamma_mod_jax.data.conversation.move_image_to_front); everything else is copied. --data
must hold a JSON list of records. --out is written atomically (a temporary file in the
same folder, then renamed), so a failure leaves no partial file. Exit status 2 with an
error naming the file when --data is missing or is not such a list.
"""

from __future__ import annotations

import json
import os
import sys

from gamma_mod_jax.data.conversation import move_image_to_front
from gamma_mod_jax.io_utils import atomic_write
from launch._common import parse_args, parser as make_parser


def rewrite_file(src: str, dst: str):
    """(records rewritten, records in total); ValueError naming the file on bad input."""
    if not os.path.isfile(src):
        raise ValueError(f"{src}: file not found")
    try:
        with open(src, "r", encoding="utf-8") as f:
            records = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{src}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{src}: not UTF-8 text ({e})") from None
    if not isinstance(records, list):
        raise ValueError(f"{src}: expected a JSON list of records, got a JSON {type(records).__name__}")
    out, changed = [], 0
    for i, record in enumerate(records):
        if not isinstance(record, dict):
            raise ValueError(f"{src}: record {i} is a JSON {type(record).__name__}, not an object")
        new = move_image_to_front(record)
        changed += new != record
        out.append(new)
    with atomic_write(dst) as f:
        json.dump(out, f, ensure_ascii=False, indent=1)
    return changed, len(out)


def main(argv=None):
    parser = make_parser(__doc__)
    parser.add_argument("--data", required=True, help="LLaVA JSON file (a list of records)")
    parser.add_argument("--out", required=True, help="output JSON file (replaced atomically)")
    args = parse_args(parser, argv)
    try:
        changed, total = rewrite_file(args.data, args.out)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{args.data} -> {args.out}: moved the image to the front in {changed} of {total} records")
    return 0


if __name__ == "__main__":
    sys.exit(main())
