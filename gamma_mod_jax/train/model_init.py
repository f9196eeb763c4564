"""The model a training run starts from and the model it leaves: `config.model` or
`config.init_checkpoint` (whose model config the run takes, with the changes it may
make), `<workdir>/model_config.json` at the start and `<workdir>/model` at the end."""

from __future__ import annotations

import dataclasses
import os
from typing import Optional

import jax
from flax import nnx

from gamma_mod_jax.io_utils import write_json_atomic
from gamma_mod_jax.models.config import MLLMConfig


def _leaves(cfg, prefix: str = "") -> dict:
    """{dotted field name: value} of a (nested) config dataclass."""
    out = {}
    for field in dataclasses.fields(cfg):
        value = getattr(cfg, field.name)
        if dataclasses.is_dataclass(value):
            out.update(_leaves(value, f"{prefix}{field.name}."))
        else:
            out[f"{prefix}{field.name}"] = value
    return out


def _field(cfg, name: str):
    """The value of dotted field `name` of `cfg` (None below a field that is None)."""
    for part in name.split("."):
        if cfg is None:
            return None
        cfg = getattr(cfg, part)
    return cfg


def _is_explicit(name: str, explicit) -> bool:
    """Whether model field `name` ('llm.hidden_size') was asked for: `explicit` None means
    every field; else a set of dotted names, a name also covering every field below it."""
    return explicit is None or any(name == e or name.startswith(e + ".") for e in explicit)


def init_model_config(saved: MLLMConfig, wanted: Optional[MLLMConfig], explicit=None, *, source: str = "the checkpoint",
                      log=print) -> MLLMConfig:
    """The model config of a run initialised from a checkpoint whose config is `saved`.

    The checkpoint's config, except what the run's `config.model` (`wanted`) may change:
    the dtypes (training precision is the run's) and scan_layers; γ-MoD (a dense checkpoint gets the run's
    `mod`, the adaptation; a γ-MoD one keeps its own, with the `mod` fields the run asks
    for); MR-Adapters added to a checkpoint without them (LLaVA-HR stage 1 -> 2). Any other
    field the run asks for (`explicit`: dotted names under `model`, e.g. the command-line
    overrides; None: every field of `wanted`) must equal the checkpoint's: ValueError naming
    each field with both values otherwise. Fields the run does not ask for come from the
    checkpoint (the ones where the recipe's defaults differ are logged)."""
    if wanted is None:
        return saved
    # dtypes and scan_layers (the parameters' layout in memory, not their values) are the run's.
    changes = {"dtype": wanted.dtype, "param_dtype": wanted.param_dtype, "scan_layers": wanted.scan_layers}
    if wanted.mod is not None and saved.mod is None:
        changes["mod"] = wanted.mod
    elif wanted.mod is not None:
        mod_changes = {f.name: getattr(wanted.mod, f.name) for f in dataclasses.fields(wanted.mod)
                       if _is_explicit(f"mod.{f.name}", explicit)}
        changes["mod"] = dataclasses.replace(saved.mod, **mod_changes)
    if wanted.adapter_after_layers and not saved.adapter_after_layers:
        changes["adapter_after_layers"] = wanted.adapter_after_layers
    result = dataclasses.replace(saved, **changes)
    conflicts, defaults = [], []
    for name, value in _leaves(wanted).items():
        have = _field(result, name)
        if have != value and name not in changes:
            # (explicitly asked γ-MoD fields were applied above, so they never differ here)
            (conflicts if _is_explicit(name, explicit) else defaults).append(
                f"{name} (checkpoint {have!r}, config {value!r})")
    if conflicts:
        raise ValueError(f"init_checkpoint {source}: the run's model config asks for changes that cannot be made "
                         f"to the checkpoint's model: {'; '.join(conflicts)}. Leave these fields at the "
                         "checkpoint's values (or drop the overrides): the model config comes from the checkpoint")
    if defaults:
        log(f"model config from {source}; the recipe's defaults differ (the checkpoint's kept): {'; '.join(defaults)}")
    return result


