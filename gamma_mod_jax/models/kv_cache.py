"""Fixed-size per-layer key/value caches for generation.

Every layer owns its cache, with its own per-example write offset (`length`) and
slot validity mask, so layers that see different tokens (γ-MoD layers keep only
some tokens) can share one static-shape generation loop.

Keys and values are stored heads-major, [batch, kv_heads, slots, head_dim]: a decode step
then reads them as they lie. In the token-major layout ([batch, slots, kv_heads,
head_dim], what `jax.nn.dot_product_attention` takes) XLA transposes the whole cache of
every layer at every step, which made attention with a 1400-token cache ~3.5x slower on
CPU (launch.benchmark's cpu config, batch 8).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct


@struct.dataclass
class LayerCache:
    """k, v: [batch, kv_heads, max_len, head_dim]; valid: [batch, max_len] (slot holds a
    real token); length: [batch] int32, where the next token is written."""
    k: jax.Array
    v: jax.Array
    valid: jax.Array
    length: jax.Array

    @classmethod
    def zeros(cls, batch: int, max_len: int, kv_heads: int, head_dim: int, dtype) -> "LayerCache":
        return cls(k=jnp.zeros((batch, kv_heads, max_len, head_dim), dtype),
                   v=jnp.zeros((batch, kv_heads, max_len, head_dim), dtype),
                   valid=jnp.zeros((batch, max_len), bool),
                   length=jnp.zeros((batch,), jnp.int32))

    @property
    def max_len(self) -> int:
        return self.k.shape[2]

    def write(self, k_new, v_new, new_valid_bs):
        """Writes a chunk of `s` tokens (k_new, v_new: [batch, s, kv_heads, head_dim]) at
        each example's offset.

        Returns (cache, mask_bqk): the updated cache and, for each new query, which
        cache slots it may attend to (valid slots at or before its own slot). The
        offset then advances by the number of valid new tokens, so right padding in
        the chunk is overwritten by the next write.
        """
        s = k_new.shape[1]
        def put(axis):
            return jax.vmap(lambda buf, new, start: jax.lax.dynamic_update_slice_in_dim(buf, new, start, axis=axis))
        heads_major = lambda x: jnp.swapaxes(x, 1, 2).astype(self.k.dtype)
        k = put(1)(self.k, heads_major(k_new), self.length)
        v = put(1)(self.v, heads_major(v_new), self.length)
        valid = put(0)(self.valid, new_valid_bs, self.length)
        slots = jnp.arange(self.max_len)
        query_slot = self.length[:, None] + jnp.arange(s)[None, :]  # [b, s]
        mask = valid[:, None, :] & (slots[None, None, :] <= query_slot[:, :, None])
        length = self.length + jnp.sum(new_valid_bs, axis=1, dtype=jnp.int32)
        return LayerCache(k=k, v=v, valid=valid, length=length), mask
