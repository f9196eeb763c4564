"""Multi-process start-up: `jax.distributed.initialize` from flags, the environment or
the cluster (SLURM), before anything touches a device.

Where the coordinates come from, first match wins:
  1. explicit arguments (launch/train.py's --coordinator-address, --num-processes,
     --process-id), e.g. launch/local_multiprocess.sh on one machine;
  2. JAX_COORDINATOR_ADDRESS + JAX_NUM_PROCESSES + JAX_PROCESS_ID in the environment;
  3. a cluster jax detects itself: a SLURM job step with more than one task (srun; one
     process per GPU, see launch/slurm.sh) or Open MPI's mpirun; jax reads address,
     count, id and local devices from there.
Otherwise the run stays single-process and nothing is initialised.

A process that dies takes the others down within bounded time: collectives with a
dead peer fail (gloo on CPU, NCCL on GPU), and the coordination service declares a
process dead after `heartbeat_timeout_s` without a heartbeat, which terminates the
survivors with an error naming the lost task (jax's default is 100 s). The launcher
turns the first into one line (`peer_failure_message`) and exits at once with status 2:
jax.distributed's shutdown would wait on the dead peer.
"""

from __future__ import annotations

import logging
import os
import re
from typing import Optional

_log = logging.getLogger(__name__)

ENV_ADDRESS, ENV_COUNT, ENV_ID = "JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"


def _slurm_multi_task() -> bool:
    """Inside an srun step with several tasks (jax's SLURM detection needs the step vars)."""
    env = os.environ
    needed = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID")
    return all(k in env for k in needed) and int(env.get("SLURM_NTASKS", "1")) > 1


def _mpirun_multi_process() -> bool:
    """Started by Open MPI's mpirun with several processes (jax detects it too)."""
    return int(os.environ.get("OMPI_COMM_WORLD_SIZE", "1")) > 1


def initialize(coordinator_address: Optional[str] = None, num_processes: Optional[int] = None,
               process_id: Optional[int] = None, *, initialization_timeout_s: int = 300,
               heartbeat_timeout_s: int = 100, log=None) -> bool:
    """Joins (or starts) the multi-process job when one is configured (see the module
    docstring); returns True when jax.distributed was initialised. Call it once, first,
    in the launcher's main (never at import: Grain's worker processes import modules)."""
    import jax

    say = log or _log.info
    explicit = [v is not None and v != "" for v in (coordinator_address, num_processes, process_id)]
    if any(explicit) and not all(explicit):
        raise ValueError("multi-process training needs all of --coordinator-address, --num-processes and "
                         f"--process-id (got {coordinator_address!r}, {num_processes!r}, {process_id!r})")
    kwargs = dict(initialization_timeout=int(initialization_timeout_s),
                  heartbeat_timeout_seconds=int(heartbeat_timeout_s))
    if all(explicit):
        source = "flags"
        args = dict(coordinator_address=coordinator_address, num_processes=int(num_processes),
                    process_id=int(process_id))
    elif all(k in os.environ for k in (ENV_ADDRESS, ENV_COUNT, ENV_ID)):
        source = "environment"
        args = dict(coordinator_address=os.environ[ENV_ADDRESS], num_processes=int(os.environ[ENV_COUNT]),
                    process_id=int(os.environ[ENV_ID]))
    elif _slurm_multi_task():
        source, args = "SLURM", {}
    elif _mpirun_multi_process():
        source, args = "Open MPI", {}
    else:
        return False
    if args and args["num_processes"] == 1:
        return False
    if args and not 0 <= args["process_id"] < args["num_processes"]:
        raise ValueError(f"process id {args['process_id']} is not in [0, {args['num_processes']})")
    jax.distributed.initialize(**args, **kwargs)
    say(f"distributed: process {jax.process_index()} of {jax.process_count()} ({source}), "
        f"{jax.local_device_count()} local of {jax.device_count()} devices")
    return True


# How a lost peer shows up in the errors of collectives and of the coordination service.
_PEER_LOST = re.compile(r"gloo|connection (?:reset|closed|refused)|broken pipe|heartbeat|unavailable|"
                        r"task:\d+|peer|socket closed|deadline exceeded", re.IGNORECASE)
_TASK = re.compile(r"task:(\d+)")


def peer_failure_message(error: BaseException) -> Optional[str]:
    """One line naming the process that is gone, when `error` (raised in a multi-process
    run) is a collective or coordination failure caused by a dead peer; None otherwise.
    The dead process is named by the error where it says (`task:N`); with two processes
    it is the other one."""
    import jax

    text = f"{type(error).__name__}: {error}"
    if jax.process_count() < 2 or not _PEER_LOST.search(text):
        return None
    me, count = jax.process_index(), jax.process_count()
    named = sorted({int(t) for t in _TASK.findall(text)} - {me})
    if named:
        who = f"process {', '.join(map(str, named))}"
    elif count == 2:
        who = f"process {1 - me}"
    else:
        who = f"one of processes {[i for i in range(count) if i != me]}"
    detail = " ".join(str(error).split())[:300]
    return f"process {me} of {count}: {who} is gone (died or stopped); stopping. ({type(error).__name__}: {detail})"
