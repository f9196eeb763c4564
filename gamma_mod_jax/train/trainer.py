"""The training loop: model from the config (random, or from a checkpoint, adapted to γ-MoD
when the config asks for MoD layers the checkpoint lacks), optimizer, data iterator,
checkpoints with automatic resume, metrics, SIGTERM handling.

`step` below counts optimizer updates; with `optim.accumulation_steps = k` each update
takes k micro-batches. Checkpoints hold the train state (parameters, optimizer, counters)
and the data iterator, so a resumed run continues with the same batches and losses.

Parallelism (gamma_mod_jax/parallel): `config.parallelism` "pjit" (default) runs the
step as one jax.jit over a (data, fsdp, tensor) mesh (`config.mesh`, default all
devices on `data`) with parameters and optimizer state sharded by logical axis names
(`config.sharding_rules`, default parallel.logical.DEFAULT_RULES) and donated; "pmap"
runs plain data parallelism with replicated state and pmean-averaged gradients. Every
process derives the same global batch plan and encodes its own rows of each global
batch (`data.batch_size` examples per process and micro-batch; the global batch is their
concatenation in process order), so all processes hold the same shapes at every step.
Checkpoints hold global arrays and the data position as a count of global batches, so
they restore onto another mesh, process count or parallelism.
With several processes every process saves and restores, metrics come from process
0, and the processes agree at every micro-batch on whether all have data and whether
any got SIGTERM, so they stop together.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import os
import re
import signal
import time
from typing import Callable, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from gamma_mod_jax.models.config import MLLMConfig
from gamma_mod_jax.parallel import data_parallel
from gamma_mod_jax.parallel.mesh import DEFAULT_MESH, describe, make_mesh
from gamma_mod_jax.parallel.sharding import BatchPlacer, like_params, param_shardings, place, replicated
from gamma_mod_jax.train.distill import load_teacher
from gamma_mod_jax.train.metrics import MetricsWriter
from gamma_mod_jax.train.optim import count_trainable, make_optimizer
from gamma_mod_jax.train.step import BATCH_KEYS, TrainState, all_finite, init_train_state, train_step


class TrainingError(RuntimeError):
    """Training stopped on purpose (too many non-finite steps in a row, a train state that
    is not finite, no data at all); the message says which checkpoint holds the last good state."""


class CheckpointWriteError(OSError):
    """A checkpoint (or the run directory) cannot be written: read-only, full disk, not a
    directory. The message names the path; the previous checkpoint is left intact."""


def model_for_training(config, log=print):
    """The model a run starts from: `config.model` (random weights from `config.seed`) or
    `config.init_checkpoint` (our checkpoint directory; `config.model` may be left None to
    take its config). The checkpoint may lack parts that `config.model` adds, which are
    then freshly initialised: the γ-MoD router (a dense checkpoint adapted to γ-MoD, every
    other weight copied) and LLaVA-HR's MR-Adapters (a stage-1 model entering stage 2)."""
    from gamma_mod_jax import api
    from gamma_mod_jax.convert.checkpoint import load_checkpoint, read_model_config
    from gamma_mod_jax.convert.keymap import param_paths

    cfg = api.model_config(config.model) if config.get("model") is not None else None
    checkpoint = config.get("init_checkpoint")
    if not checkpoint:
        if cfg is None:
            raise ValueError("the config needs `model` or `init_checkpoint`")
        log(f"model: random initialisation (seed {config.seed})")
        return api.build_model(cfg, seed=config.seed)
    saved = read_model_config(checkpoint)
    if cfg is None:
        return load_checkpoint(checkpoint, config=saved)
    add_router = cfg.mod is not None and saved.mod is None
    add_adapters = bool(cfg.adapter_after_layers) and not saved.adapter_after_layers
    comparable = dataclasses.replace(saved, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                                     mod=cfg.mod if add_router else saved.mod,
                                     adapter_after_layers=cfg.adapter_after_layers if add_adapters
                                     else saved.adapter_after_layers)
    if comparable != cfg:
        diff = [f.name for f in dataclasses.fields(MLLMConfig) if getattr(comparable, f.name) != getattr(cfg, f.name)]
        raise ValueError(f"{checkpoint}: its model config differs from config.model in {diff}")
    if not (add_router or add_adapters):
        log(f"model: {checkpoint}")
        return load_checkpoint(checkpoint, config=cfg)
    source = load_checkpoint(checkpoint, config=dataclasses.replace(saved, dtype=cfg.dtype, param_dtype=cfg.param_dtype))
    model = api.build_model(cfg, seed=config.seed)
    target = dict(param_paths(model))
    for path, var in param_paths(source):
        target[path].set_value(var.get_value())
    added = [name for name, on in (("γ-MoD router", add_router), ("MR-Adapters", add_adapters)) if on]
    log(f"model: {checkpoint}, with {' and '.join(added)} freshly initialised (seed {config.seed})")
    return model


