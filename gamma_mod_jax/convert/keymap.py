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

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gamma_mod_jax.models.scan import per_layer_paths, stacked_at

# PyTorch buffers that never correspond to parameters.
DEFAULT_IGNORED = (r".*rotary_emb\.inv_freq$", r".*\.position_ids$", r".*num_batches_tracked$")


class StateDictMismatchError(ValueError):
    """A state dict does not fit the model: lists every missing, unexpected and mis-shaped
    key, and shared tensors whose stored copies differ."""

    def __init__(self, missing: Sequence[str], unexpected: Sequence[str],
                 mis_shaped: Sequence[Tuple[str, tuple, tuple]], source: str = "state dict",
                 differing_copies: Sequence[Sequence[str]] = ()):
        self.missing, self.unexpected, self.mis_shaped = list(missing), list(unexpected), list(mis_shaped)
        self.differing_copies = [list(keys) for keys in differing_copies]
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
        for keys in self.differing_copies:
            lines.append(f"  copies of one shared tensor differ: {', '.join(keys)}")
        super().__init__("\n".join(lines))


@dataclasses.dataclass(frozen=True)
class KeyMap:
    """Prefix rules (our dotted prefix, PyTorch prefix), first match wins; shared rules
    (our dotted prefix, several PyTorch prefixes) for one tensor stored under several
    keys (the γ-MoD router under every MoD layer); PyTorch keys to ignore (regexes)."""
    prefixes: Tuple[Tuple[str, str], ...]
    ignored: Tuple[str, ...] = DEFAULT_IGNORED
    shared: Tuple[Tuple[str, Tuple[str, ...]], ...] = ()

    def torch_keys(self, path: Tuple) -> Tuple[str, ...]:
        """PyTorch key(s) of one of our parameter paths (several for a shared tensor)."""
        *body, leaf = [str(p) for p in path]
        torch_leaf = {"kernel": "weight", "scale": "weight", "embedding": "weight"}.get(leaf, leaf)
        dotted = ".".join(body + [torch_leaf])
        for ours, theirs in self.shared:
            if dotted.startswith(ours):
                return tuple(t + dotted[len(ours):] for t in theirs)
        for ours, theirs in self.prefixes:
            if dotted.startswith(ours):
                return (theirs + dotted[len(ours):],)
        raise KeyError(f"no prefix rule maps parameter {'.'.join(map(str, path))!r}")

    def torch_key(self, path: Tuple) -> str:
        """The PyTorch key of a parameter stored once."""
        keys = self.torch_keys(path)
        if len(keys) != 1:
            raise KeyError(f"parameter {'.'.join(map(str, path))!r} is stored under several keys: {keys}")
        return keys[0]

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


class LayerSlice:
    """One layer's slice of a stacked parameter (a scanned run, `models/scan.py`), read
    and written like the nnx.Param it stands for. Writes are collected and applied to
    the stacked parameter at once when every layer of the run has one (as every loader
    does: a partly written run keeps its old value)."""

    def __init__(self, stacked: nnx.Variable, index: int, pending: dict):
        self.stacked, self.index, self._pending = stacked, index, pending

    def get_value(self):
        value = self.stacked.get_value()
        if isinstance(value, jax.ShapeDtypeStruct):  # an abstract model
            return jax.ShapeDtypeStruct(value.shape[1:], value.dtype)
        return value[self.index]

    def set_value(self, value) -> None:
        self._pending[self.index] = value
        count = self.stacked.get_value().shape[0]
        if len(self._pending) == count:
            parts = [self._pending.pop(j) for j in range(count)]
            stack = np.stack if all(isinstance(p, np.ndarray) for p in parts) else jnp.stack
            dtype = self.stacked.get_value().dtype
            self.stacked.set_value(stack([p.astype(dtype) for p in parts]))


def _path_key(path: Tuple) -> Tuple:
    return tuple((0, p, "") if isinstance(p, int) else (1, 0, str(p)) for p in path)


def param_paths(model_or_state) -> List[Tuple[Tuple, object]]:
    """(path, variable) for every nnx.Param of a module or state, sorted by path. Stacked
    runs of scanned layers (`<name>_stacked/<run>/...`, see models/scan.py) appear as their
    layers' own parameters (`<name>/<layer>/...`, a `LayerSlice` each), so everything
    keyed by these paths (PyTorch keys, our checkpoints) is the same with scan on or off."""
    state = model_or_state if isinstance(model_or_state, nnx.State) else nnx.state(model_or_state, nnx.Param)
    params = [(tuple(path), var) for path, var in nnx.to_flat_state(state) if isinstance(var, nnx.Param)]
    stacked = lambda path: stacked_at(path) is not None
    layers = per_layer_paths([(path, var.get_value().shape[0] if stacked(path) else 0) for path, var in params])
    plain = []
    for (path, var), paths in zip(params, layers):
        if not stacked(path):
            plain.append((path, var))
            continue
        pending: dict = {}  # one per stacked parameter: its layers' writes, applied together
        plain += [(layer_path, LayerSlice(var, j, pending)) for j, layer_path in enumerate(paths)]
    return sorted(plain, key=lambda item: _path_key(item[0]))


