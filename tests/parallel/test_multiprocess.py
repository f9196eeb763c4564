"""Multi-process training on this machine (launch/local_multiprocess.sh: 2 processes x 4
CPU devices, gloo collectives) against 1 process x 8 devices and 1 device on synthetic
data: pmap, a tensor axis spanning both processes, checkpoints that move between
parallelisms and meshes, and a job whose process dies ending with a clear error instead
of hanging. The same losses of 2 x 4, 1 x 8 and 1 x 1 with the real data pipeline, and a
2-process checkpoint continued on 1 process: test_multiprocess_pipeline.py."""

import os
import shutil
import sys
import time

import numpy as np
import pytest

from gamma_mod_jax.train.metrics import read_metrics
from tests.parallel.helpers import LAUNCHER, child_env, processes_env, run, train_args

STEPS = 6  # the tiny recipe: 6 steps, a checkpoint every 3, metrics every step


def two_processes(workdir, *overrides, timeout=600, check=True, **env):
    """2 processes x 4 devices, 4 examples each: a global batch of 8."""
    args = ["bash", LAUNCHER, "2", "4", "--", *train_args(str(workdir), "--config.data.batch_size=4", *overrides)]
    environment = processes_env(devices=4, **env)
    environment["XLA_FLAGS"] = "--xla_backend_optimization_level=0"  # the launcher adds the device count
    return run(args, env=environment, timeout=timeout, check=check)


def one_process(workdir, devices, *overrides):
    """One process, `devices` devices, a batch of 8."""
    args = [sys.executable, "-m", "launch.train", *train_args(str(workdir), "--config.data.batch_size=8", *overrides)]
    return run(args, env=child_env(devices=devices), timeout=600)


def losses(workdir):
    return [(r["step"], r["loss"]) for r in read_metrics(str(workdir))]


def assert_same_losses(got, want):
    assert [s for s, _ in got] == [s for s, _ in want]
    np.testing.assert_allclose([l for _, l in got], [l for _, l in want], rtol=1e-5)


@pytest.mark.slow
def test_two_processes_with_pmap_and_their_checkpoint_continued_with_fsdp(tmp_path):
    two_processes(tmp_path / "pmap", "--config.parallelism=pmap")
    one_process(tmp_path / "1x1", 1)
    assert_same_losses(losses(tmp_path / "pmap"), losses(tmp_path / "1x1"))
    workdir = tmp_path / "fsdp"
    shutil.copytree(tmp_path / "pmap", workdir)
    shutil.rmtree(workdir / "checkpoints" / "6")
    one_process(workdir, 8, "--config.mesh.data=1", "--config.mesh.fsdp=8")
    assert_same_losses(losses(workdir), losses(tmp_path / "1x1"))


@pytest.mark.slow
def test_tensor_axis_spanning_both_processes(tmp_path):
    """tensor=8 over 2 processes x 4 devices: every device needs the whole batch, so the
    processes all-gather their rows first (BatchPlacer's fallback)."""
    proc = two_processes(tmp_path / "t8", "--config.mesh.data=1", "--config.mesh.tensor=8")
    assert "all-gathered between processes" in proc.stdout + proc.stderr
    one_process(tmp_path / "1x1", 1)
    assert_same_losses(losses(tmp_path / "t8"), losses(tmp_path / "1x1"))
    # Both processes wrote the final model together (each its shards of the tensor axis): it
    # holds the last checkpoint's weights.
    from gamma_mod_jax.convert.checkpoint import load_checkpoint
    from gamma_mod_jax.convert.manifest import verify_manifest
    from tests.test_workflow import assert_same_params

    assert verify_manifest(str(tmp_path / "t8" / "model")) is None
    assert_same_params(load_checkpoint(str(tmp_path / "t8" / "model")),
                       load_checkpoint(str(tmp_path / "t8" / "checkpoints" / str(STEPS))))


def test_a_dying_process_stops_the_job_with_a_clear_error(tmp_path):
    heartbeat = 10
    tic = time.monotonic()
    proc = two_processes(tmp_path / "run", check=False, timeout=400, GMJ_TEST_DIE_PROCESS=1, GMJ_TEST_DIE_AT=3,
                         HEARTBEAT_TIMEOUT=heartbeat, KILL_GRACE=120)
    elapsed = time.monotonic() - tic
    log = proc.stdout + proc.stderr
    assert proc.returncode == 3, log[-4000:]
    assert "process 1: exiting on purpose at batch 3" in log
    assert "local_multiprocess: error: process 1" in log and "exited with status 3" in log
    # the survivor saw its peer go (a failed collective, or the coordination service's
    # heartbeat check) and exited by itself, well before the launcher's SIGKILL
    assert "Gloo" in log or "heartbeat" in log, log[-4000:]
    assert "ignored SIGTERM" not in log
    ended = [line for line in log.splitlines() if "the other processes ended" in line]
    assert ended and int(ended[0].split("ended ")[1].split("s ")[0]) <= heartbeat + 20, ended
    assert elapsed < 300
