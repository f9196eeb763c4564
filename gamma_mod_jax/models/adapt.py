"""Adapting a model to a config that adds parts to it: dense -> γ-MoD (the shared router)
and LLaVA-HR stage 1 -> stage 2 (the MR-Adapters).

One definition, used by the API (`api.adapt_to_gamma_mod`), the converter (import with a
layer selection, `convert.checkpoint.write_model`) and the trainer (`init_checkpoint`):
every parameter of the source is copied unchanged (cast to the target's parameter dtype),
and the parameters only the target has take the values the target model's own
initialisation gives them at `seed` (`LlavaModel(target, rngs=nnx.Rngs(seed))`, computed
under jit for those parameters only, so the rest of the model is never drawn).
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Dict, Tuple

import jax
import jax.numpy as jnp
from flax import nnx

from gamma_mod_jax.models.config import MLLMConfig
from gamma_mod_jax.models.mllm import LlavaModel

Path = Tuple  # a parameter path, e.g. ('llm', 'router', 'kernel')


def _abstract_params(cfg: MLLMConfig) -> Dict[Path, jax.ShapeDtypeStruct]:
    model = nnx.eval_shape(lambda: LlavaModel(cfg, rngs=nnx.Rngs(0)))
    return {path: jax.ShapeDtypeStruct(var.get_value().shape, var.get_value().dtype)
            for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)) if isinstance(var, nnx.Param)}


def _name(path: Path) -> str:
    return "/".join(map(str, path))


@dataclasses.dataclass(frozen=True)
class Adaptation:
    """Source config -> target config: which parameters are copied, which are new."""
    source: MLLMConfig
    target: MLLMConfig
    copied: Tuple[Path, ...]
    fresh: Tuple[Path, ...]

    def added(self) -> str:
        """The new parts in words ('γ-MoD router', 'MR-Adapters', ...)."""
        kinds = []
        for path in self.fresh:
            kind = ("γ-MoD router" if path[:2] == ("llm", "router") else
                    "MR-Adapters" if "adapters" in map(str, path) else _name(path[:2]))
            if kind not in kinds:
                kinds.append(kind)
        return " and ".join(kinds) or "nothing"


def plan_adaptation(source: MLLMConfig, target: MLLMConfig) -> Adaptation:
    """What adapting a `source` model to `target` copies and adds. ValueError naming the
    parameters when the source has parameters the target lacks or of another shape
    (an adaptation only adds parts)."""
    have, want = _abstract_params(source), _abstract_params(target)
    only_source = [_name(p) for p in have if p not in want]
    if only_source:
        raise ValueError(f"cannot adapt: the source model has parameters the target config lacks: "
                         f"{only_source[:8]}{' ...' if len(only_source) > 8 else ''}")
    reshaped = [f"{_name(p)} {tuple(v.shape)} -> {tuple(want[p].shape)}" for p, v in have.items()
                if tuple(v.shape) != tuple(want[p].shape)]
    if reshaped:
        raise ValueError(f"cannot adapt: parameters of another shape in the target config: {reshaped[:8]}")
    return Adaptation(source, target, tuple(have), tuple(p for p in want if p not in have))


def fresh_values(target: MLLMConfig, paths, seed: int) -> Dict[Path, jax.Array]:
    """The initial values of `paths` in `LlavaModel(target, rngs=nnx.Rngs(seed))`; jit drops
    the initialisation of every other parameter."""
    paths = tuple(paths)
    if not paths:
        return {}

    @jax.jit
    def init():
        flat = dict(nnx.to_flat_state(nnx.state(LlavaModel(target, rngs=nnx.Rngs(seed)), nnx.Param)))
        return [flat[p].get_value() for p in paths]

    return dict(zip(paths, init()))


def adapt_model(adaptation: Adaptation, read_copied: Callable[[Dict[Path, jax.ShapeDtypeStruct]], Dict[Path, object]],
                seed: int) -> LlavaModel:
    """The target model: `read_copied({path: target ShapeDtypeStruct})` gives the source's
    values of `adaptation.copied`; the fresh parameters are drawn as `fresh_values` says."""
    model = nnx.eval_shape(lambda: LlavaModel(adaptation.target, rngs=nnx.Rngs(0)))
    variables = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    wanted = {p: jax.ShapeDtypeStruct(variables[p].get_value().shape, variables[p].get_value().dtype)
              for p in adaptation.copied}
    values = read_copied(wanted)
    for path, value in values.items():
        variables[path].set_value(jnp.asarray(value, wanted[path].dtype))
    for path, value in fresh_values(adaptation.target, adaptation.fresh, seed).items():
        variables[path].set_value(value)
    return model
