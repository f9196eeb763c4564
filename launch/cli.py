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
import importlib.util
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


def resolve_config_flags(argv: list) -> list:
    """`--config NAME[:arg]` / `--config=NAME[:arg]` with a shipped config's name -> its path
    (absl's config flags read a file path)."""
    from gamma_mod_jax.config_file import resolve_config_spec

    out, i = [], 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--config" and i + 1 < len(argv):
            out += [arg, resolve_config_spec(argv[i + 1])]
            i += 2
            continue
        if arg.startswith("--config="):
            arg = "--config=" + resolve_config_spec(arg[len("--config="):])
        out.append(arg)
        i += 1
    return out


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
    try:
        rest = resolve_config_flags(rest)
    except FileNotFoundError as e:
        print(f"gamma-mod {command}: {e}", file=sys.stderr)
        return 2
    prog = f"gamma-mod {command}"
    sys.argv = [prog, *rest]  # argparse takes its prog from argv[0]
    module = importlib.import_module(f"launch.{command}")
    if module.__dict__.get("app") is not None and module.__dict__["app"].__name__ == "absl.app":
        # absl launchers (train): flags are parsed by app.run from the full argv.
        module.app.run(module.main, argv=sys.argv)
        return 0
    return module.main(rest) or 0


if __name__ == "__main__":
    sys.exit(main())
