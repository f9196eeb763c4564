"""The vision-tower settings a checkpoint's weights do not determine (CLIP's head count and
LayerNorm eps, ConvNeXt's LayerNorm eps), found without guessing.

Sources, the first that has them wins:
1. the checkpoint itself: our `gamma_mod_jax` key in config.json (or, for transformers' Llava,
   its `vision_config`, read in hf_llava.py);
2. an explicit override (`launch.convert --vision-config FILE`, see `read_vision_config`);
3. the tower that `mm_vision_tower` names, when it is a local directory holding a config.json
   or a hub id whose config.json is in the local Hugging Face cache (never downloaded);
4. the table of the public towers LLaVA, LLaVA-HR and Mini-Gemini use (PUBLIC_CLIP,
   PUBLIC_CONVNEXT).
A tower config from 2-4 must agree with the weights' shapes (otherwise it describes another
tower: an error naming both); when none has them, conversion stops with an error saying what
to pass.
"""

from __future__ import annotations

import json
import os
import re
from typing import Mapping, Optional, Tuple

from gamma_mod_jax.convert.hf_files import CheckpointError, read_json
from gamma_mod_jax.models import presets

# transformers' CLIPVisionConfig defaults: what transformers itself uses for a field a tower's
# config.json leaves out (hub configs hold only the fields that differ).
HF_CLIP_VISION_DEFAULTS = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                               image_size=224, patch_size=32, layer_norm_eps=1e-5, hidden_act="quick_gelu",
                               num_channels=3)
# Fields of a CLIP tower config checked against the weights' shapes.
CLIP_SIZE_FIELDS = ("hidden_size", "intermediate_size", "num_hidden_layers", "patch_size", "image_size")
CLIP_SETTINGS = ("num_attention_heads", "layer_norm_eps")

# Public CLIP towers by hub id (matched on the last path component, so a local copy named like
# the hub repo matches too).
PUBLIC_CLIP = {"openai/clip-vit-large-patch14-336": dict(presets.CLIP_VIT_L14_336),
               "openai/clip-vit-large-patch14": dict(presets.CLIP_VIT_L14_336, image_size=224)}
# ConvNeXt trunks by a fragment of the timm / OpenCLIP name (`vision_tower_slow` of LLaVA-HR,
# `mm_vision_tower_aux` of MGM, e.g. convnext_large_mlp.clip_laion2b_ft_320,
# openclip-convnext-large-d-320-laion2B-s29B-b131K-ft-soup); '-' and '_' are alike.
PUBLIC_CONVNEXT = {"convnext_xxlarge": presets.CONVNEXT_XXLARGE, "convnext_large": presets.CONVNEXT_LARGE_MLP}

OVERRIDE_HINT = ("pass --vision-config FILE: the tower's own config.json (transformers CLIP config), or JSON "
                 '{"clip": {"num_attention_heads": N, "layer_norm_eps": X}, "convnext": {"layer_norm_eps": X}}')


def read_vision_config(path: str) -> dict:
    """An override file -> {"clip": {...}, "convnext": {...}} (either may be absent). Accepts a
    transformers CLIP config.json (`clip_vision_model`, or `clip` with its `vision_config`;
    fields it leaves out take transformers' defaults) or our own format (the `gamma_mod_jax`
    key's `clip` / `convnext` entries)."""
    data = read_json(path)
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(data).__name__}")
    if data.get("model_type") in ("clip", "clip_vision_model"):
        vision = data.get("vision_config") if data["model_type"] == "clip" else data
        if not isinstance(vision, dict):
            raise CheckpointError(f"{path}: a CLIP config without a 'vision_config' object")
        return {"clip": hf_clip_vision_fields(vision, path)}
    unknown = sorted(set(data) - {"clip", "convnext"})
    if unknown or not data:
        raise CheckpointError(f"{path}: neither a transformers CLIP config (model_type 'clip' / 'clip_vision_model') "
                              f"nor our format (keys 'clip', 'convnext'); found keys {sorted(data)}")
    for key, needed in (("clip", CLIP_SETTINGS), ("convnext", ("layer_norm_eps",))):
        entry = data.get(key)
        if entry is None:
            continue
        missing = [f for f in needed if not isinstance(entry, dict) or entry.get(f) is None]
        if missing:
            raise CheckpointError(f"{path}: '{key}' needs {', '.join(needed)}; missing {', '.join(missing)}")
    return {k: dict(v) for k, v in data.items() if v is not None}


def hf_clip_vision_fields(vision: Mapping, source: str) -> dict:
    """A transformers CLIPVisionConfig dict with its defaults filled in; CLIP with an activation
    other than quick_gelu (OpenAI's) is refused: our CLIP implements quick_gelu only."""
    out = {**HF_CLIP_VISION_DEFAULTS, **{k: v for k, v in vision.items() if v is not None}}
    if out["hidden_act"] != "quick_gelu":
        raise CheckpointError(f"{source}: vision tower hidden_act {out['hidden_act']!r}; only 'quick_gelu' (OpenAI "
                              "CLIP) is supported")
    for field in CLIP_SIZE_FIELDS + ("num_attention_heads",):
        if not (isinstance(out[field], int) and not isinstance(out[field], bool) and out[field] > 0):
            raise CheckpointError(f"{source}: vision field {field!r} is {json.dumps(out[field])}; expected a positive "
                                  "integer")
    return out


