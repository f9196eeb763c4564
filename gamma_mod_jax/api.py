"""The public Python API (re-exported lazily by `gamma_mod_jax`)."""


from __future__ import annotations

import dataclasses
from typing import Mapping, Union

import jax
import ml_collections
from flax import nnx

from gamma_mod_jax.config_file import load_config
from gamma_mod_jax.convert.keymap import StateDictMismatchError, export_state_dict, load_state_dict, mllm_keymap
from gamma_mod_jax.models.config import MLLMConfig
from gamma_mod_jax.models.generate import generate
from gamma_mod_jax.models import mllm
from gamma_mod_jax.models.mllm import LlavaModel, MLLMOutput

__all__ = ["load_config", "model_config", "build_model", "abstract_model", "adapt_to_gamma_mod", "load_torch_state_dict",
           "export_torch_state_dict", "generate", "LlavaModel", "MLLMConfig", "MLLMOutput",
           "StateDictMismatchError"]


def model_config(config: Union[str, ml_collections.ConfigDict, MLLMConfig]) -> MLLMConfig:
    """The typed model config of a config file spec, a full ConfigDict, or an MLLMConfig."""
    if isinstance(config, MLLMConfig):
        return config
    if isinstance(config, str):
        config = load_config(config)
    return MLLMConfig.from_dict(config.model if "model" in config else config)


def build_model(config, seed: int = 0) -> LlavaModel:
    """A LLaVA / LLaVA-HR model with freshly initialised weights."""
    return LlavaModel(model_config(config), rngs=nnx.Rngs(seed))


def abstract_model(config) -> LlavaModel:
    """The model with shape/dtype placeholders instead of arrays (allocates nothing)."""
    return mllm.abstract_model(model_config(config))


def adapt_to_gamma_mod(dense: LlavaModel, mod, seed: int = 0) -> LlavaModel:
    """A γ-MoD model from a dense one: every weight copied unchanged, the MoD layers and
    routing from `mod` (a MoDConfig or dict), the shared router initialised as the γ-MoD
    model's own initialisation at `seed` draws it (gamma_mod_jax/models/adapt.py, the
    adaptation the converter and the trainer use too)."""
    from gamma_mod_jax.mod.config import MoDConfig
    from gamma_mod_jax.models.adapt import adapt_model, plan_adaptation

    if dense.config.mod is not None:
        raise ValueError("adapt_to_gamma_mod: the source model is already a γ-MoD model")
    mod = mod if isinstance(mod, MoDConfig) else MoDConfig.from_dict(mod)
    adaptation = plan_adaptation(dense.config, dataclasses.replace(dense.config, mod=mod))
    values = dict(nnx.to_flat_state(nnx.state(dense, nnx.Param)))
    return adapt_model(adaptation, lambda wanted: {p: values[p].get_value() for p in wanted}, seed)


def load_torch_state_dict(model: LlavaModel, state_dict: Mapping[str, object], *, source: str = "state dict"):
    """Loads PyTorch LLaVA / LLaVA-HR / γ-MoD weights (original key names) into `model` in place."""
    load_state_dict(model, state_dict, _keymap(model), source=source)


def export_torch_state_dict(model: LlavaModel):
    """The model's weights under the original PyTorch key names (numpy arrays)."""
    return export_state_dict(model, _keymap(model))


def _keymap(model: LlavaModel):
    return mllm_keymap(model.config.family, model.llm.mod_layers)
