"""Our on-disk model checkpoint, and streaming import / export of HF-style PyTorch directories.

A checkpoint directory holds `model_config.json` (our MLLMConfig) and `params/`, an Orbax
PyTree checkpoint of the parameters (the nested dict of `nnx.state(model, nnx.Param)`).
Every writer here builds the directory under a temporary sibling and renames it into
place at the end, so an interrupted or failed write leaves nothing at the destination;
each also writes a manifest of file digests (convert/manifest.py), verified before a
restore or export reads any tensor (a directory without one, written before manifests
existed, is read unverified).

Import and export stream: the PyTorch side is read tensor by tensor (shapes from the
file headers), parameters are written to Orbax in parts (Orbax partial saving) and read
back in parts, so peak memory is about one part plus one tensor, whatever the model size.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import signal
import socket
import tempfile
import threading
from typing import Callable, Dict, Iterable, List, Optional, Tuple

import jax
import numpy as np
from orbax.checkpoint.experimental import v1 as ocp

from gamma_mod_jax.convert.hf_config import (hf_config_from_mllm, mllm_config_from_hf, mllm_config_to_dict,
                                             validate_hf_config)
from gamma_mod_jax.convert.hf_files import (CheckpointError, LazyStateDict, SafetensorsShardWriter, read_json)
from gamma_mod_jax.convert.hf_llava import EXPORT_KEYMAP, hf_llava_config_from_mllm, hf_llava_keymap, is_hf_llava
from gamma_mod_jax.convert.keymap import (KeyMap, from_torch_array, match_state_dict, mllm_keymap, param_paths,
                                          to_torch_layout)
from gamma_mod_jax.convert.manifest import verify_manifest, write_manifest
from gamma_mod_jax.models.config import MLLMConfig

MODEL_CONFIG_FILE = "model_config.json"
PARAMS_DIR = "params"
Path = Tuple  # a parameter path, e.g. ('llm', 'layers', 3, 'mlp', 'up_proj', 'kernel')


PARTIAL = ".partial-"


def _partial_prefix(dst: str) -> str:
    return f".{os.path.basename(dst)}{PARTIAL}"


def _host() -> str:
    return socket.gethostname().replace("-", "_")


def _owner_alive(name: str, prefix: str) -> bool:
    """Whether the writer that made temporary directory `name` (`<prefix><host>-<pid>-...`)
    may still be running: another host's, or a live process of this one."""
    host, _, rest = name[len(prefix):].partition("-")
    pid = rest.partition("-")[0]
    if host != _host() or not pid.isdigit():
        return host != _host()
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_partials(dst: str, log: Callable[[str], None] = print) -> List[str]:
    """Removes the temporary siblings of `dst` that earlier writers left when they were
    killed (their process is gone); returns their paths. Another live writer's are kept."""
    dst = os.path.abspath(dst)
    parent, prefix = os.path.dirname(dst), _partial_prefix(dst)
    removed = []
    if not os.path.isdir(parent):
        return removed
    for name in sorted(os.listdir(parent)):
        path = os.path.join(parent, name)
        if name.startswith(prefix) and os.path.isdir(path) and not _owner_alive(name, prefix):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
            log(f"removed {path}, left by an earlier write that was killed")
    return removed


class WriteInterrupted(BaseException):
    """SIGTERM inside an atomic write: unwinds like Ctrl-C so the temporary directory goes."""


