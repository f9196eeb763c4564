"""ConvNeXt trunk (timm / LLaVA-HR key names), LLaVA-HR's slow high-resolution branch and
Mini-Gemini's auxiliary one.

Channels-last throughout ([b, h, w, c]); timm's LayerNorm2d over channels is the same
as a LayerNorm over the last axis here. LLaVA-HR uses the last stage's output, Mini-Gemini
(OpenCLIP's ConvNeXt trunk: the same stem and stages) every stage's; the classifier head
is never built.
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from gamma_mod_jax.models.config import ConvNextConfig
from gamma_mod_jax.models.layers import gelu_exact, layer_norm, linear
from gamma_mod_jax.models.scan import scan_stack, stack_layers


def conv(in_ch: int, out_ch: int, kernel: int, *, stride: int = 1, padding="VALID", groups: int = 1, dtype,
         param_dtype, rngs: nnx.Rngs) -> nnx.Conv:
    """A 2-D convolution with bias (PyTorch nn.Conv2d semantics, HWIO kernel)."""
    return nnx.Conv(in_ch, out_ch, kernel_size=(kernel, kernel), strides=(stride, stride), padding=padding,
                    feature_group_count=groups, use_bias=True, dtype=dtype, param_dtype=param_dtype, rngs=rngs)


class ConvNeXtMlp(nnx.Module):
    def __init__(self, dim: int, hidden: int, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(use_bias=True, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.fc1 = linear(dim, hidden, **kw)
        self.fc2 = linear(hidden, dim, **kw)

    def __call__(self, x):
        return self.fc2(gelu_exact(self.fc1(x)))


class ConvNeXtBlock(nnx.Module):
    """x + weight * MLP(LN(depthwise_conv7x7(x))); `weight` is the layer scale."""

    def __init__(self, dim: int, cfg: ConvNextConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.conv_dw = conv(dim, dim, 7, padding=((3, 3), (3, 3)), groups=dim, **kw)
        self.norm = layer_norm(dim, eps=cfg.layer_norm_eps, **kw)
        self.mlp = ConvNeXtMlp(dim, cfg.mlp_ratio * dim, **kw)
        self.weight = nnx.Param(jnp.full((dim,), 1e-6, param_dtype))  # timm's layer-scale init

    def __call__(self, x_bhwc):
        y = self.mlp(self.norm(self.conv_dw(x_bhwc)))
        return x_bhwc + y * self.weight[...].astype(y.dtype)


class ConvNeXtStage(nnx.Module):
    """Downsampling (stages 1-3), then the blocks: with scan_layers one stacked module run
    by lax.scan (models/scan.py)."""

    def __init__(self, stage: int, cfg: ConvNextConfig, *, dtype, param_dtype, rngs: nnx.Rngs,
                 scan_layers: bool = False):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        dim = cfg.dims[stage]
        # Stage 0 keeps the stem's resolution and width: no downsample parameters at all.
        self.downsample = nnx.List([] if stage == 0 else [
            layer_norm(cfg.dims[stage - 1], eps=cfg.layer_norm_eps, **kw),
            conv(cfg.dims[stage - 1], dim, 2, stride=2, **kw)])
        blocks = [ConvNeXtBlock(dim, cfg, **kw) for _ in range(cfg.depths[stage])]
        self.scan_layers = scan_layers
        if scan_layers:
            self.blocks_stacked = nnx.List([stack_layers(blocks)])
        else:
            self.blocks = nnx.List(blocks)

    def __call__(self, x):
        for module in self.downsample:
            x = module(x)
        if self.scan_layers:
            return scan_stack(self.blocks_stacked[0], lambda block, x, _: (block(x), None), x)[0]
        for block in self.blocks:
            x = block(x)
        return x


class ConvNeXt(nnx.Module):
    """`stem` (4x4 stride-4 conv, LayerNorm) and four `stages`: [b, H, W, 3] -> [b, H/32, W/32, dims[-1]]."""

    def __init__(self, cfg: ConvNextConfig, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs,
                 scan_layers: bool = False):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.stem = nnx.List([conv(cfg.num_channels, cfg.dims[0], 4, stride=4, **kw),
                              layer_norm(cfg.dims[0], eps=cfg.layer_norm_eps, **kw)])
        self.stages = nnx.List([ConvNeXtStage(s, cfg, scan_layers=scan_layers, **kw) for s in range(len(cfg.depths))])
        self.dtype = dtype

    def __call__(self, pixels_bhwc):
        return self.stage_features(pixels_bhwc)[-1]

    def stage_features(self, pixels_bhwc) -> list:
        """Every stage's output, [b, H/4, W/4, dims[0]] ... [b, H/32, W/32, dims[-1]]
        (Mini-Gemini uses all four)."""
        x = pixels_bhwc.astype(self.dtype)
        for module in self.stem:
            x = module(x)
        features = []
        for stage in self.stages:
            x = stage(x)
            features.append(x)
        return features
