"""config.json of the original LLaVA / LLaVA-HR / γ-MoD code <-> our MLLMConfig
(transformers' LlavaForConditionalGeneration in hf_llava.py, Mini-Gemini in hf_config_mgm.py).

Vision-tower sizes are not in config.json (it names a hub model), so they are read
from the weights' shapes: CLIP from its patch/position embeddings and layer count,
ConvNeXt-L vs -XXL from its stem and stage depths, MR-Adapters from their presence.
What the shapes do not determine (head count, LayerNorm eps) comes from vision_towers.py:
the checkpoint, an override, the named tower's own config, or a table of public towers.
"""

from __future__ import annotations

import dataclasses
import json
import re
from typing import Mapping, Optional

from gamma_mod_jax.convert.hf_files import CheckpointError
from gamma_mod_jax.convert.vision_towers import clip_settings, convnext_layer_norm_eps
from gamma_mod_jax.models.config import ClipConfig, ConvNextConfig, LlamaConfig, MLLMConfig

KNOWN_MODEL_TYPES = ("llava", "llava_llama", "mod_llava_llama")
LLAMA_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "rms_norm_eps", "rope_theta", "max_position_embeddings", "pad_token_id",
                "bos_token_id", "eos_token_id")
CLIP_HR = "model.vision_tower.fast_vision_tower.vision_tower.vision_model."
CLIP_15 = "model.vision_tower.vision_tower.vision_model."
CONVNEXT = "model.vision_tower.slow_vision_tower.vision_tower."
# Our own config.json key (ignored by the PyTorch code): the vision and γ-MoD settings that
# neither the original keys nor the weights' shapes determine, so exports import back exactly.
EXTRA_KEY = "gamma_mod_jax"


def _int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _number(v) -> bool:
    return (_int(v) or isinstance(v, float)) and v == v and abs(v) != float("inf")


# field: (required, expected (words), check); `required`: present and not null.
_POSITIVE_INT = ("a positive integer", lambda v: _int(v) and v > 0)
_TOKEN_ID = ("a non-negative integer or null", lambda v: _int(v) and v >= 0)
_POSITIVE_NUMBER = ("a positive finite number", lambda v: _number(v) and v > 0)
CONFIG_FIELDS = {
    "model_type": (True, "a string", lambda v: isinstance(v, str)),
    "vocab_size": (True,) + _POSITIVE_INT,
    "hidden_size": (True,) + _POSITIVE_INT,
    "intermediate_size": (True,) + _POSITIVE_INT,
    "num_hidden_layers": (True,) + _POSITIVE_INT,
    "num_attention_heads": (True,) + _POSITIVE_INT,
    "num_key_value_heads": (False,) + _POSITIVE_INT,
    "rms_norm_eps": (False,) + _POSITIVE_NUMBER,
    "rope_theta": (False,) + _POSITIVE_NUMBER,
    "max_position_embeddings": (False,) + _POSITIVE_INT,
    "pad_token_id": (False,) + _TOKEN_ID,
    "bos_token_id": (False,) + _TOKEN_ID,
    "eos_token_id": (False,) + _TOKEN_ID,
    "mm_vision_select_layer": (False, "an integer", _int),
    "mm_hidden_size": (False,) + _POSITIVE_INT,
    "input_image_size": (False,) + _POSITIVE_INT,
    "is_multipath_encoder": (False, "true or false", lambda v: isinstance(v, bool)),
    "mod": (False, "an object", lambda v: isinstance(v, dict)),
    EXTRA_KEY: (False, "an object", lambda v: isinstance(v, dict)),
}


def validate_hf_config(config, source: str = "config.json") -> None:
    """Checks the config.json fields we read against their types and ranges (CONFIG_FIELDS,
    and γ-MoD's mod.mod_layers_idx / mod.router_aux_loss_coef) before any tensor is read;
    CheckpointError naming the file, the field, its value and the expected type."""
    if not isinstance(config, dict):
        raise CheckpointError(f"{source}: expected a JSON object, got {type(config).__name__}")
    if _is_hf_llava(config):
        from gamma_mod_jax.convert.hf_llava import validate_hf_llava_config  # it builds on this module
        return validate_hf_llava_config(config, source)

    def bad(field, value, expected):
        return CheckpointError(f"{source}: field {field!r} is {json.dumps(value)} ({type(value).__name__}); "
                               f"expected {expected}")

    for field, (required, expected, check) in CONFIG_FIELDS.items():
        value = config.get(field)
        if value is None:
            if required:
                raise CheckpointError(f"{source}: field {field!r} is {'null' if field in config else 'missing'}; "
                                      f"expected {expected}")
            continue
        if not check(value):
            raise bad(field, value, expected)
    mod = config.get("mod") or {}
    layers = mod.get("mod_layers_idx")
    if layers is not None:
        n = config["num_hidden_layers"]
        if not (isinstance(layers, list) and all(_int(i) and 0 <= i < n for i in layers)):
            raise bad("mod.mod_layers_idx", layers, f"a list of layer indices in [0, {n})")
    coef = mod.get("router_aux_loss_coef")
    if coef is not None and not (_number(coef) and coef >= 0):
        raise bad("mod.router_aux_loss_coef", coef, "a non-negative finite number")


