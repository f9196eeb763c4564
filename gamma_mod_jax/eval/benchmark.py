"""Dense vs γ-MoD speed on the same weights and inputs: prefill (forward) and a training
step (forward + backward + AdamW update), with the FLOPs-ideal speed-up beside it.

Only the language model is timed: γ-MoD changes nothing before it, and the vision
towers would add the same constant time to both sides.
"""

from __future__ import annotations

import dataclasses
import resource
import statistics
import time
from typing import Callable, Dict

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from gamma_mod_jax import token_types as tt
from gamma_mod_jax.mod.config import MoDConfig
from gamma_mod_jax.mod.flops import decoder_layer_flops
from gamma_mod_jax.mod.routing import total_routing_loss
from gamma_mod_jax.models.config import LlamaConfig, resolve_dtype
from gamma_mod_jax.models.llama import Llama


def make_inputs(config, seed: int = 0):
    """Embeddings (standing in for image + text), token types and labels in the LLaVA-HR layout."""
    rng = np.random.default_rng(seed)
    b, h = config.batch_size, config.llm["hidden_size"]
    n_img, n_sys, n_txt = config.image_tokens, config.system_tokens, config.text_tokens
    s = n_img + n_sys + n_txt
    types = np.concatenate([np.full(n_img, tt.IMAGE), np.full(n_sys, tt.SYSTEM),
                            np.full(n_txt // 2, tt.QUESTION), np.full(n_txt - n_txt // 2, tt.ANSWER)])
    types = np.broadcast_to(types, (b, s)).astype(np.int32)
    labels = np.where(types == tt.ANSWER, rng.integers(0, config.llm["vocab_size"], (b, s)), -100).astype(np.int32)
    embeds = (rng.standard_normal((b, s, h)) * 0.02).astype(np.float32)
    return {"embeds": jnp.asarray(embeds), "types": jnp.asarray(types), "labels": jnp.asarray(labels),
            "mask": jnp.ones((b, s), jnp.int32)}


def lm_loss(logits, labels):
    valid = labels >= 0
    logp = jax.nn.log_softmax(logits, axis=-1)
    nll = -jnp.take_along_axis(logp, jnp.maximum(labels, 0)[..., None], axis=-1)[..., 0]
    return jnp.sum(nll * valid) / jnp.maximum(jnp.sum(valid), 1)


def _time(fn: Callable, args, repeats: int, warmup: int) -> Dict[str, float]:
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return {"median_s": statistics.median(times), "min_s": min(times), "times_s": times}


def _memory(compiled) -> Dict[str, float]:
    out = {}
    try:
        analysis = compiled.memory_analysis()
        out["temp_mib"] = analysis.temp_size_in_bytes / 2**20
        out["argument_mib"] = analysis.argument_size_in_bytes / 2**20
    except Exception:  # not every backend reports it
        pass
    return out


def build_models(config):
    llm = LlamaConfig.from_dict(config.llm)
    dtype = resolve_dtype(config.dtype)
    mod = MoDConfig(num_routable_tokens=config.image_tokens + config.system_tokens, **config.mod)
    gamma = Llama(llm, mod=mod, dtype=dtype, param_dtype=jnp.float32, rngs=nnx.Rngs(0))
    dense = Llama(llm, dtype=dtype, param_dtype=jnp.float32, rngs=nnx.Rngs(0))
    # The same weights on both sides (the dense model simply has no router).
    nnx.update(dense, nnx.filter_state(nnx.state(gamma, nnx.Param), lambda path, _: path[0] != "router"))
    return dense, gamma


def ideal_speedup(config) -> float:
    """FLOPs(dense) / FLOPs(γ-MoD) of what is timed: decoder layers (paper convention,
    MoD layers at their kept length) plus the LM head."""
    llm = config.llm
    s = config.image_tokens + config.system_tokens + config.text_tokens
    mod = MoDConfig(num_routable_tokens=config.image_tokens + config.system_tokens, **config.mod)
    kept = s - mod.num_skipped(s, 0)
    head = 2 * s * llm["hidden_size"] * llm["vocab_size"]
    layer = lambda n: decoder_layer_flops(n, llm["hidden_size"], llm["intermediate_size"])
    n_layers = llm["num_hidden_layers"]
    dense = n_layers * layer(s) + head
    gamma = (n_layers - len(mod.layers)) * layer(s) + len(mod.layers) * layer(kept) + head
    return dense / gamma


def run_benchmark(config, log=print) -> dict:
    """Times dense and γ-MoD prefill and training steps; returns the results dict."""
    inputs = make_inputs(config)
    dense, gamma = build_models(config)
    results = {"config": {k: (dict(v) if hasattr(v, "items") else v) for k, v in config.items()},
               "device": str(jax.devices()[0].device_kind), "backend": jax.default_backend()}
    ideal = ideal_speedup(config)
    tx = optax.adamw(config.learning_rate)
    for phase in ("prefill", "train_step"):
        timings = {}
        for name, model in (("dense", dense), ("gamma_mod", gamma)):
            graphdef, params = nnx.split(model, nnx.Param)

            def forward(params, x):
                logits, _, aux = nnx.merge(graphdef, params)(inputs_embeds=x["embeds"], attention_mask=x["mask"],
                                                           token_types=x["types"])
                return logits, aux

            if phase == "prefill":
                fn = jax.jit(lambda p, x: forward(p, x)[0])
                args = (params, inputs)
            else:
                def loss_fn(p, x):
                    logits, aux = forward(p, x)
                    return lm_loss(logits, x["labels"]) + total_routing_loss(aux, gamma.mod)

                def step(p, opt_state, x):
                    loss, grads = jax.value_and_grad(loss_fn)(p, x)
                    updates, opt_state = tx.update(grads, opt_state, p)
                    return optax.apply_updates(p, updates), opt_state, loss

                fn = jax.jit(step)
                args = (params, tx.init(params), inputs)
            compiled = fn.lower(*args).compile()
            timing = _time(compiled, args, config.repeats, config.warmup)
            timing.update(_memory(compiled))
            timings[name] = timing
            log(f"{phase:>10} {name:>9}: {timing['median_s'] * 1e3:9.1f} ms (median of {config.repeats})")
        speedup = timings["dense"]["median_s"] / timings["gamma_mod"]["median_s"]
        results[phase] = {**timings, "speedup": speedup, "ideal_speedup": ideal, "speedup_over_ideal": speedup / ideal}
        log(f"{phase:>10} speed-up {speedup:.3f} (FLOPs-ideal {ideal:.3f}, ratio {speedup / ideal:.3f})")
    if jax.default_backend() == "gpu":
        stats = jax.devices()[0].memory_stats() or {}
        results["peak_device_mib"] = stats.get("peak_bytes_in_use", 0) / 2**20
    results["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return results
