"""Distillation from a frozen teacher during γ-MoD fine-tuning (`config.distill`).

Not part of the official γ-MoD recipe (off by default: `distill.coef = 0`). With it on,
the objective is LM loss + routing loss + `coef` x KL on the answer tokens, LLaVA-MoD's
"mimic distillation" (Shu et al., ICLR 2025) with the dense model the γ-MoD model was
adapted from as the teacher. The teacher runs forward only, in the same jitted step: its
parameters are a separate, non-differentiated argument of the step (sharded like the
student's by the same logical rules, not part of the train state or the optimizer), and
its LM head runs only on the answer positions (a static buffer of `answer_tokens` rows),
so no teacher logits exist for the image, system, question or padding positions.

Fields (`distill_config_defaults`):
  coef               weight of the KL term; 0 = no distillation (no teacher is loaded)
  teacher_checkpoint our checkpoint directory of the teacher; '' = the run's init_checkpoint
                     (the dense model being adapted). Any checkpoint with the student's
                     vocabulary, image-token id and input image size serves
  temperature        T: both distributions are softmax(logits / T); the KL is scaled by T^2
                     (Hinton et al.), so its gradients keep their size as T changes
  kl                 'forward' KL(teacher || student) (mass-covering, LLaVA-MoD's), or
                     'reverse' KL(student || teacher) (mode-seeking, as MiniLLM)
  teacher_dtype      the teacher's parameter and compute dtype; '' = the student's compute
                     dtype (the stage-2 recipes: a bfloat16 teacher for the fp32-master student)
  answer_tokens      rows of the static answer buffer per example; 0 = the batch's text length
                     (every answer token, no cap). With a cap, answer tokens past it get no KL
                     (`distill_tokens` counts those that do)
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

KL_DIRECTIONS = ("forward", "reverse")


def distill_config_defaults() -> ml_collections.ConfigDict:
    """The `config.distill` section with distillation off."""
    return ml_collections.ConfigDict(dict(coef=0.0, teacher_checkpoint="", temperature=1.0, kl="forward",
                                          teacher_dtype="", answer_tokens=0))


# What the `_distill` recipe variants set (configs/train.py); the teacher is the run's
# init_checkpoint unless distill.teacher_checkpoint names one.
RECIPE_DISTILL = dict(coef=1.0, temperature=1.0, kl="forward")


@dataclasses.dataclass(frozen=True)
class DistillSpec:
    """What the train step needs besides the teacher's parameters (a step argument)."""
    graphdef: Any          # the teacher's nnx graph definition
    rest: Any              # its non-parameter state
    coef: float
    temperature: float
    kl: str
    answer_tokens: int     # 0: the batch's text length


@dataclasses.dataclass
class Teacher:
    spec: DistillSpec
    params: Any            # nnx.State of the teacher's nnx.Param variables (host / one device)
    checkpoint: str


def enabled(config) -> bool:
    d = config.get("distill")
    return d is not None and float(d.get("coef", 0.0)) > 0.0


def check_distill_config(d) -> None:
    """Clear errors for a bad `config.distill`, naming the field."""
    unknown = set(d.keys()) - set(distill_config_defaults().keys())
    if unknown:
        raise ValueError(f"config.distill: unknown fields {sorted(unknown)}; known: "
                         f"{sorted(distill_config_defaults().keys())}")
    if float(d.coef) < 0:
        raise ValueError(f"config.distill.coef must be >= 0, got {d.coef}")
    if not float(d.temperature) > 0:
        raise ValueError(f"config.distill.temperature must be > 0, got {d.temperature}")
    if d.kl not in KL_DIRECTIONS:
        raise ValueError(f"config.distill.kl must be one of {KL_DIRECTIONS}, got {d.kl!r}")
    if int(d.answer_tokens) < 0:
        raise ValueError(f"config.distill.answer_tokens must be >= 0 (0: no cap), got {d.answer_tokens}")


