"""The training loop: model from the config (random, or from a checkpoint, adapted to γ-MoD
when the config asks for MoD layers the checkpoint lacks), optimizer, data iterator,
checkpoints with automatic resume, metrics, SIGTERM handling.

`step` below counts optimizer updates; with `optim.accumulation_steps = k` each update
takes k micro-batches. Checkpoints hold the train state (parameters, optimizer, counters)
and the data iterator, so a resumed run continues with the same batches and losses.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import signal
import time
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from gamma_mod_jax.models.config import MLLMConfig
from gamma_mod_jax.train.metrics import MetricsWriter
from gamma_mod_jax.train.optim import count_trainable, make_optimizer
from gamma_mod_jax.train.step import BATCH_KEYS, TrainState, init_train_state, train_step


class TrainingError(RuntimeError):
    """Training stopped on purpose (e.g. too many non-finite losses in a row); a checkpoint was saved."""


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


def _checkpoint_manager(workdir: str, train_cfg) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(max_to_keep=train_cfg.keep_checkpoints,
                                           enable_async_checkpointing=train_cfg.async_checkpoints, create=True)
    return ocp.CheckpointManager(os.path.abspath(os.path.join(workdir, "checkpoints")), options=options)


def _is_grain_iterator(it) -> bool:
    import grain

    return isinstance(it, (grain.DatasetIterator, grain.DataLoaderIterator))


def _save(manager, step: int, state, data_iter, *, force=False) -> bool:
    import grain

    args = {"state": ocp.args.StandardSave(state)}
    if _is_grain_iterator(data_iter):  # one file per process
        args["data"] = grain.checkpoint.CheckpointSave(data_iter)
    elif hasattr(data_iter, "get_state"):  # any other checkpointable iterator (single process)
        args["data_json"] = ocp.args.JsonSave(data_iter.get_state())
    return manager.save(step, args=ocp.args.Composite(**args), force=force)


def _restore(manager, step: int, abstract_state, data_iter):
    import grain

    args = {"state": ocp.args.StandardRestore(abstract_state)}
    saved = os.listdir(os.path.join(str(manager.directory), str(step)))
    if "data" in saved and _is_grain_iterator(data_iter):
        args["data"] = grain.checkpoint.CheckpointRestore(data_iter)
    elif "data_json" in saved and hasattr(data_iter, "set_state"):
        args["data_json"] = ocp.args.JsonRestore()
    else:
        raise ValueError(f"{manager.directory}/{step}: no data-iterator state this iterator can restore "
                         f"(saved items: {sorted(saved)})")
    restored = manager.restore(step, args=ocp.args.Composite(**args))
    if "data_json" in args:
        data_iter.set_state(restored["data_json"])
    return restored["state"]


def _device_batch(batch) -> dict:
    missing = [k for k in BATCH_KEYS if k not in batch]
    if missing:
        raise ValueError(f"data batch lacks {missing}; it has {sorted(batch)}")
    return {k: jnp.asarray(batch[k]) for k in BATCH_KEYS}


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
    DatasetIterator for checkpointable data); default: gamma_mod_jax.data.pipeline."""
    os.makedirs(workdir, exist_ok=True)
    train_cfg, optim_cfg = config.train, config.optim
    model = model_for_training(config, log=log)
    model.llm.remat = train_cfg.remat
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    num_updates = int(train_cfg.num_steps)
    accumulation = int(optim_cfg.accumulation_steps)
    tx, schedule, mask = make_optimizer(optim_cfg, params, num_updates)
    trained, total = count_trainable(params, mask)
    log(f"parameters: {trained:,} trained of {total:,}")
    state = init_train_state(params, tx)
    model_cfg = model.config
    del params, model

    if make_data_iterator is None:
        from gamma_mod_jax.data.pipeline import make_train_iterator_from_config as make_data_iterator
    data_iter = make_data_iterator(config, model_cfg)

    manager = _checkpoint_manager(workdir, train_cfg)
    start = 0
    latest = manager.latest_step()
    if latest is not None:
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
        state = _restore(manager, latest, abstract, data_iter)
        start = latest
        _trim_metrics(workdir, latest)
        log(f"resumed from {workdir}/checkpoints at step {latest}")
    step_fn = jax.jit(functools.partial(train_step, graphdef=graphdef, rest=rest, tx=tx), donate_argnums=0)

    stop = {"signal": None}
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: stop.update(signal=signum))
    writer = MetricsWriter(workdir, total_steps=num_updates, initial_step=start,
                           enabled=jax.process_index() == 0, tensorboard=train_cfg.tensorboard,
                           progress=train_cfg.progress_bar)
    step, status = start, "finished"
    try:
        window = _Window()
        while step < num_updates:
            tic = time.perf_counter()
            for _ in range(accumulation):
                try:
                    batch = next(data_iter)
                except StopIteration:
                    status = "data exhausted"
                    break
                state, metrics = step_fn(state, _device_batch(batch))
                window.add(metrics)
            if status != "finished":
                break
            step += 1
            run = int(state.nonfinite_run)
            if step % train_cfg.log_every == 0 or step == num_updates or run:
                summary = window.summary(time.perf_counter() - tic, accumulation)
                summary.update(learning_rate=float(schedule(step - 1)), nonfinite_total=int(state.nonfinite_total))
                summary.update(_data_stats(data_iter))
                writer.write(step, summary)
            writer.advance()
            if run > train_cfg.max_nonfinite_in_a_row:
                _save(manager, step, state, data_iter, force=True)
                manager.wait_until_finished()
                raise TrainingError(f"{run} non-finite losses or gradients in a row (limit "
                                    f"{train_cfg.max_nonfinite_in_a_row}) at step {step}; saved a checkpoint at "
                                    f"step {step}; lower the learning rate or check the data")
            if step % train_cfg.checkpoint_every == 0:
                _save(manager, step, state, data_iter)
            if stop["signal"] is not None:
                status = "stopped by SIGTERM"
                break
        if manager.latest_step() != step and step > start:
            _save(manager, step, state, data_iter, force=True)
    except TrainingError:
        raise
    except BaseException:
        # Save what was reached before the failure (unless the state itself is gone).
        if step > start and manager.latest_step() != step:
            try:
                _save(manager, step, state, data_iter, force=True)
                writer.message(f"saved a checkpoint at step {step} before stopping")
            except Exception:  # the state's buffers may have been donated to the failed step
                pass
        raise
    finally:
        manager.wait_until_finished()
        manager.close()
        writer.close()
        signal.signal(signal.SIGTERM, previous)
    log(f"{status} at step {step}; checkpoints in {workdir}/checkpoints")
    return {"status": status, "step": step, "nonfinite_total": int(state.nonfinite_total),
            "state": state, "graphdef": graphdef, "rest": rest}


class _Window:
    """Host-side mean of micro-batch metrics since the last log line."""

    def __init__(self):
        self.items = []

    def add(self, metrics):
        self.items.append(metrics)

    def summary(self, seconds: float, accumulation: int) -> dict:
        host = jax.device_get(self.items)
        self.items = []
        out = {}
        for key in host[0]:
            values = np.stack([np.asarray(m[key], np.float64) for m in host])
            out[key] = values.mean(axis=0)
        tokens = sum(float(m["tokens"]) for m in host[-accumulation:])
        out["step_time"] = seconds
        out["tokens_per_sec"] = tokens / max(seconds, 1e-9)
        out["finite"] = bool(np.all([m["finite"] for m in host]))
        return out


def _data_stats(data_iter) -> dict:
    stats = getattr(data_iter, "stats", None)
    if callable(stats):
        stats = stats()
    return {f"data_{k}": v for k, v in (stats or {}).items() if isinstance(v, (int, float))}
