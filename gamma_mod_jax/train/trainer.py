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
With several processes every process saves and restores and metrics come from process
0. The processes stop together: on running out of data because the data pipeline serves
one global batch plan (all run out at the same batch; another iterator is asked every
micro-batch), on SIGTERM by agreeing at log and checkpoint steps.

Nothing waits for the devices inside an update: micro-batches are dispatched ahead, the
next batch is drawn and placed on the devices while the current one runs (one ahead,
never past the next checkpoint's; a stop in between hands it back to the iterator), and
counters, guards and metrics stay on the devices until a log or checkpoint step reads
them (`train.guard_host_transfers`, default on, makes any other read an error). Uint8
pixels (data.uint8_pixels) are normalised on the device. Logged: step_time and
tokens_per_sec over the log window, model_tflops_per_device (mod/flops.py
train_step_flops) and mfu against `train.peak_flops_per_device` or the device's peak
(train/metrics.py PEAK_BF16_FLOPS; none on CPU, said once).
"""

from __future__ import annotations

import collections
import contextlib
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

from gamma_mod_jax.io_utils import atomic_write
from gamma_mod_jax.parallel import data_parallel
from gamma_mod_jax.parallel.activations import activation_sharding
from gamma_mod_jax.parallel.mesh import DEFAULT_MESH, describe, make_mesh
from gamma_mod_jax.parallel.sharding import BatchPlacer, like_params, param_shardings, place, replicated
from gamma_mod_jax.progress import progress
from gamma_mod_jax.train.distill import load_teacher
from gamma_mod_jax.train.metrics import MetricsWriter
from gamma_mod_jax.train.model_init import (check_training_config, model_for_training, write_final_model,  # noqa: F401
                                            write_model_config)
from gamma_mod_jax.train.optim import count_trainable, make_optimizer
from gamma_mod_jax.train.step import BATCH_KEYS, TrainState, all_finite, init_train_state, train_step


class TrainingError(RuntimeError):
    """Training stopped on purpose (too many non-finite steps in a row, a train state that
    is not finite, no data at all); the message says which checkpoint holds the last good state."""


class CheckpointWriteError(OSError):
    """A checkpoint (or the run directory) cannot be written: read-only, full disk, not a
    directory. The message names the path; the previous checkpoint is left intact."""


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

    def __init__(self, config, graphdef, rest, tx, params, log, devices=None, trainable=None,
                 image_token_index=None, teacher=None):
        self.mesh = make_mesh(config.get("mesh") or DEFAULT_MESH, devices)
        rules = sharding_rules(config)
        self.replicated = replicated(self.mesh)
        self.shardings, self.abstract = train_state_shardings(params, tx, self.mesh, rules, log=log)
        self.place_batch = BatchPlacer(self.mesh, rules, log=log)
        self.state = jax.jit(lambda p: init_train_state(p, tx), out_shardings=self.shardings)(
            place(params, self.shardings.params))
        step = _normalising_pixels(functools.partial(train_step, graphdef=graphdef, rest=rest, tx=tx,
                                                     trainable=trainable, distill=teacher and teacher.spec),
                                   image_token_index)

        def constrained_step(state, batch, teacher_params):
            # Traced inside the context: the model's activation constraints use this mesh and rules.
            with activation_sharding(self.mesh, rules):
                return step(state, batch, teacher_params)
        self._step = constrained_step
        # A distillation teacher: parameters sharded by the same logical rules, a step
        # argument that is neither differentiated nor donated.
        self.teacher_shardings = teacher and param_shardings(teacher.params, self.mesh, rules, log=log)
        self.teacher_params = teacher and place(teacher.params, self.teacher_shardings)
        self._compiled = {}
        per_device = sum(_shard_bytes(x) for x in jax.tree.leaves(self.state))
        total = sum(x.nbytes for x in jax.tree.leaves(self.state))
        log(f"parallelism: pjit, {describe(self.mesh)}; train state {total / 2**20:.1f} MiB, "
            f"{per_device / 2**20:.1f} MiB per device")

    def put(self, batch):
        """A host batch -> global arrays on the mesh (transfers start; nothing waits). Allowed
        to read back: BatchPlacer's fallback all-gathers rows between processes (logged)."""
        with _host_reads():
            return self.place_batch(_host_batch(batch))

    def step(self, state, batch):
        return self.run(state, self.put(batch))

    def run(self, state, batch):
        """The step on a batch from `put`: dispatched, not waited for."""
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

    def __init__(self, config, graphdef, rest, tx, params, log, devices=None, trainable=None,
                 image_token_index=None, teacher=None):
        if devices is not None and len(devices) != jax.device_count():
            raise ValueError("pmap runs on every local device of every process")
        self.mesh = make_mesh(DEFAULT_MESH)  # checkpoints: global arrays replicated on every device
        self.state = data_parallel.replicate(init_train_state(params, tx))
        self.abstract = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape[1:], x.dtype, sharding=replicated(self.mesh)), self.state)
        step = _normalising_pixels(functools.partial(train_step, graphdef=graphdef, rest=rest, tx=tx,
                                                     axis_name=data_parallel.AXIS, trainable=trainable,
                                                     distill=teacher and teacher.spec),
                                   image_token_index)
        self.teacher_params = teacher and data_parallel.replicate(teacher.params)
        self._step = jax.pmap(step, axis_name=data_parallel.AXIS, donate_argnums=0)
        if config.get("mesh") and dict(config.mesh) != DEFAULT_MESH:
            log(f"parallelism: pmap ignores config.mesh {dict(config.mesh)}")
        log(f"parallelism: pmap over {jax.local_device_count()} local device(s) x {jax.process_count()} "
            f"process(es)")

    def put(self, batch):
        return data_parallel.split_batch(_host_batch(batch))

    def step(self, state, batch):
        return self.run(state, self.put(batch))

    def run(self, state, batch):
        return self._step(state, batch, self.teacher_params)

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