def _checkpoint_manager(directory: str, train_cfg) -> ocp.CheckpointManager:
    # No max_to_keep: _Checkpoints deletes old steps itself, only once a newer one verifies.
    # cleanup_tmp_directories: a save that failed (full disk) or was killed leaves
    # `<step>.orbax-checkpoint-tmp`; the next run removes it.
    options = ocp.CheckpointManagerOptions(max_to_keep=None, enable_async_checkpointing=train_cfg.async_checkpoints,
                                           create=True, cleanup_tmp_directories=True)
    return ocp.CheckpointManager(directory, options=options)


def _is_grain_iterator(it) -> bool:
    import grain

    return isinstance(it, (grain.DatasetIterator, grain.DataLoaderIterator))


@jax.jit
def _finite_per_leaf(leaves):
    return jnp.stack([all_finite(x) for x in leaves])


def _first_nonfinite_leaf(tree) -> Optional[str]:
    """Path of the first leaf of `tree` holding a NaN or Inf, or None (one host sync)."""
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    flags = _finite_per_leaf([x for _, x in flat])
    bad = np.flatnonzero(~np.asarray(_host_value(flags)))
    return None if not bad.size else jax.tree_util.keystr(flat[int(bad[0])][0])


_TENSORSTORE_OS_ERROR = re.compile(r"os_error_code='?(\d+)")
_TENSORSTORE_PATH = re.compile(r'(?:Failed writing|local file): "([^"]+)"')


def _os_error_in(e: BaseException) -> Optional[Tuple[str, Optional[str]]]:
    """(description, path) of the operating-system error behind `e`, if any: an OSError
    in its chain, or tensorstore's ValueError carrying `os_error_code=N` (how Orbax
    reports a full disk or a read-only file system)."""
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, OSError):
            return (e.strerror or str(e)), e.filename
        code = _TENSORSTORE_OS_ERROR.search(str(e))
        if code:
            path = _TENSORSTORE_PATH.search(str(e))
            return f"{os.strerror(int(code.group(1)))} (errno {code.group(1)})", path.group(1) if path else None
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return None


class _QuietWriteFailures(logging.Filter):
    """Drops asyncio's "Future exception was never retrieved" records of tensorstore write
    failures: Orbax's parallel writes each fail on a full disk, and the save's own error
    (one line, exit status 2) already says so."""

    def filter(self, record):
        exc = record.exc_info[1] if record.exc_info else None
        text = record.getMessage() + (str(exc) if exc is not None else "")
        return not ("never retrieved" in text and _TENSORSTORE_OS_ERROR.search(text))


