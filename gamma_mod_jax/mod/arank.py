"""ARank: the rank of a layer's attention maps, γ-MoD's redundancy measure.

Official definition: the post-softmax attention map of each head, multiplied by the
lower-triangular mask, with its diagonal set to zero, in float32, ranked with the
default tolerance max(m, n) * eps * sigma_max, then averaged over heads. We compute it
batched and jitted per layer while the forward pass runs, restricted to the valid
(non-padding) tokens of every example.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def matrix_rank(x_bmn, size=None):
    """Rank of each [m, n] matrix in a batch, as numpy/torch `matrix_rank` with the default
    tolerance (max(m, n) * eps * largest singular value) in x's dtype. `size` (broadcast
    against the batch) replaces max(m, n) for matrices zero-padded from a smaller one."""
    m, n = x_bmn.shape[-2:]
    sigma = jnp.linalg.svd(x_bmn, compute_uv=False)
    eps = jnp.finfo(x_bmn.dtype).eps
    size = max(m, n) if size is None else jnp.asarray(size, x_bmn.dtype)[..., None]
    tol = sigma[..., :1] * size * eps
    return jnp.sum(sigma > tol, axis=-1)


def attention_map_ranks(probs_bhqk, token_valid_bk):
    """ARank per example and head [b, h] of post-softmax attention maps.

    Each example's map is cut to its valid tokens: padded rows and columns are zeroed
    (singular values unchanged) and the tolerance uses the valid length, so the result
    equals the rank of the unpadded map.
    """
    s = probs_bhqk.shape[-1]
    strictly_lower = jnp.tril(jnp.ones((s, s), bool), k=-1)
    valid = token_valid_bk[:, None, :, None] & token_valid_bk[:, None, None, :]
    maps = jnp.where(strictly_lower[None, None] & valid, probs_bhqk, 0.0).astype(jnp.float32)
    n_valid = jnp.sum(token_valid_bk, axis=-1)[:, None]  # [b, 1], broadcast over heads
    return matrix_rank(maps, size=n_valid)
