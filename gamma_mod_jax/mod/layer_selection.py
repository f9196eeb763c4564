"""Which decoder layers become γ-MoD layers: the one reader of every way to say it, used
by `launch.convert` and `launch.adapt` (and `launch.arank`'s rule flags).

A selection comes from a file, recognised by its content:
  - a γ-MoD `config.json` (`mod.mod_layers_idx`, 0-based),
  - our ARank JSON (`launch.arank`, format gamma_mod_jax.arank/v1): its own selection, or a
    new one from its per-layer means with a rule,
  - the official ARank log (`Layer {1-based}, Heads Avg Rank: {x}` lines, averaged over
    samples), with a rule (default: the 4 highest-ARank layers stay dense);
or by hand, `--mod-layers 3-30` (ranges and lists, 0-based: `3-5,7`).
Rules: keep the N highest-ARank layers dense (ties: gamma_mod_jax.mod.arank.select_dense_layers)
or keep layers with ARank >= X dense. A selection with no MoD layer, or with every layer
a MoD layer, is an error naming where it came from.
"""

from __future__ import annotations

import json
import re
from typing import Optional, Tuple

from gamma_mod_jax.mod.arank import (ARANK_FORMAT, DEFAULT_TIES, mod_layers_from_arank_json, parse_official_log,
                                     select_dense_layers)
from gamma_mod_jax.mod.config import check_layer_indices

DEFAULT_KEEP_DENSE = 4  # the paper: the fourth-largest ARank is the threshold


def parse_layer_list(text: str, *, num_layers: Optional[int] = None, source: str = "--mod-layers") -> Tuple[int, ...]:
    """'3-30' / '3-5,7' / '1' -> sorted 0-based layer indices (ranges inclusive).
    ValueError naming `source` and the bad part: not a number or range, a reversed range,
    a layer listed twice, or (with `num_layers`) a layer the model does not have."""
    parts = [p.strip() for p in str(text).split(",")]
    if not any(parts):
        raise ValueError(f"{source} {text!r}: empty; expected 0-based layers such as '3-30' or '3-5,7'")
    layers = []
    for part in parts:
        match = re.fullmatch(r"(\d+)(?:\s*-\s*(\d+))?", part)
        if not match:
            raise ValueError(f"{source} {text!r}: {part!r} is not a layer index or a range 'a-b' (0-based, "
                             "e.g. '3-30' or '3-5,7')")
        first, last = int(match.group(1)), int(match.group(2) if match.group(2) is not None else match.group(1))
        if last < first:
            raise ValueError(f"{source} {text!r}: range {part!r} runs backwards")
        layers += range(first, last + 1)
    return check_layer_indices(layers, num_layers, source=f"{source} {text!r}")


def _check_layers(layers, num_layers: int, source: str) -> Tuple[int, ...]:
    return check_layer_indices(layers, num_layers, source=source, selection=True)


def read_layer_selection(path: str, *, num_layers: int, keep_dense: Optional[int] = None,
                         threshold: Optional[float] = None, ties: str = DEFAULT_TIES) -> Tuple[Tuple[int, ...], str]:
    """(sorted MoD layer indices, a one-line description of where they came from) from a
    selection file (see the module docstring).

    For files with ARank values (ours, the official log) the rule picks the dense layers:
    `keep_dense` highest-ARank layers (default 4 for the log; our JSON's own selection
    without a rule) or ARank >= `threshold`. A γ-MoD config.json already names its MoD
    layers, so no rule may be given for it."""
    try:
        with open(path) as f:
            text = f.read()
    except OSError as e:
        raise ValueError(f"{path}: cannot read the layer selection ({e.strerror})") from None
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not text; expected a γ-MoD config.json, an ARank JSON or an ARank log") from None
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        if text.lstrip().startswith(("{", "[")):
            raise ValueError(f"{path}: not valid JSON ({e})") from None
        doc = None  # a log
    if isinstance(doc, dict) and isinstance(doc.get("mod"), dict) and "mod_layers_idx" in doc["mod"]:
        if keep_dense is not None or threshold is not None:
            raise ValueError(f"{path}: a γ-MoD config.json names its MoD layers; --keep-dense / --threshold "
                             "apply to ARank files only")
        layers = doc["mod"]["mod_layers_idx"]
        if not isinstance(layers, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in layers):
            raise ValueError(f"{path}: mod.mod_layers_idx must be a list of layer indices, got {layers!r}")
        return _check_layers(layers, num_layers, path), f"γ-MoD config {path}"
    if isinstance(doc, dict) and doc.get("format") == ARANK_FORMAT:
        layers = mod_layers_from_arank_json(path, num_layers=num_layers, keep_dense=keep_dense, threshold=threshold,
                                            ties=ties)
        rule = "its own selection" if keep_dense is None and threshold is None else _rule_text(keep_dense, threshold,
                                                                                               ties)
        return _check_layers(layers, num_layers, path), f"ARank JSON {path} ({rule})"
    if doc is not None:
        raise ValueError(f"{path}: JSON but neither a γ-MoD config.json (mod.mod_layers_idx) nor an ARank "
                         f"JSON (format {ARANK_FORMAT!r})")
    means = parse_official_log(text, source=path)
    if len(means) != num_layers:
        raise ValueError(f"{path}: ARank for {len(means)} layers, but the model has {num_layers} layers")
    if keep_dense is None and threshold is None:
        keep_dense = DEFAULT_KEEP_DENSE
    try:
        dense = select_dense_layers(means, keep_dense=keep_dense, threshold=threshold, ties=ties)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    layers = [i for i in range(num_layers) if i not in dense]
    return _check_layers(layers, num_layers, path), f"official ARank log {path} ({_rule_text(keep_dense, threshold, ties)})"


def _rule_text(keep_dense, threshold, ties) -> str:
    return f"keep {keep_dense} dense, ties {ties}" if keep_dense is not None else f"threshold {threshold}"


def select_mod_layers(*, num_layers: int, selection: Optional[str] = None, mod_layers: Optional[str] = None,
                      keep_dense: Optional[int] = None, threshold: Optional[float] = None,
                      ties: str = DEFAULT_TIES) -> Tuple[Tuple[int, ...], str]:
    """(MoD layers, where they came from) from a selection file (`selection`) or a layer
    list by hand (`mod_layers`, e.g. '3-30'): exactly one of them. The rule arguments
    apply to ARank files only."""
    if (selection is None) == (mod_layers is None):
        raise ValueError("give a layer selection file (--arank) or --mod-layers, not both" if selection else
                         "give a layer selection file (--arank) or --mod-layers")
    if mod_layers is not None:
        if keep_dense is not None or threshold is not None:
            raise ValueError("--keep-dense / --threshold select from ARank values; --mod-layers names the layers")
        layers = parse_layer_list(mod_layers, num_layers=num_layers)
        return _check_layers(layers, num_layers, f"--mod-layers {mod_layers}"), f"--mod-layers {mod_layers}"
    return read_layer_selection(selection, num_layers=num_layers, keep_dense=keep_dense, threshold=threshold,
                                ties=ties)
