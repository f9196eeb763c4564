"""Analytic FLOPs, forward pass, 2 FLOPs per multiply-add.

The paper's convention (the official FLOPs script) counts LLM decoder layers only:
`8 s h^2 + 4 s^2 h + 6 s h f` per layer (q/k/v/o projections, QK^T and AV over the
full s x s square, the three SwiGLU matrices), a MoD layer at its kept length
`int(s * (1 - skip_ratio))`: that floor is what reproduces the paper's Table 4
(LLaVA-HR-7B at 1400 tokens: 19.16 / 12.59 / 9.26 TFLOPs at skip 0 / 37.9% / 57.7%).
`full_model_breakdown` adds the vision towers, adapters, projector and LM head,
counted the same way.
"""

from __future__ import annotations

from typing import Dict, Optional, Sequence

from gamma_mod_jax.mod.config import check_layer_indices


def decoder_layer_flops(seq_len: float, hidden: int, ffn: int) -> float:
    """One LLaMA decoder layer over `seq_len` tokens (paper convention)."""
    s, h = seq_len, hidden
    return 8 * s * h * h + 4 * s * s * h + 6 * s * h * ffn


def kept_length(seq_len: int, skip_ratio: float) -> int:
    """Tokens a MoD layer computes when `skip_ratio` of the whole sequence skips it."""
    return int(seq_len * (1.0 - skip_ratio))


def paper_tflops(llm_cfg, seq_len: int, mod_layers: Sequence[int], skip_ratio: float,
                 kept: Optional[int] = None) -> float:
    """LLM decoder layers only, MoD layers at their kept length (`kept` tokens when given,
    else kept_length(seq_len, skip_ratio)), in TFLOPs."""
    _check(llm_cfg, mod_layers, skip_ratio)
    h, f, n = llm_cfg.hidden_size, llm_cfg.intermediate_size, llm_cfg.num_hidden_layers
    n_mod = len(set(mod_layers))
    total = (n - n_mod) * decoder_layer_flops(seq_len, h, f)
    total += n_mod * decoder_layer_flops(kept_length(seq_len, skip_ratio) if kept is None else kept, h, f)
    return total / 1e12


def _vit_layer_flops(n_tokens: int, width: int, mlp: int) -> float:
    return 8 * n_tokens * width * width + 4 * n_tokens * n_tokens * width + 4 * n_tokens * width * mlp


def _convnext_flops(cfg, image_size: int) -> float:
    side = image_size // 4
    total = 2 * side * side * cfg.dims[0] * cfg.num_channels * 16  # stem: 4x4 stride-4 conv
    for stage, (depth, dim) in enumerate(zip(cfg.depths, cfg.dims)):
        if stage > 0:
            side //= 2
            total += 2 * side * side * dim * cfg.dims[stage - 1] * 4  # 2x2 stride-2 downsample
        hw = side * side
        total += depth * (2 * hw * dim * 49 + 4 * hw * dim * dim * cfg.mlp_ratio)  # dw 7x7 + MLP
    return total


