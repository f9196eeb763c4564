"""Shared assembly of model configs for the files in this folder."""

import ml_collections

from gamma_mod_jax.models import presets
from gamma_mod_jax.token_types import IMAGE_TOKEN_INDEX


def parse_arg(arg):
    """'tiny,dtype=bf16' -> {'tiny': True, 'dtype': 'bf16'}."""
    out = {}
    for part in filter(None, (arg or "").split(",")):
        key, eq, value = part.partition("=")
        out[key.strip()] = value.strip() if eq else True
    return out


def model_config(family, llm, clip, convnext=None, *, input_image_size, tiny=False, dtype="float32",
                 param_dtype="float32", adapter_after_layers=(5, 11, 17)):
    """The `config.model` block shared by every LLaVA / LLaVA-HR config."""
    if tiny:
        llm, clip = presets.TINY_LLM, presets.TINY_CLIP
        if convnext is not None:  # keep the real trunk's LayerNorm eps (1e-6 L, 1e-5 XXL)
            convnext = dict(presets.TINY_CONVNEXT, layer_norm_eps=convnext["layer_norm_eps"])
        input_image_size = 128 if family == "llava_hr" else 28
        adapter_after_layers = (0, 1, 2)
    m = ml_collections.ConfigDict()
    m.family = family
    m.llm = dict(llm)
    m.clip = dict(clip)
    m.convnext = dict(convnext) if convnext is not None else None
    m.input_image_size = input_image_size
    m.vision_select_layer = -2
    m.adapter_after_layers = tuple(adapter_after_layers) if family == "llava_hr" else ()
    m.adapter_gate_hidden = 16 if tiny else 512
    m.mm_hidden_size = clip["hidden_size"]
    m.projector_type = "mlp2x_gelu"
    m.image_token_index = IMAGE_TOKEN_INDEX
    m.dtype = dtype
    m.param_dtype = param_dtype
    # Scanned runs of layers (models/scan.py): the full-size models compile in a fraction
    # of the time; the tiny twins (a few layers) keep the plain loop.
    m.scan_layers = not tiny
    m.mod = None  # a dense model unless the `mod` argument asks for γ-MoD
    return m


def get_model_config(arg, family, llm, clip, convnext=None, *, input_image_size):
    """Full config with a `model` block; `arg` may say `tiny`, `dtype=bf16`, `param_dtype=bf16`,
    `stage1` (LLaVA-HR without MR-Adapters, as `freeze_vision` checkpoints are), `mod` or
    `mod=RATIO` (γ-MoD on every layer but 0, 1, 2 and the last, as the released models;
    RATIO is the share of routable tokens skipped, default 0.5 as the official code)."""
    opts = parse_arg(arg)
    unknown = set(opts) - {"tiny", "dtype", "param_dtype", "stage1", "mod"}
    if unknown:
        raise ValueError(f"unknown config arguments {sorted(unknown)}")
    config = ml_collections.ConfigDict()
    config.model = model_config(family, llm, clip, convnext, input_image_size=input_image_size,
                                tiny=bool(opts.get("tiny")), dtype=opts.get("dtype", "float32"),
                                param_dtype=opts.get("param_dtype", "float32"))
    if opts.get("stage1"):
        config.model.adapter_after_layers = ()
    if opts.get("mod"):
        n_layers = config.model.llm["num_hidden_layers"]
        ratio = 0.5 if opts["mod"] is True else float(opts["mod"])
        config.model.mod = dict(layers=tuple(range(3, n_layers - 1)), routing_ratio=ratio)
        if opts.get("tiny"):
            # The tiny twin has 4 LLM layers: layer 0 dense, 1-2 MoD, the last dense; its
            # prompts are a few tokens, so the capacity counts a 2-token system prompt.
            config.model.mod["layers"] = (1, 2)
            config.model.mod["system_tokens"] = 2
    return config