@contextlib.contextmanager
def _terminate_as_exception():
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise WriteInterrupted(f"stopped by signal {signum}")

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def atomic_directory(dst: str, log: Callable[[str], None] = print, *, replace: bool = False):
    """Yields a temporary sibling of `dst`, renamed to `dst` only if the block succeeds.
    The temporary directory is removed on any failure, Ctrl-C and SIGTERM; ones left by
    writers killed harder (SIGKILL, power loss) are removed by the next write to `dst`.
    `replace`: an existing `dst` is replaced once the new one is complete (moved aside
    under a temporary name, then removed), instead of being an error."""
    dst = os.path.abspath(dst)
    if os.path.exists(dst) and not replace:
        raise CheckpointError(f"{dst}: already exists; refusing to overwrite it")
    parent = os.path.dirname(dst)
    os.makedirs(parent, exist_ok=True)
    remove_stale_partials(dst, log)
    tmp = tempfile.mkdtemp(prefix=f"{_partial_prefix(dst)}{_host()}-{os.getpid()}-", dir=parent)
    try:
        with _terminate_as_exception():
            yield tmp
            _move_into_place(tmp, dst)
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp, ignore_errors=True)


def _move_into_place(tmp: str, dst: str) -> None:
    """Renames the finished temporary directory `tmp` to `dst`; an existing `dst` is moved
    aside first (under a partial's name, removed by the next write if we die here) and
    removed after."""
    if os.path.exists(dst):
        old = f"{tmp}-replaced"
        os.rename(dst, old)
        os.rename(tmp, dst)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, dst)


def _nest(items: Iterable[Tuple[Path, object]]) -> dict:
    """{path: leaf} -> the nested dict Orbax stores (keys as strings)."""
    out: dict = {}
    for path, leaf in items:
        node = out
        for key in path[:-1]:
            node = node.setdefault(str(key), {})
        node[str(path[-1])] = leaf
    return out


def _flatten(tree: dict, prefix: Path = ()) -> List[Tuple[Tuple[str, ...], object]]:
    out = []
    for key, value in tree.items():
        if isinstance(value, dict):
            out += _flatten(value, prefix + (key,))
        else:
            out.append((prefix + (key,), value))
    return out


CONFIG_PY_FILE = "config.py"
_CONFIG_PY = '''"""ml-collections config of the model checkpoint in this directory (written by gamma-mod-jax):
`--config <this directory>/config.py` wherever a launcher takes a config."""

import json
import os

import ml_collections


def get_config(arg=None):
    with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "model_config.json")) as f:
        return ml_collections.ConfigDict({"model": json.load(f)})
'''


def _write_config(directory: str, cfg: MLLMConfig) -> None:
    """model_config.json, and config.py: the same as an ml-collections config file."""
    with open(os.path.join(directory, MODEL_CONFIG_FILE), "w") as f:
        json.dump(mllm_config_to_dict(cfg), f, indent=2)
    with open(os.path.join(directory, CONFIG_PY_FILE), "w") as f:
        f.write(_CONFIG_PY)


def save_checkpoint(dst: str, model, *, replace: bool = False) -> None:
    """Writes `model` (parameters + config) to a new directory `dst`, atomically
    (`replace`: an existing `dst` is replaced once the new one is complete). The
    parameters go to Orbax as they are (jax arrays, sharded or not): each process writes
    the shards it holds, nothing is gathered to one host. With several processes every
    process calls it with the same `dst` (a file system they share; Orbax's save is a
    collective); process 0 writes the config and the manifest once all have written their
    shards, then renames."""
    params = _nest((path, var.get_value()) for path, var in param_paths(model))
    if jax.process_count() > 1:
        _save_multiprocess(dst, params, model.config, replace=replace)
        return
    with atomic_directory(dst, replace=replace) as tmp:
        ocp.save(os.path.join(tmp, PARAMS_DIR), params)
        _write_config(tmp, model.config)
        write_manifest(tmp)


def _broadcast_text(text: str) -> str:
    """Process 0's `text` on every process (a collective: every process calls it)."""
    from jax.experimental import multihost_utils

    data = np.zeros(1024, np.uint8)
    raw = text.encode()[:1024]
    data[:len(raw)] = np.frombuffer(raw, np.uint8)
    got = np.asarray(multihost_utils.broadcast_one_to_all(data))
    return bytes(got[got != 0].astype(np.uint8)).decode()