def check_writable(directory: str) -> None:
    """Creates `directory` if needed and writes, syncs and removes a probe file in it;
    CheckpointWriteError naming the path otherwise (read-only, full, a file in the way)."""
    probe = os.path.join(directory, f".write-test-{os.getpid()}")
    try:
        os.makedirs(directory, exist_ok=True)
        with open(probe, "wb") as f:
            f.write(b"0" * 4096)
            f.flush()
            os.fsync(f.fileno())
        os.remove(probe)
    except OSError as e:
        raise CheckpointWriteError(f"{directory}: not a writable directory ({e.strerror or e})") from None


class _Checkpoints:
    """Training checkpoints in `<workdir>/checkpoints/<step>/`: Orbax saves (asynchronous or
    not) followed by a manifest of file digests (convert/manifest.py) once each save has
    completed; restore takes the newest step that verifies and is finite; retention
    (`keep_checkpoints`) deletes old steps only once newer ones verified, so the last
    verified checkpoint is never deleted."""

    def __init__(self, workdir: str, train_cfg, log):
        self.directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
        self.rejected_directory = os.path.abspath(os.path.join(workdir, "checkpoints_rejected"))
        self.keep = int(train_cfg.keep_checkpoints) if train_cfg.keep_checkpoints else None  # None: keep all
        self.log = log
        self.manager = _checkpoint_manager(self.directory, train_cfg)
        if not any(isinstance(f, _QuietWriteFailures) for f in logging.getLogger("asyncio").filters):
            logging.getLogger("asyncio").addFilter(_QuietWriteFailures())
        self.asynchronous = bool(train_cfg.async_checkpoints)
        self.pending: list = []     # saved steps whose manifest is not written yet
        self.verified: list = []    # steps known good (restored, or saved by this run with a manifest)

    def step_directory(self, step: int) -> str:
        return os.path.join(self.directory, str(step))

    def latest_step(self) -> Optional[int]:
        return self.manager.latest_step()

    def last_good(self) -> str:
        return self.step_directory(self.verified[-1]) if self.verified else "none (no checkpoint written yet)"

    def save(self, step: int, state, data_iter, *, force=False) -> bool:
        """Saves `state` at `step` unless it holds a non-finite value (TrainingError then)."""
        import grain

        self.finish()
        bad = _first_nonfinite_leaf(state)
        if bad is not None:
            raise TrainingError(f"step {step}: the train state holds non-finite values (first: {bad}); not saved. "
                                f"Last good checkpoint: {self.last_good()}")
        args = {"state": ocp.args.StandardSave(state)}
        if _is_grain_iterator(data_iter):  # one file per process
            args["data"] = grain.checkpoint.CheckpointSave(data_iter)
        elif hasattr(data_iter, "get_state"):  # any other checkpointable iterator (single process)
            args["data_json"] = ocp.args.JsonSave(data_iter.get_state())
        with self._writing(step):
            saved = self.manager.save(step, args=ocp.args.Composite(**args), force=force)
        if saved:
            self.pending.append(step)
            if not self.asynchronous:
                self.finish()
        return saved

    def finish(self) -> None:
        """Waits for the saves in flight, writes their manifests, applies retention."""
        if not self.pending:
            return
        from gamma_mod_jax.convert.manifest import write_manifest

        steps, self.pending = self.pending, []  # a failed save is not retried, nor verified
        with self._writing(steps[-1]):
            self.manager.wait_until_finished()
            for step in steps:
                if jax.process_index() == 0:
                    write_manifest(self.step_directory(step))
        self.verified += steps
        self._apply_retention()

    def _apply_retention(self) -> None:
        if self.keep is None or not self.verified:
            return
        kept = sorted(self.verified)[-self.keep:]
        for step in self.manager.all_steps():
            if step < kept[-1] and step not in kept:
                self.manager.delete(step)
        self.verified = kept

    @contextlib.contextmanager
    def _writing(self, step: int):
        try:
            yield
        except Exception as e:
            cause = _os_error_in(e)
            if cause is None:
                raise
            what, path = cause
            raise CheckpointWriteError(f"cannot write the checkpoint of step {step} at "
                                       f"{path or self.step_directory(step)}: {what}; last good checkpoint: "
                                       f"{self.last_good()}") from None

    def restore_newest(self, abstract_state, data_iter):
        """(step, state) of the newest checkpoint that verifies, restores and is finite, or
        (None, None) when there is none. Newer ones that fail are named in the log with the
        reason and moved to `checkpoints_rejected/` (kept, out of the way of new saves);
        when every checkpoint fails, CheckpointIntegrityError lists them all."""
        from gamma_mod_jax.convert.manifest import CheckpointIntegrityError, verify_manifest

        rejected = []
        for step in sorted(self.manager.all_steps(), reverse=True):
            directory = self.step_directory(step)
            try:
                unverified = verify_manifest(directory)
                if unverified:
                    self.log(f"warning: {unverified}; restoring it unverified")
                state = _restore(self.manager, step, abstract_state, data_iter, log=self.log)
                bad = _first_nonfinite_leaf(state)
                if bad is not None:
                    raise CheckpointIntegrityError(f"checkpoint {directory}: non-finite values in {bad}")
            except Exception as e:  # noqa: BLE001 - a bad checkpoint fails in many ways; each is reported
                reason = str(e).strip().splitlines()[0][:500] if str(e).strip() else type(e).__name__
                if not isinstance(e, CheckpointIntegrityError):
                    reason = f"checkpoint {directory}: cannot be restored ({type(e).__name__}: {reason})"
                self.log(f"skipping {reason}")
                rejected.append((step, reason))
                continue
            self._set_aside([s for s, _ in rejected])
            if not unverified:
                self.verified = [step]
            return step, state
        if rejected:
            raise CheckpointIntegrityError(f"no checkpoint in {self.directory} can be restored: "
                                           + "; ".join(reason for _, reason in rejected))
        return None, None

    def _set_aside(self, steps) -> None:
        if not steps:
            return
        if jax.process_index() == 0:
            os.makedirs(self.rejected_directory, exist_ok=True)
            for step in steps:
                target = os.path.join(self.rejected_directory, f"{step}-{time.strftime('%Y%m%dT%H%M%S')}")
                os.rename(self.step_directory(step), target)
                self.log(f"moved the rejected checkpoint of step {step} to {target}")
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("rejected checkpoints set aside")
        self.manager.reload()

    def close(self) -> None:
        try:
            self.finish()
        finally:
            self.manager.close()


