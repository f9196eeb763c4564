"""Small building blocks shared by the language and vision models.

Naming convention (it is what makes checkpoint import mechanical, see
`gamma_mod_jax/convert/keymap.py`): every module mirrors the PyTorch module tree
of the original code attribute by attribute, and leaves use Flax names:
`kernel` (Linear [in, out], Conv HWIO), `bias`, `scale` (norm weight),
`embedding` (Embedding weight). Any other parameter keeps its PyTorch name.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx


def gelu_exact(x):
    """PyTorch's default nn.GELU / F.gelu (erf form)."""
    return jax.nn.gelu(x, approximate=False)


def quick_gelu(x):
    """CLIP's activation: x * sigmoid(1.702 x)."""
    return x * jax.nn.sigmoid(1.702 * x)


def linear(in_features: int, out_features: int, *, use_bias: bool, dtype, param_dtype, rngs: nnx.Rngs) -> nnx.Linear:
    """A Linear with PyTorch's default init scale (uniform +-1/sqrt(in)), our dtypes."""
    bound = 1.0 / math.sqrt(in_features)
    init = nnx.initializers.uniform(scale=2 * bound)
    shifted = lambda key, shape, dt=jnp.float32: init(key, shape, dt) - jnp.asarray(bound, dt)
    return nnx.Linear(in_features, out_features, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype,
                      kernel_init=shifted, bias_init=shifted, rngs=rngs)


def layer_norm(features: int, *, eps: float, dtype, param_dtype, rngs: nnx.Rngs) -> nnx.LayerNorm:
    """LayerNorm over the last axis with scale and bias (PyTorch nn.LayerNorm)."""
    return nnx.LayerNorm(features, epsilon=eps, dtype=dtype, param_dtype=param_dtype, rngs=rngs)


class RMSNorm(nnx.Module):
    """LLaMA RMSNorm, computed in float32 and cast back like HF `LlamaRMSNorm`."""

    def __init__(self, features: int, *, eps: float, dtype, param_dtype):
        self.scale = nnx.Param(jnp.ones((features,), param_dtype))
        self.eps = eps
        self.dtype = dtype

    def __call__(self, x):
        x32 = x.astype(jnp.float32)
        variance = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
        normed = (x32 * jax.lax.rsqrt(variance + self.eps)).astype(self.dtype)
        return self.scale[...].astype(self.dtype) * normed


_ATTENTION_IMPLEMENTATION = contextvars.ContextVar("attention_implementation", default=None)


@contextlib.contextmanager
def attention_implementation(name: Optional[str]):
    """`jax.nn.dot_product_attention`'s backend for attention *traced* inside the block:
    None (XLA, the default), "xla" or "cudnn" (cuDNN's fused attention, NVIDIA GPUs, bf16 /
    fp16). A trace-time setting: jit a function inside the block (a cached trace keeps
    the backend it was traced with)."""
    if name not in (None, "xla", "cudnn"):
        raise ValueError(f"attention implementation must be None, 'xla' or 'cudnn', got {name!r}")
    token = _ATTENTION_IMPLEMENTATION.set(name)
    try:
        yield
    finally:
        _ATTENTION_IMPLEMENTATION.reset(token)


def dot_product_attention(q_bshd, k_bthd, v_bthd, mask_bqk: Optional[jax.Array] = None, *,
                          is_causal: bool = False, return_probs: bool = False):
    """Softmax attention with grouped-query support and a boolean mask.

    q: [batch, q_len, heads, head_dim]; k, v: [batch, kv_len, kv_heads, head_dim]
    with heads a multiple of kv_heads. mask: broadcastable to [batch, q_len, kv_len]
    (True = may attend), or None; is_causal adds the causal (lower-triangular) mask.
    Scores and softmax run in float32. Returns [batch, q_len, heads, head_dim].

    Without return_probs this is `jax.nn.dot_product_attention` (XLA, or cuDNN where it
    applies); a query with no visible key then gets some average of the values (only
    padding rows, whose outputs nothing reads). return_probs=True takes the explicit
    path and also returns the [batch, heads, q_len, kv_len] probabilities (ARank), with
    zeros on fully masked rows.
    """
    b, s, h, d = q_bshd.shape
    t = k_bthd.shape[1]
    if not return_probs:
        mask = None if mask_bqk is None else jnp.broadcast_to(mask_bqk, (b, s, t))[:, None]
        return jax.nn.dot_product_attention(q_bshd, k_bthd, v_bthd, mask=mask, is_causal=is_causal,
                                            implementation=_ATTENTION_IMPLEMENTATION.get())
    if is_causal:
        causal = jnp.tril(jnp.ones((s, t), bool))[None]
        mask_bqk = causal if mask_bqk is None else mask_bqk & causal
    out, probs = _grouped_attention(q_bshd, k_bthd, v_bthd, mask_bqk, keys="btkd", zero_masked_rows=True)
    return out, probs.reshape(b, h, s, -1)


def _grouped_attention(q_bshd, k, v, mask_bqk, *, keys: str, zero_masked_rows: bool):
    """Explicit grouped-query softmax attention, scores and softmax in float32: (out [b, s,
    heads, d], probs [b, kv_heads, groups, s, t]). `keys`: the einsum layout of k and v,
    "btkd" (token-major) or "bktd" (heads-major, a KV cache). zero_masked_rows: a query with
    no visible key (a fully masked padding row) gets zero probabilities, not uniform ones."""
    b, s, h, d = q_bshd.shape
    kv_heads, t = k.shape[keys.index("k")], k.shape[keys.index("t")]
    q = q_bshd.reshape(b, s, kv_heads, h // kv_heads, d)
    scores = jnp.einsum(f"bskgd,{keys}->bkgst", q, k, preferred_element_type=jnp.float32) * (1.0 / math.sqrt(d))
    mask = None if mask_bqk is None else jnp.broadcast_to(mask_bqk, (b, s, t))[:, None, None]
    if mask is not None:
        scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1)
    if mask is not None and zero_masked_rows:
        probs = jnp.where(mask, probs, 0.0)
    out = jnp.einsum(f"bkgst,{keys}->bskgd", probs.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return out.reshape(b, s, h, d).astype(q_bshd.dtype), probs


def cached_attention(q_bshd, k_bktd, v_bktd, mask_bqk):
    """Attention of new queries [batch, q_len, heads, head_dim] over a heads-major KV cache
    (k, v: [batch, kv_heads, slots, head_dim], see `models/kv_cache.py`), mask broadcastable
    to [batch, q_len, slots]. Returns [batch, q_len, heads, head_dim].

    A decode step (q_len 1) reads the cache in place with a grouped einsum (scores and
    softmax in float32); `jax.nn.dot_product_attention` wants token-major keys, and
    transposing every layer's cache at every step cost more than the attention itself. A
    prompt (q_len > 1) transposes the cache once and takes `dot_product_attention`.
    """
    if q_bshd.shape[1] > 1:
        return dot_product_attention(q_bshd, jnp.swapaxes(k_bktd, 1, 2), jnp.swapaxes(v_bktd, 1, 2), mask_bqk)
    return _grouped_attention(q_bshd, k_bktd, v_bktd, mask_bqk, keys="bktd", zero_masked_rows=False)[0]
