"""Declarative mapping between our parameter tree and PyTorch state-dict keys.

Our modules mirror the PyTorch module tree (see `gamma_mod_jax/models/layers.py`),
so a key is derived from a parameter path by (1) one prefix rule per component
and (2) one rule per leaf name: `kernel` <-> `weight` (Linear transposed,
Conv HWIO <-> OIHW), `scale` / `embedding` <-> `weight`, everything else as is.
The same table serves import and export, so round trips are exact.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Callable, Dict, Iterable, List, Mapping, Sequence, Tuple

import numpy as np
from flax import nnx

# PyTorch buffers that never correspond to parameters.
DEFAULT_IGNORED = (r".*rotary_emb\.inv_freq$", r".*\.position_ids$", r".*num_batches_tracked$")


class StateDictMismatchError(ValueError):
    """A state dict does not fit the model: lists every missing, unexpected and mis-shaped key."""

    def __init__(self, missing: Sequence[str], unexpected: Sequence[str],
                 mis_shaped: Sequence[Tuple[str, tuple, tuple]], source: str = "state dict"):
        self.missing, self.unexpected, self.mis_shaped = list(missing), list(unexpected), list(mis_shaped)
        lines = [f"{source} does not match the model:"]
        if self.missing:
            lines.append(f"  missing keys ({len(self.missing)}):")
            lines += [f"    {k}" for k in self.missing]
        if self.unexpected:
            lines.append(f"  unexpected keys ({len(self.unexpected)}):")
            lines += [f"    {k}" for k in self.unexpected]
        if self.mis_shaped:
            lines.append(f"  mis-shaped keys ({len(self.mis_shaped)}):")
            lines += [f"    {k}: got {tuple(got)}, expected {tuple(want)}" for k, got, want in self.mis_shaped]
        super().__init__("\n".join(lines))


@dataclasses.dataclass(frozen=True)
class KeyMap:
    """Prefix rules (our dotted prefix, PyTorch prefix), first match wins, plus
    PyTorch keys to ignore on import (regexes)."""
    prefixes: Tuple[Tuple[str, str], ...]
    ignored: Tuple[str, ...] = DEFAULT_IGNORED

    def torch_key(self, path: Tuple) -> str:
        """PyTorch key of one of our parameter paths."""
        *body, leaf = [str(p) for p in path]
        torch_leaf = {"kernel": "weight", "scale": "weight", "embedding": "weight"}.get(leaf, leaf)
        dotted = ".".join(body + [torch_leaf])
        for ours, theirs in self.prefixes:
            if dotted.startswith(ours):
                return theirs + dotted[len(ours):]
        raise KeyError(f"no prefix rule maps parameter {'.'.join(map(str, path))!r}")

    def is_ignored(self, key: str) -> bool:
        return any(re.fullmatch(p, key) for p in self.ignored)


def to_torch_layout(path: Tuple, array: np.ndarray) -> np.ndarray:
    """Our array -> PyTorch layout (Linear [in,out] -> [out,in]; Conv HWIO -> OIHW)."""
    if str(path[-1]) == "kernel":
        if array.ndim == 2:
            return array.T
        if array.ndim == 4:
            return array.transpose(3, 2, 0, 1)
    return array


def from_torch_layout(path: Tuple, array: np.ndarray) -> np.ndarray:
    """PyTorch layout -> ours (inverse of `to_torch_layout`)."""
    if str(path[-1]) == "kernel":
        if array.ndim == 2:
            return array.T
        if array.ndim == 4:
            return array.transpose(2, 3, 1, 0)
    return array


def _torch_shape(path: Tuple, shape: tuple) -> tuple:
    return tuple(to_torch_layout(path, np.empty(shape, np.bool_)).shape)


def to_numpy(value) -> np.ndarray:
    """A torch tensor or array-like -> numpy, keeping bfloat16 bit-exact."""
    if hasattr(value, "detach"):  # torch.Tensor, without importing torch
        t = value.detach().cpu()
        if str(t.dtype) == "torch.bfloat16":  # numpy has no bfloat16: reinterpret the bits
            import ml_dtypes
            import torch
            return t.view(dtype=torch.int16).numpy().view(ml_dtypes.bfloat16)
        return t.numpy()
    return np.asarray(value)


def param_paths(model_or_state) -> List[Tuple[Tuple, nnx.Variable]]:
    """(path, variable) for every nnx.Param of a module or state, in a stable order."""
    state = model_or_state if isinstance(model_or_state, nnx.State) else nnx.state(model_or_state, nnx.Param)
    return [(path, var) for path, var in nnx.to_flat_state(state) if isinstance(var, nnx.Param)]


def expected_torch_shapes(model, keymap: KeyMap) -> Dict[str, tuple]:
    """PyTorch key -> shape in PyTorch layout, for every parameter of `model` (abstract is fine)."""
    return {keymap.torch_key(p): _torch_shape(p, tuple(v.get_value().shape)) for p, v in param_paths(model)}


def load_state_dict(model: nnx.Module, state_dict: Mapping[str, object], keymap: KeyMap, *,
                    source: str = "state dict") -> None:
    """Copies a PyTorch-keyed state dict into `model` in place (cast to each parameter's dtype).

    Raises StateDictMismatchError naming every missing, unexpected and mis-shaped key
    before anything is modified.
    """
    params = param_paths(model)
    wanted = {keymap.torch_key(p): (p, v) for p, v in params}
    missing = sorted(k for k in wanted if k not in state_dict)
    unexpected = sorted(k for k in state_dict if k not in wanted and not keymap.is_ignored(k))
    mis_shaped = []
    for key, (path, var) in wanted.items():
        if key in state_dict:
            got = tuple(getattr(state_dict[key], "shape", np.shape(state_dict[key])))
            want = _torch_shape(path, tuple(var.get_value().shape))
            if got != want:
                mis_shaped.append((key, got, want))
    if missing or unexpected or mis_shaped:
        raise StateDictMismatchError(missing, unexpected, sorted(mis_shaped), source)
    for key, (path, var) in wanted.items():
        value = from_torch_layout(path, to_numpy(state_dict[key]))
        var.set_value(np.ascontiguousarray(value).astype(var.get_value().dtype))


def export_state_dict(model: nnx.Module, keymap: KeyMap) -> Dict[str, np.ndarray]:
    """Our parameters as a PyTorch-keyed dict of numpy arrays (PyTorch layouts)."""
    return {keymap.torch_key(p): np.ascontiguousarray(to_torch_layout(p, np.asarray(v.get_value())))
            for p, v in param_paths(model)}


LLAMA_KEYMAP = KeyMap(prefixes=(("lm_head.", "lm_head."), ("", "model.")))


def mllm_keymap(family: str) -> KeyMap:
    """Key rules of LLaVA-1.5 (`llava`) and LLaVA-HR (`llava_hr`) checkpoints."""
    common = (("llm.lm_head.", "lm_head."), ("llm.", "model."),
              ("projector.fc1.", "model.mm_projector.0."), ("projector.fc2.", "model.mm_projector.2."))
    if family == "llava":
        vision = (("vision.clip.", "model.vision_tower.vision_tower.vision_model."),)
    elif family == "llava_hr":
        vision = (("vision.clip.", "model.vision_tower.fast_vision_tower.vision_tower.vision_model."),
                  ("vision.convnext.", "model.vision_tower.slow_vision_tower.vision_tower."),
                  ("vision.adapters.", "model.vision_tower.align_stages_latent."),
                  ("vision.fusion.", "model.vision_tower.align_stages.0."))
    else:
        raise ValueError(f"unknown model family {family!r}")
    # The ConvNeXt classifier head ships in LLaVA-HR checkpoints but is never used.
    ignored = DEFAULT_IGNORED + (r"model\.vision_tower\.slow_vision_tower\.vision_tower\.head\..*",)
    return KeyMap(prefixes=common + vision, ignored=ignored)