def _restore(manager, step: int, abstract_state, data_iter, log=print):
    import grain

    args = {"state": ocp.args.StandardRestore(abstract_state)}
    directory = os.path.join(str(manager.directory), str(step))
    saved = os.listdir(directory)
    data_state = None
    if "data" in saved and _is_grain_iterator(data_iter):
        # Grain keeps one state file per process (process_<i>-of-<n>.json). The pipeline's
        # position is a count of global batches, the same in every process, so a state
        # saved by another number of processes restores too: process i reads the file of
        # process i mod n (bad-record counts are that process's).
        count = jax.process_count()
        files = os.listdir(os.path.join(directory, "data"))
        if f"process_{jax.process_index()}-of-{count}.json" in files:
            args["data"] = grain.checkpoint.CheckpointRestore(data_iter)
        else:
            saved_counts = {int(f.rsplit("-of-", 1)[1][: -len(".json")]) for f in files
                            if f.startswith("process_") and f.endswith(".json")}
            if len(saved_counts) != 1:
                raise ValueError(f"{directory}/data: expected the data-iterator state files of one process count, "
                                 f"found {sorted(files)}")
            saved_count = saved_counts.pop()
            path = os.path.join(directory, "data", f"process_{jax.process_index() % saved_count}-of-{saved_count}.json")
            with open(path) as f:
                data_state = json.load(f)
            log(f"data iterator: restoring the state saved by {saved_count} process(es) ({path}) on {count}")
    elif "data_json" in saved and hasattr(data_iter, "set_state"):
        args["data_json"] = ocp.args.JsonRestore()
    else:
        raise ValueError(f"{manager.directory}/{step}: no data-iterator state this iterator can restore "
                         f"(saved items: {sorted(saved)})")
    restored = manager.restore(step, args=ocp.args.Composite(**args))
    if data_state is not None:
        data_iter.set_state(data_state)
    if "data_json" in args:
        data_iter.set_state(restored["data_json"])
    return restored["state"]


