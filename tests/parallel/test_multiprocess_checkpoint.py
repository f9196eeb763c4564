"""A model checkpoint written and read by 2 processes under FSDP without gathering to one
host: each process writes and reads its own shards; process 0 writes the manifest after all
have written (it lists every file of the checkpoint)."""

import json
import os
import socket
import subprocess
import sys

from gamma_mod_jax.convert.manifest import MANIFEST_FILE, verify_manifest
from tests.parallel.helpers import GLOO_START_TIMEOUT, REPO, processes_env, result_line


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_pair(directory):
    env = processes_env(devices=2)
    port = _free_port()
    procs = [subprocess.Popen([sys.executable, "-m", "tests.parallel.checkpoint_worker", str(directory),
                               f"127.0.0.1:{port}", "2", str(i)], cwd=REPO, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(2)]
    try:
        return [p.communicate(timeout=300) + (p.returncode,) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()


def test_two_processes_save_and_restore_an_fsdp_sharded_model(tmp_path):
    directory = tmp_path / "model"
    outs = _run_pair(directory)
    if any(rc and GLOO_START_TIMEOUT in out + err for out, err, rc in outs):
        outs = _run_pair(tmp_path / "model_retry")  # Gloo's fixed start-up wait on a loaded machine
        directory = tmp_path / "model_retry"
    for out, err, rc in outs:
        assert rc == 0, (out[-3000:], err[-3000:])
    results = [result_line(out) for out, _, _ in outs]
    for r in results:
        assert r["split_params"] > 0  # the parameters really are split between the processes
        assert r["compared_shards"] > 0 and r["max_abs_error"] == 0.0 and r["same_sharding"]
    assert sorted(r["process"] for r in results) == [0, 1]
    assert verify_manifest(str(directory)) is None
    with open(directory / MANIFEST_FILE) as f:
        listed = set(json.load(f)["files"])
    present = {os.path.relpath(os.path.join(root, name), directory) for root, _, names in os.walk(directory)
               for name in names} - {MANIFEST_FILE}
    assert listed == present  # written after every process's files were in place
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary directory left
