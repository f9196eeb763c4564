"""config.json of Mini-Gemini(-HD) and γ-MoD Mini-Gemini (`model_type` `mgm` / `mod_mgm`)
<-> our MLLMConfig.

Sizes come from the weights' shapes (CLIP, the ConvNeXt trunk's depths and widths); the
layout from the MGM keys (`image_size_aux`, `image_grid`, `image_global`,
`mm_hidden_size_aux`, checked against the weights). What neither holds (CLIP's head count
and LayerNorm eps, the trunk's LayerNorm eps) comes from vision_towers.py (our
`gamma_mod_jax` key, an override, the tower `mm_vision_tower` / `mm_vision_tower_aux` names);
anything else is an error naming the field, never a guess.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Mapping, Optional

from gamma_mod_jax.convert.hf_config import EXTRA_KEY, LLAMA_FIELDS, count_indexed, official_mod_json
from gamma_mod_jax.convert.hf_files import CheckpointError
from gamma_mod_jax.convert.keymap_mgm import AUX_PREFIX, CLIP_PREFIX
from gamma_mod_jax.convert.vision_towers import clip_settings, convnext_layer_norm_eps
from gamma_mod_jax.models import presets
from gamma_mod_jax.models.config import ClipConfig, ConvNextConfig, LlamaConfig, MLLMConfig

DEFAULT_AUX_TOWER = "model_zoo/OpenAI/openclip-convnext-large-d-320-laion2B-s29B-b131K-ft-soup"


def _require(config: Mapping, field: str, source: str):
    if config.get(field) is None:
        raise CheckpointError(f"{source}: MGM config without {field!r}")
    return config[field]


def mgm_config_from_hf(config: Mapping, shapes: Mapping[str, tuple], source: str = "config.json",
                       vision_config: Optional[Mapping] = None) -> MLLMConfig:
    """Our config of an MGM / γ-MoD MGM checkpoint: its config.json and {key: shape} of its
    weights; `vision_config`: the override (see hf_config.mllm_config_from_hf)."""
    override = vision_config or {}
    keys = list(shapes)
    extra = config.get(EXTRA_KEY) or {}
    try:
        d, _, patch, _ = shapes[CLIP_PREFIX + "embeddings.patch_embedding.weight"]
        n_pos = shapes[CLIP_PREFIX + "embeddings.position_embedding.weight"][0]
        mlp = shapes[CLIP_PREFIX + "encoder.layers.0.mlp.fc1.weight"][0]
        depths = tuple(count_indexed(keys, re.escape(AUX_PREFIX) + rf"vision_stages\.{s}\.blocks\.(\d+)\.") for s in range(4))
        dims = tuple(shapes[AUX_PREFIX + f"vision_stages.{s}.blocks.0.conv_dw.weight"][0] for s in range(4))
    except KeyError as e:
        raise CheckpointError(f"{source}: no MGM vision tower weights ({e.args[0]} missing)") from None
    sizes = dict(image_size=int(round((n_pos - 1) ** 0.5)) * patch, patch_size=patch, hidden_size=d,
                 intermediate_size=mlp,
                 num_hidden_layers=count_indexed(keys, re.escape(CLIP_PREFIX) + r"encoder\.layers\.(\d+)\."))
    settings, _ = clip_settings(sizes, held=extra.get("clip"), override=override.get("clip"),
                                tower_name=config.get("mm_vision_tower"), field="mm_vision_tower", source=source)
    clip = ClipConfig(**sizes, num_attention_heads=int(settings["num_attention_heads"]),
                      layer_norm_eps=float(settings["layer_norm_eps"]))
    eps, _ = convnext_layer_norm_eps(depths, dims, held=(extra.get("convnext") or {}).get("layer_norm_eps"),
                                     override=override.get("convnext"), tower_name=config.get("mm_vision_tower_aux"),
                                     field="mm_vision_tower_aux", source=source)
    aux_channels = int(_require(config, "mm_hidden_size_aux", source))
    if aux_channels != sum(dims):
        raise CheckpointError(f"{source}: mm_hidden_size_aux {aux_channels} but the ConvNeXt stages in the weights "
                              f"have {' + '.join(map(str, dims))} = {sum(dims)} channels")
    kw = dict(family="mgm", llm=LlamaConfig.from_dict({k: config[k] for k in LLAMA_FIELDS if config.get(k) is not None}),
              clip=clip, convnext=ConvNextConfig(depths=depths, dims=dims, layer_norm_eps=float(eps)),
              input_image_size=int(_require(config, "image_size_aux", source)),
              # MGM's own defaults when absent: getattr(config, 'image_grid', 1), 'image_global' False.
              image_grid=int(config.get("image_grid", 1)), image_global=bool(config.get("image_global", False)),
              vision_select_layer=int(config.get("mm_vision_select_layer", -2)),
              mm_hidden_size=int(config.get("mm_hidden_size", d)), adapter_after_layers=())
    if config.get("model_type") == "mod_mgm":
        from gamma_mod_jax.mod.config import MoDConfig
        mod = config.get("mod") or {}
        layers = mod.get("mod_layers_idx")
        if not layers:
            raise CheckpointError(f"{source}: model_type mod_mgm without mod.mod_layers_idx")
        # The official options of the layout: the HD one fills its 2880-position prefix with the image.
        official = presets.MGM_MOD if kw["image_grid"] > 1 else presets.MGM_MOD_NO_HD
        ours = dict(extra.get("mod") or {"routing_ratio": 0.5, **official})
        ours.update(layers=tuple(int(i) for i in layers), aux_loss_coef=float(mod.get("router_aux_loss_coef", 0.01)))
        kw["mod"] = MoDConfig.from_dict(ours)
    try:
        return MLLMConfig(**kw)
    except ValueError as e:
        raise CheckpointError(f"{source}: {e}") from None


def mgm_hf_config(cfg: MLLMConfig) -> dict:
    """config.json for exporting an MGM model to the original PyTorch code."""
    out = {k: getattr(cfg.llm, k) for k in LLAMA_FIELDS}
    out["num_key_value_heads"] = cfg.llm.kv_heads
    aux_tower = "convnext_xxlarge" if cfg.convnext.dims[0] >= 384 else DEFAULT_AUX_TOWER
    out.update(architectures=["MGMLlamaForCausalLM"], model_type="mgm", mm_projector_type=cfg.projector_type,
               mm_hidden_size=cfg.mm_hidden_size, mm_hidden_size_aux=cfg.mm_hidden_size_aux,
               image_size_aux=cfg.input_image_size, image_grid=cfg.image_grid, image_global=cfg.image_global,
               mm_vision_select_layer=cfg.vision_select_layer, mm_vision_select_feature="patch",
               mm_vision_tower="openai/clip-vit-large-patch14-336", mm_vision_tower_aux=aux_tower,
               optimize_vision_tower=False, optimize_vision_tower_aux=False, image_aspect_ratio="pad",
               mm_use_im_start_end=False, mm_use_im_patch_token=False, tie_word_embeddings=False)
    out[EXTRA_KEY] = {"clip": dataclasses.asdict(cfg.clip), "convnext": dataclasses.asdict(cfg.convnext),
                       "mod": None if cfg.mod is None else dataclasses.asdict(cfg.mod)}
    if cfg.mod is not None:
        out.update(model_type="mod_mgm", architectures=["MoDMGMLlamaForCausalLM"], mod=official_mod_json(cfg.mod))
    return out
