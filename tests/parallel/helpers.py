"""Subprocess plumbing for the parallelism tests: the pytest process has one CPU device,
so anything on several devices or processes runs in a child with its own XLA_FLAGS."""

from __future__ import annotations

import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LAUNCHER = os.path.join(REPO, "launch", "local_multiprocess.sh")


def child_env(devices: int = 1, **extra) -> dict:
    """Environment of a child: `devices` CPU devices, the tests' compilation cache,
    LLVM's fast optimisation level (compiles 2x faster; every compared run uses it)."""
    env = dict(os.environ)
    env.update(
        JAX_PLATFORMS="cpu", PYTHONPATH=REPO + os.pathsep + env.get("PYTHONPATH", ""),
        XLA_FLAGS=f"--xla_force_host_platform_device_count={devices} --xla_backend_optimization_level=0",
        JAX_DEFAULT_MATMUL_PRECISION="highest",
        JAX_COMPILATION_CACHE_DIR=os.environ.get("GAMMA_MOD_JAX_TEST_JIT_CACHE", "/tmp/gamma_mod_jax_test_jit_cache"),
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0.5",
        TF_CPP_MIN_LOG_LEVEL="2",  # XLA's SPMD performance warnings
        PYTHON=sys.executable)
    env.update({k: str(v) for k, v in extra.items()})
    return env


# Gloo creates its communicators at the first collective and waits a fixed 30 s for the
# peers' keys: on an overloaded 2-core machine one process can still be compiling the step
# then (see processes_env). That start-up failure (nothing trained or written yet) is retried once; any other
# failure, or the same one twice, fails the test.
GLOO_START_TIMEOUT = "Gloo context initialization failed: DEADLINE_EXCEEDED"


def processes_env(devices: int, **extra) -> dict:
    """child_env for each process of a multi-process job, without the persistent compilation
    cache: a process that finds its step executable there reaches the first collective long
    before a peer that compiles it, past Gloo's fixed 30 s start-up wait."""
    return child_env(devices=devices, JAX_ENABLE_COMPILATION_CACHE="false", **extra)


def run(args, *, env, timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0 and GLOO_START_TIMEOUT in proc.stdout + proc.stderr:
        print(f"retrying once after a Gloo start-up timeout: {' '.join(map(str, args))}")
        proc = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, args))} exited with {proc.returncode}\n"
                             f"stdout:\n{proc.stdout[-6000:]}\nstderr:\n{proc.stderr[-6000:]}")
    return proc


def result_line(stdout: str) -> dict:
    lines = [line for line in stdout.splitlines() if line.startswith("RESULT ")]
    assert lines, f"no RESULT line in:\n{stdout[-4000:]}"
    return json.loads(lines[-1][len("RESULT "):])


def train_args(workdir: str, *overrides: str, recipe: str = "llava15_7b_mod0.3,tiny") -> list:
    """launch.train arguments for the tiny recipe on the synthetic data source."""
    return ["--config", f"configs/train.py:{recipe}", "--workdir", workdir,
            "--data-iterator", "tests.parallel.synthetic_data:make_iterator",
            "--config.train.tensorboard=False", "--config.train.progress_bar=False", *overrides]
