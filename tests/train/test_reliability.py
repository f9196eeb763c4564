"""Faults the trainer must survive without losing or faking anything: a NaN learning rate,
bit-flipped and truncated checkpoints, every checkpoint corrupt, a workdir it cannot write,
data that yields no batch."""

import os
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from gamma_mod_jax.data.sources import BrokenDataError
from gamma_mod_jax.convert.manifest import CheckpointIntegrityError, verify_manifest
from gamma_mod_jax.train.trainer import CheckpointWriteError, TrainingError, model_for_training, train
from tests.train.test_trainer import losses, synthetic_iterator, tiny_config


def synthetic_data(config, model_cfg):
    """--data-iterator target for launcher subprocesses: the trainer tests' synthetic data."""
    return synthetic_iterator(2)(config, model_cfg)


def _state_files(step_dir):
    """Files of the train state in a checkpoint step directory, largest first."""
    found = []
    for root, _, names in os.walk(os.path.join(step_dir, "state")):
        found += [os.path.join(root, n) for n in names]
    return sorted(found, key=os.path.getsize, reverse=True)


def test_nan_learning_rate_never_produces_a_nonfinite_checkpoint(tmp_path):
    """Finite loss and gradients, NaN update: every step is skipped, the run stops at
    exactly the limit (3, at step 3), and the one checkpoint (step 2, keep_checkpoints=1)
    holds the initial, finite parameters."""
    config = tiny_config(num_steps=8, checkpoint_every=2, keep_checkpoints=1, max_nonfinite_in_a_row=3)
    config.optim.learning_rate = float("nan")
    with pytest.raises(TrainingError, match="3 non-finite steps in a row .* at step 3: .*checkpoints/2"):
        train(config, str(tmp_path), make_data_iterator=synthetic_iterator(2), log=lambda *_: None)
    assert sorted(int(d) for d in os.listdir(tmp_path / "checkpoints") if d.isdigit()) == [2]
    assert verify_manifest(str(tmp_path / "checkpoints" / "2")) is None
    saved = ocp.StandardCheckpointer().restore(str(tmp_path / "checkpoints" / "2" / "state"))
    initial = nnx.state(model_for_training(config, log=lambda *_: None), nnx.Param).to_pure_dict()
    for leaf in jax.tree.leaves(saved["opt_state"]):
        if np.issubdtype(np.asarray(leaf).dtype, np.floating):
            assert np.all(np.isfinite(leaf))
    saved_params, init_params = jax.tree.leaves(saved["params"]), jax.tree.leaves(initial)
    assert len(saved_params) == len(init_params)
    for got, want in zip(saved_params, init_params):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