def _host_batch(batch) -> dict:
    missing = [k for k in BATCH_KEYS if k not in batch]
    if missing:
        raise ValueError(f"data batch lacks {missing}; it has {sorted(batch)}")
    return {k: np.asarray(batch[k]) for k in BATCH_KEYS}


def _host_value(x) -> np.ndarray:
    """Host copy of a replicated (or single-device, or host) value, in any process."""
    if isinstance(x, jax.Array):
        return np.asarray(x.addressable_shards[0].data)
    return np.asarray(x)


PARALLELISMS = ("pjit", "pmap")


def sharding_rules(config):
    """config.sharding_rules as a tuple of pairs (None: the default rules)."""
    rules = config.get("sharding_rules")
    return None if rules is None else tuple(tuple(r) for r in rules)


def train_state_shardings(params, tx, mesh, rules=None, *, log=print):
    """(TrainState of NamedShardings, TrainState of ShapeDtypeStructs carrying them) for
    parameters `params` (arrays or ShapeDtypeStructs) under optimizer `tx`: parameters by
    their logical axes and `rules`, optimizer moments like their parameters, counters
    replicated. The second is the restore target for a checkpoint on this mesh."""
    rep = replicated(mesh)
    param_sh = param_shardings(params, mesh, rules, log=log)
    abstract = jax.eval_shape(lambda p: init_train_state(p, tx), params)
    shardings = TrainState(params=param_sh, opt_state=like_params(abstract.opt_state, params, param_sh, rep),
                           step=rep, nonfinite_total=rep, nonfinite_run=rep)
    abstract = jax.tree.map(lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh), abstract, shardings)
    return shardings, abstract


class _PjitRunner:
    """The step as one jax.jit over the mesh: state sharded by logical axis rules and
    donated, batches as global arrays sharded over the batch axes."""

    def __init__(self, config, graphdef, rest, tx, params, log, devices=None, trainable=None, teacher=None):
        self.mesh = make_mesh(config.get("mesh") or DEFAULT_MESH, devices)
        rules = sharding_rules(config)
        self.replicated = replicated(self.mesh)
        self.shardings, self.abstract = train_state_shardings(params, tx, self.mesh, rules, log=log)
        self.place_batch = BatchPlacer(self.mesh, rules, log=log)
        self.state = jax.jit(lambda p: init_train_state(p, tx), out_shardings=self.shardings)(
            place(params, self.shardings.params))
        self._step = functools.partial(train_step, graphdef=graphdef, rest=rest, tx=tx, trainable=trainable,
                                       distill=teacher and teacher.spec)
        # A distillation teacher: parameters sharded by the same logical rules, a step
        # argument that is neither differentiated nor donated.
        self.teacher_shardings = teacher and param_shardings(teacher.params, self.mesh, rules, log=log)
        self.teacher_params = teacher and place(teacher.params, self.teacher_shardings)
        self._compiled = {}
        per_device = sum(_shard_bytes(x) for x in jax.tree.leaves(self.state))
        total = sum(x.nbytes for x in jax.tree.leaves(self.state))
        log(f"parallelism: pjit, {describe(self.mesh)}; train state {total / 2**20:.1f} MiB, "
            f"{per_device / 2**20:.1f} MiB per device")

    def step(self, state, batch):
        batch = self.place_batch(_host_batch(batch))
        size = batch["input_ids"].shape[0]
        if size not in self._compiled:
            in_batch = {k: v.sharding for k, v in batch.items()}
            self._compiled[size] = jax.jit(self._step, in_shardings=(self.shardings, in_batch, self.teacher_shardings),
                                           out_shardings=(self.shardings, self.replicated), donate_argnums=0)
        return self._compiled[size](state, batch, self.teacher_params)

    def abstract_checkpoint(self):
        return self.abstract

    def to_checkpoint(self, state):
        return state

    def from_checkpoint(self, restored):
        return restored

    @staticmethod
    def to_host(metrics):
        return jax.tree.map(_host_value, metrics)


