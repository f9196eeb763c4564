"""ARank: the rank of a layer's attention maps, γ-MoD's redundancy measure.

Official definition: the post-softmax attention map of each head, multiplied by the
lower-triangular mask, with its diagonal set to zero, in float32, ranked with the
default tolerance max(m, n) * eps * sigma_max, then averaged over heads. We compute it
batched and jitted per layer while the forward pass runs, restricted to the valid
(non-padding) tokens of every example.
"""

from __future__ import annotations

import json
import re

import jax
import jax.numpy as jnp
import numpy as np

from gamma_mod_jax.mod.config import check_layer_indices


def matrix_rank(x_bmn, size=None):
    """Rank of each [m, n] matrix in a batch, as numpy/torch `matrix_rank` with the default
    tolerance (max(m, n) * eps * largest singular value) in x's dtype. `size` (broadcast
    against the batch) replaces max(m, n) for matrices zero-padded from a smaller one."""
    m, n = x_bmn.shape[-2:]
    sigma = jnp.linalg.svd(x_bmn, compute_uv=False)
    eps = jnp.finfo(x_bmn.dtype).eps
    size = max(m, n) if size is None else jnp.asarray(size, x_bmn.dtype)[..., None]
    tol = sigma[..., :1] * size * eps
    return jnp.sum(sigma > tol, axis=-1)


def attention_map_ranks(probs_bhqk, token_valid_bk):
    """ARank per example and head [b, h] of post-softmax attention maps.

    Each example's map is cut to its valid tokens: padded rows and columns are zeroed
    (singular values unchanged) and the tolerance uses the valid length, so the result
    equals the rank of the unpadded map.
    """
    s = probs_bhqk.shape[-1]
    strictly_lower = jnp.tril(jnp.ones((s, s), bool), k=-1)
    valid = token_valid_bk[:, None, :, None] & token_valid_bk[:, None, None, :]
    maps = jnp.where(strictly_lower[None, None] & valid, probs_bhqk, 0.0).astype(jnp.float32)
    n_valid = jnp.sum(token_valid_bk, axis=-1)[:, None]  # [b, 1], broadcast over heads
    return matrix_rank(maps, size=n_valid)


# --- statistics over samples and the dense / MoD layer selection -------------------

ARANK_FORMAT = "gamma_mod_jax.arank/v1"


class ARankAccumulator:
    """Collects per-sample ARank values (mean over heads) for every layer, batch by batch,
    over every example of every batch (the official code looked at example 0 only)."""

    def __init__(self, num_layers: int):
        self.per_sample = [[] for _ in range(num_layers)]

    def add(self, ranks_per_layer, token_valid_bk=None):
        """ranks_per_layer: one [b, heads] array per layer; token_valid [b, s] (optional)
        drops examples with no valid token."""
        keep = None if token_valid_bk is None else np.asarray(token_valid_bk).any(axis=-1)
        if len(ranks_per_layer) != len(self.per_sample):
            raise ValueError(f"expected ranks for {len(self.per_sample)} layers, got {len(ranks_per_layer)}")
        for layer, ranks in enumerate(ranks_per_layer):
            values = np.asarray(ranks, np.float64).mean(axis=-1)
            if keep is not None:
                values = values[keep]
            self.per_sample[layer].extend(float(v) for v in values)

    @property
    def num_samples(self) -> int:
        return len(self.per_sample[0]) if self.per_sample else 0

    def layer_statistics(self):
        if self.num_samples == 0:
            raise ValueError("ARank: no samples were analysed (empty dataset or every example padding)")
        return [{"layer": i, "mean": float(np.mean(v)), "std": float(np.std(v)), "per_sample": list(v)}
                for i, v in enumerate(self.per_sample)]


TIES = ("later_mod", "stay_dense")
DEFAULT_TIES = "later_mod"


def select_dense_layers(mean_ranks, *, keep_dense=None, threshold=None, ties=DEFAULT_TIES):
    """The layers that stay dense (sorted); every other layer becomes a MoD layer.

    `keep_dense=N`: the paper's rule, the N highest-ARank layers stay dense. Equal ARank
    values at the cut are settled by `ties`: "later_mod" (default) keeps exactly N layers
    dense, and of layers with equal ARank the later one becomes γ-MoD first (layers ranked
    by ARank descending, then index ascending; early layers stay dense, as in the released
    configs' dense layers 0, 1, 2); "stay_dense" keeps every layer whose ARank equals the
    N-th largest dense (the paper's wording taken literally: all layers tied at the cut
    stay dense, so a model whose layers all tie gets no MoD layer).
    `threshold=x`: layers with ARank >= x stay dense."""
    ranks = [float(r) for r in mean_ranks]
    if (keep_dense is None) == (threshold is None):
        raise ValueError("give exactly one of keep_dense=N or threshold=x")
    if ties not in TIES:
        raise ValueError(f"ties={ties!r}: expected one of {TIES}")
    if threshold is not None:
        return tuple(i for i, r in enumerate(ranks) if r >= float(threshold))
    if not 1 <= keep_dense <= len(ranks):
        raise ValueError(f"keep_dense={keep_dense} must be between 1 and the number of layers ({len(ranks)})")
    if ties == "stay_dense":
        cutoff = sorted(ranks, reverse=True)[keep_dense - 1]
        return tuple(i for i, r in enumerate(ranks) if r >= cutoff)
    order = sorted(range(len(ranks)), key=lambda i: (-ranks[i], i))
    return tuple(sorted(order[:keep_dense]))


