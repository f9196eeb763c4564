"""Parameter counts per component of a config, without allocating any weights.

    python -m launch.inspect --config configs/llava_hr_7b.py[:arg]
"""

from __future__ import annotations

import json
import math
from collections import OrderedDict

from gamma_mod_jax import api as gm
from gamma_mod_jax.convert.keymap import param_paths
from launch._common import parse_args, parser as make_parser

# Component = the first path elements that name it (longest match wins).
COMPONENTS = (("vision", "clip"), ("vision", "convnext"), ("vision", "adapters"), ("vision", "fusion"),
              ("vision", "aux"), ("vision", "mining"),  # Mini-Gemini: ConvNeXt trunk, patch info mining
              ("projector",), ("llm",))


def count_parameters(config) -> "OrderedDict[str, int]":
    """{component: number of parameters} for a config (file spec, ConfigDict or MLLMConfig)."""
    counts = OrderedDict(("/".join(c), 0) for c in COMPONENTS)
    for path, var in param_paths(gm.abstract_model(config)):
        names = tuple(str(p) for p in path)
        component = max((c for c in COMPONENTS if names[:len(c)] == c), key=len, default=None)
        if component is None:
            raise RuntimeError(f"parameter {'/'.join(names)} belongs to no known component")
        counts["/".join(component)] += math.prod(var.get_value().shape)
    return counts


def main(argv=None):
    parser = make_parser(__doc__)
    parser.add_argument("--config", required=True, help="configs/<file>.py[:arg]")
    args = parse_args(parser, argv)
    counts = count_parameters(args.config)
    total = sum(counts.values())
    width = max(map(len, counts))
    print(f"parameters of {args.config}")
    for name, n in counts.items():
        if n:
            print(f"  {name:<{width}}  {n:>15,}  ({n / total:6.2%})")
    print(f"  {'total':<{width}}  {total:>15,}")
    print(json.dumps({**{k: v for k, v in counts.items() if v}, "total": total}))


if __name__ == "__main__":
    main()
