"""The assembled multimodal LLM: vision tower -> projector -> image features spliced
into the text embeddings (`splice.py`, static shapes) -> LLaMA.

Every spliced position carries a token type id (`gamma_mod_jax.token_types`), which
γ-MoD routing uses instead of hard-coded lengths.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from gamma_mod_jax import token_types as tt
from gamma_mod_jax.models.config import MLLMConfig
from gamma_mod_jax.models.llama import Llama
from gamma_mod_jax.models.projector import Projector
from gamma_mod_jax.models.splice import IGNORE_INDEX, default_text_types, splice_layout
from gamma_mod_jax.models.vision import build_vision_tower


@struct.dataclass
class MLLMOutput:
    """logits [b, L, vocab] float32; token_types, attention_mask, labels [b, L] on the
    spliced sequence (labels None when none were given)."""
    logits: jax.Array
    token_types: jax.Array
    attention_mask: jax.Array
    labels: Optional[jax.Array] = None
    # γ-MoD statistics stacked over MoD layers ({} for a dense model): routing_loss [n_mod]
    # (unscaled), selected [n_mod, b, L], skip_ratio and skip_<type> [n_mod].
    mod_aux: dict = struct.field(default_factory=dict)
    # With `answer_rows=k`: logits are [b, k, vocab] at these spliced positions only
    # (answer_positions), valid where answer_valid.
    answer_positions: Optional[jax.Array] = None
    answer_valid: Optional[jax.Array] = None


def answer_positions(labels_bL, k: int):
    """The first k positions p whose next label (p + 1) is supervised (not IGNORE_INDEX), in
    order: the rows that predict answer tokens under LLaVA's shifted LM loss. Returns
    (positions [b, k] int32, valid [b, k]); rows past an example's count are 0 and invalid."""
    target = jnp.concatenate([labels_bL[:, 1:] != IGNORE_INDEX, jnp.zeros_like(labels_bL[:, :1], bool)], axis=1)
    # A stable sort of "not a target" puts the target positions first, in order.
    order = jnp.argsort(~target, axis=1, stable=True)[:, :k].astype(jnp.int32)
    valid = jnp.arange(k)[None, :] < jnp.sum(target, axis=1, keepdims=True)
    return jnp.where(valid, order, 0), valid


def _is_concrete(x) -> bool:
    return x is not None and not isinstance(x, jax.core.Tracer)


def check_input_shapes(cfg: MLLMConfig, input_ids_bt, attention_mask_bt, pixel_values_bhwc, token_types_bt=None,
                       labels_bt=None):
    """Raises ValueError naming the argument, its shape and the expected one (runs at trace
    time: shapes are static)."""
    ids_shape = tuple(input_ids_bt.shape)
    if len(ids_shape) != 2:
        raise ValueError(f"input_ids: expected [batch, text_len], got shape {ids_shape}")
    for name, x in (("attention_mask", attention_mask_bt), ("token_types", token_types_bt), ("labels", labels_bt)):
        if x is not None and tuple(x.shape) != ids_shape:
            raise ValueError(f"{name}: expected the shape of input_ids {ids_shape}, got {tuple(x.shape)}")
    size = cfg.input_image_size
    want = (ids_shape[0], size, size, 3)
    got = tuple(pixel_values_bhwc.shape)
    if got != want:
        hint = ""
        if len(got) == 4 and got[1] == 3 and got[-1] != 3:
            hint = " (this looks like NCHW: the model takes NHWC, transpose with (0, 2, 3, 1))"
        elif len(got) == 4 and got[1:3] != (size, size):
            hint = f" (the model's input_image_size is {size}: resize the images, see gamma_mod_jax/data/image.py)"
        raise ValueError(f"pixel_values: expected [batch, {size}, {size}, 3] = {want} (NHWC), got {got}{hint}")


