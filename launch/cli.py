"""`gamma-mod <command> [flags]`: one entry point for every launcher in this folder.

    gamma-mod --help                     # the commands, one line each
    gamma-mod convert --help             # = python -m launch.convert --help
    gamma-mod train --config train:llava15_7b_mod0.3,tiny --workdir /tmp/run ...

`--config` takes a path or the name of a shipped config (`llava_hr_7b:tiny`), so the command
works from any directory once the project is installed (`pip install .`).
"""

from __future__ import annotations

import ast
import importlib
import os
import sys

_NOT_COMMANDS = {"__init__", "cli"}


def commands() -> dict:
    """{command: first docstring line} for the launcher modules next to this file
    (read from the source, so listing them imports no jax)."""
    here = os.path.dirname(os.path.abspath(__file__))
    found = {}
    for name in sorted(os.listdir(here)):
        stem, ext = os.path.splitext(name)
        if ext != ".py" or stem in _NOT_COMMANDS or stem.startswith("_"):
            continue
        with open(os.path.join(here, name), encoding="utf-8") as f:
            doc = ast.get_docstring(ast.parse(f.read())) or ""
        found[stem] = (doc.strip().splitlines() or [""])[0]
    return found


def _usage(known: dict) -> str:
    width = max(map(len, known))
    lines = ["usage: gamma-mod <command> [flags]   (gamma-mod <command> --help for its flags)", "", "commands:"]
    lines += [f"  {name.ljust(width)}  {summary}" for name, summary in known.items()]
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    known = commands()
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage(known))
        return 0
    command, rest = argv[0].replace("-", "_"), argv[1:]
    if command not in known:
        print(f"gamma-mod: unknown command {argv[0]!r}\n\n{_usage(known)}", file=sys.stderr)
        return 2
    prog = f"gamma-mod {command}"
    sys.argv = [prog, *rest]  # argparse takes its prog from argv[0]
    return importlib.import_module(f"launch.{command}").main(rest) or 0


if __name__ == "__main__":
    sys.exit(main())
