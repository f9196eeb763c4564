"""A peer killed in a 2-process run: the survivor exits by itself with status 2 and one
line naming the dead process, well within the heartbeat timeout."""

import socket
import subprocess
import sys
import time

import pytest

from tests.parallel.helpers import REPO, processes_env, train_args


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow  # two processes compile the tiny model: ~1-2 min on 2 cores
def test_survivor_of_a_dead_peer_exits_2_naming_it(tmp_path):
    heartbeat = 60
    port = _free_port()
    env = processes_env(devices=1, GMJ_TEST_DIE_PROCESS=1, GMJ_TEST_DIE_AT=3)
    procs = []
    for index in range(2):
        args = [sys.executable, "-m", "launch.train",
                *train_args(str(tmp_path / "run"), "--config.data.batch_size=2", "--config.train.num_steps=6"),
                f"--coordinator-address=127.0.0.1:{port}", "--num-processes=2", f"--process-id={index}",
                f"--heartbeat-timeout={heartbeat}"]
        procs.append(subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True))
    try:
        _, err1 = procs[1].communicate(timeout=400)
        died = time.monotonic()
        assert procs[1].returncode == 3, err1[-3000:]
        _, err0 = procs[0].communicate(timeout=heartbeat + 60)
        waited = time.monotonic() - died
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    assert procs[0].returncode == 2, err0[-3000:]
    last = err0.strip().splitlines()[-1]
    assert last.startswith("error: process 0 of 2: process 1 is gone"), err0[-3000:]
    assert "Traceback" not in err0
    assert waited < heartbeat, waited