def check_input_values(cfg: MLLMConfig, input_ids_bt, attention_mask_bt=None):
    """Host-side checks of concrete token ids (numpy or jax arrays): at most one image
    placeholder per example (transformers-style prompts expand `<image>` into one id per
    image feature; this model splices the features at a single placeholder itself), and
    every other real token id inside the vocabulary. Raises ValueError naming example,
    position and id."""
    ids = np.asarray(input_ids_bt)
    valid = np.ones(ids.shape, bool) if attention_mask_bt is None else np.asarray(attention_mask_bt).astype(bool)
    placeholders = (ids == cfg.image_token_index) & valid
    counts = placeholders.sum(axis=1)
    if counts.max(initial=0) > 1:
        i = int(np.argmax(counts > 1))
        raise ValueError(
            f"input_ids: example {i} holds {int(counts[i])} image placeholders (id {cfg.image_token_index}); the "
            f"model takes one per example and splices its {cfg.num_image_tokens} image features there (a "
            f"transformers-style prompt with the image token repeated per feature must keep just one)")
    vocab = cfg.llm.vocab_size
    bad = valid & ~placeholders & ((ids < 0) | (ids >= vocab))
    if bad.any():
        i, j = (int(v[0]) for v in np.nonzero(bad))
        raise ValueError(f"input_ids: example {i}, position {j} holds id {int(ids[i, j])}, outside the vocabulary "
                         f"[0, {vocab}) (the image placeholder is {cfg.image_token_index})")