def selection_rule(keep_dense=None, threshold=None, ties=DEFAULT_TIES) -> dict:
    """The rule as the ARank JSON records it."""
    if keep_dense is not None:
        return {"type": "keep_dense", "n": keep_dense, "ties": ties}
    return {"type": "threshold", "value": threshold}


def arank_report(stats, *, keep_dense=None, threshold=None, ties=DEFAULT_TIES) -> dict:
    """The ARank JSON document: per-layer statistics, the rule and its selection."""
    dense = select_dense_layers([s["mean"] for s in stats], keep_dense=keep_dense, threshold=threshold, ties=ties)
    return {"format": ARANK_FORMAT, "num_layers": len(stats), "num_samples": len(stats[0]["per_sample"]),
            "layers": stats, "rule": selection_rule(keep_dense, threshold, ties), "dense_layers": list(dense),
            "mod_layers": [s["layer"] for s in stats if s["layer"] not in dense]}


def parse_official_log(text: str, source: str = "log"):
    """Mean ARank per layer (0-based list) from the official code's printed lines
    `Layer {1-based}, Heads Avg Rank: {x}`, repeated over samples."""
    values = {}
    for line_no, line in enumerate(text.splitlines(), 1):
        match = re.search(r"Layer\s+(\d+),\s*Heads Avg Rank:\s*([-+0-9.eE]+)", line)
        if match:
            layer = int(match.group(1))
            if layer < 1:
                raise ValueError(f"{source}:{line_no}: layer numbers are 1-based, got {layer}")
            values.setdefault(layer - 1, []).append(float(match.group(2)))
    if not values:
        raise ValueError(f"{source}: no 'Layer N, Heads Avg Rank: x' lines found")
    n_layers = max(values) + 1
    missing = [i + 1 for i in range(n_layers) if i not in values]
    if missing:
        raise ValueError(f"{source}: no ARank lines for layers {missing} (1-based)")
    return [sum(v) / len(v) for _, v in sorted(values.items())]


def mod_layers_from_arank_json(path: str, *, num_layers: int, keep_dense=None, threshold=None,
                               ties=DEFAULT_TIES) -> tuple:
    """The MoD layers (sorted) of an ARank JSON document (`arank_report`) for a model with
    `num_layers` decoder layers: its own selection, or with `keep_dense` / `threshold` a
    new one from its per-layer means. ValueError naming the file for anything that does
    not fit."""
    try:
        with open(path) as f:
            doc = json.load(f)
    except FileNotFoundError:
        raise ValueError(f"{path}: ARank file not found") from None
    except OSError as e:
        raise ValueError(f"{path}: cannot read the ARank file ({e.strerror})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(doc, dict):
        raise ValueError(f"{path}: expected a JSON object (an ARank report), got {type(doc).__name__}")
    if doc.get("format", ARANK_FORMAT) != ARANK_FORMAT:
        raise ValueError(f"{path}: format {doc['format']!r} is not {ARANK_FORMAT!r}")

    def layer_list(key, values):
        if not isinstance(values, list):
            raise ValueError(f"{path}: '{key}' must be a list of layer indices, got {values!r}")
        check_layer_indices(values, num_layers, source=f"{path}: '{key}'")
        return values

    reselect = keep_dense is not None or threshold is not None
    needed = ("layers",) if reselect else ("mod_layers", "dense_layers")
    missing = [k for k in needed if k not in doc]
    if missing:
        raise ValueError(f"{path}: missing key(s) {missing} (an ARank report from launch.arank has "
                         "'layers', 'dense_layers' and 'mod_layers')")
    if not reselect:
        mod, dense = layer_list("mod_layers", doc["mod_layers"]), layer_list("dense_layers", doc["dense_layers"])
        both = sorted(set(mod) & set(dense))
        if both:
            raise ValueError(f"{path}: layers {both} are listed as both MoD and dense")
        if "num_layers" in doc and doc["num_layers"] != num_layers:
            raise ValueError(f"{path}: ARank of a {doc['num_layers']}-layer model; the model has {num_layers} layers")
        return tuple(sorted(mod))
    layers = doc["layers"]
    if not isinstance(layers, list) or not all(isinstance(s, dict) and "layer" in s and "mean" in s for s in layers):
        raise ValueError(f"{path}: 'layers' must be a list of {{'layer': i, 'mean': x, ...}} entries")
    indices = layer_list("layers", [s["layer"] for s in layers])
    if sorted(indices) != list(range(num_layers)):
        absent = sorted(set(range(num_layers)) - set(indices))
        raise ValueError(f"{path}: no ARank statistics for layers {absent}; the model has {num_layers} layers")
    try:
        means = [float(s["mean"]) for s in sorted(layers, key=lambda s: s["layer"])]
    except (TypeError, ValueError):
        raise ValueError(f"{path}: a layer's 'mean' is not a number") from None
    try:
        dense = select_dense_layers(means, keep_dense=keep_dense, threshold=threshold, ties=ties)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    return tuple(i for i in range(num_layers) if i not in dense)
