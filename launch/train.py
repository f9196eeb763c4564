"""Trains a model from an ml-collections config.

    python -m launch.train --config configs/train.py:llava_hr_7b_mod0.34 --workdir /runs/gmod \
        [--config.init_checkpoint=/ckpt/stage1] [--config.optim.learning_rate=2e-5]

Resumes automatically from the newest checkpoint in `<workdir>/checkpoints`; writes
`<workdir>/metrics.jsonl`, TensorBoard files in `<workdir>/tensorboard`, the resolved
config as `<workdir>/config.json`, the model config as `<workdir>/model_config.json`, and,
once the run finishes (one process), the trained model as `<workdir>/model` (a model directory, as
launch.convert writes; every launcher also takes the workdir itself). SIGTERM saves a
checkpoint and exits cleanly.

--config.init_checkpoint=DIR (a model directory or a workdir): the model config comes
from that checkpoint; the recipe's model may change only the dtypes, γ-MoD (a dense
checkpoint is adapted to the recipe's `mod`; for a γ-MoD one, the `--config.model.mod.*`
given) and add LLaVA-HR's MR-Adapters (stage 1 -> 2). Any other `--config.model.*` given
must equal the checkpoint's value (exit 2 naming field and both values otherwise).

Parallelism comes from the config (`--config.parallelism=pjit|pmap`,
`--config.mesh.fsdp=8`, `--config.sharding_rules=...`; see configs/train.py). Several
processes (one per host, or per GPU): every process runs this same command with
`--coordinator_address=HOST:PORT --num_processes=N --process_id=I` (or the
JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID variables, or inside a
multi-task SLURM step, where nothing is needed: launch/slurm.sh);
launch/local_multiprocess.sh starts such a job on this machine.
"""

from __future__ import annotations

import json
import os
import sys

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "configs/<file>.py[:arg]", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "run directory (checkpoints, metrics); resumed if it holds any")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "multi-process: HOST:PORT of process 0's "
                                   "coordinator (default: JAX_COORDINATOR_ADDRESS, or detected under SLURM)")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "multi-process: number of processes")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "multi-process: this process's index, 0..num_processes-1")
_HEARTBEAT = flags.DEFINE_integer("heartbeat_timeout", 100, "multi-process: seconds without a heartbeat after "
                                  "which a process is declared dead and the job stops with an error")
_INIT_TIMEOUT = flags.DEFINE_integer("initialization_timeout", 300, "multi-process: seconds to wait for every "
                                     "process to join")
_DATA_ITERATOR = flags.DEFINE_string("data_iterator", None, "MODULE:FUNCTION, a make_data_iterator(config, "
                                     "model_config) to use instead of the Grain pipeline")
flags.mark_flags_as_required(["config", "workdir"])


def _import_function(spec: str):
    import importlib

    module, _, name = spec.partition(":")
    if not name:
        raise app.UsageError(f"--data_iterator must be MODULE:FUNCTION, got {spec!r}")
    return getattr(importlib.import_module(module), name)


def _exit_on_error(e: Exception, process_count: int) -> None:
    """Bad input and stopped runs: one line, exit status 2. With several processes, or
    after a failed checkpoint write, exit at once (os._exit): jax.distributed's shutdown
    would wait for a dead peer, and Orbax's failed writer threads print tracebacks at
    interpreter exit. A lost peer is named in one line; anything else is re-raised (one
    process) or printed with its traceback (several)."""
    from gamma_mod_jax.parallel.distributed import peer_failure_message
    from gamma_mod_jax.train.trainer import CheckpointWriteError, TrainingError

    peer = peer_failure_message(e) if process_count > 1 else None
    if peer is not None:
        message = peer
    elif isinstance(e, (ValueError, TrainingError, CheckpointWriteError)):
        message = str(e)
    elif process_count == 1:
        raise e
    else:
        import traceback

        traceback.print_exc()
        message = None
    if message is not None:
        print(f"error: {message}", file=sys.stderr)
    if process_count == 1 and not isinstance(e, CheckpointWriteError):
        sys.exit(2)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(2 if message is not None else 1)


def _explicit_model_fields():
    """The model fields this command line sets (`--config.model.llm.hidden_size=...` ->
    'llm.hidden_size'; `--config.model=...`: None, all of them): with init_checkpoint,
    only these are compared with the checkpoint's config (the recipe's other model
    defaults give way to the checkpoint's)."""
    overrides = config_flags.get_override_values(flags.FLAGS["config"])
    if "model" in overrides:
        return None
    return {name[len("model."):] for name in overrides if name.startswith("model.")}


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    from gamma_mod_jax.parallel.distributed import initialize

    # First, before anything touches a device (the trainer's imports do not).
    initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value, heartbeat_timeout_s=_HEARTBEAT.value,
               initialization_timeout_s=_INIT_TIMEOUT.value, log=print)
    import jax

    from gamma_mod_jax.train.trainer import check_training_config, check_writable, train

    config, workdir = _CONFIG.value, _WORKDIR.value
    make_data_iterator = _import_function(_DATA_ITERATOR.value) if _DATA_ITERATOR.value else None
    try:
        check_training_config(config)  # e.g. a model directory's config.py: exit 2 before anything is written
        check_writable(workdir)  # a read-only or full disk, or a file named like workdir: exit 2 before anything
        if jax.process_index() == 0:
            with open(os.path.join(workdir, "config.json"), "w") as f:
                f.write(config.to_json(indent=2))
        summary = train(config, workdir, make_data_iterator=make_data_iterator,
                        explicit_model_fields=_explicit_model_fields())
    except Exception as e:  # noqa: BLE001 - sorted below; anything unexpected is re-raised
        _exit_on_error(e, jax.process_count())
    if jax.process_index() == 0:
        print(json.dumps({k: v for k, v in summary.items() if isinstance(v, (int, float, str))}))


if __name__ == "__main__":
    app.run(main)