def _save_multiprocess(dst: str, params: dict, cfg: MLLMConfig, *, replace: bool = False) -> None:
    """save_checkpoint with several processes: process 0 picks and creates the temporary
    directory and tells the others (or the error, which every process then raises); all
    write their shards into it through Orbax; process 0 finishes and renames it; the last
    broadcast is the barrier none returns before (and carries process 0's outcome)."""
    dst = os.path.abspath(dst)
    lead = jax.process_index() == 0
    answer = ""
    if lead:
        try:
            if os.path.exists(dst) and not replace:
                raise CheckpointError(f"{dst}: already exists; refusing to overwrite it")
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            remove_stale_partials(dst)
            answer = "ok:" + tempfile.mkdtemp(prefix=f"{_partial_prefix(dst)}{_host()}-{os.getpid()}-",
                                              dir=os.path.dirname(dst))
        except (OSError, CheckpointError) as e:
            answer = f"error:{e}"
    answer = _broadcast_text(answer)
    if not answer.startswith("ok:"):
        raise CheckpointError(answer[len("error:"):])
    tmp = answer[len("ok:"):]
    try:
        ocp.save(os.path.join(tmp, PARAMS_DIR), params)  # collective; returns once every shard is written
        outcome = "ok:"
        if lead:
            try:
                _write_config(tmp, cfg)
                write_manifest(tmp)
                _move_into_place(tmp, dst)
            except OSError as e:
                outcome = f"error:{dst}: {e}"
        outcome = _broadcast_text(outcome)
        if outcome != "ok:":
            raise CheckpointError(outcome[len("error:"):])
    finally:
        if lead and os.path.exists(tmp):
            shutil.rmtree(tmp, ignore_errors=True)


def _read_config_file(path: str) -> MLLMConfig:
    try:
        return MLLMConfig.from_dict(read_json(path))
    except (TypeError, ValueError) as e:
        if isinstance(e, CheckpointError):
            raise
        raise CheckpointError(f"{path}: not a model config ({e})") from None


# --------------------------------------------------------------------------- model sources

TRAINING_MODEL_DIR = "model"              # <workdir>/model: the final model launch.train writes
TRAINING_CHECKPOINTS_DIR = "checkpoints"  # <workdir>/checkpoints/<step>: training checkpoints
TRAINING_STATE_ITEM = "state"             # their train state (parameters under `params`)
EXPECTED_MODEL = ("expected a model directory (model_config.json + params/, written by launch.convert, "
                  "launch.adapt or launch.train as <workdir>/model) or a launch.train workdir (model/ or "
                  "checkpoints/<step>/)")


@dataclasses.dataclass(frozen=True)
class ModelSource:
    """Where a model is read from: a model directory (`save_checkpoint`, launch.convert,
    `<workdir>/model`) or a training checkpoint (`<workdir>/checkpoints/<step>`, whose
    train state holds the parameters under `params`, each as `<path>/value`)."""
    given: str                  # the path as named by the user
    directory: str              # the model directory, or the training checkpoint's step directory
    config: MLLMConfig
    step: Optional[int] = None  # the training step of a training checkpoint

    @property
    def is_training_checkpoint(self) -> bool:
        return self.step is not None

    def describe(self) -> str:
        if self.is_training_checkpoint:
            return f"{self.given} (training checkpoint {self.directory}, step {self.step})"
        return self.given if os.path.abspath(self.given) == self.directory else f"{self.given} ({self.directory})"


def training_model_config(workdir: str) -> MLLMConfig:
    """The model config of a launch.train run: `<workdir>/model_config.json` (written when
    the run starts), else the `model` of its resolved `config.json`."""
    path = os.path.join(workdir, MODEL_CONFIG_FILE)
    if os.path.isfile(path):
        return _read_config_file(path)
    run_config = os.path.join(workdir, "config.json")
    model = read_json(run_config).get("model") if os.path.isfile(run_config) else None
    if not isinstance(model, dict):
        raise CheckpointError(f"{workdir}: a training workdir without {MODEL_CONFIG_FILE} (nor a `model` in "
                              "config.json) gives no model config for its checkpoints")
    try:
        return MLLMConfig.from_dict(model)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{run_config}: `model` is not a model config ({e})") from None