class LlavaModel(nnx.Module):
    """LLaVA-1.5 or LLaVA-HR (per `cfg.family`): `vision`, `projector`, `llm`."""

    def __init__(self, cfg: MLLMConfig, *, rngs: nnx.Rngs):
        self.config = cfg
        self.vision = build_vision_tower(cfg, rngs=rngs)
        self.projector = Projector(cfg.mm_hidden_size, cfg.llm.hidden_size, dtype=cfg.compute_dtype,
                                   param_dtype=cfg.weight_dtype, rngs=rngs)
        mod = cfg.mod
        if mod is not None and mod.num_routable_tokens is None:
            # Capacity is a trace-time constant: the image tokens plus the system prompt.
            mod = dataclasses.replace(mod, num_routable_tokens=mod.routable_count(cfg.num_image_tokens))
        self.llm = Llama(cfg.llm, mod=mod, dtype=cfg.compute_dtype, param_dtype=cfg.weight_dtype,
                         scan_layers=cfg.scan_layers, rngs=rngs)

    def encode_images(self, pixel_values_bhwc):
        """[b, S, S, 3] CLIP-normalised pixels -> image tokens in LLM space [b, n, hidden]."""
        return self.projector(self.vision(pixel_values_bhwc.astype(self.config.compute_dtype)))

    def embed_multimodal(self, input_ids_bt, attention_mask_bt, pixel_values_bhwc, token_types_bt=None,
                         labels_bt=None):
        """Spliced input embeddings [b, L, hidden] and the per-position metadata."""
        cfg = self.config
        check_input_shapes(cfg, input_ids_bt, attention_mask_bt, pixel_values_bhwc, token_types_bt, labels_bt)
        if _is_concrete(input_ids_bt) and _is_concrete(attention_mask_bt):  # an eager call: check the ids too
            check_input_values(cfg, input_ids_bt, attention_mask_bt)
        layout = splice_layout(input_ids_bt, attention_mask_bt, cfg.image_token_index, cfg.num_image_tokens)
        safe_ids = jnp.where(input_ids_bt == cfg.image_token_index, cfg.llm.pad_token_id, input_ids_bt)
        text_emb = self.llm.embed(safe_ids)                                             # [b, t, h]
        text_emb = jnp.take_along_axis(text_emb, layout.text_index[..., None], axis=1)  # [b, L, h]
        image_emb = self.encode_images(pixel_values_bhwc)                               # [b, n, h]
        image_emb = jnp.take_along_axis(image_emb, layout.image_index[..., None], axis=1)
        embeds = jnp.where(layout.is_image[..., None], image_emb.astype(text_emb.dtype), text_emb)
        if token_types_bt is None:
            token_types_bt = default_text_types(input_ids_bt, attention_mask_bt, cfg.image_token_index)
        types = jnp.take_along_axis(token_types_bt, layout.text_index, axis=1)
        types = jnp.where(layout.is_image, tt.IMAGE, types)
        types = jnp.where(layout.valid, types, tt.PADDING).astype(jnp.int32)
        labels = None
        if labels_bt is not None:
            labels = jnp.take_along_axis(labels_bt, layout.text_index, axis=1)
            labels = jnp.where(layout.is_image | ~layout.valid, IGNORE_INDEX, labels)
        return embeds, layout.valid, types, labels

    def __call__(self, input_ids, attention_mask, pixel_values, token_types=None, labels=None,
                 routing: str = "capacity", answer_rows: Optional[int] = None) -> MLLMOutput:
        """Full forward over a right-padded batch. input_ids/attention_mask/token_types/labels:
        [b, t] text-level; pixel_values [b, S, S, 3]. Positions are 0..L-1 like LLaVA.
        routing ('capacity' for training, 'threshold' for the official inference rule)
        matters only for γ-MoD models. answer_rows=k (static, needs labels): the LM head runs
        only on the first k positions that predict an answer token (`answer_positions`), so
        no logits exist for the others; logits [b, k, vocab]."""
        embeds, valid, types, labels = self.embed_multimodal(input_ids, attention_mask, pixel_values,
                                                             token_types, labels)
        positions = rows_valid = None
        if answer_rows is not None:
            if labels is None:
                raise ValueError("answer_rows needs labels (they mark the answer tokens)")
            positions, rows_valid = answer_positions(labels, answer_rows)
        logits, _, mod_aux = self.llm(inputs_embeds=embeds, attention_mask=valid, token_types=types,
                                      routing=routing, logit_rows=positions)
        return MLLMOutput(logits=logits, token_types=types, attention_mask=valid.astype(jnp.int32), labels=labels,
                          mod_aux=mod_aux, answer_positions=positions, answer_valid=rows_valid)

    @property
    def inference_routing(self) -> str:
        return "capacity" if self.config.mod is None else self.config.mod.inference

    # --- generation interface (see gamma_mod_jax/models/generate.py) ---

    def check_batch(self, batch):
        """Host-side checks of a generation batch before it is traced (see `check_input_values`)."""
        check_input_values(self.config, batch["input_ids"], batch.get("attention_mask"))

    def prefill(self, batch, max_new_tokens: int):
        """Prompt into fresh caches (γ-MoD layers' sized by the inference routing, see
        `Llama.cache_lengths`): (logits [b, vocab] at each example's last real token, caches,
        mod_aux of the prompt)."""
        embeds, valid, types, _ = self.embed_multimodal(batch["input_ids"], batch["attention_mask"],
                                                        batch["pixel_values"], batch.get("token_types"))
        routing = self.inference_routing
        caches = self.llm.init_caches(embeds.shape[0], embeds.shape[1], max_new_tokens, routing)
        logits, caches, aux = self.llm(inputs_embeds=embeds, attention_mask=valid, caches=caches, token_types=types,
                                       routing=routing, last_only=True)
        return logits[:, 0], caches, aux

    def decode_step(self, tokens_b1, caches):
        # Generated tokens are answer tokens (always computed under the official policy).
        types = jnp.full(tokens_b1.shape, tt.ANSWER, jnp.int32)
        logits, caches, _ = self.llm(tokens_b1, caches=caches, token_types=types, routing=self.inference_routing)
        return logits, caches


def abstract_model(cfg: MLLMConfig) -> LlavaModel:
    """The model with shape/dtype placeholders instead of arrays (allocates nothing)."""
    return nnx.eval_shape(lambda: LlavaModel(cfg, rngs=nnx.Rngs(0)))