def make_step_runner(config, graphdef, rest, tx, params, log=print, *, devices=None, trainable=None,
                     image_token_index=None, teacher=None):
    """The step runner `config.parallelism` asks for: `.state` (the initial train state,
    placed), `.step(state, host_batch) -> (state, metrics)` (= `.run(state, .put(host_batch))`:
    placing a batch on the devices and running the step, separately), checkpoint conversions.
    `devices`: the mesh's devices (default: all). `trainable`: the freeze rules' mask
    (frozen parameters get no gradients computed). `image_token_index`: the model's image
    placeholder id; with it, uint8 pixel_values (data.uint8_pixels) are normalised on the
    device, rows without a placeholder to zeros as the host path's text-only rows. `teacher`:
    a distill.Teacher (its parameters placed beside the state, outside it: not optimised,
    not checkpointed)."""
    kind = config.get("parallelism") or "pjit"
    if kind not in PARALLELISMS:
        raise ValueError(f"config.parallelism must be one of {PARALLELISMS}, got {kind!r}")
    return (_PjitRunner if kind == "pjit" else _PmapRunner)(config, graphdef, rest, tx, params, log, devices,
                                                            trainable, image_token_index, teacher)


def _normalising_pixels(step, image_token_index):
    """`step` taking uint8 pixel_values (resized, not normalised) and normalising them on the
    device first (data/image.py normalise_on_device: the host path's values exactly)."""
    if image_token_index is None:
        return step

    def run(state, batch, *rest):
        if batch["pixel_values"].dtype == jnp.uint8:  # static: decided when the step is traced
            from gamma_mod_jax.data.image import normalise_on_device

            has_image = jnp.any(batch["input_ids"] == image_token_index, axis=1)
            batch = dict(batch, pixel_values=normalise_on_device(batch["pixel_values"], has_image))
        return step(state, batch, *rest)
    return run


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
    with atomic_write(path) as f:
        f.writelines(lines)


