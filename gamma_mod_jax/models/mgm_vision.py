"""Mini-Gemini's vision side (MGM-HD and MGM): CLIP on low-resolution views, OpenCLIP's
ConvNeXt trunk on the high-resolution input, patch info mining between them.

The model takes the high-resolution image (`images_aux` of the original code: padded to a
square, CLIP-normalised at `input_image_size`, see `gamma_mod_jax.data.image`) and forms
the low-resolution views itself, in float32, exactly as the original data code does
(bilinear, align_corners=False): the image at grid x 336 px cut into a row-major grid of
336-px tiles, plus (HD) the global view, that image resized to 336.
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from gamma_mod_jax.models.clip import ClipVisionTransformer, clip_scan_breaks
from gamma_mod_jax.models.config import MLLMConfig
from gamma_mod_jax.models.convnext import ConvNeXt
from gamma_mod_jax.models.patch_info_mining import PatchInfoMining
from gamma_mod_jax.models.resample import resize_bilinear_half_pixel


def split_grid(x_bhwc, grid: int):
    """[b, H, W, c] -> [b, grid*grid, H/grid, W/grid, c], tiles in row-major order."""
    b, h, w, c = x_bhwc.shape
    x = x_bhwc.reshape(b, grid, h // grid, grid, w // grid, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, grid * grid, h // grid, w // grid, c)


def mgm_views(pixels_bhwc, view_size: int, grid: int, with_global: bool):
    """The original's `images` from its `images_aux`: [b, grid*grid (+1), view, view, 3],
    tiles t00, t01, ... then the global view, in float32."""
    x = pixels_bhwc.astype(jnp.float32)
    full = resize_bilinear_half_pixel(x, grid * view_size, grid * view_size)
    if grid == 1:
        return full[:, None]
    views = [split_grid(full, grid)]
    if with_global:
        views.append(resize_bilinear_half_pixel(full, view_size, view_size)[:, None])
    return jnp.concatenate(views, axis=1)


class OpenClipConvNeXtAux(nnx.Module):
    """OpenCLIP ConvNeXt stem + stages (keys `vision_stem`, `vision_stages`): the four stage
    maps, stages 1-3 upsampled (bilinear, float32) to stage 0's size, concatenated on
    channels: [b, S, S, 3] -> [b, S/4, S/4, sum(dims)]."""

    def __init__(self, cfg: MLLMConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.trunk = ConvNeXt(cfg.convnext, dtype=dtype, param_dtype=param_dtype, scan_layers=cfg.scan_layers,
                              rngs=rngs)

    def __call__(self, pixels_bhwc):
        stages = self.trunk.stage_features(pixels_bhwc)
        _, h, w, _ = stages[0].shape
        return jnp.concatenate([stages[0]] + [resize_bilinear_half_pixel(s, h, w) for s in stages[1:]], axis=-1)


class MGMVisionTower(nnx.Module):
    """pixels [b, S, S, 3] at `input_image_size` -> image tokens [b, n_views * 576, mm_hidden]
    in the order [global | t00 | t01 | t10 | t11] (HD) or the single view's 576 tokens."""

    def __init__(self, cfg: MLLMConfig, *, rngs: nnx.Rngs):
        kw = dict(dtype=cfg.compute_dtype, param_dtype=cfg.weight_dtype, rngs=rngs)
        self.clip = ClipVisionTransformer(cfg.clip, scan_breaks=clip_scan_breaks(cfg), **kw)
        self.aux = OpenClipConvNeXtAux(cfg, **kw)
        self.mining = PatchInfoMining(cfg.mm_hidden_size, cfg.mm_hidden_size_aux, **kw)
        self.select_layer = cfg.vision_select_layer
        self.grid, self.with_global = cfg.image_grid, cfg.image_global
        self.view_size = cfg.clip.image_size
        self.dtype = cfg.compute_dtype

    def __call__(self, pixels_bhwc):
        b = pixels_bhwc.shape[0]
        g = self.grid
        views = mgm_views(pixels_bhwc, self.view_size, g, self.with_global).astype(self.dtype)
        n_tiles = g * g
        # One CLIP batch, as the original: all tiles [b * g * g], then the global views [b].
        tiles = views[:, :n_tiles].reshape(b * n_tiles, *views.shape[2:])
        clip_in = tiles if not self.with_global else jnp.concatenate([tiles, views[:, n_tiles]], axis=0)
        feats = self.clip.features_llava15(clip_in, select_layer=self.select_layer)  # [·, 576, d]
        aux = self.aux(pixels_bhwc)                                                   # [b, S/4, S/4, c]
        _, h, w, c = aux.shape
        local_aux = split_grid(aux, g).reshape(b * n_tiles, h // g, w // g, c)
        local = self.mining(feats[:b * n_tiles], local_aux).reshape(b, n_tiles * feats.shape[1], -1)
        if not self.with_global:
            return local
        global_aux = resize_bilinear_half_pixel(aux, h // g, w // g)
        return jnp.concatenate([self.mining(feats[b * n_tiles:], global_aux), local], axis=1)
