"""Typed, hashable model configurations.

ml-collections files in `configs/` describe a run; the model part is turned into
these frozen dataclasses (`MLLMConfig.from_dict(cfg.model)`) so that modules can
keep their config as static, hashable metadata under `jax.jit`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional, Tuple

import jax.numpy as jnp

from gamma_mod_jax import token_types as tt
from gamma_mod_jax.mod.config import MoDConfig

_DTYPES = {"float32": jnp.float32, "fp32": jnp.float32, "bfloat16": jnp.bfloat16, "bf16": jnp.bfloat16,
           "float16": jnp.float16, "fp16": jnp.float16}


def resolve_dtype(name: str):
    """Maps a config dtype name ('float32', 'bf16', ...) to a jnp dtype."""
    try:
        return _DTYPES[str(name)]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; expected one of {sorted(_DTYPES)}") from None


def _from_mapping(cls, d: Mapping[str, Any]):
    d = dict(d.to_dict() if hasattr(d, "to_dict") else d)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - set(fields))
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown config keys {unknown}; known: {sorted(fields)}")
    for name, value in list(d.items()):
        if isinstance(value, list):
            d[name] = tuple(value)
    return cls(**d)


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """LLaMA / Vicuna decoder (HF `LlamaConfig` field meanings)."""
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: Optional[int] = None  # None: same as num_attention_heads (no GQA)
    head_dim: Optional[int] = None  # None: hidden_size // num_attention_heads
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_position_embeddings: int = 4096
    pad_token_id: int = 0
    bos_token_id: int = 1
    eos_token_id: int = 2

    @property
    def kv_heads(self) -> int:
        return self.num_key_value_heads or self.num_attention_heads

    @property
    def dim_per_head(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads

    @classmethod
    def from_dict(cls, d):
        return _from_mapping(cls, d)


@dataclasses.dataclass(frozen=True)
class ClipConfig:
    """CLIP vision transformer (HF `CLIPVisionConfig` field meanings)."""
    image_size: int = 336  # size the position-embedding table was trained for
    patch_size: int = 14
    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    layer_norm_eps: float = 1e-5
    num_channels: int = 3

    @classmethod
    def from_dict(cls, d):
        return _from_mapping(cls, d)


@dataclasses.dataclass(frozen=True)
class ConvNextConfig:
    """timm-style ConvNeXt trunk (stem + 4 stages; the head is never used)."""
    depths: Tuple[int, ...] = (3, 3, 27, 3)  # convnext_large_mlp
    dims: Tuple[int, ...] = (192, 384, 768, 1536)
    layer_norm_eps: float = 1e-6
    mlp_ratio: int = 4
    num_channels: int = 3

    @classmethod
    def from_dict(cls, d):
        return _from_mapping(cls, d)


@dataclasses.dataclass(frozen=True)
class MLLMConfig:
    """A LLaVA-1.5 (`family='llava'`), LLaVA-HR (`family='llava_hr'`) or Mini-Gemini
    (`family='mgm'`: CLIP on low-resolution views, the ConvNeXt trunk on the input image,
    patch info mining between them) model."""
    family: str = "llava_hr"
    llm: LlamaConfig = LlamaConfig()
    clip: ClipConfig = ClipConfig()
    convnext: Optional[ConvNextConfig] = None  # LLaVA-HR slow branch / MGM auxiliary trunk; None for LLaVA-1.5
    # Input resolution fed to the model (1024 for LLaVA-HR, 336 for LLaVA-1.5, MGM's
    # `image_size_aux`: 1536 for MGM-HD, 768 otherwise).
    input_image_size: int = 1024
    # LLaVA-1.5: which CLIP hidden state feeds the projector (-2 = output of the
    # second-to-last layer, as `mm_vision_select_layer`). LLaVA-HR runs all layers.
    vision_select_layer: int = -2
    # LLaVA-1.5: `mm_vision_select_feature`: 'patch' drops the CLS token (official LLaVA and
    # transformers' vision_feature_select_strategy 'default'), 'cls_patch' keeps it ('full').
    vision_select_feature: str = "patch"
    # LLaVA-HR MR-Adapters: inserted after these 0-based CLIP layer indices.
    # Empty = stage-1 model (`freeze_vision=True`: no adapters in the checkpoint).
    adapter_after_layers: Tuple[int, ...] = (5, 11, 17)
    adapter_gate_hidden: int = 512
    mm_hidden_size: int = 1024
    # MGM only: CLIP sees an image_grid x image_grid grid of clip.image_size tiles of the
    # input resized to image_grid * clip.image_size, plus (image_global) the whole image at
    # clip.image_size first; MGM-HD: 2 and True (2880 image tokens), MGM: 1 and False (576).
    image_grid: int = 1
    image_global: bool = False
    projector_type: str = "mlp2x_gelu"
    image_token_index: int = tt.IMAGE_TOKEN_INDEX  # placeholder id in input_ids where the image goes
    mod: Optional[MoDConfig] = None  # γ-MoD layers and routing; None = dense model
    dtype: str = "float32"  # compute dtype
    param_dtype: str = "float32"
    # Runs of identical layers (decoder: consecutive dense / γ-MoD layers) as one lax.scan
    # over stacked parameters: compile time independent of depth. Same results and the
    # same per-layer checkpoint keys either way (models/scan.py).
    scan_layers: bool = False

    def __post_init__(self):
        if self.family not in ("llava", "llava_hr", "mgm"):
            raise ValueError(f"MLLMConfig.family must be 'llava', 'llava_hr' or 'mgm', got {self.family!r}")
        if self.family in ("llava_hr", "mgm") and self.convnext is None:
            raise ValueError(f"MLLMConfig: family {self.family!r} needs a convnext config")
        if self.family == "mgm":
            self._check_mgm()
        if self.vision_select_feature not in ("patch", "cls_patch"):
            raise ValueError(f"MLLMConfig.vision_select_feature must be 'patch' or 'cls_patch', got "
                             f"{self.vision_select_feature!r}")
        if self.vision_select_feature != "patch" and self.family != "llava":
            raise ValueError(f"MLLMConfig: vision_select_feature 'cls_patch' needs family 'llava', got {self.family!r}")
        if self.projector_type != "mlp2x_gelu":
            raise ValueError(f"MLLMConfig.projector_type: only 'mlp2x_gelu' is supported, got {self.projector_type!r}")

    def _check_mgm(self):
        if self.image_grid < 1 or (self.image_global and self.image_grid < 2):
            raise ValueError(f"MLLMConfig: MGM needs image_grid >= 1 (>= 2 with image_global), got "
                             f"image_grid={self.image_grid}, image_global={self.image_global}")
        side = self.clip.image_size // self.clip.patch_size  # CLIP patch grid per view
        aux_side = self.input_image_size // 4 // self.image_grid  # ConvNeXt stage-0 map per view
        if self.input_image_size % 32 or aux_side % side:
            raise ValueError(f"MLLMConfig: MGM input_image_size {self.input_image_size} must be a multiple of 32 "
                             f"whose stage-0 map per view ({aux_side}) the CLIP grid side {side} divides")

    @property
    def mm_hidden_size_aux(self) -> int:
        """MGM: channels of the concatenated ConvNeXt stage features (2880 for ConvNeXt-L)."""
        return sum(self.convnext.dims)

    @property
    def num_views(self) -> int:
        """MGM: CLIP views per image (grid tiles plus the global view)."""
        return self.image_grid ** 2 + int(self.image_global)

    @property
    def fast_image_size(self) -> int:
        """Resolution the CLIP branch runs at: LLaVA-HR's max(S*14/32, 336); S for LLaVA-1.5;
        the CLIP size of each view for MGM."""
        if self.family == "mgm":
            return self.clip.image_size
        if self.family == "llava":
            return self.input_image_size
        return max(self.input_image_size * self.clip.patch_size // 32, self.clip.image_size)

    @property
    def num_image_tokens(self) -> int:
        per_view = (self.fast_image_size // self.clip.patch_size) ** 2
        if self.family == "mgm":
            return per_view * self.num_views
        return per_view + int(self.vision_select_feature == "cls_patch")

    @property
    def compute_dtype(self):
        return resolve_dtype(self.dtype)

    @property
    def weight_dtype(self):
        return resolve_dtype(self.param_dtype)

    @classmethod
    def from_dict(cls, d) -> "MLLMConfig":
        d = dict(d.to_dict() if hasattr(d, "to_dict") else d)
        if "llm" in d:
            d["llm"] = LlamaConfig.from_dict(d["llm"])
        if "clip" in d:
            d["clip"] = ClipConfig.from_dict(d["clip"])
        if d.get("convnext") is not None:
            d["convnext"] = ConvNextConfig.from_dict(d["convnext"])
        if d.get("mod") is not None:
            d["mod"] = MoDConfig.from_dict(d["mod"])
        return _from_mapping(cls, d)
