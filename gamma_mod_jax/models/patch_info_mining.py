"""Mini-Gemini's patch info mining: every low-resolution CLIP token attends to the window
of high-resolution ConvNeXt features under its patch, and the result is added to it.

PyTorch keys: `vlm_uni_query_projector` (LayerNorm + Linear on the CLIP tokens),
`vlm_uni_aux_projector` / `vlm_uni_val_projector` (LayerNorm + Linear on the window
features, keys and values); each is an `nnx.List` of the two so indices match.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from gamma_mod_jax.models.layers import layer_norm, linear


def windows(features_bhwc, grid: int):
    """[b, H, W, c] -> [b, grid*grid, (H/grid)*(W/grid), c]: the row-major grid of windows,
    each window's pixels row-major (one window per CLIP patch)."""
    b, h, w, c = features_bhwc.shape
    wh, ww = h // grid, w // grid
    x = features_bhwc.reshape(b, grid, wh, grid, ww, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, grid * grid, wh * ww, c)


def _norm_linear(in_features: int, out_features: int, *, eps: float, dtype, param_dtype, rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    return nnx.List([layer_norm(in_features, eps=eps, **kw), linear(in_features, out_features, use_bias=True, **kw)])


class PatchInfoMining(nnx.Module):
    """out = x + softmax(q k^T / sqrt(d)) v per CLIP token: q from the token [b, n, d], keys
    and values from its window of aux features; the residual is the raw token."""

    def __init__(self, dim: int, aux_dim: int, *, eps: float = 1e-5, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(eps=eps, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.query_projector = _norm_linear(dim, dim, **kw)
        self.aux_projector = _norm_linear(aux_dim, dim, **kw)
        self.val_projector = _norm_linear(aux_dim, dim, **kw)

    def __call__(self, x_bnd, aux_bhwc):
        """x [b, n, d] on a row-major sqrt(n) x sqrt(n) grid; aux [b, H, W, c] with H, W
        multiples of sqrt(n) -> [b, n, d]."""
        grid = int(round(x_bnd.shape[1] ** 0.5))
        a = windows(aux_bhwc.astype(x_bnd.dtype), grid)                   # [b, n, w, c]
        apply = lambda pair, t: pair[1](pair[0](t))
        q = apply(self.query_projector, x_bnd)                           # [b, n, d]
        k = apply(self.aux_projector, a)                                 # [b, n, w, d]
        v = apply(self.val_projector, a)
        scores = jnp.einsum("bnd,bnwd->bnw", q, k / jnp.asarray(k.shape[-1] ** 0.5, k.dtype))
        # The official nan_to_num: +-inf (fp16 overflow) become the dtype's largest values.
        weights = jax.nn.softmax(jnp.nan_to_num(scores), axis=-1)
        return x_bnd + jnp.einsum("bnw,bnwd->bnd", weights, v)
