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
from flax import nnx
from orbax.checkpoint.experimental import v1 as ocp

from gamma_mod_jax.convert.hf_config import (hf_config_from_mllm, mllm_config_from_hf, mllm_config_to_dict,
                                             validate_hf_config)
from gamma_mod_jax.convert.hf_files import (CheckpointError, LazyStateDict, SafetensorsShardWriter, read_json)
from gamma_mod_jax.convert.keymap import (from_torch_array, match_state_dict, mllm_keymap, param_paths,
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
def atomic_directory(dst: str, log: Callable[[str], None] = print):
    """Yields a temporary sibling of `dst`, renamed to `dst` only if the block succeeds.
    The temporary directory is removed on any failure, Ctrl-C and SIGTERM; ones left by
    writers killed harder (SIGKILL, power loss) are removed by the next write to `dst`."""
    dst = os.path.abspath(dst)
    if os.path.exists(dst):
        raise CheckpointError(f"{dst}: already exists; refusing to overwrite it")
    parent = os.path.dirname(dst)
    os.makedirs(parent, exist_ok=True)
    remove_stale_partials(dst, log)
    tmp = tempfile.mkdtemp(prefix=f"{_partial_prefix(dst)}{_host()}-{os.getpid()}-", dir=parent)
    try:
        with _terminate_as_exception():
            yield tmp
            os.rename(tmp, dst)
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp, ignore_errors=True)


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


def save_checkpoint(dst: str, model) -> None:
    """Writes `model` (parameters + config) to a new directory `dst`, atomically. The
    parameters go to Orbax as they are (jax arrays, sharded or not): each process writes
    the shards it holds, nothing is gathered to one host. With several processes every
    process calls it with the same `dst` (a file system they share); process 0 writes the
    config and the manifest once all have written their shards, then renames."""
    params = _nest((path, var.get_value()) for path, var in param_paths(model))
    if jax.process_count() > 1:
        _save_multiprocess(dst, params, model.config)
        return
    with atomic_directory(dst) as tmp:
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


def _save_multiprocess(dst: str, params: dict, cfg: MLLMConfig) -> None:
    """save_checkpoint with several processes: process 0 picks and creates the temporary
    directory and tells the others (or the error, which every process then raises); all
    write their shards into it through Orbax; process 0 finishes and renames it; the last
    broadcast is the barrier none returns before (and carries process 0's outcome)."""
    dst = os.path.abspath(dst)
    lead = jax.process_index() == 0
    answer = ""
    if lead:
        try:
            if os.path.exists(dst):
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
                os.rename(tmp, dst)
            except OSError as e:
                outcome = f"error:{dst}: {e}"
        outcome = _broadcast_text(outcome)
        if outcome != "ok:":
            raise CheckpointError(outcome[len("error:"):])
    finally:
        if lead and os.path.exists(tmp):
            shutil.rmtree(tmp, ignore_errors=True)


def read_model_config(src: str) -> MLLMConfig:
    path = os.path.join(src, MODEL_CONFIG_FILE)
    try:
        return MLLMConfig.from_dict(read_json(path))
    except (TypeError, ValueError) as e:
        if isinstance(e, CheckpointError):
            raise
        raise CheckpointError(f"{path}: not a model config ({e})") from None


def _load_params(src: str, abstract_leaves: Dict[Path, jax.ShapeDtypeStruct], partial: bool) -> Dict[Path, object]:
    """{path: array} for the parameters named in `abstract_leaves` (all of them unless `partial`)."""
    target = _nest(abstract_leaves.items())
    params_dir = os.path.join(os.path.abspath(src), PARAMS_DIR)
    if not os.path.isdir(params_dir):
        raise CheckpointError(f"{params_dir}: no parameter checkpoint")
    context = ocp.Context()
    context.pytree.loading.partial_load = partial
    try:
        with context:
            restored = ocp.load(params_dir, target)
    except Exception as e:  # Orbax reports structure/shape mismatches in many exception types
        raise CheckpointError(f"{params_dir}: does not match {os.path.join(src, MODEL_CONFIG_FILE)} "
                              f"({type(e).__name__}: {str(e)[:2000]})") from None
    by_string = {tuple(map(str, p)): p for p in abstract_leaves}
    return {by_string[p]: leaf for p, leaf in _flatten(restored)}


def load_checkpoint(src: str, sharding_for: Optional[Callable] = None, config: Optional[MLLMConfig] = None):
    """Restores a model written by `save_checkpoint` / `convert_hf_checkpoint` onto any device
    layout: `sharding_for(path, shape_dtype)` gives each parameter's target sharding
    (default: this process's first device), so only each device's own slices are read:
    with several processes and a sharding over all of them (FSDP), each reads its part.
    `config`: restore with this config instead of the saved one (dtypes may differ)."""
    from gamma_mod_jax.api import abstract_model  # convert/ -> models/: the API builds the model

    verify_manifest(os.path.abspath(src))
    cfg = config if config is not None else read_model_config(src)
    model = abstract_model(cfg)
    default = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    variables = dict(param_paths(model))
    abstract = {}
    for path, var in variables.items():
        leaf = var.get_value()
        abstract[path] = jax.ShapeDtypeStruct(leaf.shape, leaf.dtype,
                                              sharding=sharding_for(path, leaf) if sharding_for else default)
    for path, value in _load_params(src, abstract, partial=False).items():
        variables[path].set_value(value)
    return model


