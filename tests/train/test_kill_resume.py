"""`launch.train` killed with SIGKILL (between steps, and in the middle of a checkpoint save)
and restarted writes the same losses, step for step, as an uninterrupted run."""

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from gamma_mod_jax.data.easy_vqa import easy_vqa_vocabulary
from gamma_mod_jax.data.tokenizer import build_word_tokenizer
from gamma_mod_jax.train.metrics import read_metrics

STEPS = 8


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok") / "tokenizer"
    build_word_tokenizer(easy_vqa_vocabulary(), str(path))
    return str(path)


def command(workdir, tokenizer_dir, checkpoint_every):
    return [sys.executable, "-m", "launch.train", "--config", "configs/train.py:llava15_7b_mod0.3,tiny",
            "--workdir", str(workdir), f"--config.train.num_steps={STEPS}",
            f"--config.train.checkpoint_every={checkpoint_every}", "--config.train.log_every=1",
            "--config.data.source=easy_vqa", f"--config.data.tokenizer_path={tokenizer_dir}",
            "--config.data.buckets=(64,)", "--config.data.max_records=64", "--config.data.num_epochs=4"]


def env():
    return dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=os.getcwd())


def losses(workdir):
    return {r["step"]: r["loss"] for r in read_metrics(str(workdir))}


def finished(cmd):
    result = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tokenizer_dir):
    workdir = tmp_path_factory.mktemp("reference") / "run"
    finished(command(workdir, tokenizer_dir, checkpoint_every=2))
    got = losses(workdir)
    assert sorted(got) == list(range(1, STEPS + 1))
    return got


def kill_when(cmd, condition, deadline_s=300):
    proc = subprocess.Popen(cmd, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    start = time.monotonic()
    try:
        while time.monotonic() - start < deadline_s:
            if condition():
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                return True
            if proc.poll() is not None:
                return False
            time.sleep(0.002)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return False


@pytest.mark.slow
def test_sigkill_between_steps_then_restart_gives_the_same_losses(tmp_path, tokenizer_dir, reference):
    workdir = tmp_path / "run"
    cmd = command(workdir, tokenizer_dir, checkpoint_every=2)
    metrics = workdir / "metrics.jsonl"
    killed = kill_when(cmd, lambda: metrics.exists() and len(metrics.read_text().splitlines()) >= 5)
    assert killed, "the run finished before it could be killed"
    assert 5 <= len(losses(workdir)) < STEPS
    finished(cmd)
    got = losses(workdir)
    assert sorted(got) == list(range(1, STEPS + 1))
    np.testing.assert_allclose([got[s] for s in sorted(got)], [reference[s] for s in sorted(reference)],
                               rtol=1e-6, atol=1e-6)


@pytest.mark.slow
def test_sigkill_during_a_checkpoint_save_keeps_the_previous_checkpoint(tmp_path, tokenizer_dir, reference):
    workdir = tmp_path / "run"
    cmd = command(workdir, tokenizer_dir, checkpoint_every=1)
    checkpoints = workdir / "checkpoints"
    seen = {}

    def saving():  # an unfinished save: Orbax writes under a temporary name, renamed when complete
        if not checkpoints.exists():
            return False
        names = os.listdir(checkpoints)
        partial = [n for n in names if "tmp" in n]
        done = [int(n) for n in names if n.isdigit()]
        if partial and done and max(done) >= 2:
            seen.update(partial=partial, done=sorted(done))
            return True
        return False

    killed = kill_when(cmd, saving)
    assert killed, "no save was caught in progress"
    finished(cmd)
    got = losses(workdir)
    assert sorted(got) == list(range(1, STEPS + 1)), seen
    np.testing.assert_allclose([got[s] for s in sorted(got)], [reference[s] for s in sorted(reference)],
                               rtol=1e-6, atol=1e-6)
