"""The real data pipeline under several processes (launch/local_multiprocess.sh: 2
processes x 4 CPU devices) against 1 process x 8 devices and 1 device: the global batch
plan gives every process the same shapes at every step and every topology the same
batches, so the losses agree; a checkpoint of 2 processes continues on 1.

Data: easy-VQA (two questions per conversation) and a LLaVA-JSON set with varied lengths
and one undecodable image (tests/data/varied_llava.py), each in 4 buckets of which the
6 steps use at least 3."""

import json
import os
import shutil
import sys

import numpy as np
import pytest

from gamma_mod_jax.train.metrics import read_metrics
from tests.data import varied_llava
from tests.parallel.helpers import LAUNCHER, child_env, processes_env, run

STEPS = 6  # the tiny recipe: 6 steps of a global batch of 8, a checkpoint every 3
EASY_VQA_BUCKETS = (58, 60, 62, 64)


def _args(workdir, data_args, batch_size):
    return ["--config", "configs/train.py:llava15_7b_mod0.3,tiny", "--workdir", str(workdir),
            "--data-iterator", "tests.parallel.shape_logging_data:make_iterator",
            "--config.train.tensorboard=False", "--config.train.progress_bar=False",
            f"--config.data.batch_size={batch_size}", *data_args]


def two_processes(workdir, data_args):
    """2 processes x 4 devices, 4 examples each: a global batch of 8."""
    environment = processes_env(devices=4, GMJ_TEST_SHAPES_DIR=workdir)
    environment["XLA_FLAGS"] = "--xla_backend_optimization_level=0"  # the launcher adds the device count
    return run(["bash", LAUNCHER, "2", "4", "--", *_args(workdir, data_args, 4)], env=environment, timeout=600)


def one_process(workdir, devices, data_args):
    """One process, `devices` devices, a batch of 8."""
    return run([sys.executable, "-m", "launch.train", *_args(workdir, data_args, 8)],
               env=child_env(devices=devices, GMJ_TEST_SHAPES_DIR=workdir), timeout=600)


def losses(workdir):
    return [(r["step"], r["loss"]) for r in read_metrics(str(workdir))]


def assert_same_losses(got, want):
    assert [s for s, _ in got] == [s for s, _ in want]
    np.testing.assert_allclose([l for _, l in got], [l for _, l in want], rtol=1e-5)
    print("largest relative loss difference", max(abs(a - b) / abs(b) for (_, a), (_, b) in zip(got, want)))


def global_batches(workdir, count):
    """[(text length, ids of the global batch's real rows in row order)] per step, read from the
    processes' shape logs; asserts every process had the same shapes at every step."""
    logs = []
    for p in range(count):
        with open(os.path.join(workdir, f"shapes.process_{p}-of-{count}.jsonl")) as f:
            logs.append([json.loads(line) for line in f])
    out = []
    for lines in zip(*logs):
        assert len({line["global_batch"] for line in lines}) == 1, lines
        assert all(line["shapes"] == lines[0]["shapes"] for line in lines), [line["shapes"] for line in lines]
        shapes = lines[0]["shapes"]
        assert shapes["input_ids"][0] * count == 8 and shapes["labels"] == shapes["input_ids"]
        out.append((shapes["input_ids"][1], [i for line in lines for i in line["ids"]]))
    assert len(out) == len(logs[0])
    return out


def _check_runs(runs, buckets):
    """runs: {name: (workdir, process count)}; same losses, batches, padding efficiency."""
    reference = losses(runs["1x1"][0])
    assert [s for s, _ in reference] == list(range(1, STEPS + 1))
    plans = {name: global_batches(*run_) for name, run_ in runs.items()}
    want = plans["1x1"]
    assert len(want) == STEPS
    lengths = [t for t, _ in want]
    assert set(lengths) <= set(buckets) and len(set(lengths)) >= 3, lengths
    for name, (workdir, _) in runs.items():
        assert plans[name] == want, name
        assert_same_losses(losses(workdir), reference)
        efficiency = [r["data_padding_efficiency"] for r in read_metrics(str(workdir))]
        assert efficiency == [r["data_padding_efficiency"] for r in read_metrics(str(runs["1x1"][0]))]
        assert 0.5 < efficiency[-1] < 1
    return want


@pytest.mark.slow  # 3 runs, ~3 min on 2 cores
def test_easy_vqa_gives_every_topology_the_same_batches_and_losses(tmp_path):
    tokenizer_dir = str(tmp_path / "tokenizer")
    from gamma_mod_jax.data.easy_vqa import easy_vqa_vocabulary
    from gamma_mod_jax.data.tokenizer import build_word_tokenizer

    build_word_tokenizer(easy_vqa_vocabulary(), tokenizer_dir)
    data = ["--config.data.source=easy_vqa", "--config.data.easy_vqa_turns=2", "--config.data.max_records=48",
            f"--config.data.buckets={EASY_VQA_BUCKETS}", f"--config.data.tokenizer_path={tokenizer_dir}"]
    two_processes(tmp_path / "2x4", data)
    one_process(tmp_path / "1x8", 8, data)
    one_process(tmp_path / "1x1", 1, data)
    _check_runs({"2x4": (tmp_path / "2x4", 2), "1x8": (tmp_path / "1x8", 1), "1x1": (tmp_path / "1x1", 1)},
                EASY_VQA_BUCKETS)


@pytest.mark.slow  # 3 runs, ~3 min on 2 cores
def test_llava_json_same_losses_on_two_processes_and_the_checkpoint_continues_on_one(tmp_path):
    json_path, image_dir, tokenizer_dir = varied_llava.write_varied_llava(str(tmp_path / "data"))
    data = [f"--config.data.json_path={json_path}", f"--config.data.image_dir={image_dir}",
            f"--config.data.tokenizer_path={tokenizer_dir}", f"--config.data.buckets={varied_llava.BUCKETS}",
            "--config.data.group_by_modality=False"]  # Grain's global shuffle (easy-VQA: the recipe's grouping)
    two_processes(tmp_path / "2x4", data)  # checkpoints at steps 3 and 6
    one_process(tmp_path / "1x1", 1, data)
    batches = _check_runs({"2x4": (tmp_path / "2x4", 2), "1x1": (tmp_path / "1x1", 1)}, varied_llava.BUCKETS)
    # the undecodable image is a padding row on the process that owns it, counted there
    assert any(len(ids) == 7 for _, ids in batches) and varied_llava.CORRUPT_ID not in sum((i for _, i in batches), [])
    assert sum(r["data_skipped_unreadable_image"] for r in read_metrics(str(tmp_path / "1x1"))[-1:]) == 1

    resumed = tmp_path / "resumed"
    shutil.copytree(tmp_path / "2x4", resumed)
    shutil.rmtree(resumed / "checkpoints" / "6")
    proc = one_process(resumed, 1, data)
    assert "resumed from" in proc.stdout and proc.stdout.split("resumed from")[1].split()[0].endswith("checkpoints/3"), proc.stdout[-2000:]
    assert "restoring the state saved by 2 process(es)" in proc.stdout
    assert_same_losses(losses(resumed), losses(tmp_path / "1x1"))  # steps 4-6 redone on one process
    assert global_batches(resumed, 1) == batches[3:]
