"""CLIP ViT vision tower (HF `CLIPVisionModel.vision_model` attribute names), used the two
ways LLaVA uses it: LLaVA-1.5 features from one hidden layer, and LLaVA-HR's fast branch
at a higher resolution with MR-Adapters hooked in between layers."""

from __future__ import annotations

from typing import Callable, Optional

import jax.numpy as jnp
from flax import nnx

from gamma_mod_jax.models.config import ClipConfig
from gamma_mod_jax.models.layers import dot_product_attention, layer_norm, linear, quick_gelu
from gamma_mod_jax.models.resample import resample_grid_bicubic_aa, resize_bilinear_align_corners


class ClipEmbeddings(nnx.Module):
    def __init__(self, cfg: ClipConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        d = cfg.hidden_size
        self.grid = cfg.image_size // cfg.patch_size
        self.class_embedding = nnx.Param(nnx.initializers.normal(d ** -0.5)(rngs.params(), (d,), param_dtype))
        self.patch_embedding = nnx.Conv(cfg.num_channels, d, kernel_size=(cfg.patch_size, cfg.patch_size),
                                        strides=(cfg.patch_size, cfg.patch_size), padding="VALID", use_bias=False,
                                        dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.position_embedding = nnx.Embed(self.grid ** 2 + 1, d, dtype=dtype, param_dtype=param_dtype,
                                            embedding_init=nnx.initializers.normal(0.02), rngs=rngs)
        self.dtype = dtype

    def patches(self, pixels_bhwc):
        """[b, H, W, 3] -> patch embeddings [b, (H/p)*(W/p), d] in row-major grid order."""
        x = self.patch_embedding(pixels_bhwc.astype(self.dtype))
        return x.reshape(x.shape[0], -1, x.shape[-1])

    def patch_positions(self, grid: int):
        """Position embeddings of a grid x grid patch layout [grid*grid, d]: the trained
        table, resampled (bicubic, antialiased) when the grid differs (LLaVA-HR)."""
        table = self.position_embedding.embedding[...].astype(self.dtype)
        patch_table = table[1:].reshape(1, self.grid, self.grid, -1)
        patch_table = resample_grid_bicubic_aa(patch_table, grid, grid)
        return patch_table.reshape(grid * grid, -1)

    def with_class_token(self, pixels_bhwc):
        """Standard CLIP embeddings [b, 1 + n, d]: CLS token first, trained positions."""
        x = self.patches(pixels_bhwc)
        cls = jnp.broadcast_to(self.class_embedding[...].astype(self.dtype), (x.shape[0], 1, x.shape[-1]))
        x = jnp.concatenate([cls, x], axis=1)
        return x + self.position_embedding.embedding[...].astype(self.dtype)[None]


class ClipAttention(nnx.Module):
    def __init__(self, cfg: ClipConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        d = cfg.hidden_size
        kw = dict(use_bias=True, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (linear(d, d, **kw) for _ in range(4))
        self.num_heads = cfg.num_attention_heads

    def __call__(self, x_bnd):
        b, n, d = x_bnd.shape
        split = lambda t: t.reshape(b, n, self.num_heads, d // self.num_heads)
        out = dot_product_attention(split(self.q_proj(x_bnd)), split(self.k_proj(x_bnd)), split(self.v_proj(x_bnd)),
                                    None)
        return self.out_proj(out.reshape(b, n, d))


class ClipMLP(nnx.Module):
    def __init__(self, cfg: ClipConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(use_bias=True, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.fc1 = linear(cfg.hidden_size, cfg.intermediate_size, **kw)
        self.fc2 = linear(cfg.intermediate_size, cfg.hidden_size, **kw)

    def __call__(self, x):
        return self.fc2(quick_gelu(self.fc1(x)))


class ClipEncoderLayer(nnx.Module):
    def __init__(self, cfg: ClipConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.layer_norm1 = layer_norm(cfg.hidden_size, eps=cfg.layer_norm_eps, **kw)
        self.self_attn = ClipAttention(cfg, **kw)
        self.layer_norm2 = layer_norm(cfg.hidden_size, eps=cfg.layer_norm_eps, **kw)
        self.mlp = ClipMLP(cfg, **kw)

    def __call__(self, x):
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class ClipEncoder(nnx.Module):
    def __init__(self, cfg: ClipConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.layers = nnx.List([ClipEncoderLayer(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
                                for _ in range(cfg.num_hidden_layers)])


class ClipVisionTransformer(nnx.Module):
    """CLIP's vision transformer; `post_layernorm` exists for weight loading only."""

    def __init__(self, cfg: ClipConfig, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.config = cfg
        self.embeddings = ClipEmbeddings(cfg, **kw)
        self.pre_layrnorm = layer_norm(cfg.hidden_size, eps=cfg.layer_norm_eps, **kw)  # HF's spelling
        self.encoder = ClipEncoder(cfg, **kw)
        self.post_layernorm = layer_norm(cfg.hidden_size, eps=cfg.layer_norm_eps, **kw)

    def features_llava15(self, pixels_bhwc, select_layer: int = -2, keep_cls: bool = False):
        """LLaVA-1.5: HF `hidden_states[select_layer]` without the CLS token, [b, n, d]
        (with it first, [b, 1 + n, d], if `keep_cls`). Only the layers that feed the selected
        hidden state are run."""
        n_states = len(self.encoder.layers) + 1  # embeddings, then each layer's output
        n_run = select_layer % n_states
        x = self.pre_layrnorm(self.embeddings.with_class_token(pixels_bhwc))
        for layer in self.encoder.layers[:n_run]:
            x = layer(x)
        return x if keep_cls else x[:, 1:]

    def features_hr(self, pixels_bhwc, fast_size: int,
                    layer_hook: Optional[Callable[[int, jnp.ndarray], jnp.ndarray]] = None):
        """LLaVA-HR fast branch: resize to `fast_size` (bilinear, align_corners=True),
        patch tokens with resampled positions and no CLS token, pre-LN, every layer with
        `x = layer_hook(i, x)` after layer i, no post-LN. [b, (fast_size/p)^2, d]."""
        pixels = resize_bilinear_align_corners(pixels_bhwc, fast_size, fast_size)
        grid = fast_size // self.config.patch_size
        x = self.embeddings.patches(pixels) + self.embeddings.patch_positions(grid)[None]
        x = self.pre_layrnorm(x)
        for i, layer in enumerate(self.encoder.layers):
            x = layer(x)
            if layer_hook is not None:
                x = layer_hook(i, x)
        return x
