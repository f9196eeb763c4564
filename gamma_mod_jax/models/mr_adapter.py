"""LLaVA-HR's mixture-of-resolution pieces: the MR-Adapter inserted inside the CLIP
tower (`align_stages_latent.{k}`) and the final fast/slow fusion (`align_stages.0`)."""

from __future__ import annotations

import math

import jax.numpy as jnp
from flax import nnx

from gamma_mod_jax.models.convnext import conv
from gamma_mod_jax.models.layers import gelu_exact, linear
from gamma_mod_jax.models.resample import resize_bilinear_align_corners


def align_slow_tokens(slow_bhwc, num_tokens: int):
    """Slow-branch map [b, h, w, c] -> tokens [b, num_tokens, c] in row-major order:
    upsampled (bilinear, align_corners=True) when smaller, average-pooled when larger."""
    b, h, w, c = slow_bhwc.shape
    side = math.isqrt(num_tokens)
    if h * w < num_tokens:
        slow_bhwc = resize_bilinear_align_corners(slow_bhwc, side, side)
    elif h * w > num_tokens:
        k = h // side
        slow_bhwc = slow_bhwc.reshape(b, side, k, side, k, c).mean(axis=(2, 4))
    return slow_bhwc.reshape(b, -1, c)


class _Unused(nnx.Module):
    """A parameter-free slot (the GELU at index 1 of PyTorch's `gate` Sequential)."""


class MRAdapter(nnx.Module):
    """Injects slow (ConvNeXt) features into the fast (CLIP) tokens with a tanh gate.
    The 1x1 projections start at zero, so a fresh adapter is the identity."""

    def __init__(self, fast_dim: int, slow_dim: int, gate_hidden: int, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.slow_conv = conv(slow_dim, slow_dim, 1, **kw)
        self.slow_proj = conv(slow_dim, fast_dim, 1, **kw)
        self.fast_conv = conv(fast_dim, fast_dim, 7, padding=((3, 3), (3, 3)), groups=fast_dim, **kw)
        self.fast_proj = conv(fast_dim, fast_dim, 1, **kw)
        for zeroed in (self.slow_proj, self.fast_proj):
            zeroed.kernel.set_value(jnp.zeros_like(zeroed.kernel.get_value()))
            zeroed.bias.set_value(jnp.zeros_like(zeroed.bias.get_value()))
        self.gate = nnx.List([linear(2 * fast_dim, gate_hidden, use_bias=True, **kw), _Unused(),
                              linear(gate_hidden, 1, use_bias=True, **kw)])

    def __call__(self, fast_btd, slow_bhwc):
        b, n, d = fast_btd.shape
        side = math.isqrt(n)
        slow = self.slow_proj(gelu_exact(self.slow_conv(slow_bhwc)))
        slow = align_slow_tokens(slow, n)                                     # [b, n, d]
        fast = fast_btd.reshape(b, side, side, d)
        fast = fast + self.fast_proj(gelu_exact(self.fast_conv(fast)))
        fast = fast.reshape(b, n, d)
        pooled = jnp.mean(jnp.concatenate([fast, slow], axis=-1), axis=1)     # [b, 2d]
        gate = self.gate[2](gelu_exact(self.gate[0](pooled)))[:, None, :]     # [b, 1, 1]
        return fast + slow * jnp.tanh(gate)


class HRFusion(nnx.Module):
    """fast_proj(fast tokens) + slow_proj(slow tokens): LLaVA-HR's final image features."""

    def __init__(self, fast_dim: int, slow_dim: int, out_dim: int, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(use_bias=True, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.fast_proj = linear(fast_dim, out_dim, **kw)
        self.slow_proj = linear(slow_dim, out_dim, **kw)

    def __call__(self, fast_btd, slow_bhwc):
        return self.fast_proj(fast_btd) + self.slow_proj(align_slow_tokens(slow_bhwc, fast_btd.shape[1]))