def _check_sizes(found: Mapping, sizes: Mapping, what: str, source: str) -> None:
    wrong = [f"{k} {found[k]} (weights: {sizes[k]})" for k in sizes if k in found and found[k] != sizes[k]]
    if wrong:
        raise CheckpointError(f"{source}: {what} does not describe the tower in the weights: {'; '.join(wrong)}")


def check_override_agrees(held: Mapping, override: Optional[Mapping], fields, source: str) -> None:
    """An override of settings the checkpoint holds must say the same (else it is a mistake)."""
    differ = [f"{k} {override[k]} (checkpoint: {held[k]})" for k in fields
              if override and override.get(k) is not None and override[k] != held[k]]
    if differ:
        raise CheckpointError(f"{source}: --vision-config contradicts the settings the checkpoint holds: "
                              f"{'; '.join(differ)}")


def _local_tower_config(name: str) -> Tuple[Optional[dict], str]:
    """(config.json of tower `name`, where it was found) from a local directory or the HF cache."""
    if os.path.isdir(name):
        path = os.path.join(name, "config.json")
        return (read_json(path), path) if os.path.isfile(path) else (None, "")
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", name):
        return None, ""
    try:
        from huggingface_hub import try_to_load_from_cache
        path = try_to_load_from_cache(repo_id=name, filename="config.json")
    except Exception:  # no huggingface_hub, or a name the hub would not accept
        return None, ""
    return (read_json(path), path) if isinstance(path, str) else (None, "")


def clip_settings(sizes: Mapping, *, held: Optional[Mapping], override: Optional[Mapping], tower_name,
                  field: str, source: str) -> Tuple[dict, str]:
    """({num_attention_heads, layer_norm_eps}, where they came from) for the CLIP tower whose
    weights have `sizes` (CLIP_SIZE_FIELDS). `held`: the checkpoint's own record (our key),
    `override`: the override file's `clip` entry, `tower_name`: config.json's `field`."""
    if held and all(held.get(k) is not None for k in CLIP_SETTINGS):
        check_override_agrees(held, override, CLIP_SETTINGS, source)
        return {k: held[k] for k in CLIP_SETTINGS}, f"{source} (settings recorded by gamma_mod_jax)"
    if override:
        _check_sizes(override, sizes, "the --vision-config CLIP config", source)
        return {k: override[k] for k in CLIP_SETTINGS}, "--vision-config"
    name = str(tower_name or "")
    if name:
        found, path = _local_tower_config(name)
        if found is not None:
            if found.get("model_type") == "clip":
                found = found.get("vision_config") or {}
            fields = hf_clip_vision_fields(found, path)
            _check_sizes(fields, sizes, f"{path} ({field} {name!r})", source)
            return {k: fields[k] for k in CLIP_SETTINGS}, path
        base = name.rstrip("/").split("/")[-1].lower()
        for hub_id, known in PUBLIC_CLIP.items():
            if base == hub_id.split("/")[-1]:
                _check_sizes(known, sizes, f"{field} {name!r} (public tower {hub_id})", source)
                return {k: known[k] for k in CLIP_SETTINGS}, f"public tower {hub_id}"
    raise CheckpointError(f"{source}: the CLIP tower's head count and LayerNorm eps are not in the checkpoint, and "
                          f"{field}={tower_name!r} is neither a local directory with a config.json, nor in the local "
                          f"Hugging Face cache, nor a known public tower ({', '.join(PUBLIC_CLIP)}); {OVERRIDE_HINT}")


def convnext_layer_norm_eps(depths, dims, *, held: Optional[float], override: Optional[Mapping], tower_name,
                            field: str, source: str) -> Tuple[float, str]:
    """(ConvNeXt LayerNorm eps, where it came from) for the trunk with these depths and widths."""
    if held is not None:
        check_override_agrees({"layer_norm_eps": held}, override, ("layer_norm_eps",), source)
        return float(held), f"{source} (settings recorded by gamma_mod_jax)"
    if override and override.get("layer_norm_eps") is not None:
        return float(override["layer_norm_eps"]), "--vision-config"
    name = str(tower_name or "").lower().replace("-", "_")
    for fragment, known in PUBLIC_CONVNEXT.items():
        if fragment in name:
            shape = {"depths": tuple(depths), "dims": tuple(dims)}
            _check_sizes({k: tuple(known[k]) for k in shape}, shape, f"{field} {tower_name!r} ({fragment})", source)
            return float(known["layer_norm_eps"]), f"public tower {fragment}"
    raise CheckpointError(f"{source}: the ConvNeXt LayerNorm eps is not in the checkpoint and {field}={tower_name!r} "
                          f"names no known trunk ({', '.join(PUBLIC_CONVNEXT)}); {OVERRIDE_HINT}")
