"""Trains a model from an ml-collections config.

    python -m launch.train --config configs/train.py:llava_hr_7b_mod0.34 --workdir /runs/gmod \
        [--config.init_checkpoint=/ckpt/stage1] [--config.optim.learning_rate=2e-5]

Resumes automatically from the newest checkpoint in `<workdir>/checkpoints`; writes
`<workdir>/metrics.jsonl`, TensorBoard files in `<workdir>/tensorboard`, the resolved
config as `<workdir>/config.json`, the model config as `<workdir>/model_config.json`, and,
once the run finishes, the trained model as `<workdir>/model` (a model directory, as
launch.convert writes, by every process together; every launcher also takes the workdir itself). SIGTERM saves a
checkpoint and exits cleanly.

--config.init_checkpoint=DIR (a model directory or a workdir): the model config comes
from that checkpoint; the recipe's model may change only the dtypes, γ-MoD (a dense
checkpoint is adapted to the recipe's `mod`; for a γ-MoD one, the `--config.model.mod.*`
given) and add LLaVA-HR's MR-Adapters (stage 1 -> 2). Any other `--config.model.*` given
must equal the checkpoint's value (exit 2 naming field and both values otherwise).

Parallelism comes from the config (`--config.parallelism=pjit|pmap`,
`--config.mesh.fsdp=8`, `--config.sharding_rules=...`; see configs/train.py). Several
processes (one per host, or per GPU): every process runs this same command with
`--coordinator-address=HOST:PORT --num-processes=N --process-id=I` (or the
JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID variables, or inside a
multi-task SLURM step, where nothing is needed: launch/slurm.sh);
launch/local_multiprocess.sh starts such a job on this machine.
"""

from __future__ import annotations

import importlib
import json
import os
import sys

from launch._common import parse_args, parser as make_parser

CONFIG_PREFIX = "--config."


def _parser():
    p = make_parser(__doc__, epilog="--config.<dotted.field>=<value> (or --config.<dotted.field> <value>) sets one "
                    "field of the config: a Python literal, or text for a string field; the field must exist and "
                    "keep its type.")
    p.add_argument("--config", required=True, help="training config: configs/<file>.py[:arg], or a shipped config's "
                   "name (train:llava15_7b_mod0.3,tiny)")
    p.add_argument("--workdir", required=True, help="run directory (checkpoints, metrics); resumed if it holds any")
    p.add_argument("--coordinator-address", default=None, help="multi-process: HOST:PORT of process 0's "
                   "coordinator (default: JAX_COORDINATOR_ADDRESS, or detected under SLURM)")
    p.add_argument("--num-processes", type=int, default=None, help="multi-process: number of processes")
    p.add_argument("--process-id", type=int, default=None, help="multi-process: this process's index, "
                   "0..num-processes-1")
    p.add_argument("--heartbeat-timeout", type=int, default=100, help="multi-process: seconds without a heartbeat "
                   "after which a process is declared dead and the job stops with an error")
    p.add_argument("--initialization-timeout", type=int, default=300, help="multi-process: seconds to wait for "
                   "every process to join")
    p.add_argument("--data-iterator", default=None, help="MODULE:FUNCTION, a make_data_iterator(config, "
                   "model_config) to use instead of the Grain pipeline")
    return p


def config_overrides(rest: list) -> list:
    """The `--config.<field>=<value>` / `--config.<field> <value>` arguments -> [(field, text)];
    ValueError for anything else."""
    out, i = [], 0
    while i < len(rest):
        arg = rest[i]
        if not arg.startswith(CONFIG_PREFIX) or len(arg) == len(CONFIG_PREFIX):
            raise ValueError(f"unrecognized argument {arg!r}")
        field, eq, text = arg[len(CONFIG_PREFIX):].partition("=")
        if not eq:
            if i + 1 == len(rest):
                raise ValueError(f"{arg}: expected {arg}=<value> or {arg} <value>")
            text, i = rest[i + 1], i + 1
        out.append((field, text))
        i += 1
    return out


def load_training_config(spec: str, overrides: list):
    """The config `spec` names with the overrides applied (config_file.override_field), locked."""
    from gamma_mod_jax.config_file import load_config, override_field

    config = load_config(spec)
    for field, text in overrides:
        override_field(config, field, text, name=f"{CONFIG_PREFIX}{field}")
    config.lock()  # the trainer cannot add a field by mistake
    return config


def _import_function(spec: str):
    module, _, name = spec.partition(":")
    if not name:
        raise ValueError(f"--data-iterator must be MODULE:FUNCTION, got {spec!r}")
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


def explicit_model_fields(overrides: list):
    """The model fields the command line sets (`--config.model.llm.hidden_size=...` ->
    'llm.hidden_size'; `--config.model=...`: None, all of them): with init_checkpoint,
    only these are compared with the checkpoint's config (the recipe's other model
    defaults give way to the checkpoint's)."""
    fields = [field for field, _ in overrides]
    if "model" in fields:
        return None
    return {field[len("model."):] for field in fields if field.startswith("model.")}


def main(argv=None) -> int:
    p = _parser()
    args, rest = parse_args(p, argv, known=True)
    try:
        overrides = config_overrides(rest)
    except ValueError as e:
        p.error(str(e))  # usage and the error, exit status 2
    try:  # bad arguments: exit 2 before any device is touched
        config = load_training_config(args.config, overrides)
        make_data_iterator = _import_function(args.data_iterator) if args.data_iterator else None
    except (ValueError, OSError, AttributeError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from gamma_mod_jax.parallel.distributed import initialize

    # First, before anything touches a device (the trainer's imports do not).
    initialize(args.coordinator_address, args.num_processes, args.process_id,
               heartbeat_timeout_s=args.heartbeat_timeout, initialization_timeout_s=args.initialization_timeout,
               log=print)
    import jax

    from gamma_mod_jax.train.trainer import check_training_config, check_writable, train

    workdir = args.workdir
    try:
        check_training_config(config)  # e.g. a model directory's config.py: exit 2 before anything is written
        check_writable(workdir)  # a read-only or full disk, or a file named like workdir: exit 2 before anything
        if jax.process_index() == 0:
            with open(os.path.join(workdir, "config.json"), "w") as f:
                f.write(config.to_json(indent=2))
        summary = train(config, workdir, make_data_iterator=make_data_iterator,
                        explicit_model_fields=explicit_model_fields(overrides))
    except Exception as e:  # noqa: BLE001 - sorted below; anything unexpected is re-raised
        _exit_on_error(e, jax.process_count())
    if jax.process_index() == 0:
        print(json.dumps({k: v for k, v in summary.items() if isinstance(v, (int, float, str))}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
