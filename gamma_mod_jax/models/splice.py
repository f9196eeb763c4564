"""Static-shape splicing of image features into a right-padded text batch.

A text batch [b, t] with at most one image placeholder per example becomes a
sequence of length t - 1 + n_image_tokens for every example, whether the image sits
at the start, in the middle, or is absent (text-only examples are right-padded
further). This module only computes where each position comes from.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from gamma_mod_jax import token_types as tt
from gamma_mod_jax.token_types import IGNORE_INDEX



@struct.dataclass
class SpliceLayout:
    """Where every position of the spliced sequence comes from. All [b, L] with
    L = t - 1 + n_image_tokens."""
    text_index: jax.Array   # index into the text sequence (meaningless where is_image)
    image_index: jax.Array  # index into the image tokens (meaningless where not is_image)
    is_image: jax.Array     # bool
    valid: jax.Array        # bool: a real token (image or unpadded text)


def splice_layout(input_ids_bt, attention_mask_bt, image_token_index: int, num_image_tokens: int) -> SpliceLayout:
    """Computes the static-shape splice of `num_image_tokens` features at each example's
    first `image_token_index` placeholder (examples without one stay text-only)."""
    b, t = input_ids_bt.shape
    n = num_image_tokens
    length = t - 1 + n
    is_placeholder = input_ids_bt == image_token_index
    has_image = jnp.any(is_placeholder, axis=1)[:, None]                       # [b, 1]
    pos = jnp.argmax(is_placeholder, axis=1).astype(jnp.int32)[:, None]        # [b, 1]
    j = jnp.arange(length, dtype=jnp.int32)[None, :]                            # [1, L]
    in_image = has_image & (j >= pos) & (j < pos + n)
    after_image = has_image & (j >= pos + n)
    text_index = jnp.where(after_image, j - n + 1, j)
    in_text_range = text_index < t
    text_index = jnp.clip(text_index, 0, t - 1)
    text_valid = jnp.take_along_axis(attention_mask_bt.astype(bool), text_index, axis=1) & in_text_range
    valid = jnp.where(in_image, True, text_valid)
    return SpliceLayout(text_index=text_index, image_index=jnp.clip(j - pos, 0, n - 1),
                        is_image=in_image, valid=valid)


def default_text_types(input_ids_bt, attention_mask_bt, image_token_index: int):
    """Token types when the data pipeline gives none: text before the image is SYSTEM,
    after it (or all text of a text-only example) QUESTION, padding PADDING."""
    is_placeholder = input_ids_bt == image_token_index
    seen_image = jnp.cumsum(is_placeholder, axis=1) > 0
    has_image = jnp.any(is_placeholder, axis=1, keepdims=True)
    types = jnp.where(has_image & ~seen_image, tt.SYSTEM, tt.QUESTION)
    return jnp.where(attention_mask_bt.astype(bool), types, tt.PADDING).astype(jnp.int32)