def _is_hf_llava(config) -> bool:
    from gamma_mod_jax.convert.hf_llava import is_hf_llava
    return is_hf_llava(config)


def num_llm_layers(config) -> int:
    """The LLM's layer count of a validated config.json (nested for transformers' Llava)."""
    if _is_hf_llava(config):
        from gamma_mod_jax.convert.hf_llava import num_llm_layers as hf_layers
        return hf_layers(config)
    return config["num_hidden_layers"]


def count_indexed(keys, pattern: str) -> int:
    """1 + the largest index the regex `pattern`'s group matches among `keys` (0 if none)."""
    found = {int(m.group(1)) for k in keys for m in [re.match(pattern, k)] if m}
    return max(found) + 1 if found else 0


def mllm_config_from_hf(config: Mapping, shapes: Mapping[str, tuple], source: str = "config.json",
                        vision_config: Optional[Mapping] = None) -> MLLMConfig:
    """Our config for an original or transformers-Llava checkpoint: its config.json and
    {key: shape} of its weights. `vision_config`: the override's {"clip": ..., "convnext": ...}
    (vision_towers.read_vision_config), used where the checkpoint lacks those settings."""
    validate_hf_config(config, source)
    if _is_hf_llava(config):
        from gamma_mod_jax.convert.hf_llava import mllm_config_from_hf_llava
        return mllm_config_from_hf_llava(config, shapes, source, vision_config)
    override = vision_config or {}
    model_type = config.get("model_type")
    if model_type in ("mgm", "mod_mgm"):
        from gamma_mod_jax.convert.hf_config_mgm import mgm_config_from_hf  # it builds on this module
        return mgm_config_from_hf(config, shapes, source, vision_config)
    if model_type not in KNOWN_MODEL_TYPES:
        raise CheckpointError(f"{source}: unknown model_type {model_type!r} "
                              f"(known: {', '.join(KNOWN_MODEL_TYPES + ('mgm', 'mod_mgm'))})")
    llm = {k: config[k] for k in LLAMA_FIELDS if config.get(k) is not None}
    hr = bool(config.get("is_multipath_encoder")) or "vision_tower_slow" in config
    keys = list(shapes)
    prefix = CLIP_HR if hr else CLIP_15
    try:
        d, _, patch, _ = shapes[prefix + "embeddings.patch_embedding.weight"]
        n_pos = shapes[prefix + "embeddings.position_embedding.weight"][0]
        mlp = shapes[prefix + "encoder.layers.0.mlp.fc1.weight"][0]
    except KeyError as e:
        raise CheckpointError(f"{source}: no CLIP vision tower weights ({e.args[0]} missing)") from None
    grid = int(round((n_pos - 1) ** 0.5))
    extra = config.get(EXTRA_KEY) or {}
    sizes = dict(image_size=grid * patch, patch_size=patch, hidden_size=d, intermediate_size=mlp,
                 num_hidden_layers=count_indexed(keys, re.escape(prefix) + r"encoder\.layers\.(\d+)\."))
    settings, _ = clip_settings(sizes, held=extra.get("clip"), override=override.get("clip"),
                                tower_name=config.get("mm_vision_tower"), field="mm_vision_tower", source=source)
    clip = ClipConfig(**sizes, **settings)
    select_feature = config.get("mm_vision_select_feature", "patch")
    if select_feature not in ("patch", "cls_patch"):
        raise CheckpointError(f"{source}: field 'mm_vision_select_feature' is {json.dumps(select_feature)}; expected "
                              "'patch' or 'cls_patch'")
    kw = dict(family="llava_hr" if hr else "llava", llm=LlamaConfig.from_dict(llm), clip=clip,
              vision_select_layer=int(config.get("mm_vision_select_layer", -2)), vision_select_feature=select_feature,
              mm_hidden_size=int(config.get("mm_hidden_size", d)))
    if hr:
        stem = shapes.get(CONVNEXT + "stem.0.weight")
        if stem is None:
            raise CheckpointError(f"{source}: LLaVA-HR config but no ConvNeXt weights ({CONVNEXT}stem.0.weight)")
        depths = tuple(count_indexed(keys, re.escape(CONVNEXT) + rf"stages\.{s}\.blocks\.(\d+)\.") for s in range(4))
        dims = tuple(shapes[CONVNEXT + f"stages.{s}.blocks.0.conv_dw.weight"][0] for s in range(4))
        eps, _ = convnext_layer_norm_eps(depths, dims, held=(extra.get("convnext") or {}).get("layer_norm_eps"),
                                         override=override.get("convnext"), tower_name=config.get("vision_tower_slow"),
                                         field="vision_tower_slow", source=source)
        n_adapters = count_indexed(keys, r"model\.vision_tower\.align_stages_latent\.(\d+)\.")
        quarter = clip.num_hidden_layers // 4
        after = extra.get("adapter_after_layers", [quarter * (k + 1) - 1 for k in range(n_adapters)])
        kw.update(convnext=ConvNextConfig(depths=depths, dims=dims, layer_norm_eps=eps),
                  input_image_size=int(config.get("input_image_size", 1024)),
                  adapter_after_layers=tuple(int(i) for i in after))
        if n_adapters:
            kw["adapter_gate_hidden"] = shapes["model.vision_tower.align_stages_latent.0.gate.0.weight"][0]
    else:
        kw.update(input_image_size=clip.image_size, adapter_after_layers=())
    if "adapter_gate_hidden" in extra and not kw.get("adapter_after_layers"):
        kw["adapter_gate_hidden"] = int(extra["adapter_gate_hidden"])  # unused without adapters
    if model_type == "mod_llava_llama":
        from gamma_mod_jax.mod.config import MoDConfig
        mod = config.get("mod") or {}
        layers = mod.get("mod_layers_idx")
        if not layers:
            raise CheckpointError(f"{source}: model_type mod_llava_llama without mod.mod_layers_idx")
        # The official code ignores `capacity_factor` and always skips half of the routable
        # prefix: routing_ratio 0.5 reproduces it.
        ours = dict(extra.get("mod") or {"routing_ratio": 0.5})
        ours.update(layers=tuple(int(i) for i in layers), aux_loss_coef=float(mod.get("router_aux_loss_coef", 0.01)))
        kw["mod"] = MoDConfig.from_dict(ours)
    return MLLMConfig(**kw)


