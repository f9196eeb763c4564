"""Which decoder layers become γ-MoD layers, read from any of the files that record it:
a γ-MoD `config.json` (`mod.mod_layers_idx`), our ARank JSON (`launch.arank`), or the
official ARank log (`Layer {1-based}, Heads Avg Rank: {x}` lines, averaged over samples)."""

from __future__ import annotations

import json
from typing import Optional, Tuple

from gamma_mod_jax.mod.arank import ARANK_FORMAT, mod_layers_from_arank_json, parse_official_log, select_dense_layers

DEFAULT_KEEP_DENSE = 4  # the paper: the fourth-largest ARank is the threshold


def _check_layers(layers, num_layers: int, source: str) -> Tuple[int, ...]:
    bad = [i for i in layers if not 0 <= int(i) < num_layers]
    if bad:
        raise ValueError(f"{source}: layer(s) {bad} do not exist: the model has {num_layers} layers (0-based)")
    if len(set(layers)) == num_layers:
        raise ValueError(f"{source}: every layer would be a MoD layer; at least one must stay dense")
    return tuple(sorted({int(i) for i in layers}))


def read_layer_selection(path: str, *, num_layers: int, keep_dense: Optional[int] = None,
                         threshold: Optional[float] = None) -> Tuple[Tuple[int, ...], str]:
    """(sorted MoD layer indices, a one-line description of where they came from).

    For files with ARank values (ours, the official log) the rule picks the dense layers:
    `keep_dense` highest-ARank layers (default 4) or ARank >= `threshold`. A γ-MoD
    config.json already names its MoD layers, so no rule may be given for it."""
    try:
        with open(path) as f:
            text = f.read()
    except OSError as e:
        raise ValueError(f"{path}: cannot read ({e.strerror})") from None
    try:
        doc = json.loads(text)
    except json.JSONDecodeError:
        doc = None
    if isinstance(doc, dict) and isinstance(doc.get("mod"), dict) and "mod_layers_idx" in doc["mod"]:
        if keep_dense is not None or threshold is not None:
            raise ValueError(f"{path}: a γ-MoD config.json names its MoD layers; --keep-dense / --threshold "
                             "apply to ARank files only")
        layers = doc["mod"]["mod_layers_idx"]
        if not isinstance(layers, list) or not all(isinstance(i, int) for i in layers):
            raise ValueError(f"{path}: mod.mod_layers_idx must be a list of layer indices, got {layers!r}")
        return _check_layers(layers, num_layers, path), f"γ-MoD config {path}"
    if isinstance(doc, dict) and doc.get("format") == ARANK_FORMAT:
        layers = mod_layers_from_arank_json(path, num_layers=num_layers, keep_dense=keep_dense, threshold=threshold)
        return _check_layers(layers, num_layers, path), f"ARank JSON {path}"
    if doc is not None:
        raise ValueError(f"{path}: JSON but neither a γ-MoD config.json (mod.mod_layers_idx) nor an ARank "
                         f"JSON (format {ARANK_FORMAT!r})")
    means = parse_official_log(text, source=path)
    if len(means) != num_layers:
        raise ValueError(f"{path}: ARank for {len(means)} layers, but the model has {num_layers} layers")
    if keep_dense is None and threshold is None:
        keep_dense = DEFAULT_KEEP_DENSE
    try:
        dense = select_dense_layers(means, keep_dense=keep_dense, threshold=threshold)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    layers = [i for i in range(num_layers) if i not in dense]
    rule = f"keep {keep_dense} dense" if keep_dense is not None else f"threshold {threshold}"
    return _check_layers(layers, num_layers, path), f"official ARank log {path} ({rule})"