def train(config, workdir: str, *, make_data_iterator: Optional[Callable] = None, log=print,
          explicit_model_fields=None) -> dict:
    """Runs (or resumes) training in `workdir`; returns a summary dict.

    make_data_iterator(config, model_config) -> iterator of numpy batches (a Grain
    DatasetIterator for checkpointable data); default: gamma_mod_jax.data.pipeline.

    Non-finite steps are skipped on device (train.step); their count in a row is read at
    log and checkpoint steps only (no host sync per step): once it reached
    `train.max_nonfinite_in_a_row`, the run stops with TrainingError naming the step where
    it did, and no checkpoint after that step is written (the last good one is kept).

    The run's model config is written to `<workdir>/model_config.json` at the start, and
    a finished run writes the trained model to `<workdir>/model` (write_final_model).
    `explicit_model_fields`: see model_for_training."""
    check_training_config(config)
    checkpoint_dir = os.path.join(workdir, "checkpoints")
    check_writable(workdir)  # before any model is built: read-only, full, a file in the way
    check_writable(checkpoint_dir)
    train_cfg, optim_cfg = config.train, config.optim
    lead = jax.process_index() == 0
    info = log if lead else (lambda *_: None)
    model = model_for_training(config, log=info, explicit=explicit_model_fields)
    if lead:
        write_model_config(workdir, model.config)
    model.llm.remat = train_cfg.remat
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    num_updates = int(train_cfg.num_steps)
    accumulation = int(optim_cfg.accumulation_steps)
    limit = max(int(train_cfg.max_nonfinite_in_a_row), 1)
    tx, schedule, mask = make_optimizer(optim_cfg, params, num_updates)
    trained, total = count_trainable(params, mask)
    info(f"parameters: {trained:,} trained of {total:,}")
    image_token_index = model.config.image_token_index
    teacher = load_teacher(config, model.config, log=info)  # None unless config.distill.coef > 0
    runner = make_step_runner(config, graphdef, rest, tx, params, info, trainable=mask,
                              image_token_index=image_token_index, teacher=teacher)
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
    prefetch = _Prefetcher(data_iter, runner.put)
    save_step = lambda after: min((after // train_cfg.checkpoint_every + 1) * train_cfg.checkpoint_every, num_updates)
    # Nothing is drawn past the next checkpoint step's micro-batches, so a checkpoint's data
    # position is the one its state consumed; a stop between checkpoints rewinds instead.
    prefetch.limit = (save_step(start) - start) * accumulation

    def save(step_, state_, force=False):
        prefetch.rewind()
        saved = checkpoints.save(step_, runner.to_checkpoint(state_), data_iter, force=force)
        prefetch.limit = (save_step(step_) - start) * accumulation
        return saved

    processes = jax.process_count()
    # With several processes they must agree on whether all have data before each step (a
    # collective with a missing peer hangs). The data pipeline's iterators serve one global
    # batch plan, so all run out at the same batch and need no agreement; any other iterator
    # is asked every micro-batch (a host synchronisation per step).
    agree_on_data = processes > 1 and not getattr(data_iter, "same_batches_on_every_process", False)
    if agree_on_data:
        info("data: the iterator does not say it serves the same batches on every process; the processes "
             "agree on having data at every micro-batch (a host synchronisation per step)")
    guard = _update_guard(train_cfg)

    stop = {"signal": None}
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: stop.update(signal=signum))
    writer = MetricsWriter(workdir, total_steps=num_updates, initial_step=start,
                           enabled=lead, tensorboard=train_cfg.tensorboard,
                           progress=train_cfg.progress_bar)
    window = _Window(runner.to_host, _step_flops(model_cfg, train_cfg, processes, info),
                     runner.mesh.devices.size, _peak_flops(train_cfg, info))

    def check_nonfinite_limit():
        hit = window.first_step_at_limit(limit)
        if hit is not None:
            checkpoints.finish()
            unit = "micro-batches" if accumulation > 1 else "steps"
            raise TrainingError(f"{limit} non-finite {unit} in a row (train.max_nonfinite_in_a_row) at step {hit}: "
                                f"updates skipped, nothing saved after it; last good checkpoint: "
                                f"{checkpoints.last_good()}. Lower the learning rate or check the data")

    step, status, compiled_shapes = start, "finished", set()
    try:
        while step < num_updates:
            # One update: micro-batches dispatched without waiting for the device (no value
            # is read back here; train.guard_host_transfers makes a read an error), the next
            # batch drawn and placed while the device computes.
            with guard():
                for _ in range(accumulation):
                    item = prefetch.take()
                    if agree_on_data:
                        with _host_reads():
                            has_data = _all_processes(item is not None)[0]
                    else:
                        has_data = item is not None
                    if not has_data:  # every process must have data
                        status = "data exhausted"
                        break
                    batch, shape = item
                    if shape in compiled_shapes:
                        state, metrics = runner.run(state, batch)
                    else:  # the first step of each batch shape compiles (a minute for a 7B model)
                        with progress(f"compiling the training step for batch shape {shape}", log=info):
                            state, metrics = runner.run(state, batch)
                        compiled_shapes.add(shape)
                    prefetch.fill()
                    window.add(metrics, step + 1, shape)
            if status != "finished":
                break
            step += 1
            with _host_reads():  # log and checkpoint steps: the only reads from the devices
                logged = step % train_cfg.log_every == 0 or step == num_updates
                if logged:
                    summary = window.summary()
                    summary.update(learning_rate=float(schedule(step - 1)),
                                   nonfinite_total=int(_host_value(state.nonfinite_total).reshape(-1)[0]))
                    summary.update(_data_stats(data_iter))
                    writer.write(step, summary)
                    check_nonfinite_limit()
                writer.advance()
                checkpointed = step % train_cfg.checkpoint_every == 0
                if checkpointed:
                    check_nonfinite_limit()
                    save(step, state)
                # SIGTERM on any process stops all: one process checks its own flag every
                # update; several agree at log and checkpoint steps only
                if processes == 1:
                    stopping = stop["signal"] is not None
                else:
                    stopping = (logged or checkpointed) and not _all_processes(stop["signal"] is None)[0]
            if stopping:
                status = "stopped by SIGTERM"
                break
        with _host_reads():
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
                with _host_reads():
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
    summary = {"status": status, "step": step, "nonfinite_total": int(_host_value(state.nonfinite_total)),
               "state": state, "graphdef": graphdef, "rest": rest}
    if status == "finished" and step == num_updates:
        try:
            summary["model"] = write_final_model(workdir, graphdef, state.params, rest, log=info)
        except OSError as e:
            raise CheckpointWriteError(f"{workdir}/model: cannot write the trained model ({e.strerror or e}); the "
                                       f"last checkpoint holds it ({checkpoints.last_good()}): `python -m "
                                       f"launch.convert --checkpoint {workdir} --out DIR` writes it") from None
    return summary


def _host_reads():
    """Where the trainer reads values back from the devices (log and checkpoint steps)."""
    return jax.transfer_guard_device_to_host("allow")


def _update_guard(train_cfg):
    """The context of an update's micro-batches: device-to-host transfers are errors there
    unless `train.guard_host_transfers` is False (a read would stall dispatch every step).
    jax guards accelerator arrays only: CPU arrays are host memory, read without a transfer."""
    if train_cfg.get("guard_host_transfers", True):
        return lambda: jax.transfer_guard_device_to_host("disallow")
    return contextlib.nullcontext


class _Prefetcher:
    """Batches placed on the devices ahead of use: after the step of batch k is dispatched,
    batch k + 1 is drawn and its transfer started (`fill`), so loading and the host-to-device
    copy overlap the device's work. `limit` caps the batches drawn ahead (counted from the
    start of the run); `rewind` hands back batches drawn but not used (a stop between
    checkpoints, before a save) by restoring the iterator's state from before their draw."""

    def __init__(self, data_iter, put: Callable, depth: int = 1):
        self.data_iter, self.put, self.depth = data_iter, put, depth
        self.queue: collections.deque = collections.deque()  # (state before the draw, placed batch, shape)
        self.exhausted = False
        self.limit: Optional[int] = None
        self.drawn = 0
        self.stateful = callable(getattr(data_iter, "get_state", None)) and callable(
            getattr(data_iter, "set_state", None))

    def _draw(self) -> bool:
        if self.exhausted:
            return False
        before = self.data_iter.get_state() if self.stateful else None
        try:
            batch = next(self.data_iter)
        except StopIteration:
            self.exhausted = True
            return False
        self.drawn += 1
        host = _host_batch(batch)
        self.queue.append((before, self.put(host), tuple(host["input_ids"].shape)))
        return True

    def take(self):
        """(placed batch, host input_ids shape) of the next batch; None once the data ended."""
        if not self.queue:
            self._draw()
        if not self.queue:
            return None
        _, batch, shape = self.queue.popleft()
        return batch, shape

    def fill(self) -> None:
        while len(self.queue) < self.depth and (self.limit is None or self.drawn < self.limit) and self._draw():
            pass

    def rewind(self) -> None:
        if not self.queue:
            return
        before = self.queue[0][0]
        self.drawn -= len(self.queue)
        self.queue.clear()
        if before is not None:
            self.data_iter.set_state(before)
        self.exhausted = False


class _Window:
    """Micro-batch metrics since the last log line (device values until then), their model
    FLOPs, and the non-finite counts in a row since the last limit check."""

    def __init__(self, to_host, flops_of: Callable, devices: int, peak: Optional[float]):
        self.items = []
        self.runs = []  # (update step, nonfinite_run after the micro-batch)
        self.to_host, self.flops_of, self.devices, self.peak = to_host, flops_of, devices, peak
        self.flops, self.updates, self.last_step = 0.0, 0, None
        self.start = time.perf_counter()

    def add(self, metrics, step: int, shape):
        self.items.append(metrics)
        self.runs.append((step, metrics["nonfinite_run"]))
        flops = self.flops_of(shape)
        self.flops = None if flops is None or self.flops is None else self.flops + flops
        if step != self.last_step:
            self.updates, self.last_step = self.updates + 1, step

    def first_step_at_limit(self, limit: int) -> Optional[int]:
        """The first update step since the last call whose count of non-finite micro-batches
        in a row reached `limit`, or None."""
        runs, self.runs = self.runs, []
        values = self.to_host([run for _, run in runs])
        for (step, _), value in zip(runs, values):
            if int(np.asarray(value).reshape(-1)[0]) >= limit:
                return step
        return None

    def summary(self) -> dict:
        """Means over the window's micro-batches; step_time, tokens_per_sec and the model
        FLOPs rates over the time since the last summary (the first includes compilation)."""
        host = [self.to_host(m) for m in self.items]  # waits for the window's last step
        seconds = max(time.perf_counter() - self.start, 1e-9)
        out = {}
        for key in host[0]:
            values = np.stack([np.asarray(m[key], np.float64) for m in host])
            out[key] = values.mean(axis=0)
        out["step_time"] = seconds / max(self.updates, 1)
        out["tokens_per_sec"] = sum(float(np.asarray(m["tokens"]).reshape(-1)[0]) for m in host) / seconds
        out["finite"] = bool(np.all([m["finite"] for m in host]))
        out["nonfinite_run"] = int(np.asarray(host[-1]["nonfinite_run"]).reshape(-1)[0])
        if self.flops is not None:
            out["model_tflops_per_device"] = self.flops / seconds / self.devices / 1e12
            if self.peak:
                out["mfu"] = self.flops / seconds / self.devices / self.peak
        self.items, self.flops, self.updates = [], 0.0, 0
        self.start = time.perf_counter()
        return out


def _step_flops(model_cfg, train_cfg, processes: int, log) -> Callable:
    """shape of a process's input_ids -> model FLOPs of its step on the global batch
    (mod/flops.py train_step_flops); None (logged once) when the counter cannot count it."""
    from gamma_mod_jax.mod.flops import train_step_flops

    cache = {}

    def flops_of(shape):
        if shape not in cache:
            try:
                cache[shape] = train_step_flops(model_cfg, shape[0] * processes, shape[1], train_cfg.remat)["model"]
            except Exception as e:  # noqa: BLE001 - a missing count must not stop training
                log(f"mfu: not reported: the FLOPs counter cannot count this model ({type(e).__name__}: {e})")
                cache[shape] = None
        return cache[shape]
    return flops_of


def _peak_flops(train_cfg, log) -> Optional[float]:
    """train.peak_flops_per_device, else the device's from PEAK_BF16_FLOPS; None (said once)
    when neither knows it: mfu is then left out of the metrics."""
    from gamma_mod_jax.train.metrics import peak_bf16_flops

    given = train_cfg.get("peak_flops_per_device")
    if given:
        return float(given)
    kind = jax.devices()[0].device_kind
    peak = peak_bf16_flops(kind)
    if peak is None:
        log(f"mfu: not reported: no peak bf16 FLOPs known for device kind {kind!r}; set "
            f"train.peak_flops_per_device (model_tflops_per_device is reported)")
    return peak


def _data_stats(data_iter) -> dict:
    stats = getattr(data_iter, "stats", None)
    if callable(stats):
        stats = stats()
    return {f"data_{k}": v for k, v in (stats or {}).items() if isinstance(v, (int, float))}