def hf_config_from_mllm(cfg: MLLMConfig) -> dict:
    """config.json for exporting our model to the original PyTorch code."""
    if cfg.family == "mgm":
        from gamma_mod_jax.convert.hf_config_mgm import mgm_hf_config
        return mgm_hf_config(cfg)
    out = {k: getattr(cfg.llm, k) for k in LLAMA_FIELDS}
    out["num_key_value_heads"] = cfg.llm.kv_heads
    out.update(architectures=["LlavaLlamaForCausalLM"], model_type="llava", mm_projector_type=cfg.projector_type,
               mm_hidden_size=cfg.mm_hidden_size, mm_vision_select_layer=cfg.vision_select_layer,
               mm_vision_select_feature=cfg.vision_select_feature, mm_vision_tower="openai/clip-vit-large-patch14-336",
               image_aspect_ratio="pad", mm_use_im_start_end=False, mm_use_im_patch_token=False,
               tie_word_embeddings=False)
    if cfg.family == "llava_hr":
        out.update(is_multipath_encoder=True, input_image_size=cfg.input_image_size,
                   vision_tower_slow="convnext_xxlarge" if cfg.convnext.dims[0] >= 384 else "convnext_large_mlp",
                   freeze_vision=not cfg.adapter_after_layers)
    out[EXTRA_KEY] = {"clip": dataclasses.asdict(cfg.clip),
                       "convnext": None if cfg.convnext is None else dataclasses.asdict(cfg.convnext),
                       "adapter_after_layers": list(cfg.adapter_after_layers),
                       "adapter_gate_hidden": cfg.adapter_gate_hidden,
                       "mod": None if cfg.mod is None else dataclasses.asdict(cfg.mod)}
    if cfg.mod is not None:
        out.update(model_type="mod_llava_llama", architectures=["MoDLLaVALlamaForCausalLM"], mod=official_mod_json(cfg.mod))
    return out


def official_mod_json(mod) -> dict:
    """The `mod` entry of an official γ-MoD config.json (LLaVA-HR and Mini-Gemini alike)."""
    return dict(mod_enable=True, mod_mode="arank_mod", mod_layers_idx=list(mod.layers),
                capacity_factor=mod.routing_ratio, router_aux_loss_coef=mod.aux_loss_coef)


def mllm_config_to_dict(cfg: MLLMConfig) -> dict:
    """Our config as plain JSON-able data (MLLMConfig.from_dict reads it back)."""
    return dataclasses.asdict(cfg)
