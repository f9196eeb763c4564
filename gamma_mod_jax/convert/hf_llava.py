"""transformers' `LlavaForConditionalGeneration` checkpoints (the `llava-hf/*` format) <-> our
LLaVA-1.5 model (family 'llava').

config.json holds `text_config` (LLaMA) and `vision_config` (CLIP), often sparse: a field left
out takes transformers' default, as `from_pretrained` does. Weights come in two key layouts:
the module tree of transformers >= 4.52 (`model.language_model.`, `model.vision_tower.`,
`model.multi_modal_projector.linear_{1,2}.`, `lm_head.`) and the older one of the hub
checkpoints, which transformers 5 still writes (`language_model.model.`, `vision_tower.`,
`multi_modal_projector.`, `language_model.lm_head.`); CLIP's own `vision_model.` level is
there (transformers 4) or not (transformers 5). Export writes the hub layout with the
`vision_model.` level (that of the llava-hf checkpoints, which transformers 5 loads as well).

Image tokens: transformers' prompts hold one `image_token_index` per image feature; our model
takes one placeholder, `MLLMConfig.image_token_index`, and splices the features there. The
id is the same (inside the vocabulary), so a prompt reads `<image>` once instead of n times.
"""

from __future__ import annotations

import json
import re
from typing import Mapping, Optional, Sequence

from gamma_mod_jax.convert.hf_config import LLAMA_FIELDS, count_indexed, validate_hf_config
from gamma_mod_jax.convert.hf_files import CheckpointError
from gamma_mod_jax.convert.keymap import DEFAULT_IGNORED, KeyMap
from gamma_mod_jax.convert.vision_towers import (CLIP_SETTINGS, CLIP_SIZE_FIELDS, check_override_agrees,
                                                 hf_clip_vision_fields)
from gamma_mod_jax.models.config import ClipConfig, LlamaConfig, MLLMConfig

ARCHITECTURE = "LlavaForConditionalGeneration"
# transformers' LlamaConfig defaults (for fields a sparse text_config leaves out).
HF_LLAMA_DEFAULTS = dict(model_type="llama", vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                         num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=None, head_dim=None,
                         hidden_act="silu", max_position_embeddings=2048, rms_norm_eps=1e-6, rope_theta=10000.0,
                         rope_scaling=None, attention_bias=False, mlp_bias=False, tie_word_embeddings=False,
                         pad_token_id=None, bos_token_id=1, eos_token_id=2)
# LlavaConfig's defaults: its vision tower when `vision_config` is absent is CLIP ViT-L/14-336.
HF_LLAVA_DEFAULTS = dict(image_token_index=32000, projector_hidden_act="gelu", vision_feature_select_strategy="default",
                         vision_feature_layer=-2, multimodal_projector_bias=True, tie_word_embeddings=False)
HF_LLAVA_VISION_DEFAULT = dict(model_type="clip_vision_model", hidden_size=1024, intermediate_size=4096,
                               num_hidden_layers=24, num_attention_heads=16, image_size=336, patch_size=14,
                               projection_dim=768)
SELECT_STRATEGY = {"default": "patch", "full": "cls_patch"}  # transformers' name -> our vision_select_feature


def is_hf_llava(config: Mapping) -> bool:
    """Whether a config.json is transformers' LlavaConfig (not the original LLaVA code's)."""
    return (isinstance(config, Mapping) and config.get("model_type") == "llava"
            and ("text_config" in config or "vision_config" in config
                 or ARCHITECTURE in (config.get("architectures") or [])))


def _bad(source, field, value, expected):
    return CheckpointError(f"{source}: field {field!r} is {json.dumps(value)}; expected {expected}")


def text_fields(config: Mapping, source: str = "config.json") -> dict:
    """text_config with transformers' defaults filled in and `rope_theta` read from
    `rope_parameters` (transformers 5) when given there; refuses what our LLaMA does not
    implement (another architecture, biases, RoPE scaling, tied embeddings)."""
    text = config.get("text_config") or {}
    if not isinstance(text, dict):
        raise _bad(source, "text_config", text, "an object")
    out = {**HF_LLAMA_DEFAULTS, **{k: v for k, v in text.items() if v is not None}}
    rope = text.get("rope_parameters") or {}
    if isinstance(rope, dict) and rope.get("rope_theta") is not None:
        out["rope_theta"] = rope["rope_theta"]
    for field, want in (("model_type", "llama"), ("hidden_act", "silu"), ("attention_bias", False),
                        ("mlp_bias", False)):
        if out[field] != want:
            raise _bad(source, f"text_config.{field}", out[field], json.dumps(want))
    scaling = out["rope_scaling"] or (rope if isinstance(rope, dict) else {})
    if scaling.get("rope_type", scaling.get("type", "default")) != "default":
        raise _bad(source, "text_config.rope_scaling", scaling, "no RoPE scaling (rope_type 'default')")
    if out["tie_word_embeddings"] or config.get("tie_word_embeddings"):
        raise CheckpointError(f"{source}: tied word embeddings (tie_word_embeddings true) are not supported; "
                              "our LLaMA keeps a separate lm_head")
    return out