def _training_steps(checkpoints_dir: str) -> List[int]:
    """Finished training checkpoints (Orbax's `<step>.orbax-checkpoint-tmp` excluded), newest first."""
    names = os.listdir(checkpoints_dir) if os.path.isdir(checkpoints_dir) else []
    return sorted((int(n) for n in names if n.isdigit()
                   and os.path.isdir(os.path.join(checkpoints_dir, n, TRAINING_STATE_ITEM))), reverse=True)


def resolve_model(path, log: Callable[[str], None] = print) -> ModelSource:
    """The model a launcher reads from `path`: a model directory; a training workdir,
    which resolves to its `model/` if present, else to its newest checkpoint whose manifest
    verifies (newer ones that do not are named in the log); or one training checkpoint
    `<workdir>/checkpoints/<step>`. The manifest of what it resolves to is verified here
    (CheckpointIntegrityError naming the file), before any config or tensor is read.
    CheckpointError naming `path` and what was expected otherwise. A ModelSource is
    returned as it is."""
    from gamma_mod_jax.convert.manifest import CheckpointIntegrityError

    if isinstance(path, ModelSource):
        return path
    directory = os.path.abspath(path)
    if not os.path.isdir(directory):
        raise CheckpointError(f"{path}: no such directory; {EXPECTED_MODEL}")
    if os.path.isfile(os.path.join(directory, MODEL_CONFIG_FILE)) and os.path.isdir(os.path.join(directory, PARAMS_DIR)):
        verify_manifest(directory)  # a directory without a manifest (older writes) is read unverified
        return ModelSource(path, directory, _read_config_file(os.path.join(directory, MODEL_CONFIG_FILE)))
    parent = os.path.dirname(directory)
    if (os.path.basename(parent) == TRAINING_CHECKPOINTS_DIR and os.path.basename(directory).isdigit()
            and os.path.isdir(os.path.join(directory, TRAINING_STATE_ITEM))):
        unverified = verify_manifest(directory)
        if unverified:
            log(f"warning: {unverified}; reading it unverified")
        return ModelSource(path, directory, training_model_config(os.path.dirname(parent)),
                           step=int(os.path.basename(directory)))
    final = os.path.join(directory, TRAINING_MODEL_DIR)
    if os.path.isfile(os.path.join(final, MODEL_CONFIG_FILE)):
        return dataclasses.replace(resolve_model(final, log), given=path)
    checkpoints_dir = os.path.join(directory, TRAINING_CHECKPOINTS_DIR)
    steps = _training_steps(checkpoints_dir)
    if os.path.isdir(checkpoints_dir):
        skipped = []
        for step in steps:
            step_dir = os.path.join(checkpoints_dir, str(step))
            try:
                unverified = verify_manifest(step_dir)
            except CheckpointIntegrityError as e:
                unverified = str(e)
            if unverified:
                skipped.append(unverified)
                continue
            for reason in skipped:
                log(f"warning: skipping {reason}")
            return ModelSource(path, step_dir, training_model_config(directory), step=step)
        raise CheckpointError(f"{path}: a training workdir with no {TRAINING_MODEL_DIR}/ and no verified checkpoint "
                              f"in {checkpoints_dir}" + (f" ({'; '.join(skipped)})" if skipped else ""))
    raise CheckpointError(f"{path}: not a model; {EXPECTED_MODEL}")


def read_model_config(src) -> MLLMConfig:
    """The model config of a model directory or training workdir / checkpoint (resolve_model)."""
    return resolve_model(src).config