class _PmapRunner:
    """Plain data parallelism: jax.pmap over the local devices of every process,
    replicated state, gradients averaged with pmean (see train.step)."""

    def __init__(self, config, graphdef, rest, tx, params, log, devices=None, trainable=None, teacher=None):
        if devices is not None and len(devices) != jax.device_count():
            raise ValueError("pmap runs on every local device of every process")
        self.mesh = make_mesh(DEFAULT_MESH)  # checkpoints: global arrays replicated on every device
        self.state = data_parallel.replicate(init_train_state(params, tx))
        self.abstract = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape[1:], x.dtype, sharding=replicated(self.mesh)), self.state)
        step = functools.partial(train_step, graphdef=graphdef, rest=rest, tx=tx, axis_name=data_parallel.AXIS,
                                 trainable=trainable, distill=teacher and teacher.spec)
        self.teacher_params = teacher and data_parallel.replicate(teacher.params)
        self._step = jax.pmap(step, axis_name=data_parallel.AXIS, donate_argnums=0)
        if config.get("mesh") and dict(config.mesh) != DEFAULT_MESH:
            log(f"parallelism: pmap ignores config.mesh {dict(config.mesh)}")
        log(f"parallelism: pmap over {jax.local_device_count()} local device(s) x {jax.process_count()} "
            f"process(es)")

    def step(self, state, batch):
        return self._step(state, data_parallel.split_batch(_host_batch(batch)), self.teacher_params)

    def abstract_checkpoint(self):
        return self.abstract

    def to_checkpoint(self, state):
        return data_parallel.unreplicate(state, self.mesh)

    def from_checkpoint(self, restored):
        return data_parallel.from_global(restored)

    @staticmethod
    def to_host(metrics):
        return data_parallel.unreplicate_metrics(metrics)


def _shard_bytes(x) -> int:
    shape = x.sharding.shard_shape(x.shape)
    return int(np.prod(shape)) * x.dtype.itemsize


def make_step_runner(config, graphdef, rest, tx, params, log=print, *, devices=None, trainable=None, teacher=None):
    """The step runner `config.parallelism` asks for: `.state` (the initial train state,
    placed), `.step(state, host_batch) -> (state, metrics)`, checkpoint conversions.
    `devices`: the mesh's devices (default: all). `trainable`: the freeze rules' mask
    (frozen parameters get no gradients computed). `teacher`: a distill.Teacher (its
    parameters placed beside the state, outside it: not optimised, not checkpointed)."""
    kind = config.get("parallelism") or "pjit"
    if kind not in PARALLELISMS:
        raise ValueError(f"config.parallelism must be one of {PARALLELISMS}, got {kind!r}")
    return (_PjitRunner if kind == "pjit" else _PmapRunner)(config, graphdef, rest, tx, params, log, devices,
                                                            trainable, teacher)


def _all_processes(*flags: bool) -> tuple:
    """(all processes' flag is True) for each flag; a no-op with one process."""
    if jax.process_count() == 1:
        return flags
    from jax.experimental import multihost_utils

    gathered = np.asarray(multihost_utils.process_allgather(np.asarray(flags, np.int32)))
    return tuple(bool(v) for v in gathered.reshape(-1, len(flags)).min(axis=0))