def full_model_breakdown(mllm_cfg, seq_len: int, skip_ratio: float = 0.0,
                         mod_layers: Optional[Sequence[int]] = None, kept: Optional[int] = None) -> Dict[str, float]:
    """TFLOPs per component of one forward pass over one image and `seq_len` tokens (MoD
    layers at `kept` tokens when given, else at the `skip_ratio` share)."""
    clip, llm = mllm_cfg.clip, mllm_cfg.llm
    n_img = mllm_cfg.num_image_tokens
    d = clip.hidden_size
    out = {}
    patch = 2 * n_img * clip.num_channels * clip.patch_size ** 2 * d
    if mllm_cfg.family == "mgm":
        out.update(_mgm_vision_flops(mllm_cfg))
    elif mllm_cfg.family == "llava":
        n_clip_layers = clip.num_hidden_layers + 1 + mllm_cfg.vision_select_layer
        n_clip_tokens = n_img + 1  # the CLS token runs through the tower too
    else:
        n_clip_layers, n_clip_tokens = clip.num_hidden_layers, n_img
    if mllm_cfg.family != "mgm":
        out["vision_clip"] = patch + n_clip_layers * _vit_layer_flops(n_clip_tokens, d, clip.intermediate_size)
    if mllm_cfg.family == "llava_hr":
        cs = mllm_cfg.convnext.dims[-1]
        slow_hw = (mllm_cfg.input_image_size // 32) ** 2
        out["vision_convnext"] = _convnext_flops(mllm_cfg.convnext, mllm_cfg.input_image_size)
        per_adapter = (2 * slow_hw * cs * cs + 2 * slow_hw * cs * d + 2 * n_img * d * 49 + 2 * n_img * d * d
                       + 2 * (2 * d * mllm_cfg.adapter_gate_hidden + mllm_cfg.adapter_gate_hidden))
        out["vision_adapters"] = len(mllm_cfg.adapter_after_layers) * per_adapter
        out["vision_fusion"] = 2 * n_img * d * mllm_cfg.mm_hidden_size + 2 * n_img * cs * mllm_cfg.mm_hidden_size
    out["projector"] = 2 * n_img * (mllm_cfg.mm_hidden_size * llm.hidden_size + llm.hidden_size ** 2)
    layers = default_mod_layers(llm.num_hidden_layers) if mod_layers is None else mod_layers
    routed = skip_ratio or (kept is not None and kept < seq_len)
    out["llm_decoder"] = paper_tflops(llm, seq_len, layers if routed else (), skip_ratio, kept) * 1e12
    out["lm_head"] = 2 * seq_len * llm.hidden_size * llm.vocab_size
    return {k: v / 1e12 for k, v in out.items()}


def _mgm_vision_flops(cfg) -> Dict[str, float]:
    """Mini-Gemini: CLIP on every view (CLS included, up to the selected layer), the ConvNeXt
    trunk at the input size (the upsampling is not counted), patch info mining (query
    projection per token; key and value projections and the attention over its window)."""
    clip, d = cfg.clip, cfg.clip.hidden_size
    per_view = (clip.image_size // clip.patch_size) ** 2
    n_layers = clip.num_hidden_layers + 1 + cfg.vision_select_layer
    view = 2 * per_view * clip.num_channels * clip.patch_size ** 2 * d
    view += n_layers * _vit_layer_flops(per_view + 1, d, clip.intermediate_size)
    window = (cfg.input_image_size // 4 // cfg.image_grid) ** 2 // per_view  # aux pixels under one token
    c = cfg.mm_hidden_size_aux
    n_img = cfg.num_image_tokens
    mining = n_img * (2 * d * d + window * (2 * 2 * c * d + 2 * 2 * d))
    return {"vision_clip": cfg.num_views * view, "vision_convnext": _convnext_flops(cfg.convnext, cfg.input_image_size),
            "vision_mining": mining}


def train_step_flops(mllm_cfg, batch_size: int, text_len: int, remat: str = "none") -> Dict[str, float]:
    """FLOPs of one training step (forward and backward) over a global batch of
    `batch_size` rows of `text_len` text tokens (placeholder included), as the model runs
    it: every row's image through the vision towers (static shapes: text-only rows too),
    the LLM over the spliced length text_len - 1 + image tokens, each MoD layer at the
    capacity's kept length (mod.num_skipped), the LM head over every position.
      model:    3 x forward (the backward pass is twice the forward: gradients with respect
                to activations and to weights); what MFU counts. Frozen parameters' skipped
                weight gradients are not taken off (stage 1 overstates).
      hardware: model + what rematerialisation recomputes: the decoder layers' forward
                ('full') or their attention-score products ('dots'); what the device runs.
    Paper convention: attention over the full s x s square, 2 FLOPs per multiply-add."""
    n_img = mllm_cfg.num_image_tokens
    seq = text_len - 1 + n_img
    mod = mllm_cfg.mod
    layers = tuple(mod.layers) if mod is not None else ()
    kept = seq - mod.num_skipped(seq, n_img) if mod is not None else seq
    parts = full_model_breakdown(mllm_cfg, seq, 0.0, layers, kept=kept)
    forward = sum(parts.values()) * 1e12 * batch_size
    model = 3 * forward
    if remat == "full":
        extra = parts["llm_decoder"] * 1e12 * batch_size
    elif remat == "dots":
        h, n = mllm_cfg.llm.hidden_size, mllm_cfg.llm.num_hidden_layers
        extra = batch_size * 4 * h * ((n - len(layers)) * seq * seq + len(layers) * kept * kept)
    elif remat == "none":
        extra = 0.0
    else:
        raise ValueError(f"unknown remat policy {remat!r}; one of 'none', 'full', 'dots'")
    return {"model": model, "hardware": model + extra, "forward": forward}


def default_mod_layers(num_layers: int) -> tuple:
    """The released γ-MoD choice: every layer but 0, 1, 2 and the last."""
    return tuple(range(3, num_layers - 1))


def _check(llm_cfg, mod_layers, skip_ratio):
    if not 0.0 <= skip_ratio < 1.0:
        raise ValueError(f"skip ratio must be in [0, 1), got {skip_ratio}")
    check_layer_indices(mod_layers, llm_cfg.num_hidden_layers, source="MoD layers")