def model_for_training(config, log=print, explicit=None):
    """The model a run starts from: `config.model` (random weights from `config.seed`) or
    `config.init_checkpoint` (a model directory or a launch.train workdir / checkpoint),
    whose model config is taken as `init_model_config` says (`explicit`: the model fields
    the run asks for; None: all of `config.model`; `config.model` may be None). Parts the
    checkpoint lacks and the config adds are the adaptation (models/adapt.py): the γ-MoD
    router, LLaVA-HR's MR-Adapters, freshly initialised from `config.seed`; every other
    weight is copied."""
    from gamma_mod_jax.convert.checkpoint import load_checkpoint, read_params, resolve_model
    from gamma_mod_jax.models.adapt import adapt_model, plan_adaptation
    from gamma_mod_jax.models.mllm import LlavaModel

    model = config.get("model")
    cfg = None if model is None else model if isinstance(model, MLLMConfig) else MLLMConfig.from_dict(model)
    checkpoint = config.get("init_checkpoint")
    if not checkpoint:
        if cfg is None:
            raise ValueError("the config needs `model` or `init_checkpoint`")
        log(f"model: random initialisation (seed {config.seed})")
        return LlavaModel(cfg, rngs=nnx.Rngs(config.seed))
    source = resolve_model(checkpoint, log)
    cfg = init_model_config(source.config, cfg, explicit, source=source.describe(), log=log)
    saved = dataclasses.replace(source.config, dtype=cfg.dtype, param_dtype=cfg.param_dtype, scan_layers=cfg.scan_layers)
    if saved.mod is not None:
        saved = dataclasses.replace(saved, mod=cfg.mod)  # γ-MoD settings change no parameter
    adaptation = plan_adaptation(saved, cfg)
    if not adaptation.fresh:
        log(f"model: {source.describe()}")
        return load_checkpoint(source, config=cfg)
    model = adapt_model(adaptation, lambda wanted: read_params(source, wanted), seed=config.seed)
    log(f"model: {source.describe()}, with {adaptation.added()} freshly initialised (seed {config.seed})")
    return model


def write_model_config(workdir: str, cfg: MLLMConfig) -> None:
    """`<workdir>/model_config.json`: the run's model config, which makes its training
    checkpoints readable as models (convert.checkpoint.resolve_model)."""
    from gamma_mod_jax.convert.checkpoint import MODEL_CONFIG_FILE
    from gamma_mod_jax.convert.hf_config import mllm_config_to_dict

    path = os.path.join(workdir, MODEL_CONFIG_FILE)
    write_json_atomic(path, mllm_config_to_dict(cfg))


def write_final_model(workdir: str, graphdef, params, rest, log=print) -> str:
    """`<workdir>/model`: the trained model as a model directory (the converter's format,
    what every launcher loads), replacing one an earlier finish of this run wrote; its
    path. With several processes every process calls this (Orbax's save is a collective:
    one process saving alone waits at its barriers for ever) with `params` the global
    arrays the step leaves; each writes the shards it holds."""
    from gamma_mod_jax.convert.checkpoint import TRAINING_MODEL_DIR, save_checkpoint

    path = os.path.join(workdir, TRAINING_MODEL_DIR)
    if jax.process_count() == 1:
        params = jax.device_get(params)
    save_checkpoint(path, nnx.merge(graphdef, params, rest), replace=True)
    log(f"model: wrote {path}")
    return path


TRAIN_SECTIONS = ("train", "optim", "data")


def check_training_config(config) -> None:
    """ValueError unless `config` is a training config (a model config, such as a model
    directory's config.py, has only `model`)."""
    missing = [k for k in TRAIN_SECTIONS if k not in config]
    if missing:
        raise ValueError(f"the config has no {', '.join(repr(k) for k in missing)} section(s): it is not a training "
                         "config (a model directory's config.py describes the model only). Use a training config "
                         "and start from the model: --config configs/train.py:<recipe> "
                         "--config.init_checkpoint=<model directory>")
