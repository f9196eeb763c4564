"""Dense vs γ-MoD speed on the same weights and inputs: prefill (forward) under capacity and
threshold routing, a training step (forward + backward + AdamW update) and greedy decoding
after the prompt, with the FLOPs-ideal speed-up beside each and the KV-cache bytes.

Only the language model is timed: γ-MoD changes nothing before it, and the vision
towers would add the same constant time to both sides. Each timed function also reports
samples/s, its model FLOPs rate per device and MFU (against the device's peak bf16 FLOP/s,
train/metrics.py, or config.peak_flops_per_device; none on CPU) and its compiled memory.
config.attention "cudnn" runs attention through cuDNN's fused kernel (GPU, bf16).
"""

from __future__ import annotations

import contextlib
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
from gamma_mod_jax.mod.routing import threshold_bucket_sizes, total_routing_loss
from gamma_mod_jax.models.config import LlamaConfig, resolve_dtype
from gamma_mod_jax.models.layers import attention_implementation
from gamma_mod_jax.models.llama import Llama
from gamma_mod_jax.progress import progress
from gamma_mod_jax.train.distill import tempered_kl


def make_inputs(config, seed: int = 0, batch_size=None):
    """Embeddings (standing in for image + text), token types and labels in the LLaVA-HR layout."""
    rng = np.random.default_rng(seed)
    b, h = batch_size or config.batch_size, config.llm["hidden_size"]
    n_img, n_sys, n_txt = config.image_tokens, config.system_tokens, config.text_tokens
    s = n_img + n_sys + n_txt
    types = np.concatenate([np.full(n_img, tt.IMAGE), np.full(n_sys, tt.SYSTEM),
                            np.full(n_txt // 2, tt.QUESTION), np.full(n_txt - n_txt // 2, tt.ANSWER)])
    types = np.broadcast_to(types, (b, s)).astype(np.int32)
    labels = np.where(types == tt.ANSWER, rng.integers(0, config.llm["vocab_size"], (b, s)), tt.IGNORE_INDEX).astype(np.int32)
    embeds = (rng.standard_normal((b, s, h)) * 0.02).astype(np.float32)
    return {"embeds": jnp.asarray(embeds), "types": jnp.asarray(types), "labels": jnp.asarray(labels),
            "mask": jnp.ones((b, s), jnp.int32)}


def lm_loss(logits, labels):
    valid = labels >= 0
    logp = jax.nn.log_softmax(logits, axis=-1)
    nll = -jnp.take_along_axis(logp, jnp.maximum(labels, 0)[..., None], axis=-1)[..., 0]
    return jnp.sum(nll * valid) / jnp.maximum(jnp.sum(valid), 1)


def _time_interleaved(fns: Dict[str, Callable], args: Dict[str, tuple], repeats: int,
                      warmup: int) -> Dict[str, Dict[str, float]]:
    """Times several functions in turns (one run of each per round), so that load from
    other processes on a shared machine falls on all of them alike."""
    for _ in range(warmup):
        for name, fn in fns.items():
            jax.block_until_ready(fn(*args[name]))
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            jax.block_until_ready(fn(*args[name]))
            times[name].append(time.perf_counter() - start)
    return {name: {"median_s": statistics.median(t), "min_s": min(t), "times_s": t} for name, t in times.items()}


def _compile(fn, args, what: str, log=print):
    """(compiled executable, seconds spent lowering and compiling), with a progress line."""
    start = time.perf_counter()
    with progress(f"compiling {what}", log=log):
        compiled = fn.lower(*args).compile()
    return compiled, time.perf_counter() - start


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
    param_dtype = resolve_dtype(config.get("param_dtype", "float32"))
    mod = _mod_config(config)
    scan = config.get("scan_layers", False)
    gamma = Llama(llm, mod=mod, dtype=dtype, param_dtype=param_dtype, scan_layers=scan, rngs=nnx.Rngs(0))
    dense = Llama(llm, dtype=dtype, param_dtype=param_dtype, scan_layers=scan, rngs=nnx.Rngs(0))
    _copy_weights(gamma, dense)
    return dense, gamma


def _copy_weights(gamma, dense) -> None:
    """The same weights on both sides (the dense model simply has no router), layer by layer:
    scanned, the two stack their layers in different runs (one dense run vs dense / γ-MoD / dense)."""
    from gamma_mod_jax.convert.keymap import param_paths

    theirs = dict(param_paths(dense))
    for path, var in param_paths(gamma):
        if path[0] != "router":
            theirs[path].set_value(var.get_value())


def ideal_speedup(config, kept_per_mod_layer=None) -> float:
    """FLOPs(dense) / FLOPs(γ-MoD) of what is timed (forward_flops)."""
    dense, gamma = forward_flops(config, kept_per_mod_layer)
    return dense / gamma


def forward_flops(config, kept_per_mod_layer=None) -> tuple:
    """(dense, γ-MoD) forward FLOPs of what is timed, per batch: decoder layers (paper
    convention, MoD layers at their kept length: the capacity, or the measured mean kept
    count per MoD layer when given) plus the LM head. A training step counts 3 times its
    forward (the backward is twice the forward; model FLOPs: remat's recomputation is not counted)."""
    llm = config.llm
    s = config.image_tokens + config.system_tokens + config.text_tokens
    mod = _mod_config(config)
    if kept_per_mod_layer is None:
        kept_per_mod_layer = [s - mod.num_skipped(s, 0)] * len(mod.layers)
    head = 2 * s * llm["hidden_size"] * llm["vocab_size"]
    layer = lambda n: decoder_layer_flops(n, llm["hidden_size"], llm["intermediate_size"])
    n_layers = llm["num_hidden_layers"]
    dense = n_layers * layer(s) + head
    gamma = (n_layers - len(mod.layers)) * layer(s) + sum(layer(k) for k in kept_per_mod_layer) + head
    b = config.batch_size
    return dense * b, gamma * b


def _peak(config):
    from gamma_mod_jax.train.metrics import peak_bf16_flops

    return config.get("peak_flops_per_device") or peak_bf16_flops(jax.devices()[0].device_kind)


def _throughput(timing: dict, batch: int, flops: float, peak) -> dict:
    """samples/s, model TFLOP/s (one device) and MFU (None without a known peak) of a timing."""
    rate = flops / timing["median_s"]
    return {"samples_per_s": batch / timing["median_s"], "model_tflops_per_device": rate / 1e12,
            "mfu": rate / peak if peak else None}


def _mod_config(config, **changes) -> MoDConfig:
    return MoDConfig(num_routable_tokens=config.image_tokens + config.system_tokens, **{**config.mod, **changes})


def _forward_fn(model, routing):
    graphdef = nnx.graphdef(model)

    def forward(params, x):
        return nnx.merge(graphdef, params)(inputs_embeds=x["embeds"], attention_mask=x["mask"],
                                          token_types=x["types"], routing=routing)
    return forward


def _train_step(forward, mod, tx, teacher=None):
    """A jitted training step (forward + backward + optimizer update) of `forward`: LM loss +
    routing loss. teacher: (graphdef, answer_rows, coef) adds coef x KL(teacher || student)
    on the answer tokens (`answer_rows`, their sequence indices, the same in every example
    of the benchmark layout), distillation as train/distill.py does it; the step then takes
    the teacher's parameters as a fourth argument, outside the gradient and the optimizer,
    and the teacher's LM head runs on the answer rows only."""
    def loss_fn(p, x, teacher_logits, rows):
        logits, _, aux = forward(p, x)
        loss = lm_loss(logits, x["labels"]) + total_routing_loss(aux, mod)
        if teacher_logits is None:
            return loss
        answer_logits = jnp.take_along_axis(logits, rows[..., None], axis=1)
        kl_sum, count = tempered_kl(teacher_logits, answer_logits, jnp.ones(rows.shape, bool), 1.0, "forward")
        return loss + teacher[2] * kl_sum / count

    def step(p, opt_state, x, teacher_params=None):
        teacher_logits = rows = None
        if teacher is not None:
            graphdef, answer_rows, _ = teacher
            rows = jnp.broadcast_to(jnp.asarray(answer_rows, jnp.int32), (x["types"].shape[0], len(answer_rows)))
            teacher_logits, _, _ = nnx.merge(graphdef, teacher_params)(
                inputs_embeds=x["embeds"], attention_mask=x["mask"], token_types=x["types"], logit_rows=rows)
            teacher_logits = jax.lax.stop_gradient(teacher_logits)
        loss, grads = jax.value_and_grad(loss_fn)(p, x, teacher_logits, rows)
        updates, opt_state = tx.update(grads, opt_state, p)
        return optax.apply_updates(p, updates), opt_state, loss

    return jax.jit(step)


def calibrated_threshold(gamma, inputs, iterations: int = 3, log=print) -> float:
    """A prefill threshold that keeps about as many tokens as capacity routing. Random router
    weights put almost every p above the official 0.005, so that rule would skip nothing
    here. Start from the p quantile (pooled over MoD layers and tokens, every token kept)
    at the share capacity routing skips; then, since skipping in one layer changes p in the
    next, repeat with the p measured under the last threshold. The threshold whose skip
    ratio came closest to capacity routing's is returned."""
    s = inputs["embeds"].shape[1]
    target = gamma.mod.num_skipped(s, 0) / s
    threshold, best = -1.0, None
    for _ in range(iterations + 1):
        # One bucket (all tokens, masked): the same routing, compiled faster.
        model = _with_mod(gamma, prefill_threshold=threshold, threshold_buckets=(1.0,))
        _, _, aux = jax.jit(_forward_fn(model, "threshold"))(nnx.state(model), inputs)
        skip = float(np.mean(aux["skip_ratio"]))
        if threshold >= 0 and (best is None or abs(skip - target) < abs(best[1] - target)):
            best = (threshold, skip)
        threshold = float(np.quantile(np.asarray(aux["probability"], np.float64).ravel(), target))
    log(f"threshold calibration: {best[0]:.6f} skips {best[1]:.3f} (capacity routing: {target:.3f})")
    return best[0]


def _with_mod(model, **changes):
    """The same weights under a changed MoD config."""
    other = Llama(model.config, mod=dataclasses.replace(model.mod, **changes), dtype=model.dtype,
                  param_dtype=jnp.float32, scan_layers=model.scan_layers, rngs=nnx.Rngs(0))
    nnx.update(other, nnx.state(model))
    return other


def kv_cache_bytes(model, batch: int, prompt_len: int, new_tokens: int, routing) -> list:
    """Bytes of each layer's cache (keys, values, slot flags, lengths) for generation."""
    shapes = jax.eval_shape(lambda: model.init_caches(batch, prompt_len, new_tokens, routing))
    return [sum(int(np.prod(a.shape)) * a.dtype.itemsize for a in jax.tree.leaves(c)) for c in shapes]


def _decode_fns(model, routing, new_tokens: int):
    """Jitted (prefill into generation caches, then greedy decode of `new_tokens` tokens)."""
    graphdef = nnx.graphdef(model)
    cache_routing = routing if model.mod is not None else None

    @jax.jit
    def prefill(params, x):
        m = nnx.merge(graphdef, params)
        b, s = x["mask"].shape
        caches = m.init_caches(b, s, new_tokens, cache_routing)
        logits, caches, _ = m(inputs_embeds=x["embeds"], attention_mask=x["mask"], token_types=x["types"],
                              caches=caches, routing=routing, last_only=True)
        return jnp.argmax(logits[:, 0], -1).astype(jnp.int32), caches

    @jax.jit
    def decode(params, token, caches):
        m = nnx.merge(graphdef, params)
        answer = jnp.full(token.shape + (1,), tt.ANSWER, jnp.int32)

        def step(_, carry):
            token, caches = carry
            logits, caches, _ = m(token[:, None], caches=caches, token_types=answer, routing=routing)
            return jnp.argmax(logits[:, 0], -1).astype(jnp.int32), caches
        return jax.lax.fori_loop(0, new_tokens - 1, step, (token, caches))[0]
    return prefill, decode


def models_from_checkpoint(config, mllm):
    """(config, dense, γ-MoD) for a loaded γ-MoD model: its language model, the same
    weights without the router as the dense side, and the benchmark config rewritten to the
    model's shapes, MoD layers and token layout (its image tokens + system prompt)."""
    gamma = mllm.llm
    if gamma.mod is None:
        raise ValueError("--checkpoint: not a γ-MoD model (its config has no mod block)")
    config = config.copy_and_resolve_references()
    config.llm = dataclasses.asdict(gamma.config)
    config.mod = {k: v for k, v in dataclasses.asdict(gamma.mod).items() if k != "num_routable_tokens"}
    config.image_tokens, config.system_tokens = mllm.config.num_image_tokens, gamma.mod.system_tokens
    dense = Llama(gamma.config, dtype=gamma.dtype, param_dtype=jnp.float32, scan_layers=gamma.scan_layers,
                  rngs=nnx.Rngs(0))
    _copy_weights(gamma, dense)
    return config, dense, gamma


def run_benchmark(config, log=print, checkpoint_model=None) -> dict:
    """Times dense vs γ-MoD (capacity and threshold routing) prefill, training steps and
    decoding on the same weights; returns the results dict. checkpoint_model: a loaded
    γ-MoD LlavaModel to benchmark (with its own prefill threshold) instead of random weights."""
    if checkpoint_model is not None:
        config, dense, gamma = models_from_checkpoint(config, checkpoint_model)
    else:
        dense, gamma = build_models(config)
    inputs = make_inputs(config)
    results = {"config": {k: (dict(v) if hasattr(v, "items") else v) for k, v in config.items()},
               "device": str(jax.devices()[0].device_kind), "backend": jax.default_backend(),
               "compile_s": {}}
    s = inputs["embeds"].shape[1]
    ideal = ideal_speedup(config)
    if checkpoint_model is not None:
        threshold = gamma.mod.prefill_threshold
        log(f"threshold routing: the checkpoint's own prefill threshold {threshold}")
    else:
        threshold = calibrated_threshold(gamma, inputs, log=log)
        log(f"threshold routing: prefill threshold calibrated to {threshold:.6f}, the p quantile that keeps as many "
            f"tokens as capacity routing ({s - gamma.mod.num_skipped(s, 0)} of {s}; random router weights keep "
            f"almost every token above the official {gamma.mod.prefill_threshold})")
    gamma_threshold = _with_mod(gamma, prefill_threshold=threshold)
    tx = optax.adamw(config.learning_rate)
    models = {"dense": (dense, "capacity"), "gamma_mod": (gamma, "capacity"),
              "gamma_mod_threshold": (gamma_threshold, "threshold")}
    kept = None
    peak = _peak(config)
    if peak is None:
        log(f"mfu: not reported: no peak bf16 FLOPs known for device kind {jax.devices()[0].device_kind!r} "
            f"(set peak_flops_per_device, `peak_flops=` in configs/benchmark.py)")
    attention = config.get("attention")
    results["attention"] = attention or "xla"
    distill_coef = float(config.get("distill_coef", 0.0))
    for phase in ("prefill", "train_step"):
        fns, args, compiled_info = {}, {}, {}
        phase_models = dict(models)
        if phase == "train_step":
            del phase_models["gamma_mod_threshold"]  # training routes by capacity
            if distill_coef > 0:
                phase_models["gamma_mod_distill"] = (gamma, "capacity")
        for name, (model, routing) in phase_models.items():
            # Rematerialisation (config.remat) in the training step only, as the trainer sets it.
            model.remat = config.get("remat", "none") if phase == "train_step" else "none"
            params = nnx.state(model, nnx.Param)
            forward = _forward_fn(model, routing)
            if phase == "prefill":
                fn = jax.jit(lambda p, x, forward=forward: forward(p, x)[0])
                args[name] = (params, inputs)
            else:
                args[name] = (params, tx.init(params), inputs)
                teacher = None
                if name == "gamma_mod_distill":
                    answer_rows = np.nonzero(np.asarray(inputs["types"][0]) == tt.ANSWER)[0]
                    teacher = (nnx.graphdef(dense), answer_rows, distill_coef)
                    args[name] += (nnx.state(dense, nnx.Param),)
                fn = _train_step(forward, gamma.mod, tx, teacher)
            with attention_implementation(attention) if attention else contextlib.nullcontext():
                fns[name], compile_s = _compile(fn, args[name], f"{phase} ({name})", log)
            compiled_info[name] = {"compile_s": compile_s, **_memory(fns[name])}
        timings = _time_interleaved(fns, args, config.repeats, config.warmup)
        results["compile_s"][phase] = {name: info["compile_s"] for name, info in compiled_info.items()}
        dense_flops, gamma_flops = forward_flops(config)
        if "gamma_mod_threshold" in timings:
            _, _, aux = jax.jit(_forward_fn(gamma_threshold, "threshold"))(nnx.state(gamma_threshold), inputs)
            kept = np.asarray(aux["selected"]).sum(-1).mean(-1)  # mean kept count per MoD layer
        flops = {"dense": dense_flops, "gamma_mod": gamma_flops,
                 "gamma_mod_threshold": forward_flops(config, kept)[1] if kept is not None else None,
                 # the student's step plus one teacher forward (its LM head counted at every position)
                 "gamma_mod_distill": gamma_flops + dense_flops / 3}
        for name, timing in timings.items():
            timing.update(compiled_info[name])
            timing.update(_throughput(timing, config.batch_size, flops[name] * (3 if phase == "train_step" else 1),
                                      peak))
            mfu = "" if timing["mfu"] is None else f", MFU {timing['mfu']:.3f}"
            memory = f", {timing['temp_mib']:.0f} MiB temp" if "temp_mib" in timing else ""
            log(f"{phase:>10} {name:>19}: {timing['median_s'] * 1e3:9.1f} ms (median of {config.repeats}, "
                f"interleaved; compiled in {timing['compile_s']:.1f} s), {timing['samples_per_s']:.2f} samples/s, "
                f"{timing['model_tflops_per_device']:.2f} TFLOP/s{mfu}{memory}")
        speedup = timings["dense"]["median_s"] / timings["gamma_mod"]["median_s"]
        results[phase] = {"dense": timings["dense"], "gamma_mod": timings["gamma_mod"], "speedup": speedup,
                          "ideal_speedup": ideal, "speedup_over_ideal": speedup / ideal}
        if "gamma_mod_distill" in timings:
            results[phase]["gamma_mod_distill"] = timings["gamma_mod_distill"]
        log(f"{phase:>10} speed-up {speedup:.3f} (FLOPs-ideal {ideal:.3f}, ratio {speedup / ideal:.3f})")
        if phase == "prefill":
            t_ideal = ideal_speedup(config, kept)
            t_speedup = timings["dense"]["median_s"] / timings["gamma_mod_threshold"]["median_s"]
            results["prefill_threshold"] = {
                "gamma_mod": timings["gamma_mod_threshold"], "speedup": t_speedup, "ideal_speedup": t_ideal,
                "speedup_over_ideal": t_speedup / t_ideal, "skip_ratio": float(np.mean(aux["skip_ratio"])),
                "threshold": threshold, "kept_per_layer": [float(k) for k in kept],
                "buckets": list(threshold_bucket_sizes(s, gamma.mod))}
            log(f"{'prefill':>10} threshold speed-up {t_speedup:.3f} (FLOPs-ideal {t_ideal:.3f} at the measured skip "
                f"{results['prefill_threshold']['skip_ratio']:.3f}, ratio {t_speedup / t_ideal:.3f})")
    new_tokens = config.decode_new_tokens
    dense_kv = kv_cache_bytes(dense, config.batch_size, s, new_tokens, None)
    gamma_kv = kv_cache_bytes(gamma, config.batch_size, s, new_tokens, "capacity")
    results["kv_cache"] = {"dense_bytes": sum(dense_kv), "gamma_mod_bytes": sum(gamma_kv),
                           "gamma_mod_threshold_bytes": sum(kv_cache_bytes(gamma, config.batch_size, s, new_tokens,
                                                                           "threshold")),
                           "dense_bytes_per_layer": dense_kv, "gamma_mod_bytes_per_layer": gamma_kv,
                           "batch_size": config.batch_size, "tokens": s + new_tokens}
    log(f"  kv cache (batch {config.batch_size}, {s} + {new_tokens} tokens): dense {sum(dense_kv) / 2**20:.1f} MiB, "
        f"γ-MoD capacity {sum(gamma_kv) / 2**20:.1f} MiB ({sum(gamma_kv) / sum(dense_kv):.3f} of dense)")
    results["decode"] = {}
    for batch in config.decode_batch_sizes:
        x = make_inputs(config, batch_size=batch)
        fns, args = {}, {}
        for name, (model, routing) in models.items():
            prefill, decode = _decode_fns(model, routing, new_tokens)
            params = nnx.state(model, nnx.Param)
            token, caches = prefill(params, x)
            fns[name], compile_s = _compile(decode, (params, token, caches), f"decode, batch {batch} ({name})", log)
            args[name] = (params, token, caches)
            results["compile_s"].setdefault(f"decode_batch_{batch}", {})[name] = compile_s
        timings = _time_interleaved(fns, args, config.repeats, config.warmup)
        steps = batch * (new_tokens - 1)
        row = {f"{name}_tokens_per_s": steps / t["median_s"] for name, t in timings.items()}
        results["decode"][f"batch_{batch}"] = row
        log(f"    decode batch {batch}: " + ", ".join(f"{k[:-len('_tokens_per_s')]} {v:.1f} tokens/s"
                                                  for k, v in row.items()))
    stats = jax.devices()[0].memory_stats() or {}  # GPU / TPU; none on CPU
    if "peak_bytes_in_use" in stats:
        results["peak_device_mib"] = stats["peak_bytes_in_use"] / 2**20
        log(f"  peak device memory {results['peak_device_mib']:.0f} MiB")
    results["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return results