def llava_fields(config: Mapping, source: str = "config.json") -> dict:
    """The top-level LlavaConfig fields with their defaults, checked."""
    out = {**HF_LLAVA_DEFAULTS, **{k: v for k, v in config.items() if k in HF_LLAVA_DEFAULTS and v is not None}}
    if config.get("image_token_id") is not None and config.get("image_token_index") is None:
        out["image_token_index"] = config["image_token_id"]
    layer = out["vision_feature_layer"]
    if not (isinstance(layer, int) and not isinstance(layer, bool)):
        raise _bad(source, "vision_feature_layer", layer, "one layer index (a list of layers, concatenated, is not "
                   "supported)")
    if out["vision_feature_select_strategy"] not in SELECT_STRATEGY:
        raise _bad(source, "vision_feature_select_strategy", out["vision_feature_select_strategy"],
                   "'default' or 'full'")
    if out["projector_hidden_act"] != "gelu":
        raise _bad(source, "projector_hidden_act", out["projector_hidden_act"], '"gelu" (mlp2x_gelu)')
    if out["multimodal_projector_bias"] is not True:
        raise _bad(source, "multimodal_projector_bias", out["multimodal_projector_bias"], "true")
    return out


def validate_hf_llava_config(config: Mapping, source: str = "config.json") -> None:
    """Checks the fields we read (text, vision, Llava) before any tensor is read."""
    llava = llava_fields(config, source)
    text = text_fields(config, source)
    validate_hf_config({k: v for k, v in text.items() if k in ("model_type",) + LLAMA_FIELDS},
                       f"{source} (text_config)")
    vision = HF_LLAVA_VISION_DEFAULT if config.get("vision_config") is None else config["vision_config"]
    if not isinstance(vision, dict) or vision.get("model_type", "clip_vision_model") != "clip_vision_model":
        found = vision.get("model_type") if isinstance(vision, dict) else vision
        raise _bad(source, "vision_config.model_type" if isinstance(vision, dict) else "vision_config", found,
                   '"clip_vision_model" (a CLIP tower; others are not supported)')
    n_states = hf_clip_vision_fields(vision, f"{source} (vision_config)")["num_hidden_layers"] + 1
    if not -n_states <= llava["vision_feature_layer"] < n_states:
        raise _bad(source, "vision_feature_layer", llava["vision_feature_layer"],
                   f"a hidden-state index in [-{n_states}, {n_states}) (the tower has {n_states - 1} layers)")
    token = llava["image_token_index"]
    if not (isinstance(token, int) and 0 <= token < text["vocab_size"]):
        raise _bad(source, "image_token_index", token, f"a token id in the vocabulary [0, {text['vocab_size']})")


def num_llm_layers(config: Mapping) -> int:
    return text_fields(config)["num_hidden_layers"]


def hf_llava_keymap(keys: Sequence[str]) -> KeyMap:
    """Our parameter names <-> the layout `keys` are in (either key layout, with or without
    CLIP's `vision_model.` level)."""
    new = any(k.startswith("model.language_model.") for k in keys)
    tower = "model.vision_tower." if new else "vision_tower."
    if any(k.startswith(tower + "vision_model.") for k in keys):
        tower += "vision_model."
    if new:
        rules = (("llm.lm_head.", "lm_head."), ("llm.", "model.language_model."),
                 ("projector.fc1.", "model.multi_modal_projector.linear_1."),
                 ("projector.fc2.", "model.multi_modal_projector.linear_2."))
    else:
        rules = (("llm.lm_head.", "language_model.lm_head."), ("llm.", "language_model.model."),
                 ("projector.fc1.", "multi_modal_projector.linear_1."),
                 ("projector.fc2.", "multi_modal_projector.linear_2."))
    return KeyMap(prefixes=rules + (("vision.clip.", tower),), ignored=DEFAULT_IGNORED)


EXPORT_KEYMAP = hf_llava_keymap(["vision_tower.vision_model."])  # the hub layout