def _trim_metrics(workdir: str, last_step: int) -> None:
    """After a resume, drop logged records past the restored step (they will be redone)."""
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return
    with open(path) as f:
        lines = [line for line in f if line.strip() and json.loads(line)["step"] <= last_step]
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.writelines(lines)
    os.replace(tmp, path)


def train(config, workdir: str, *, make_data_iterator: Optional[Callable] = None, log=print) -> dict:
    """Runs (or resumes) training in `workdir`; returns a summary dict.

    make_data_iterator(config, model_config) -> iterator of numpy batches (a Grain
    DatasetIterator for checkpointable data); default: gamma_mod_jax.data.pipeline.

    Non-finite steps are skipped on device (train.step); their count in a row is read at
    log and checkpoint steps only (no host sync per step): once it reached
    `train.max_nonfinite_in_a_row`, the run stops with TrainingError naming the step where
    it did, and no checkpoint after that step is written (the last good one is kept)."""
    checkpoint_dir = os.path.join(workdir, "checkpoints")
    check_writable(workdir)  # before any model is built: read-only, full, a file in the way
    check_writable(checkpoint_dir)
    train_cfg, optim_cfg = config.train, config.optim
    lead = jax.process_index() == 0
    info = log if lead else (lambda *_: None)
    model = model_for_training(config, log=info)
    model.llm.remat = train_cfg.remat
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    num_updates = int(train_cfg.num_steps)
    accumulation = int(optim_cfg.accumulation_steps)
    limit = max(int(train_cfg.max_nonfinite_in_a_row), 1)
    tx, schedule, mask = make_optimizer(optim_cfg, params, num_updates)
    trained, total = count_trainable(params, mask)
    info(f"parameters: {trained:,} trained of {total:,}")
    teacher = load_teacher(config, model.config, log=info)  # None unless config.distill.coef > 0
    runner = make_step_runner(config, graphdef, rest, tx, params, info, trainable=mask, teacher=teacher)
    state = runner.state
    runner.state = None
    model_cfg = model.config
    del params, model, teacher

    if make_data_iterator is None:
        from gamma_mod_jax.data.pipeline import make_train_iterator_from_config as make_data_iterator
    data_iter = make_data_iterator(config, model_cfg)

    checkpoints = _Checkpoints(workdir, train_cfg, info)
    start = 0
    if checkpoints.latest_step() is not None:
        latest, restored = checkpoints.restore_newest(runner.abstract_checkpoint(), data_iter)
        if latest is not None:
            del state  # its buffers are replaced by the restored ones
            state = runner.from_checkpoint(restored)
            del restored
            start = latest
            if lead:
                _trim_metrics(workdir, latest)
            info(f"resumed from {checkpoints.step_directory(latest)}")
    save = lambda step_, state_, force=False: checkpoints.save(step_, runner.to_checkpoint(state_), data_iter,
                                                               force=force)

    stop = {"signal": None}
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: stop.update(signal=signum))
    writer = MetricsWriter(workdir, total_steps=num_updates, initial_step=start,
                           enabled=lead, tensorboard=train_cfg.tensorboard,
                           progress=train_cfg.progress_bar)
    window = _Window(runner.to_host)

    def check_nonfinite_limit():
        hit = window.first_step_at_limit(limit)
        if hit is not None:
            checkpoints.finish()
            unit = "micro-batches" if accumulation > 1 else "steps"
            raise TrainingError(f"{limit} non-finite {unit} in a row (train.max_nonfinite_in_a_row) at step {hit}: "
                                f"updates skipped, nothing saved after it; last good checkpoint: "
                                f"{checkpoints.last_good()}. Lower the learning rate or check the data")

    step, status = start, "finished"
    try:
        while step < num_updates:
            tic = time.perf_counter()
            for _ in range(accumulation):
                try:
                    batch = next(data_iter)
                except StopIteration:
                    batch = None
                if not _all_processes(batch is not None)[0]:  # every process must have data
                    status = "data exhausted"
                    break
                state, metrics = runner.step(state, batch)
                window.add(metrics, step + 1)
            if status != "finished":
                break
            step += 1
            if step % train_cfg.log_every == 0 or step == num_updates:
                summary = window.summary(time.perf_counter() - tic, accumulation)
                summary.update(learning_rate=float(schedule(step - 1)),
                               nonfinite_total=int(_host_value(state.nonfinite_total).reshape(-1)[0]))
                summary.update(_data_stats(data_iter))
                writer.write(step, summary)
                check_nonfinite_limit()
            writer.advance()
            if step % train_cfg.checkpoint_every == 0:
                check_nonfinite_limit()
                save(step, state)
            if not _all_processes(stop["signal"] is None)[0]:  # SIGTERM on any process stops all
                status = "stopped by SIGTERM"
                break
        check_nonfinite_limit()
        if status == "data exhausted" and step == 0:
            raise TrainingError(f"the data yielded no batch for a first step; data counts: "
                                f"{_data_stats(data_iter) or 'none reported'}")
        if checkpoints.latest_step() != step and step > start:
            save(step, state, force=True)
        checkpoints.finish()
    except (TrainingError, CheckpointWriteError):
        raise
    except BaseException:
        # Save what was reached before the failure (unless the state itself is gone). Not
        # with several processes: the others are not saving, and a save needs all of them.
        if step > start and checkpoints.latest_step() != step and jax.process_count() == 1:
            try:
                check_nonfinite_limit()
                save(step, state, force=True)
                checkpoints.finish()
                writer.message(f"saved a checkpoint at step {step} before stopping")
            except Exception:  # the state's buffers may have been donated to the failed step
                pass
        raise
    finally:
        try:
            checkpoints.close()
        finally:
            writer.close()
            signal.signal(signal.SIGTERM, previous)
    info(f"{status} at step {step}; checkpoints in {checkpoint_dir}")
    state = runner.to_checkpoint(state)
    return {"status": status, "step": step, "nonfinite_total": int(_host_value(state.nonfinite_total)),
            "state": state, "graphdef": graphdef, "rest": rest}