@pytest.mark.slow  # three runs of the tiny model: ~60-90 s on 2 shared cores
def test_corrupt_newest_checkpoints_are_skipped_and_the_run_resumes_from_the_last_good_one(tmp_path):
    """Checkpoints 2, 4, 6; 6 bit-flipped, 4 truncated: resume verifies, names both with
    the reason, sets them aside and continues from 2 with the uninterrupted run's losses.
    With 2 corrupt as well nothing restores: an error naming every checkpoint and file."""
    config = tiny_config(num_steps=6, checkpoint_every=2, keep_checkpoints=3)
    workdir = tmp_path / "run"
    train(config, str(workdir), make_data_iterator=synthetic_iterator(2), log=lambda *_: None)
    reference = losses(workdir)
    assert [s for s, _ in reference] == [1, 2, 3, 4, 5, 6]
    ckpt = workdir / "checkpoints"
    flipped = _state_files(ckpt / "6")[0]
    with open(flipped, "r+b") as f:
        f.seek(os.path.getsize(flipped) // 2)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0x10]))
    truncated = _state_files(ckpt / "4")[0]
    os.truncate(truncated, os.path.getsize(truncated) // 2)
    # every checkpoint corrupt: an error naming each, nothing moved or deleted
    spoiled = _state_files(ckpt / "2")[0]
    intact = open(spoiled, "rb").read()
    with open(spoiled, "wb") as f:
        f.write(intact[:-7])
    with pytest.raises(CheckpointIntegrityError) as err:
        train(config, str(workdir), make_data_iterator=synthetic_iterator(2), log=lambda *_: None)
    for step, path in ((6, flipped), (4, truncated), (2, spoiled)):
        assert f"checkpoints/{step}: file {os.path.relpath(path, ckpt / str(step))}" in str(err.value)
    assert sorted(int(d) for d in os.listdir(ckpt) if d.isdigit()) == [2, 4, 6]
    with open(spoiled, "wb") as f:
        f.write(intact)

    messages = []
    out = train(config, str(workdir), make_data_iterator=synthetic_iterator(2), log=messages.append)
    assert out["step"] == 6
    log = "\n".join(messages)
    assert "checkpoints/6: file" in log and "SHA-256" in log, log
    assert "checkpoints/4: file" in log and "truncated" in log, log
    assert "resumed from" in log and log.split("resumed from")[1].split()[0].endswith("checkpoints/2")
    assert sorted(n.split("-")[0] for n in os.listdir(workdir / "checkpoints_rejected")) == ["4", "6"]
    got = losses(workdir)
    assert [s for s, _ in got] == [s for s, _ in reference]
    np.testing.assert_allclose([l for _, l in got], [l for _, l in reference], rtol=1e-5)
    for step in (2, 4, 6):
        assert verify_manifest(str(ckpt / str(step))) is None


def test_unwritable_checkpoints_directory_is_an_error_before_training(tmp_path):
    (tmp_path / "checkpoints").write_text("a file where the checkpoints directory belongs")
    with pytest.raises(CheckpointWriteError, match=f"{tmp_path}/checkpoints: not a writable directory"):
        train(tiny_config(), str(tmp_path), make_data_iterator=synthetic_iterator(2), log=lambda *_: None)
    result = subprocess.run(
        [sys.executable, "-m", "launch.train", "--config", "configs/train.py:llava_hr_7b_mod0.5,tiny",
         "--workdir", str(tmp_path), "--data-iterator", "tests.train.test_reliability:synthetic_data"],
        env=dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=os.getcwd()), capture_output=True, text=True,
        timeout=300)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert f"error: {tmp_path}/checkpoints: not a writable directory" in result.stderr


def test_data_that_yields_no_batch_is_an_error_with_the_counts(tmp_path):
    class Empty:
        def __next__(self):
            raise StopIteration

        def get_state(self):
            return {}

        def set_state(self, state):
            pass

        def stats(self):
            return {"skipped": 5, "skipped_bad_json": 5}

    with pytest.raises(TrainingError, match="no batch.*'data_skipped': 5, 'data_skipped_bad_json': 5"):
        train(tiny_config(), str(tmp_path), make_data_iterator=lambda c, m: Empty(), log=lambda *_: None)


def test_a_data_file_of_bad_records_only_is_an_error_with_the_counts(tmp_path):
    """Bad JSON, 100,000 nested brackets, an image path leaving image_dir, a missing
    image: the real pipeline skips and counts each, and the run fails instead of
    'training' 0 steps."""
    import json

    from gamma_mod_jax.data.tokenizer import build_word_tokenizer

    build_word_tokenizer(["what is it ?"], str(tmp_path / "tok"))
    (tmp_path / "images").mkdir()
    (tmp_path / "secret.png").write_bytes(b"outside the image folder")
    turns = [{"from": "human", "value": "<image>\nwhat is it ?"}, {"from": "gpt", "value": "it"}]
    lines = ["{not json", "[" * 100_000, json.dumps({"id": "escape", "image": "../secret.png", "conversations": turns}),
             json.dumps({"id": "missing", "image": "nope.png", "conversations": turns})]
    (tmp_path / "data.jsonl").write_text("\n".join(lines) + "\n")
    config = tiny_config()
    config.data.json_path = str(tmp_path / "data.jsonl")
    config.data.image_dir = str(tmp_path / "images")
    config.data.tokenizer_path = str(tmp_path / "tok")
    # The batch plan sees every record bad before the first step: a BrokenDataError
    # (a ValueError: exit status 2 from launch.train) with the counts by reason.
    with pytest.raises(BrokenDataError, match="no batch") as err:
        train(config, str(tmp_path / "run"), log=lambda *_: None)
    for counted in ("skipped 4", "bad_json: 2", "image_outside_image_dir: 1", "missing_image: 1"):
        assert counted in str(err.value)


@pytest.mark.slow
def test_a_full_disk_during_a_save_is_exit_2_naming_the_path_and_the_previous_checkpoint_survives(tmp_path):
    """The resumed run may write no file over 195 KiB (RLIMIT_FSIZE: what a full disk does
    to a write, and it binds root too): its save at step 4 fails; the run ends with exit
    status 2 and one error line naming the path, checkpoint 2 still verifies."""
    import shlex

    workdir = tmp_path / "run"
    train(tiny_config(num_steps=2), str(workdir), make_data_iterator=synthetic_iterator(2), log=lambda *_: None)
    command = [sys.executable, "-m", "launch.train", "--config", "configs/train.py:llava_hr_7b_mod0.5,tiny",
               "--workdir", str(workdir), "--config.train.num_steps=4", "--config.train.checkpoint_every=2",
               "--data-iterator", "tests.train.test_reliability:synthetic_data"]
    # SIGXFSZ ignored: a write past the limit fails with EFBIG instead of killing the process
    result = subprocess.run(["bash", "-c", f"trap '' XFSZ; ulimit -f 195; exec {shlex.join(command)}"],
                            env=dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=os.getcwd()), capture_output=True,
                            text=True, timeout=400)
    assert result.returncode == 2, result.stderr[-3000:]
    # (Orbax's writer threads log their own failures, tracebacks included, before this line.)
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: cannot write the checkpoint of step 4 at {workdir}/checkpoints/4"), last
    assert "File too large" in last and f"last good checkpoint: {workdir}/checkpoints/2" in last
    assert verify_manifest(str(workdir / "checkpoints" / "2")) is None
