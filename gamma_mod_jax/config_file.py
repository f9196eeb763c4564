"""Loading `configs/<name>.py[:arg]` files (big_vision style `get_config(arg)`).

A config is named by a path (`configs/llava_hr_7b.py:tiny`) or, from any directory once the
package is installed, by the name of a shipped config (`llava_hr_7b:tiny`, `train:llava15_7b_mod0.3`).
`override_field` sets one field from command-line text (launch.train's `--config.a.b=value`,
configs/demo.py's `:a.b=value` arguments).
"""

from __future__ import annotations

import ast
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


def override_field(config, dotted: str, text: str, name: str = None) -> None:
    """config.<dotted> = the Python literal `text` (a plain string when it is not one, or
    when the field is a string). The field must exist (a config is locked: no new fields)
    and keep its type: an int for a float is fine, a list for a tuple too, `true`/`false`
    for a bool; a typed placeholder (config_dict.placeholder(T)) takes a T, any other field
    that is None any value. ValueError naming the field
    (`name`, default `dotted`) otherwise."""
    name = name or dotted
    *parents, leaf = dotted.split(".")
    node = config
    for part in parents:
        if not isinstance(node, (dict, ml_collections.ConfigDict)) or part not in node:
            raise ValueError(f"{name}: no field {part!r}")
        node = node[part]
    if not isinstance(node, (dict, ml_collections.ConfigDict)) or leaf not in node:
        raise ValueError(f"{name}: no field {leaf!r}")
    old = node[leaf]
    old_type = type(old) if old is not None else None
    if old is None and isinstance(node, ml_collections.ConfigDict):
        try:  # a typed placeholder (config_dict.placeholder(str)): None, of a declared type
            declared = node.get_ref(leaf).get_type()
        except ValueError:  # a plain None
            declared = None
        old_type = declared if declared not in (None, type(None)) else None
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        value = text
    if old_type is str:
        value = text
    elif old_type is bool and text.strip().lower() in ("true", "false"):
        value = text.strip().lower() == "true"
    elif old_type is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    elif old_type in (list, tuple) and isinstance(value, (list, tuple)):
        value = old_type(value)
    elif old_type is ml_collections.ConfigDict and isinstance(value, dict):
        value = ml_collections.ConfigDict(value)
    wrong = old_type is not None and (not isinstance(value, old_type) or (isinstance(value, bool)
                                                                          and old_type is not bool))
    if wrong:
        raise ValueError(f"{name}={text}: expected {old_type.__name__}, got {type(value).__name__}")
    try:
        node[leaf] = value
    except TypeError as e:  # ConfigDict's own type check
        raise ValueError(f"{name}={text}: {e}") from None
