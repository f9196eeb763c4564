"""Logical axis names: what each dimension of a parameter or batch array means.

Parameters get theirs from their path (`llm/layers/3/self_attn/q_proj/kernel`) and
rank through PARAM_AXES, an ordered table of (regex, names) pairs: the first pattern
that fully matches the path, with as many names as the parameter has dimensions,
decides. Vectors (norm scales, biases, layer scales, the CLIP class embedding) are
replicated. A parameter no pattern matches is replicated (logged once), so a new
module never breaks sharding, it is only not sharded.

Logical names map to mesh axes through one rules table (config.sharding_rules),
DEFAULT_RULES below unless the config says otherwise:

    batch        -> (data, fsdp)  examples of a batch
    embed        -> fsdp          LLM hidden size (FSDP: parameters split, gathered per use)
    heads        -> tensor        attention heads x head_dim (q/k/v outputs, o input)
    kv_heads     -> tensor
    mlp          -> tensor        LLM MLP and projector hidden units
    vocab        -> tensor        embedding rows, lm_head columns
    vision_embed -> fsdp          CLIP / ConvNeXt / adapter widths
    vision_heads -> tensor, vision_mlp -> tensor
    conv_out     -> fsdp          output channels of convolutions
    length, router, norm, conv_window, conv_in, vision_positions -> replicated
    layers       (not listed)     the stacked-layer axis of scanned runs: kept whole

Changing the parallelism is a config change: e.g. ("embed", None) turns FSDP off for
the LLM, ("mlp", None) turns tensor parallelism of the MLP off.
"""

from __future__ import annotations

import re
from typing import Optional, Sequence, Tuple, Union

MeshAxes = Union[None, str, Tuple[str, ...]]

DEFAULT_RULES: Tuple[Tuple[str, MeshAxes], ...] = (
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("router", None),
    ("norm", None),
    ("vision_embed", "fsdp"),
    ("vision_heads", "tensor"),
    ("vision_mlp", "tensor"),
    ("vision_positions", None),
    ("conv_window", None),
    ("conv_in", None),
    ("conv_out", "fsdp"),
)

_CONV = ("conv_window", "conv_window", "conv_in", "conv_out")

# (path regex, logical names per dimension); first full match with the right rank wins.
PARAM_AXES: Tuple[Tuple[str, Tuple[Optional[str], ...]], ...] = (
    # --- LLaMA decoder
    (r"llm/embed_tokens/embedding", ("vocab", "embed")),
    (r"llm/lm_head/kernel", ("embed", "vocab")),
    (r"llm/router/kernel", ("embed", "router")),
    (r"llm/layers/\d+/self_attn/q_proj/kernel", ("embed", "heads")),
    (r"llm/layers/\d+/self_attn/[kv]_proj/kernel", ("embed", "kv_heads")),
    (r"llm/layers/\d+/self_attn/o_proj/kernel", ("heads", "embed")),
    (r"llm/layers/\d+/mlp/(gate|up)_proj/kernel", ("embed", "mlp")),
    (r"llm/layers/\d+/mlp/down_proj/kernel", ("mlp", "embed")),
    # --- projector: column- then row-parallel, like an LLM MLP
    (r"projector/fc1/kernel", ("vision_embed", "mlp")),
    (r"projector/fc2/kernel", ("mlp", "embed")),
    # --- CLIP
    (r"vision/clip/embeddings/patch_embedding/kernel", _CONV[:3] + ("vision_embed",)),
    (r"vision/clip/embeddings/position_embedding/embedding", ("vision_positions", "vision_embed")),
    (r"vision/clip/encoder/layers/\d+/self_attn/[qkv]_proj/kernel", ("vision_embed", "vision_heads")),
    (r"vision/clip/encoder/layers/\d+/self_attn/out_proj/kernel", ("vision_heads", "vision_embed")),
    (r"vision/clip/encoder/layers/\d+/mlp/fc1/kernel", ("vision_embed", "vision_mlp")),
    (r"vision/clip/encoder/layers/\d+/mlp/fc2/kernel", ("vision_mlp", "vision_embed")),
    # --- ConvNeXt, MR-Adapters, fusion (LLaVA-HR)
    (r"vision/convnext/.*/mlp/fc1/kernel", ("vision_embed", "vision_mlp")),
    (r"vision/convnext/.*/mlp/fc2/kernel", ("vision_mlp", "vision_embed")),
    (r"vision/adapters/\d+/gate/0/kernel", ("vision_embed", "vision_mlp")),
    (r"vision/adapters/\d+/gate/2/kernel", ("vision_mlp", "router")),
    (r"vision/fusion/(fast|slow)_proj/kernel", ("vision_mlp", "vision_embed")),
    (r"vision/.*/kernel", _CONV),  # every convolution (HWIO)
    # --- vectors: replicated
    (r".*", ("norm",)),
)

_COMPILED = tuple((re.compile(pattern), names) for pattern, names in PARAM_AXES)


# A scanned run of layers (`llm/layers_stacked/1/...`, models/scan.py) stacks its layers'
# parameters on a leading axis: named `layers` (not listed in the rules: kept whole), the
# rest named as the per-layer parameter (`llm/layers/<i>/...`).
_STACKED_RUN = re.compile(r"([^/]+)_stacked/\d+/")


def param_logical_axes(path: str, ndim: int) -> Optional[Tuple[Optional[str], ...]]:
    """Logical names of the parameter at `path` ("/"-joined) with `ndim` dimensions,
    or None when no entry of PARAM_AXES covers it (the caller replicates it)."""
    per_layer, stacked = _STACKED_RUN.subn(r"\1/0/", path)
    if stacked:
        inner = param_logical_axes(per_layer, ndim - stacked)
        return None if inner is None else ("layers",) * stacked + inner
    for pattern, names in _COMPILED:
        if len(names) == ndim and pattern.fullmatch(path):
            return names
    return None


def batch_logical_axes(ndim: int) -> Tuple[Optional[str], ...]:
    """A batch array [batch, ...]: examples split, everything else whole."""
    return ("batch",) + (None,) * (ndim - 1)


def rules_dict(rules: Optional[Sequence[Tuple[str, MeshAxes]]]) -> dict:
    """The rules table as {logical name: mesh axes tuple}; None means DEFAULT_RULES.
    A logical name the table does not list is replicated."""
    table = {}
    for item in (DEFAULT_RULES if rules is None else rules):
        if len(item) != 2:
            raise ValueError(f"a sharding rule is (logical name, mesh axes), got {item!r}")
        name, axes = item
        if name in table:
            raise ValueError(f"sharding rules name {name!r} twice")
        if axes is None:
            axes = ()
        elif isinstance(axes, str):
            axes = (axes,)
        table[name] = tuple(axes)
    return table