def _load_params(source: ModelSource, abstract_leaves: Dict[Path, jax.ShapeDtypeStruct],
                 partial: bool) -> Dict[Path, object]:
    """{path: array} for the parameters named in `abstract_leaves` (all of them unless `partial`)."""
    if source.is_training_checkpoint:
        # The train state's `params` (an nnx.State: each leaf under `<path>/value`); the
        # optimizer state and counters beside it are not read.
        target = {"params": _nest((path + ("value",), leaf) for path, leaf in abstract_leaves.items())}
        where, item, partial, unwrap = source.directory, TRAINING_STATE_ITEM, True, lambda p: p[1:-1]
    else:
        target = _nest(abstract_leaves.items())
        where, item, unwrap = os.path.join(source.directory, PARAMS_DIR), None, lambda p: p
        if not os.path.isdir(where):
            raise CheckpointError(f"{where}: no parameter checkpoint")
    context = ocp.Context()
    context.pytree.loading.partial_load = partial
    try:
        with context:
            restored = ocp.load(where, target) if item is None else ocp.load(where, target, checkpointable_name=item)
    except Exception as e:  # Orbax reports structure/shape mismatches in many exception types
        raise CheckpointError(f"{where}: does not match the model config of {source.describe()} "
                              f"({type(e).__name__}: {str(e)[:2000]})") from None
    by_string = {tuple(map(str, p)): p for p in abstract_leaves}
    values = {by_string[unwrap(p)]: leaf for p, leaf in _flatten(restored)}
    missing = [p for p in abstract_leaves if p not in values]
    if missing:
        raise CheckpointError(f"{where}: no value for {len(missing)} parameter(s), e.g. "
                              f"{'/'.join(map(str, missing[0]))}")
    return values


def load_checkpoint(src, sharding_for: Optional[Callable] = None, config: Optional[MLLMConfig] = None):
    """Restores the model of `src` (a model directory, a training workdir or checkpoint:
    resolve_model, or a ModelSource) onto any device layout: `sharding_for(path,
    shape_dtype)` gives each parameter's target sharding (default: the first device), so
    only each device's own slices are read. `config`: restore with this config instead
    of the saved one (dtypes may differ)."""
    source = resolve_model(src)
    model = abstract_model_for(config if config is not None else source.config)
    return _fill(model, source, sharding_for)


def abstract_model_for(cfg: MLLMConfig):
    """The model of `cfg` with shape/dtype placeholders instead of arrays (allocates nothing;
    validates the config, e.g. MoD layers that do not exist)."""
    from gamma_mod_jax.models.mllm import abstract_model  # convert -> models, never -> api

    return abstract_model(cfg)


def abstract_params(model, sharding_for: Optional[Callable] = None) -> Dict[Path, jax.ShapeDtypeStruct]:
    """{path: ShapeDtypeStruct} of `model`'s parameters, placed by `sharding_for` (default: the first device)."""
    default = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])  # this process's
    out = {}
    for path, var in param_paths(model):
        leaf = var.get_value()
        out[path] = jax.ShapeDtypeStruct(leaf.shape, leaf.dtype,
                                         sharding=sharding_for(path, leaf) if sharding_for else default)
    return out


def read_params(src, abstract_leaves: Dict[Path, jax.ShapeDtypeStruct]) -> Dict[Path, object]:
    """The parameters named in `abstract_leaves` (a subset is fine) from the model of `src`
    (those without a sharding onto this process's first device)."""
    default = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    placed = {p: leaf if getattr(leaf, "sharding", None) is not None else
              jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=default) for p, leaf in abstract_leaves.items()}
    return _load_params(resolve_model(src), placed, partial=True)


def _fill(model, source: ModelSource, sharding_for):
    variables = dict(param_paths(model))
    for path, value in _load_params(source, abstract_params(model, sharding_for), partial=False).items():
        variables[path].set_value(value)
    return model


