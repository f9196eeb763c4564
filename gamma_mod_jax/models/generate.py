"""Greedy generation with fixed-size KV caches, jitted once per shape bucket.

Any model with `prefill(batch, max_new_tokens) -> (last_logits [b, vocab], caches, aux)` and
`decode_step(tokens [b, 1], caches) -> (logits [b, 1, vocab], caches)` can be
generated from. Prompts are right-padded; every example continues from its own
length, so a batch may mix prompt lengths.
"""

from __future__ import annotations

import functools
import time
from typing import Iterator, Mapping

import jax
import jax.numpy as jnp
from flax import nnx


def _check_batch(model, batch):
    """The model's host-side input checks (ids against its vocabulary and image
    placeholder), run before tracing; models without any pass."""
    check = getattr(model, "check_batch", None)
    if check is not None:
        check(batch)


def greedy_loop(decode_step, first_logits_bv, caches, *, max_new_tokens: int, eos_id: int, pad_id: int):
    """Greedy decoding from the prefill logits. Returns tokens [b, max_new_tokens]:
    generation stops per example after `eos_id` (which is kept), then `pad_id` follows."""
    b = first_logits_bv.shape[0]
    tok = jnp.argmax(first_logits_bv, axis=-1).astype(jnp.int32)
    out = jnp.full((b, max_new_tokens), pad_id, jnp.int32).at[:, 0].set(tok)
    done = tok == eos_id

    def cond(carry):
        i, _, _, done, _ = carry
        return (i < max_new_tokens) & ~jnp.all(done)

    def body(carry):
        i, tok, caches, done, out = carry
        logits, caches = decode_step(tok[:, None], caches)
        nxt = jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32)
        nxt = jnp.where(done, pad_id, nxt)
        out = out.at[:, i].set(nxt)
        return i + 1, nxt, caches, done | (nxt == eos_id), out

    *_, out = jax.lax.while_loop(cond, body, (jnp.int32(1), tok, caches, done, out))
    return out


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "eos_id", "pad_id"))
def _generate(graphdef, state, batch, *, max_new_tokens, eos_id, pad_id):
    model = nnx.merge(graphdef, state)
    first_logits, caches, _ = model.prefill(batch, max_new_tokens)
    return greedy_loop(model.decode_step, first_logits, caches, max_new_tokens=max_new_tokens,
                       eos_id=eos_id, pad_id=pad_id)


def generate(model: nnx.Module, batch: Mapping[str, jax.Array], *, max_new_tokens: int, eos_id: int,
             pad_id: int = 0) -> jax.Array:
    """Greedy generation: new tokens [b, max_new_tokens] (padded with `pad_id` after EOS).

    Compiles once per (batch shapes, max_new_tokens) bucket; pad prompts to a fixed
    set of lengths to bound recompilation.
    """
    _check_batch(model, batch)
    graphdef, state = nnx.split(model)
    return _generate(graphdef, state, dict(batch), max_new_tokens=max_new_tokens, eos_id=eos_id, pad_id=pad_id)


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens"))
def _prefill(graphdef, state, batch, *, max_new_tokens):
    return nnx.merge(graphdef, state).prefill(batch, max_new_tokens)


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "eos_id", "pad_id"))
def _decode(graphdef, state, first_logits, caches, *, max_new_tokens, eos_id, pad_id):
    return greedy_loop(nnx.merge(graphdef, state).decode_step, first_logits, caches, max_new_tokens=max_new_tokens,
                       eos_id=eos_id, pad_id=pad_id)


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _decode_step(graphdef, state, token_b, caches):
    logits, caches = nnx.merge(graphdef, state).decode_step(token_b[:, None], caches)
    return jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32), caches


def generate_timed(model: nnx.Module, batch: Mapping[str, jax.Array], *, max_new_tokens: int, eos_id: int,
                   pad_id: int = 0):
    """`generate` with prefill and decoding compiled and timed apart: (tokens [b, n],
    {"prefill_s", "decode_s"} of this call, the prefill's mod_aux). Same tokens as `generate`."""
    _check_batch(model, batch)
    graphdef, state = nnx.split(model)
    start = time.perf_counter()
    first_logits, caches, aux = jax.block_until_ready(
        _prefill(graphdef, state, dict(batch), max_new_tokens=max_new_tokens))
    middle = time.perf_counter()
    tokens = jax.block_until_ready(_decode(graphdef, state, first_logits, caches, max_new_tokens=max_new_tokens,
                                           eos_id=eos_id, pad_id=pad_id))
    return tokens, {"prefill_s": middle - start, "decode_s": time.perf_counter() - middle}, aux


def stream_greedy(model: nnx.Module, batch: Mapping[str, jax.Array], *, max_new_tokens: int, eos_id: int) -> Iterator:
    """Greedy generation for one prompt (batch of 1), yielding each new token id as soon as it
    is chosen (EOS included, then stops): the tokens `generate` gives, one at a time."""
    _check_batch(model, batch)
    graphdef, state = nnx.split(model)
    first_logits, caches, _ = _prefill(graphdef, state, dict(batch), max_new_tokens=max_new_tokens)
    token = jnp.argmax(first_logits, axis=-1).astype(jnp.int32)
    for i in range(max_new_tokens):
        yield int(token[0])
        if int(token[0]) == eos_id or i == max_new_tokens - 1:
            return
        token, caches = _decode_step(graphdef, state, token, caches)
