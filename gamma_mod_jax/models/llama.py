"""LLaMA / Vicuna decoder in Flax NNX, matching HF `LlamaForCausalLM`.

Attribute names mirror HF (`embed_tokens`, `layers[i].self_attn.q_proj`, ...) so
checkpoints import mechanically. RoPE uses HF's rotate_half layout, so HF q/k
weights load without permutation.
"""

from __future__ import annotations

import functools
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from gamma_mod_jax.mod.config import MoDConfig, check_layer_indices
from gamma_mod_jax.mod.layer import mod_layer_capacity, mod_layer_threshold
from gamma_mod_jax.mod.routing import threshold_bucket_sizes
from gamma_mod_jax.models.config import LlamaConfig
from gamma_mod_jax.models.kv_cache import LayerCache
from gamma_mod_jax.models.layers import RMSNorm, cached_attention, dot_product_attention, linear
from gamma_mod_jax.models.scan import layer_runs, scan_stack, stack_layers, unstack
from gamma_mod_jax.parallel.activations import constrain

# Logical names of activations (sharding constraints, parallel/activations.py): the
# residual stream [batch, length, embed], q [b, s, heads, head_dim], k and v.
ACTIVATION = ("batch", "length", "embed")
HEADS = ("batch", "length", "heads", None)
KV_HEADS = ("batch", "length", "kv_heads", None)


def rope_cos_sin(positions_bs, head_dim: int, theta: float):
    """cos, sin [batch, seq, head_dim] for integer positions (HF default RoPE)."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    freqs = positions_bs.astype(jnp.float32)[..., None] * inv_freq  # [b, s, d/2]
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x_bshd, cos_bsd, sin_bsd):
    """Rotates q or k with HF's rotate_half convention (first half / second half pairs)."""
    half = x_bshd.shape[-1] // 2
    rotated = jnp.concatenate([-x_bshd[..., half:], x_bshd[..., :half]], axis=-1)
    cos = cos_bsd[:, :, None, :]
    sin = sin_bsd[:, :, None, :]
    # Computed in float32 like HF's fp32 cos/sin, then cast back.
    out = x_bshd.astype(jnp.float32) * cos + rotated.astype(jnp.float32) * sin
    return out.astype(x_bshd.dtype)


def last_valid_rows(x_bsd, token_valid_bs):
    """Rows (logits or hidden states) at each example's last real token of a right-padded
    batch: [b, s, d] -> [b, d]."""
    last = jnp.maximum(jnp.sum(token_valid_bs, axis=1).astype(jnp.int32) - 1, 0)
    return jnp.take_along_axis(x_bsd, last[:, None, None], axis=1)[:, 0]