def _groups(abstract: Dict[Path, jax.ShapeDtypeStruct], budget: int) -> List[Dict[Path, jax.ShapeDtypeStruct]]:
    """Consecutive groups of parameters of about `budget` bytes each (at least one parameter)."""
    groups: List[Dict[Path, jax.ShapeDtypeStruct]] = [{}]
    size = 0
    for path, leaf in abstract.items():
        nbytes = int(np.prod(leaf.shape)) * np.dtype(leaf.dtype).itemsize
        if groups[-1] and size + nbytes > budget:
            groups.append({})
            size = 0
        groups[-1][path] = leaf
        size += nbytes
    return groups


def write_model(src, dst: str, *, mod=None, seed: int = 0, part_bytes: int = 2**30, replace: bool = False,
                log: Callable[[str], None] = print):
    """Writes the model of `src` (a model directory, a training workdir or checkpoint:
    resolve_model) as a model directory `dst`, streaming about `part_bytes` of parameters
    at a time, atomically. `mod`: a MoDConfig turning a dense model into a γ-MoD one
    (models/adapt.py; the router drawn from `seed`). Returns the written model config."""
    from gamma_mod_jax.models.adapt import fresh_values, plan_adaptation

    source = resolve_model(src, log)
    cfg = source.config
    if mod is not None:
        if cfg.mod is not None:
            raise CheckpointError(f"{source.describe()}: already a γ-MoD model (MoD layers {list(cfg.mod.layers)}); "
                                  "a layer selection applies to dense models only")
        cfg = dataclasses.replace(cfg, mod=mod)
    adaptation = plan_adaptation(source.config, cfg)  # also validates cfg (e.g. MoD layers that do not exist)
    target = abstract_params(abstract_model_for(cfg), lambda path, leaf: jax.sharding.SingleDeviceSharding(
        jax.devices("cpu")[0]))
    copied = {path: target[path] for path in adaptation.copied}
    groups = _groups(copied, part_bytes)
    log(f"{source.describe()}: {cfg.family}, {cfg.llm.num_hidden_layers} LLM layers"
        f"{'' if cfg.mod is None else f', γ-MoD layers {list(cfg.mod.layers)}'}; writing {len(copied)} "
        f"parameters in {len(groups)} part(s) to {dst}")
    with atomic_directory(dst, log, replace=replace) as tmp:
        params_dir = os.path.join(tmp, PARAMS_DIR)
        for group in groups:
            values = _load_params(source, group, partial=True)
            ocp.partial.save(params_dir, _nest((p, np.asarray(v)) for p, v in values.items()))
        if adaptation.fresh:
            fresh = fresh_values(cfg, adaptation.fresh, seed)
            ocp.partial.save(params_dir, _nest((p, np.asarray(v)) for p, v in fresh.items()))
            log(f"  {adaptation.added()} initialised (seed {seed})")
        ocp.partial.finalize(params_dir)
        _write_config(tmp, cfg)
        write_manifest(tmp)
    log(f"wrote {dst}")
    return cfg


# --------------------------------------------------------------------------- import


def _with_dtype(cfg: MLLMConfig, dtype: Optional[str], state_dict: LazyStateDict, keymap) -> MLLMConfig:
    """Parameters and compute in `dtype`, by default in the dtype the LLM weights are stored in."""
    if dtype is None:
        embed = keymap.torch_key(("llm", "embed_tokens", "embedding"))
        stored = state_dict[embed].dtype if embed in state_dict else None
        dtype = stored if stored in ("float32", "bfloat16", "float16") else cfg.param_dtype
    return dataclasses.replace(cfg, dtype=dtype, param_dtype=dtype)



def _source_mod_layers(cfg: MLLMConfig) -> tuple:
    return () if cfg.mod is None else tuple(sorted(cfg.mod.layers))