# --------------------------------------------------------------------------- import


def _with_dtype(cfg: MLLMConfig, dtype: Optional[str], state_dict: LazyStateDict) -> MLLMConfig:
    """Parameters and compute in `dtype`, by default in the dtype the LLM weights are stored in."""
    if dtype is None:
        stored = state_dict["model.embed_tokens.weight"].dtype if "model.embed_tokens.weight" in state_dict else None
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


def convert_hf_checkpoint(src: str, dst: str, *, dtype: Optional[str] = None, mod=None, seed: int = 0,
                          part_bytes: Optional[int] = None, allow_nonfinite: bool = False,
                          log: Callable[[str], None] = print) -> MLLMConfig:
    """Converts an original LLaVA / LLaVA-HR / γ-MoD checkpoint directory into our checkpoint
    at `dst`, streaming shard by shard. `dtype`: parameter and compute dtype of the result
    (default: as the config says). `mod`: a MoDConfig turning a dense checkpoint into a γ-MoD
    one (the router drawn from `seed`). config.json is validated before any weight file is
    opened; integer tensors and (unless `allow_nonfinite`) NaN/Inf values are errors.
    Returns the written model config."""
    from gamma_mod_jax.api import abstract_model
    from gamma_mod_jax.models.llama import make_router

    config_path = os.path.join(src, "config.json")
    hf_config = read_json(config_path)
    validate_hf_config(hf_config, config_path)
    state_dict = LazyStateDict(src)
    source_cfg = mllm_config_from_hf(hf_config, {k: state_dict[k].shape for k in state_dict}, source=config_path)
    cfg = _with_dtype(source_cfg, dtype, state_dict)
    if mod is not None:
        if cfg.mod is not None:
            raise CheckpointError(f"{config_path}: already a γ-MoD checkpoint (MoD layers {list(cfg.mod.layers)}); "
                                  "an ARank selection applies to dense checkpoints only")
        cfg = dataclasses.replace(cfg, mod=mod)
    model = abstract_model(cfg)  # validates the config (e.g. MoD layers that do not exist)
    adapting = mod is not None
    keymap = mllm_keymap(cfg.family, _source_mod_layers(source_cfg))
    params = param_paths(model)
    is_router = lambda path: path[:2] == ("llm", "router")
    chosen = match_state_dict(params, state_dict, keymap, source=src, skip=is_router if adapting else lambda p: False)

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
        if adapting:
            router = make_router(cfg.llm.hidden_size, cfg.mod, param_dtype=cfg.weight_dtype, rngs=nnx.Rngs(seed))
            part += [(("llm", "router") + tuple(path), np.asarray(var.get_value()))
                     for path, var in param_paths(router)]
            log(f"  router initialised ({cfg.mod.router_init}, seed {seed}) for MoD layers {list(cfg.mod.layers)}")
        flush()
        ocp.partial.finalize(params_dir)
        _write_config(tmp, cfg)
        write_manifest(tmp)
    log(f"wrote {dst}")
    return cfg


# --------------------------------------------------------------------------- export


def export_hf_checkpoint(src: str, dst: str, *, max_shard_bytes: int = 5 * 2**30,
                         log: Callable[[str], None] = print) -> None:
    """Writes our checkpoint `src` as an HF-style directory the original PyTorch code loads
    (safetensors shards + index + config.json), streaming shard by shard, atomically."""
    from gamma_mod_jax.api import abstract_model

    verify_manifest(os.path.abspath(src))
    cfg = read_model_config(src)
    model = abstract_model(cfg)
    keymap = mllm_keymap(cfg.family, _source_mod_layers(cfg))
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
    log(f"{src}: exporting {cfg.family} to {dst} in {len(groups)} safetensors file(s)")
    with atomic_directory(dst, log) as tmp:
        writer = SafetensorsShardWriter(tmp, num_shards=len(groups))
        for number, group in enumerate(groups, 1):
            values = _load_params(src, dict(group), partial=True)
            tensors = {}
            for path, _ in group:
                array = np.ascontiguousarray(to_torch_layout(path, np.asarray(values.pop(path))))
                for key in keymap.torch_keys(path):
                    tensors[key] = array
            name = writer.write(tensors)
            log(f"  [{number}/{len(groups)}] {name}: {len(tensors)} tensors")
        writer.finish(hf_config_from_mllm(cfg))
    log(f"wrote {dst}")
