"""CLIP ViT vision tower (HF `CLIPVisionModel.vision_model` attribute names), used the two
ways LLaVA uses it: LLaVA-1.5 features from one hidden layer, and LLaVA-HR's fast branch
at a higher resolution with MR-Adapters hooked in between layers."""

from __future__ import annotations

from typing import Callable, Optional

import jax.numpy as jnp
from flax import nnx

from gamma_mod_jax.models.config import ClipConfig, MLLMConfig
from gamma_mod_jax.models.layers import dot_product_attention, layer_norm, linear, quick_gelu
from gamma_mod_jax.models.resample import resample_grid_bicubic_aa, resize_bilinear_align_corners
from gamma_mod_jax.models.scan import layer_runs, scan_stack, stack_layers
from gamma_mod_jax.parallel.activations import constrain


# Logical names of the encoder's hidden states [batch, tokens, width] (activation sharding).
VISION_ACTIVATION = ("batch", "length", "vision_embed")


def layers_run(cfg: ClipConfig, select_layer: int) -> int:
    """Layers LLaVA-1.5 runs to reach HF `hidden_states[select_layer]` (embeddings first)."""
    return select_layer % (cfg.num_hidden_layers + 1)


def clip_scan_breaks(cfg: MLLMConfig):
    """Where CLIP's scanned runs end (None: scan_layers off): after each MR-Adapter's layer
    (LLaVA-HR), or after the layer whose output is the selected feature (LLaVA-1.5, MGM)."""
    if not cfg.scan_layers:
        return None
    if cfg.family == "llava_hr":
        return tuple(cfg.adapter_after_layers)
    return (layers_run(cfg.clip, cfg.vision_select_layer) - 1,)


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
    """The encoder layers. scan_breaks (scan_layers on): layer indices after which a run of
    layers ends (where a hook reads or changes the hidden state, or a feature is taken);
    each run is one stacked module run by lax.scan (models/scan.py)."""

    def __init__(self, cfg: ClipConfig, *, dtype, param_dtype, rngs: nnx.Rngs, scan_breaks=None):
        layers = [ClipEncoderLayer(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
                  for _ in range(cfg.num_hidden_layers)]
        self.num_layers = cfg.num_hidden_layers
        self.scan_layers = scan_breaks is not None
        if self.scan_layers:
            run_of = [sum(1 for b in scan_breaks if b < i) for i in range(self.num_layers)]
            self.runs = tuple((start, count) for start, count, _ in layer_runs(run_of))
            self.layers_stacked = nnx.List([stack_layers(layers[start:start + count]) for start, count in self.runs])
        else:
            self.layers = nnx.List(layers)

    def __call__(self, x, stop: int, layer_hook=None):
        """Layers 0..stop-1, with `x = layer_hook(i, x)` after layer i (scanned: after the
        last layer of each run only; the hook must be the identity elsewhere)."""
        if not self.scan_layers:
            for i, layer in enumerate(self.layers[:stop]):
                x = constrain(layer(x), VISION_ACTIVATION)
                if layer_hook is not None:
                    x = layer_hook(i, x)
            return x
        for r, (start, count) in enumerate(self.runs):
            if start >= stop:
                break
            if start + count > stop:
                raise ValueError(f"scanned CLIP: layer {stop - 1} is not the end of a run {self.runs} "
                                 "(build the encoder with it in scan_breaks)")
            x, _ = scan_stack(self.layers_stacked[r], lambda layer, x, _: (constrain(layer(x), VISION_ACTIVATION),
                                                                            None), x)
            if layer_hook is not None:
                x = layer_hook(start + count - 1, x)
        return x


class ClipVisionTransformer(nnx.Module):
    """CLIP's vision transformer; `post_layernorm` exists for weight loading only."""

    def __init__(self, cfg: ClipConfig, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs,
                 scan_breaks=None):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.config = cfg
        self.embeddings = ClipEmbeddings(cfg, **kw)
        self.pre_layrnorm = layer_norm(cfg.hidden_size, eps=cfg.layer_norm_eps, **kw)  # HF's spelling
        self.encoder = ClipEncoder(cfg, scan_breaks=scan_breaks, **kw)
        self.post_layernorm = layer_norm(cfg.hidden_size, eps=cfg.layer_norm_eps, **kw)

    def features_llava15(self, pixels_bhwc, select_layer: int = -2, keep_cls: bool = False):
        """LLaVA-1.5: HF `hidden_states[select_layer]` without the CLS token, [b, n, d]
        (with it first, [b, 1 + n, d], if `keep_cls`). Only the layers that feed the selected
        hidden state are run."""
        x = self.pre_layrnorm(self.embeddings.with_class_token(pixels_bhwc))
        x = self.encoder(x, layers_run(self.config, select_layer))
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
        return self.encoder(x, self.encoder.num_layers, layer_hook)
