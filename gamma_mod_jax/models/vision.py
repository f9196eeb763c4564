"""The two image encoders LLaVA uses, as one interface: pixels -> [b, n_tokens, mm_hidden].

- `LlavaVisionTower`: LLaVA-1.5, CLIP ViT-L/14-336, a hidden state from layer -2, CLS dropped
  (or kept: `vision_select_feature`).
- `HRVisionTower`: LLaVA-HR's mixture of resolutions: CLIP at 448 px (fast) and ConvNeXt
  at 1024 px (slow), MR-Adapters inside CLIP, and the final fast/slow fusion.
- `MGMVisionTower` (`mgm_vision.py`): Mini-Gemini(-HD), CLIP on low-resolution views, a
  ConvNeXt trunk on the high-resolution input, patch info mining.
"""

from __future__ import annotations

from flax import nnx

from gamma_mod_jax.models.clip import ClipVisionTransformer, clip_scan_breaks
from gamma_mod_jax.models.config import MLLMConfig
from gamma_mod_jax.models.convnext import ConvNeXt
from gamma_mod_jax.models.mgm_vision import MGMVisionTower
from gamma_mod_jax.models.mr_adapter import HRFusion, MRAdapter


class LlavaVisionTower(nnx.Module):
    def __init__(self, cfg: MLLMConfig, *, rngs: nnx.Rngs):
        kw = dict(dtype=cfg.compute_dtype, param_dtype=cfg.weight_dtype, rngs=rngs)
        self.clip = ClipVisionTransformer(cfg.clip, scan_breaks=clip_scan_breaks(cfg), **kw)
        self.select_layer = cfg.vision_select_layer
        self.keep_cls = cfg.vision_select_feature == "cls_patch"

    def __call__(self, pixels_bhwc):
        """pixels [b, 336, 336, 3] (CLIP-normalised) -> [b, 576, 1024]."""
        return self.clip.features_llava15(pixels_bhwc, select_layer=self.select_layer, keep_cls=self.keep_cls)


class HRVisionTower(nnx.Module):
    def __init__(self, cfg: MLLMConfig, *, rngs: nnx.Rngs):
        kw = dict(dtype=cfg.compute_dtype, param_dtype=cfg.weight_dtype, rngs=rngs)
        slow_dim = cfg.convnext.dims[-1]
        fast_dim = cfg.clip.hidden_size
        self.clip = ClipVisionTransformer(cfg.clip, scan_breaks=clip_scan_breaks(cfg), **kw)
        self.convnext = ConvNeXt(cfg.convnext, scan_layers=cfg.scan_layers, **kw)
        # Stage-1 models (`freeze_vision`) have no adapters: an empty list.
        self.adapters = nnx.List([MRAdapter(fast_dim, slow_dim, cfg.adapter_gate_hidden, **kw)
                                  for _ in cfg.adapter_after_layers])
        self.fusion = HRFusion(fast_dim, slow_dim, cfg.mm_hidden_size, **kw)
        self.adapter_after_layers = tuple(cfg.adapter_after_layers)
        self.fast_image_size = cfg.fast_image_size

    def __call__(self, pixels_bhwc):
        """pixels [b, S, S, 3] at the input resolution (1024) -> [b, (S*14/32/14)^2, mm_hidden]."""
        slow_bhwc = self.convnext(pixels_bhwc)

        def adapter_hook(layer_index, fast_btd):
            if layer_index in self.adapter_after_layers:
                adapter = self.adapters[self.adapter_after_layers.index(layer_index)]
                fast_btd = adapter(fast_btd, slow_bhwc)
            return fast_btd

        fast_btd = self.clip.features_hr(pixels_bhwc, self.fast_image_size, layer_hook=adapter_hook)
        return self.fusion(fast_btd, slow_bhwc)


def build_vision_tower(cfg: MLLMConfig, *, rngs: nnx.Rngs) -> nnx.Module:
    if cfg.family == "mgm":
        return MGMVisionTower(cfg, rngs=rngs)
    return HRVisionTower(cfg, rngs=rngs) if cfg.family == "llava_hr" else LlavaVisionTower(cfg, rngs=rngs)