def expected_torch_shapes(model, keymap: KeyMap) -> Dict[str, tuple]:
    """PyTorch key -> shape in PyTorch layout, for every parameter of `model` (abstract is fine)."""
    return {k: _torch_shape(p, tuple(v.get_value().shape)) for p, v in param_paths(model) for k in keymap.torch_keys(p)}


def match_state_dict(params: Sequence[Tuple[Tuple, nnx.Variable]], state_dict: Mapping[str, object],
                     keymap: KeyMap, *, source: str = "state dict",
                     skip: Callable[[Tuple], bool] = lambda path: False) -> List[Tuple[Tuple, nnx.Variable, str]]:
    """(path, variable, PyTorch key to read) for every parameter in `params` not `skip`ped.

    Only shapes are looked at (values may be lazy), except for a shared tensor stored
    under several keys, whose copies are read and must be equal. Raises
    StateDictMismatchError naming every missing, unexpected and mis-shaped key (and
    differing copies) at once.
    """
    missing, mis_shaped, differing, known, chosen = [], [], [], set(), []
    for path, var in params:
        keys = keymap.torch_keys(path)
        known.update(keys)
        if skip(path):
            continue
        present = [k for k in keys if k in state_dict]
        if not present:
            missing.append(keys[0] if len(keys) == 1 else f"{keys[0]} (or any of {', '.join(keys[1:])})")
            continue
        want = _torch_shape(path, tuple(var.get_value().shape))
        bad = [(k, tuple(getattr(state_dict[k], "shape", np.shape(state_dict[k]))), want) for k in present]
        bad = [b for b in bad if b[1] != want]
        if bad:
            mis_shaped += bad
            continue
        if len(present) > 1:
            first = to_numpy(state_dict[present[0]])
            if any(not np.array_equal(first, to_numpy(state_dict[k])) for k in present[1:]):
                differing.append(present)
                continue
        chosen.append((path, var, present[0]))
    unexpected = sorted(k for k in state_dict if k not in known and not keymap.is_ignored(k))
    if missing or unexpected or mis_shaped or differing:
        raise StateDictMismatchError(sorted(missing), unexpected, sorted(mis_shaped), source, differing)
    return chosen


def load_state_dict(model: nnx.Module, state_dict: Mapping[str, object], keymap: KeyMap, *,
                    source: str = "state dict") -> None:
    """Copies a PyTorch-keyed state dict into `model` in place (cast to each parameter's
    dtype), after `match_state_dict` found it complete: on a mismatch nothing is modified."""
    for path, var, key in match_state_dict(param_paths(model), state_dict, keymap, source=source):
        var.set_value(from_torch_array(path, state_dict[key], var.get_value().dtype))


def from_torch_array(path: Tuple, value, dtype) -> np.ndarray:
    """One PyTorch tensor (or array-like) as our parameter: layout and dtype converted."""
    return np.asarray(from_torch_layout(path, to_numpy(value)), dtype=dtype, order="C")


def export_state_dict(model: nnx.Module, keymap: KeyMap) -> Dict[str, np.ndarray]:
    """Our parameters as a PyTorch-keyed dict of numpy arrays (PyTorch layouts)."""
    out = {}
    for path, var in param_paths(model):
        value = np.ascontiguousarray(to_torch_layout(path, np.asarray(var.get_value())))
        for key in keymap.torch_keys(path):
            out[key] = value
    return out


LLAMA_KEYMAP = KeyMap(prefixes=(("lm_head.", "lm_head."), ("", "model.")))


def mllm_keymap(family: str, mod_layers: Sequence[int] = ()) -> KeyMap:
    """Key rules of LLaVA-1.5 (`llava`), LLaVA-HR (`llava_hr`) and γ-MoD checkpoints (the
    shared router is stored as `model.layers.{i}.router.weight` for every MoD layer i);
    Mini-Gemini (`mgm`) from `keymap_mgm.py`."""
    if family == "mgm":
        from gamma_mod_jax.convert.keymap_mgm import mgm_keymap  # it builds on this module
        return mgm_keymap(mod_layers)
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
    shared = ((("llm.router.", tuple(f"model.layers.{i}.router." for i in sorted(mod_layers))),)
              if mod_layers else ())
    return KeyMap(prefixes=common + vision, ignored=ignored, shared=shared)
