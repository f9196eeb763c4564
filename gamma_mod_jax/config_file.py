"""Loading `configs/<name>.py[:arg]` files (big_vision style `get_config(arg)`).

A config is named by a path (`configs/llava_hr_7b.py:tiny`) or, from any directory once the
package is installed, by the name of a shipped config (`llava_hr_7b:tiny`, `train:llava15_7b_mod0.3`).
"""

from __future__ import annotations

import importlib.util
import os

import ml_collections


def shipped_configs_dir() -> str:
    """The folder of the configs that ship with the project (the checkout's `configs/`,
    or the installed `configs` package)."""
    spec = importlib.util.find_spec("configs")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the shipped configs (package 'configs') are not importable: "
                                "install the project (pip install .) or run from the checkout")
    return list(spec.submodule_search_locations)[0]


def shipped_config_names() -> list:
    return sorted(f[:-3] for f in os.listdir(shipped_configs_dir()) if f.endswith(".py") and not f.startswith("_"))


def resolve_config_path(path: str) -> str:
    """An existing file as it is; otherwise the shipped config of that name
    (`llava15_7b`, `llava15_7b.py` or `configs/llava15_7b.py`)."""
    if os.path.isfile(path):
        return path
    name = os.path.basename(path)
    name = name if name.endswith(".py") else f"{name}.py"
    if os.path.dirname(path) in ("", "configs"):
        try:
            candidate = os.path.join(shipped_configs_dir(), name)
        except FileNotFoundError:
            candidate = ""
        if candidate and os.path.isfile(candidate):
            return candidate
    try:
        known = ", ".join(shipped_config_names())
    except FileNotFoundError:
        known = "(none importable)"
    raise FileNotFoundError(f"config file {path!r} not found, and no shipped config has that name "
                            f"(shipped: {known})")


def resolve_config_spec(spec: str) -> str:
    """`path-or-name[:arg]` -> `existing/path.py[:arg]`."""
    path, sep, arg = spec.partition(":")
    return resolve_config_path(path) + sep + arg


def load_config(spec: str) -> ml_collections.ConfigDict:
    """`path/to/config.py[:arg]` or `<shipped name>[:arg]` -> the ConfigDict its `get_config(arg)` returns."""
    path, _, arg = spec.partition(":")
    try:
        path = resolve_config_path(path)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{e} (from --config {spec!r})") from None
    module_spec = importlib.util.spec_from_file_location(f"_config_{abs(hash(path))}", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise AttributeError(f"config file {path!r} defines no get_config(arg=None)")
    return module.get_config(arg or None)