class LlamaAttention(nnx.Module):
    def __init__(self, cfg: LlamaConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        d, h, kvh, hd = cfg.hidden_size, cfg.num_attention_heads, cfg.kv_heads, cfg.dim_per_head
        kw = dict(use_bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.q_proj = linear(d, h * hd, **kw)
        self.k_proj = linear(d, kvh * hd, **kw)
        self.v_proj = linear(d, kvh * hd, **kw)
        self.o_proj = linear(h * hd, d, **kw)
        self.num_heads, self.kv_heads, self.head_dim, self.theta = h, kvh, hd, cfg.rope_theta

    def __call__(self, x_bsd, positions_bs, mask_bqk, cache: Optional[LayerCache] = None,
                 token_valid_bs=None, return_probs: bool = False):
        """Self-attention. Without a cache it is causal and `mask_bqk` (broadcastable to
        [b, s, s], e.g. the valid keys [b, 1, s]) restricts it further; with a cache the
        new keys are written first and the mask comes from the cache."""
        b, s, _ = x_bsd.shape
        q = constrain(self.q_proj(x_bsd).reshape(b, s, self.num_heads, self.head_dim), HEADS)
        k = constrain(self.k_proj(x_bsd).reshape(b, s, self.kv_heads, self.head_dim), KV_HEADS)
        v = constrain(self.v_proj(x_bsd).reshape(b, s, self.kv_heads, self.head_dim), KV_HEADS)
        cos, sin = rope_cos_sin(positions_bs, self.head_dim, self.theta)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is None:
            result = dot_product_attention(q, k, v, mask_bqk, is_causal=True, return_probs=return_probs)
            out, probs = result if return_probs else (result, None)
        else:
            if return_probs:
                raise ValueError("attention maps are probed on passes without a KV cache")
            cache, cache_mask = cache.write(k, v, token_valid_bs)
            # Prefill from an empty cache: the in-sequence mask equals the cache mask; the
            # cache mask is used in both cases so decode and prefill share one path.
            out, probs = cached_attention(q, cache.k.astype(q.dtype), cache.v.astype(q.dtype), cache_mask), None
        out = self.o_proj(out.reshape(b, s, self.num_heads * self.head_dim))
        return out, cache, probs


class LlamaMLP(nnx.Module):
    def __init__(self, cfg: LlamaConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(use_bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.gate_proj = linear(cfg.hidden_size, cfg.intermediate_size, **kw)
        self.up_proj = linear(cfg.hidden_size, cfg.intermediate_size, **kw)
        self.down_proj = linear(cfg.intermediate_size, cfg.hidden_size, **kw)

    def __call__(self, x):
        hidden = jax.nn.silu(self.gate_proj(x)) * self.up_proj(x)
        return self.down_proj(constrain(hidden, ("batch", "length", "mlp")))


class LlamaDecoderLayer(nnx.Module):
    """Pre-norm block: h = x + Attn(LN1(x)); out = h + MLP(LN2(h))."""

    def __init__(self, cfg: LlamaConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype)
        self.input_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, **kw)
        self.self_attn = LlamaAttention(cfg, rngs=rngs, **kw)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, **kw)
        self.mlp = LlamaMLP(cfg, rngs=rngs, **kw)

    def attention_branch(self, x_bsd, positions_bs, mask_bqk, cache=None, token_valid_bs=None,
                         return_probs=False):
        """x + Attn(LN1(x)), returned with the updated cache and attention probabilities."""
        attn, cache, probs = self.self_attn(self.input_layernorm(x_bsd), positions_bs, mask_bqk, cache,
                                            token_valid_bs, return_probs)
        return x_bsd + attn, cache, probs

    def mlp_branch(self, h_bsd):
        """MLP(LN2(h)), without the residual (γ-MoD scales this branch by the router weight)."""
        return self.mlp(self.post_attention_layernorm(h_bsd))

    def __call__(self, x_bsd, positions_bs, mask_bqk, cache=None, token_valid_bs=None, return_probs=False):
        h, cache, probs = self.attention_branch(x_bsd, positions_bs, mask_bqk, cache, token_valid_bs, return_probs)
        out = h + self.mlp_branch(h)
        return (out, cache, probs) if return_probs else (out, cache)


# "full": save nothing inside a layer; "dots": keep matmul outputs without batch dims.
REMAT_POLICIES = {"none": None, "full": None, "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable}


def make_router(hidden_size: int, mod: MoDConfig, *, param_dtype=jnp.float32, rngs: nnx.Rngs) -> nnx.Linear:
    """The shared γ-MoD router [hidden, 2], no bias, computed in float32, initialised as
    `mod.router_init` says (also used alone when a dense checkpoint is converted)."""
    router = linear(hidden_size, 2, use_bias=False, dtype=jnp.float32, param_dtype=param_dtype, rngs=rngs)
    if mod.router_init == "xavier_uniform":
        router.kernel.set_value(nnx.initializers.xavier_uniform()(
            rngs.params(), router.kernel.get_value().shape, param_dtype))
    return router


class Llama(nnx.Module):
    """Decoder-only LM: `embed_tokens`, `layers`, `norm`, untied `lm_head`; with a MoD
    config, the layers it names become γ-MoD layers sharing one `router` [hidden, 2].
    scan_layers: `layers_stacked` instead of `layers`, one stacked module per run of
    consecutive dense or γ-MoD layers (`runs`), each run one lax.scan (models/scan.py);
    caches are then stacked per run too (`init_caches`)."""

    def __init__(self, cfg: LlamaConfig, *, mod: Optional[MoDConfig] = None, dtype=jnp.float32,
                 param_dtype=jnp.float32, scan_layers: bool = False, rngs: nnx.Rngs):
        self.config = cfg
        self.mod = mod if mod is not None and mod.enabled else None
        self.dtype = dtype
        # Activation rematerialisation in training passes: a REMAT_POLICIES key, set by
        # the trainer (a training choice, not part of the model config).
        self.remat = "none"
        if self.mod is not None:
            check_layer_indices(self.mod.layers, cfg.num_hidden_layers, source="MoD layers", selection=True)
        self.embed_tokens = nnx.Embed(cfg.vocab_size, cfg.hidden_size, dtype=dtype, param_dtype=param_dtype,
                                      embedding_init=nnx.initializers.normal(0.02), rngs=rngs)
        layers = [LlamaDecoderLayer(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
                  for _ in range(cfg.num_hidden_layers)]
        # scan_layers: each run of consecutive dense or γ-MoD layers is one stacked module
        # run by lax.scan (models/scan.py); `runs` holds (first layer, count, is_mod).
        self.scan_layers = scan_layers
        if scan_layers:
            self.runs = layer_runs([i in self.mod_layers for i in range(cfg.num_hidden_layers)])
            self.layers_stacked = nnx.List([stack_layers(layers[start:start + count])
                                            for start, count, _ in self.runs])
        else:
            self.layers = nnx.List(layers)
        self.norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, dtype=dtype, param_dtype=param_dtype)
        self.lm_head = linear(cfg.hidden_size, cfg.vocab_size, use_bias=False, dtype=dtype,
                              param_dtype=param_dtype, rngs=rngs)
        if self.mod is not None:
            self.router = make_router(cfg.hidden_size, self.mod, param_dtype=param_dtype, rngs=rngs)

    @property
    def mod_layers(self) -> tuple:
        return () if self.mod is None else tuple(sorted(self.mod.layers))

    def embed(self, input_ids_bs):
        return self.embed_tokens(input_ids_bs).astype(self.dtype)

    def cache_lengths(self, prompt_len: int, max_new_tokens: int = 0, routing: Optional[str] = None) -> list:
        """Cache slots per layer for a prompt of `prompt_len` tokens and `max_new_tokens`
        generated ones. Dense layers (and every layer when routing is None) hold all of
        them. A MoD layer holds what its prefill may write plus the new tokens: under
        capacity routing its static capacity (prompt_len - skipped); under threshold
        routing its largest bucket, which is the whole prompt (any token may pass p > 0.005)."""
        full = prompt_len + max_new_tokens
        if routing is None or self.mod is None:
            return [full] * self.config.num_hidden_layers
        if routing == "capacity":
            kept = prompt_len - self.mod.num_skipped(prompt_len, 0)
        else:
            kept = threshold_bucket_sizes(prompt_len, self.mod)[-1]
        return [kept + max_new_tokens if i in self.mod_layers else full for i in range(self.config.num_hidden_layers)]

    def init_caches(self, batch: int, prompt_len: int, max_new_tokens: int = 0, routing: Optional[str] = None) -> list:
        """Empty fixed-size caches sized as `cache_lengths` says (full size, prompt_len +
        max_new_tokens slots, for every layer when routing is None): one per layer, or with
        scan_layers one per run of layers, stacked (a leading [count] axis on every field)."""
        c = self.config
        lengths = self.cache_lengths(prompt_len, max_new_tokens, routing)
        zeros = lambda n: LayerCache.zeros(batch, n, c.kv_heads, c.dim_per_head, self.dtype)
        if not self.scan_layers:
            return [zeros(n) for n in lengths]
        return [jax.tree.map(lambda a, count=count: jnp.zeros((count,) + a.shape, a.dtype), zeros(lengths[start]))
                for start, count, _ in self.runs]

    def decode_layers(self, x_bsd, positions_bs, token_valid_bs, caches: Optional[Sequence[LayerCache]] = None,
                      token_types_bs=None, routing: str = "capacity", attention_probe=None):
        """Runs all decoder layers and the final norm.

        routing: 'capacity' (top-k, training) or 'threshold' (the official inference rule;
        a single decode token uses the decode threshold). attention_probe: optional
        `f(probs [b, heads, s, s], token_valid [b, s]) -> value`, applied to each dense
        layer's attention probabilities as the pass goes (ARank reduces them at once, so
        no layer's maps outlive it). caches: as `init_caches` makes them. Returns (hidden,
        new caches or None, aux) where aux stacks per-MoD-layer statistics and, with a
        probe, holds its values (one per dense layer) under "attention_probe" ({} for a
        plain dense pass).
        """
        # Causal attention (added by the attention itself) over the valid keys.
        mask = token_valid_bs[:, None, :] if caches is None else None
        remat = self.remat != "none" and caches is None and attention_probe is None
        step = functools.partial(self._layer_step, positions_bs=positions_bs, mask=mask,
                                 token_valid_bs=token_valid_bs, token_types_bs=token_types_bs, routing=routing,
                                 attention_probe=attention_probe)
        if self.scan_layers:
            x_bsd, new_caches, mod_aux, probed = self._scan_runs(step, x_bsd, caches, remat, routing)
        else:
            new_caches, mod_aux, probed = [], [], []
            for i, layer in enumerate(self.layers):
                cache = None if caches is None else caches[i]
                if remat:  # training: recompute each layer's activations in the backward pass
                    x_bsd, layer_aux = self._remat_layer(i, layer, x_bsd, positions_bs, mask, token_valid_bs,
                                                         token_types_bs, routing)
                    probe = None
                else:
                    x_bsd, cache, layer_aux, probe = step(i in self.mod_layers, layer, x_bsd, cache)
                if layer_aux is not None:
                    mod_aux.append(layer_aux)
                if probe is not None:
                    probed.append(probe)
                new_caches.append(cache)
            mod_aux = jax.tree.map(lambda *xs: jnp.stack(xs), *mod_aux) if mod_aux else {}
        aux = mod_aux
        if attention_probe is not None:
            aux = {**aux, "attention_probe": probed}
        return self.norm(x_bsd), (None if caches is None else new_caches), aux

    def _layer_step(self, is_mod, layer, x_bsd, cache, *, positions_bs, mask, token_valid_bs, token_types_bs,
                    routing, attention_probe):
        """One decoder layer: (x, cache, MoD statistics or None, probe value or None)."""
        x_bsd = constrain(x_bsd, ACTIVATION)
        if is_mod:
            x_bsd, cache, aux = self._mod_layer(layer, x_bsd, positions_bs, token_valid_bs, token_types_bs, cache,
                                                routing)
            return constrain(x_bsd, ACTIVATION), cache, aux, None
        if attention_probe is not None:
            x_bsd, cache, probs = layer(x_bsd, positions_bs, mask, cache, token_valid_bs, return_probs=True)
            return constrain(x_bsd, ACTIVATION), cache, None, attention_probe(probs, token_valid_bs)
        x_bsd, cache = layer(x_bsd, positions_bs, mask, cache, token_valid_bs)
        return constrain(x_bsd, ACTIVATION), cache, None, None

    def _scan_runs(self, step, x_bsd, caches, remat: bool, routing: str):
        """decode_layers with scan_layers: one lax.scan per run of layers, remat inside it.
        (x, caches per run, MoD statistics stacked over MoD layers, probe values per dense layer)."""
        if remat and self.mod is not None and routing != "capacity":
            raise ValueError("rematerialisation applies to training passes (capacity routing) only")
        new_caches, mod_aux, probed = [], [], []
        for r, (start, count, is_mod) in enumerate(self.runs):
            def body(layer, x, cache, is_mod=is_mod):
                x, cache, aux, probe = step(is_mod, layer, x, cache)
                return x, (cache, aux, probe)
            x_bsd, (cache, aux, probe) = scan_stack(self.layers_stacked[r], body, x_bsd,
                                                    None if caches is None else caches[r], remat=remat,
                                                    policy=REMAT_POLICIES[self.remat])
            new_caches.append(cache)
            if aux is not None:
                mod_aux.append(aux)
            if probe is not None:
                probed += unstack(probe, count)
        mod_aux = jax.tree.map(lambda *xs: jnp.concatenate(xs), *mod_aux) if mod_aux else {}
        return x_bsd, new_caches, mod_aux, probed

    def _first_dense_cache_length(self, caches):
        """[b] tokens held by the first dense layer's cache (decode positions continue from it)."""
        if self.scan_layers:
            run = next(r for r, (_, _, is_mod) in enumerate(self.runs) if not is_mod)
            return caches[run].length[0]
        return caches[next(i for i in range(len(self.layers)) if i not in self.mod_layers)].length

    def _remat_layer(self, i, layer, x_bsd, positions_bs, mask, token_valid_bs, token_types_bs, routing):
        policy = REMAT_POLICIES[self.remat]
        if i in self.mod_layers:
            if routing != "capacity":
                raise ValueError("rematerialisation applies to training passes (capacity routing) only")
            mod, num_skipped = self.mod, self.mod.num_skipped(x_bsd.shape[1], 0)  # static values, no module

            def run_mod(layer, router, x, positions, valid, types):
                out, _, aux = mod_layer_capacity(layer, router, x, positions, valid, types, mod, num_skipped, None)
                return out, aux
            return nnx.remat(run_mod, policy=policy)(layer, self.router, x_bsd, positions_bs, token_valid_bs,
                                                     token_types_bs)

        def run_dense(layer, x, positions, mask, valid):
            return layer(x, positions, mask, None, valid)[0]
        return nnx.remat(run_dense, policy=policy)(layer, x_bsd, positions_bs, mask, token_valid_bs), None

    def _mod_layer(self, layer, x_bsd, positions_bs, token_valid_bs, token_types_bs, cache, routing):
        if token_types_bs is None:
            raise ValueError("γ-MoD layers need token_types to know which tokens are routable")
        decoding = cache is not None and x_bsd.shape[1] == 1
        if routing == "threshold":
            threshold = self.mod.decode_threshold if decoding else self.mod.prefill_threshold
            return mod_layer_threshold(layer, self.router, x_bsd, positions_bs, token_valid_bs, token_types_bs,
                                       self.mod, threshold, cache)
        if routing != "capacity":
            raise ValueError(f"routing must be 'capacity' or 'threshold', got {routing!r}")
        # A single decode token cannot compete for capacity: it is computed (the official
        # policy forces every token after the prompt's image and system prefix).
        num_skipped = 0 if decoding else self.mod.num_skipped(x_bsd.shape[1], 0)
        return mod_layer_capacity(layer, self.router, x_bsd, positions_bs, token_valid_bs, token_types_bs,
                                  self.mod, num_skipped, cache)

    def __call__(self, input_ids_bs=None, *, inputs_embeds=None, attention_mask=None, positions=None,
                 caches=None, token_types=None, routing: str = "capacity", attention_probe=None,
                 last_only: bool = False, logit_rows=None):
        """(logits [batch, seq, vocab] float32, updated caches, mod_aux); with last_only,
        logits [batch, 1, vocab] at each example's last real token only (prefill: the LM
        head runs on one row per example); with `logit_rows` [batch, k] (sequence indices),
        logits [batch, k, vocab] at those rows only (a distillation teacher's answer tokens).

        Right padding: `attention_mask` [b, s] marks real tokens; positions default to
        0..s-1 (what HF does for right-padded batches) or, with caches, continue from
        each example's length in the first dense layer's cache. `token_types` [b, s]
        (gamma_mod_jax.token_types) are needed by γ-MoD layers only. attention_probe: see
        `decode_layers`.
        """
        x = self.embed(input_ids_bs) if inputs_embeds is None else inputs_embeds.astype(self.dtype)
        b, s = x.shape[:2]
        token_valid = jnp.ones((b, s), bool) if attention_mask is None else attention_mask.astype(bool)
        if positions is None:
            if caches is None:
                start = jnp.zeros((b,), jnp.int32)
            else:
                start = self._first_dense_cache_length(caches)
            positions = start[:, None] + jnp.arange(s, dtype=jnp.int32)[None]
        hidden, caches, mod_aux = self.decode_layers(x, positions, token_valid, caches, token_types, routing,
                                                     attention_probe)
        if last_only:
            hidden = last_valid_rows(hidden, token_valid)[:, None]
        elif logit_rows is not None:
            hidden = jnp.take_along_axis(hidden, logit_rows[..., None], axis=1)
        logits = constrain(self.lm_head(hidden).astype(jnp.float32), ("batch", "length", "vocab"))
        return logits, caches, mod_aux

    # --- generation interface (see gamma_mod_jax/models/generate.py) ---

    def prefill(self, batch, max_new_tokens: int):
        """Runs the right-padded prompt into fresh caches with room for `max_new_tokens`;
        (logits [b, vocab] at each example's last token, caches, mod_aux)."""
        ids, mask = batch["input_ids"], batch["attention_mask"]
        caches = self.init_caches(ids.shape[0], ids.shape[1], max_new_tokens, "capacity")
        logits, caches, aux = self(ids, attention_mask=mask, caches=caches, last_only=True)
        return logits[:, 0], caches, aux

    def decode_step(self, tokens_b1, caches):
        logits, caches, _ = self(tokens_b1, caches=caches)
        return logits, caches