class _Window:
    """Host-side mean of micro-batch metrics since the last log line, and the non-finite
    counts in a row since the last limit check (device values until then)."""

    def __init__(self, to_host):
        self.items = []
        self.runs = []  # (update step, nonfinite_run after the micro-batch)
        self.to_host = to_host

    def add(self, metrics, step: int):
        self.items.append(metrics)
        self.runs.append((step, metrics["nonfinite_run"]))

    def first_step_at_limit(self, limit: int) -> Optional[int]:
        """The first update step since the last call whose count of non-finite micro-batches
        in a row reached `limit`, or None."""
        runs, self.runs = self.runs, []
        values = self.to_host([run for _, run in runs])
        for (step, _), value in zip(runs, values):
            if int(np.asarray(value).reshape(-1)[0]) >= limit:
                return step
        return None

    def summary(self, seconds: float, accumulation: int) -> dict:
        host = [self.to_host(m) for m in self.items]
        self.items = []
        out = {}
        for key in host[0]:
            values = np.stack([np.asarray(m[key], np.float64) for m in host])
            out[key] = values.mean(axis=0)
        tokens = sum(float(m["tokens"]) for m in host[-accumulation:])
        out["step_time"] = seconds
        out["tokens_per_sec"] = tokens / max(seconds, 1e-9)
        out["finite"] = bool(np.all([m["finite"] for m in host]))
        out["nonfinite_run"] = int(np.asarray(host[-1]["nonfinite_run"]).reshape(-1)[0])
        return out


def _data_stats(data_iter) -> dict:
    stats = getattr(data_iter, "stats", None)
    if callable(stats):
        stats = stats()
    return {f"data_{k}": v for k, v in (stats or {}).items() if isinstance(v, (int, float))}