def mllm_config_from_hf_llava(config: Mapping, shapes: Mapping[str, tuple], source: str = "config.json",
                              vision_config: Optional[Mapping] = None) -> MLLMConfig:
    """Our config of a transformers Llava checkpoint; CLIP's sizes from vision_config are
    checked against the weights', an override (`vision_config`) against its settings."""
    validate_hf_llava_config(config, source)
    llava, text = llava_fields(config, source), text_fields(config, source)
    vision = hf_clip_vision_fields(config.get("vision_config") or HF_LLAVA_VISION_DEFAULT, source)
    check_override_agrees(vision, (vision_config or {}).get("clip"), CLIP_SETTINGS + CLIP_SIZE_FIELDS, source)
    keymap = hf_llava_keymap(list(shapes))
    tower = keymap.prefixes[-1][1]
    try:
        d, _, patch, _ = shapes[tower + "embeddings.patch_embedding.weight"]
        n_pos = shapes[tower + "embeddings.position_embedding.weight"][0]
        mlp = shapes[tower + "encoder.layers.0.mlp.fc1.weight"][0]
    except KeyError as e:
        raise CheckpointError(f"{source}: transformers Llava config, but no CLIP vision tower weights ({e.args[0]} "
                              "missing)") from None
    sizes = dict(hidden_size=d, intermediate_size=mlp, patch_size=patch,
                 image_size=int(round((n_pos - 1) ** 0.5)) * patch,
                 num_hidden_layers=count_indexed(list(shapes), re.escape(tower) + r"encoder\.layers\.(\d+)\."))
    wrong = [f"{k} {vision[k]} (weights: {sizes[k]})" for k in CLIP_SIZE_FIELDS if vision[k] != sizes[k]]
    if wrong:
        raise CheckpointError(f"{source}: vision_config does not match the weights: {'; '.join(wrong)}")
    clip = ClipConfig(**{k: vision[k] for k in CLIP_SIZE_FIELDS + ("num_attention_heads", "layer_norm_eps",
                                                                    "num_channels")})
    llm = {k: text[k] for k in LLAMA_FIELDS + ("head_dim",) if text[k] is not None}
    try:
        return MLLMConfig(family="llava", llm=LlamaConfig.from_dict(llm), clip=clip, convnext=None,
                          input_image_size=clip.image_size, vision_select_layer=llava["vision_feature_layer"],
                          vision_select_feature=SELECT_STRATEGY[llava["vision_feature_select_strategy"]],
                          adapter_after_layers=(), mm_hidden_size=d, image_token_index=llava["image_token_index"])
    except ValueError as e:
        raise CheckpointError(f"{source}: {e}") from None


def hf_llava_config_from_mllm(cfg: MLLMConfig, image_token_index: Optional[int] = None) -> dict:
    """config.json of `LlavaForConditionalGeneration` for our LLaVA-1.5 model; ValueError for a
    model that class cannot hold (LLaVA-HR, Mini-Gemini, γ-MoD) or an image id outside the
    vocabulary (`image_token_index` chooses one)."""
    if cfg.family != "llava" or cfg.mod is not None:
        what = "a γ-MoD model" if cfg.mod is not None else f"family {cfg.family!r}"
        raise ValueError(f"--format hf-llava: {what} has no transformers-native class "
                         "(LlavaForConditionalGeneration holds LLaVA-1.5 only); export it in the original layout "
                         "(the default --format original)")
    token = cfg.image_token_index if image_token_index is None else image_token_index
    if not 0 <= token < cfg.llm.vocab_size:
        raise ValueError(f"--format hf-llava: the model's image placeholder id is {token}, outside the vocabulary "
                         f"[0, {cfg.llm.vocab_size}); transformers needs one inside it: pass --image-token-index ID "
                         "(a vocabulary id prompts never use otherwise)")
    llm, clip = cfg.llm, cfg.clip
    strategy = {v: k for k, v in SELECT_STRATEGY.items()}[cfg.vision_select_feature]
    text = dict(model_type="llama", architectures=["LlamaForCausalLM"], vocab_size=llm.vocab_size,
                hidden_size=llm.hidden_size, intermediate_size=llm.intermediate_size,
                num_hidden_layers=llm.num_hidden_layers, num_attention_heads=llm.num_attention_heads,
                num_key_value_heads=llm.kv_heads, head_dim=llm.dim_per_head, hidden_act="silu",
                max_position_embeddings=llm.max_position_embeddings, rms_norm_eps=llm.rms_norm_eps,
                rope_theta=llm.rope_theta, rope_parameters={"rope_type": "default", "rope_theta": llm.rope_theta},
                attention_bias=False, mlp_bias=False, tie_word_embeddings=False, pad_token_id=llm.pad_token_id,
                bos_token_id=llm.bos_token_id, eos_token_id=llm.eos_token_id)
    vision = dict(model_type="clip_vision_model", hidden_act="quick_gelu",
                  **{k: getattr(clip, k) for k in CLIP_SIZE_FIELDS + ("num_attention_heads", "layer_norm_eps",
                                                                       "num_channels")})
    return dict(architectures=[ARCHITECTURE], model_type="llava", text_config=text, vision_config=vision,
                image_token_index=token, image_seq_length=cfg.num_image_tokens, projector_hidden_act="gelu",
                multimodal_projector_bias=True, vision_feature_layer=cfg.vision_select_layer,
                vision_feature_select_strategy=strategy, tie_word_embeddings=False, dtype=cfg.param_dtype)