def _checked_tensor(tensor, key: str, shard: str, allow_nonfinite: bool) -> np.ndarray:
    """The stored tensor's values; CheckpointError for an integer / bool tensor (every
    parameter is floating point) or, unless `allow_nonfinite`, a NaN or Inf in it."""
    if not str(tensor.dtype).startswith(("float", "bfloat")):
        raise CheckpointError(f"{shard}: tensor {key!r} is stored as {tensor.dtype}; parameters must be floating "
                              "point (float32, bfloat16, float16)")
    value = np.asarray(tensor)
    if not allow_nonfinite:
        finite = np.isfinite(value.astype(np.float32) if value.dtype.itemsize < 4 else value)
        if not finite.all():
            bad = int(value.size - np.count_nonzero(finite))
            raise CheckpointError(f"{shard}: tensor {key!r} holds {bad} NaN/Inf value(s) of {value.size}; "
                                  "convert with --allow-nonfinite to keep them")
    return value


def _source_keymap(hf_config: dict, cfg: MLLMConfig, keys) -> KeyMap:
    if is_hf_llava(hf_config):
        return hf_llava_keymap(list(keys))
    return mllm_keymap(cfg.family, _source_mod_layers(cfg))


def convert_hf_checkpoint(src: str, dst: str, *, dtype: Optional[str] = None, mod=None, seed: int = 0,
                          part_bytes: Optional[int] = None, allow_nonfinite: bool = False,
                          vision_config: Optional[dict] = None, log: Callable[[str], None] = print) -> MLLMConfig:
    """Converts an original LLaVA / LLaVA-HR / Mini-Gemini / γ-MoD checkpoint directory, or a
    transformers LlavaForConditionalGeneration one, into our checkpoint at `dst`, streaming
    shard by shard. `dtype`: parameter and compute dtype of the result (default: as stored).
    `mod`: a MoDConfig turning a dense checkpoint into a γ-MoD one (the router drawn from
    `seed`). `vision_config`: vision-tower settings the checkpoint lacks
    (vision_towers.read_vision_config). config.json is validated before any weight file is
    opened; integer tensors and (unless `allow_nonfinite`) NaN/Inf values are errors.
    Returns the written model config."""
    from gamma_mod_jax.models.adapt import fresh_values, plan_adaptation

    config_path = os.path.join(src, "config.json")
    hf_config = read_json(config_path)
    validate_hf_config(hf_config, config_path)
    state_dict = LazyStateDict(src)
    source_cfg = mllm_config_from_hf(hf_config, {k: state_dict[k].shape for k in state_dict}, source=config_path,
                                     vision_config=vision_config)
    keymap = _source_keymap(hf_config, source_cfg, state_dict)
    cfg = _with_dtype(source_cfg, dtype, state_dict, keymap)
    if mod is not None:
        if cfg.mod is not None:
            raise CheckpointError(f"{config_path}: already a γ-MoD checkpoint (MoD layers {list(cfg.mod.layers)}); "
                                  "an ARank selection applies to dense checkpoints only")
        dense_cfg, cfg = cfg, dataclasses.replace(cfg, mod=mod)
    model = abstract_model_for(cfg)
    fresh = set(plan_adaptation(dense_cfg, cfg).fresh) if mod is not None else set()  # the router
    params = param_paths(model)
    chosen = match_state_dict(params, state_dict, keymap, source=src, skip=lambda path: path in fresh)

    shards = sorted({state_dict.shard_of(key) for _, _, key in chosen})
    sizes = {s: os.path.getsize(s) for s in shards}
    budget = part_bytes if part_bytes is not None else max(max(sizes.values()) // 2, 1)
    log(f"{src}: {cfg.family}, {cfg.llm.num_hidden_layers} LLM layers"
        f"{'' if cfg.mod is None else f', γ-MoD layers {list(cfg.mod.layers)}'}; {len(chosen)} tensors in "
        f"{len(shards)} file(s); writing {cfg.param_dtype} parameters to {dst}")
    with atomic_directory(dst, log) as tmp:
        params_dir = os.path.join(tmp, PARAMS_DIR)
        part, part_size, written = [], 0, 0

        def flush():
            nonlocal part, part_size
            if part:
                ocp.partial.save(params_dir, _nest(part))
            part, part_size = [], 0

        for number, shard in enumerate(shards, 1):
            entries = [(p, v, k) for p, v, k in chosen if state_dict.shard_of(k) == shard]
            log(f"  [{number}/{len(shards)}] {os.path.basename(shard)}: {len(entries)} tensors, "
                f"{sizes[shard] / 2**20:.1f} MiB")
            for path, var, key in entries:
                stored = _checked_tensor(state_dict[key], key, shard, allow_nonfinite)
                value = from_torch_array(path, stored, var.get_value().dtype)
                if part and part_size + value.nbytes > budget:
                    flush()
                part.append((path, value))
                part_size += value.nbytes
                written += 1
            state_dict.close(shard)
        if fresh:
            part += [(path, np.asarray(value)) for path, value in fresh_values(cfg, sorted(fresh, key=str), seed).items()]
            log(f"  router initialised ({cfg.mod.router_init}, seed {seed}) for MoD layers {list(cfg.mod.layers)}")
        flush()
        ocp.partial.finalize(params_dir)
        _write_config(tmp, cfg)
        write_manifest(tmp)
    log(f"wrote {dst}")
    return cfg


# --------------------------------------------------------------------------- export


EXPORT_FORMATS = ("original", "hf-llava")


def export_hf_checkpoint(src: str, dst: str, *, format: str = "original", image_token_index: Optional[int] = None,
                         max_shard_bytes: int = 5 * 2**30, log: Callable[[str], None] = print) -> None:
    """Writes our checkpoint `src` as an HF-style directory (safetensors shards + index +
    config.json), streaming shard by shard, atomically. `format`: 'original', the layout the
    original LLaVA / LLaVA-HR / Mini-Gemini / γ-MoD code loads, or 'hf-llava', transformers'
    LlavaForConditionalGeneration (LLaVA-1.5 models only; `image_token_index` sets its image
    token id when the model's placeholder lies outside the vocabulary)."""

    if format not in EXPORT_FORMATS:
        raise ValueError(f"unknown export format {format!r}; expected one of {', '.join(EXPORT_FORMATS)}")
    if image_token_index is not None and format != "hf-llava":
        raise ValueError("--image-token-index applies to --format hf-llava only")
    source = resolve_model(src)
    cfg = source.config
    if format == "hf-llava":
        hf_config = hf_llava_config_from_mllm(cfg, image_token_index)  # refuses what the class cannot hold
        keymap = EXPORT_KEYMAP
    else:
        hf_config = hf_config_from_mllm(cfg)
        keymap = mllm_keymap(cfg.family, _source_mod_layers(cfg))
    model = abstract_model_for(cfg)
    cpu = jax.sharding.SingleDeviceSharding(jax.devices("cpu")[0])
    groups: List[List[Tuple[Path, jax.ShapeDtypeStruct]]] = [[]]
    size = 0
    for path, var in param_paths(model):
        leaf = var.get_value()
        nbytes = int(np.prod(leaf.shape)) * np.dtype(leaf.dtype).itemsize * len(keymap.torch_keys(path))
        if groups[-1] and size + nbytes > max_shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append((path, jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=cpu)))
        size += nbytes
    log(f"{src}: exporting {cfg.family} to {dst} ({format} layout) in {len(groups)} safetensors file(s)")
    with atomic_directory(dst, log) as tmp:
        writer = SafetensorsShardWriter(tmp, num_shards=len(groups))
        for number, group in enumerate(groups, 1):
            values = _load_params(source, dict(group), partial=True)
            tensors = {}
            for path, _ in group:
                array = np.ascontiguousarray(to_torch_layout(path, np.asarray(values.pop(path))))
                for key in keymap.torch_keys(path):
                    tensors[key] = array
            name = writer.write(tensors)
            log(f"  [{number}/{len(groups)}] {name}: {len(tensors)} tensors")
        writer.finish(hf_config)
    log(f"wrote {dst}")