def load_teacher(config, student_cfg, log=print) -> Optional[Teacher]:
    """The frozen teacher `config.distill` asks for, or None when distillation is off.
    ValueError (naming the checkpoint and field) when it cannot teach this student:
    another vocabulary size, image-token id or input image size, or no checkpoint given."""
    from gamma_mod_jax.convert.checkpoint import load_checkpoint, read_model_config

    if not enabled(config):
        return None
    d = config.distill
    check_distill_config(d)
    path = d.teacher_checkpoint or config.get("init_checkpoint") or ""
    if not path:
        raise ValueError("config.distill.coef > 0 needs a teacher: set config.distill.teacher_checkpoint "
                         "(or config.init_checkpoint, the dense model being adapted)")
    saved = read_model_config(path)
    if not d.teacher_checkpoint and saved.mod is not None:
        raise ValueError(f"config.distill.teacher_checkpoint is empty and init_checkpoint {path} is already a "
                         f"γ-MoD model; name the dense model it was adapted from in config.distill.teacher_checkpoint")
    for what, theirs, ours in (("llm.vocab_size", saved.llm.vocab_size, student_cfg.llm.vocab_size),
                               ("image_token_index", saved.image_token_index, student_cfg.image_token_index),
                               ("input_image_size", saved.input_image_size, student_cfg.input_image_size)):
        if theirs != ours:
            raise ValueError(f"distillation teacher {path}: {what} {theirs} differs from the student's {ours}; "
                             f"the teacher needs the student's tokenizer, vocabulary and image input")
    dtype = d.teacher_dtype or student_cfg.dtype
    model = load_checkpoint(path, config=dataclasses.replace(saved, dtype=dtype, param_dtype=dtype))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    spec = DistillSpec(graphdef=graphdef, rest=rest, coef=float(d.coef), temperature=float(d.temperature), kl=d.kl,
                       answer_tokens=int(d.answer_tokens))
    size = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params))
    log(f"distillation: teacher {path} ({'γ-MoD' if saved.mod is not None else 'dense'}, {dtype}, "
        f"{size / 2**20:.1f} MiB), coef {spec.coef}, {spec.kl} KL at temperature {spec.temperature}")
    return Teacher(spec=spec, params=params, checkpoint=path)


def answer_buffer_rows(spec: DistillSpec, text_len: int) -> int:
    """Static rows of the answer buffer for a batch of text length `text_len` (a supervised
    position predicts one of the text labels 1..t-1, so t rows hold them all)."""
    return text_len if spec.answer_tokens == 0 else min(spec.answer_tokens, text_len)


def teacher_answer_logits(spec: DistillSpec, teacher_params, batch):
    """The teacher's logits at the batch's answer positions, [b, k, vocab] float32, and
    their validity [b, k]; forward only, behind stop_gradient."""
    teacher = nnx.merge(spec.graphdef, teacher_params, spec.rest)
    k = answer_buffer_rows(spec, batch["labels"].shape[1])
    out = teacher(batch["input_ids"], batch["attention_mask"], batch["pixel_values"], batch.get("token_types"),
                  batch["labels"], routing="capacity", answer_rows=k)
    return jax.lax.stop_gradient(out.logits.astype(jnp.float32)), out.answer_valid


def tempered_kl(teacher_logits, student_logits, mask, temperature: float, direction: str):
    """Sum over `mask`ed positions of T^2 x KL between softmax(logits / T) of teacher and
    student (`direction` 'forward': KL(teacher || student); 'reverse': KL(student ||
    teacher)), and the number of such positions. Logits [..., vocab], mask [...]."""
    log_t = jax.nn.log_softmax(teacher_logits.astype(jnp.float32) / temperature, axis=-1)
    log_s = jax.nn.log_softmax(student_logits.astype(jnp.float32) / temperature, axis=-1)
    log_p, log_q = (log_t, log_s) if direction == "forward" else (log_s, log_t)
    per_token = jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1)
    mask = mask.astype(bool)
    return temperature ** 2 * jnp.sum(jnp.where(mask, per_token, 0.0)), jnp.sum(mask)


def top1_matches(teacher_logits, student_logits, mask):
    """Positions (under `mask`) where teacher and student rank the same token first."""
    same = jnp.argmax(teacher_logits, axis=-1) == jnp.argmax(student_logits, axis=-1)
    return jnp.sum(same & mask.astype(bool))
