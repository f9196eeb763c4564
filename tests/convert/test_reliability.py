"""launch.convert on bad input: config.json fields of the wrong type, NaN / Inf and integer
weights, index entries outside --checkpoint or not strings, temporary directories left by killed
runs; our model checkpoints verified against their manifest."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import gamma_mod_jax as gm
from gamma_mod_jax.convert.checkpoint import load_checkpoint, save_checkpoint
from gamma_mod_jax.convert.hf_config import hf_config_from_mllm
from gamma_mod_jax.convert.manifest import CheckpointIntegrityError
from tests.convert.test_convert import original_checkpoint, run_cli, write_original


@pytest.fixture
def source(rng, tmp_path):
    cfg, _, state = original_checkpoint(rng, "llava")
    return hf_config_from_mllm(cfg), state, tmp_path


def refused(capsys, tmp_path, *args):
    """Runs the converter to tmp_path/out/ours, expects exit 2 and nothing left; returns stderr."""
    dst = tmp_path / "out" / "ours"
    assert run_cli(*args, "--out", dst) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and not dst.exists()
    assert not (tmp_path / "out").exists() or os.listdir(tmp_path / "out") == []
    return err


@pytest.mark.parametrize("field, value, expected", [
    ("hidden_size", "64", "a positive integer"),
    ("hidden_size", [64], "a positive integer"),
    ("num_hidden_layers", 4.5, "a positive integer"),
    ("num_hidden_layers", None, "a positive integer"),
    ("num_attention_heads", True, "a positive integer"),
    ("rms_norm_eps", "1e-6", "a positive finite number"),
    ("rope_theta", -1.0, "a positive finite number"),
    ("eos_token_id", "2", "a non-negative integer or null"),
    ("is_multipath_encoder", "yes", "true or false"),
    ("vocab_size", "missing", "a positive integer"),
])
def test_config_fields_of_the_wrong_type_are_refused_before_any_tensor(source, capsys, field, value, expected):
    config, state, tmp = source
    config = dict(config)
    if value == "missing":
        del config[field]
    else:
        config[field] = value
    (tmp / "src").mkdir()
    (tmp / "src" / "config.json").write_text(json.dumps(config))
    (tmp / "src" / "model.safetensors").write_bytes(b"not a safetensors file: must not be opened")
    err = refused(capsys, tmp, "--checkpoint", tmp / "src")
    assert f"{tmp / 'src' / 'config.json'}: field {field!r}" in err
    assert expected in err and "safetensors" not in err
    if value != "missing":
        assert json.dumps(value) in err


def test_mod_layer_indices_are_checked(rng, tmp_path, capsys):
    cfg, _, state = original_checkpoint(rng, "gamma_mod")
    config = hf_config_from_mllm(cfg)
    config["mod"]["mod_layers_idx"] = [1, "2"]
    write_original(tmp_path / "src", state, config)
    err = refused(capsys, tmp_path, "--checkpoint", tmp_path / "src")
    assert "'mod.mod_layers_idx'" in err and '[1, "2"]' in err and "[0, 4)" in err


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_weights_are_an_error_unless_allowed(source, capsys, bad):
    config, state, tmp = source
    key = "model.layers.1.mlp.up_proj.weight"
    state[key] = state[key].clone()
    state[key][0, 3] = bad
    write_original(tmp / "src", state, config)
    err = refused(capsys, tmp, "--checkpoint", tmp / "src")
    assert str(tmp / "src" / "model.safetensors") in err and key in err and "1 NaN/Inf" in err
    assert run_cli("--checkpoint", tmp / "src", "--out", tmp / "kept", "--allow-nonfinite") == 0
    kept = load_checkpoint(str(tmp / "kept"))
    up = np.asarray(kept.llm.layers[1].mlp.up_proj.kernel.get_value())
    assert int(np.count_nonzero(~np.isfinite(up))) == 1


def test_integer_weights_are_an_error(source, capsys):
    config, state, tmp = source
    key = "model.norm.weight"
    state[key] = torch.ones_like(state[key], dtype=torch.int32)
    write_original(tmp / "src", state, config, "bin")
    err = refused(capsys, tmp, "--checkpoint", tmp / "src")
    assert key in err and "int32" in err and "floating point" in err


@pytest.mark.parametrize("entry, needle", [("../../x.safetensors", "outside"), ("/etc/x.safetensors", "outside"),
                                           (5, "expected the file name"), (None, "expected the file name")])
def test_index_entries_must_be_files_inside_src(source, capsys, entry, needle):
    config, state, tmp = source
    write_original(tmp / "src", state, config, "safetensors", 2)
    index_path = tmp / "src" / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"]["model.norm.weight"] = entry
    index_path.write_text(json.dumps(index))
    err = refused(capsys, tmp, "--checkpoint", tmp / "src")
    assert str(index_path) in err and "model.norm.weight" in err and needle in err


def test_temporary_directories_of_killed_runs_are_removed_by_the_next_run(source, capsys):
    config, state, tmp = source
    write_original(tmp / "src", state, config)
    out = tmp / "out"
    out.mkdir()
    host = socket.gethostname().replace("-", "_")
    dead = out / f".ours.partial-{host}-{2**22 + 12345}-abc"   # no such process
    live = out / f".ours.partial-{host}-{os.getpid()}-def"     # this process: another writer at work
    for d in (dead, live):
        d.mkdir()
        (d / "junk").write_bytes(b"x" * 1000)
    assert run_cli("--checkpoint", tmp / "src", "--out", out / "ours") == 0
    assert "left by an earlier write that was killed" in capsys.readouterr().out
    assert sorted(os.listdir(out)) == sorted(["ours", live.name])


def test_sigterm_during_a_conversion_leaves_nothing(source):
    config, state, tmp = source
    write_original(tmp / "src", state, config, "safetensors", 3)
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=os.getcwd())
    # The signal goes out when the temporary directory appears; a tiny conversion may still
    # finish first, so try again (a few times at most: never a pass without a real signal).
    for attempt in range(5):
        out = tmp / f"out{attempt}"
        proc = subprocess.Popen([sys.executable, "-m", "launch.convert", "--checkpoint", str(tmp / "src"), "--out",
                                 str(out / "ours")], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)
        deadline = time.monotonic() + 120
        while not (out.exists() and any(".partial-" in n for n in os.listdir(out))):
            assert proc.poll() is None and time.monotonic() < deadline, "the conversion never started writing"
            time.sleep(0.01)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
        if proc.returncode != 0:
            break
    assert proc.returncode == 130, f"5 conversions all finished before SIGTERM, or: {err}"
    assert "Traceback" not in err and "interrupted" in err
    assert os.listdir(out) == []


def test_model_checkpoint_bit_rot_is_detected_on_load_and_export(tmp_path, capsys):
    model = gm.build_model(gm.model_config("configs/llava15_7b.py:tiny"), seed=0)
    save_checkpoint(str(tmp_path / "ckpt"), model)
    load_checkpoint(str(tmp_path / "ckpt"))  # intact: loads
    files = [os.path.join(r, n) for r, _, ns in os.walk(tmp_path / "ckpt" / "params") for n in ns]
    victim = max(files, key=os.path.getsize)
    data = bytearray(open(victim, "rb").read())
    data[len(data) // 2] ^= 0x01
    open(victim, "wb").write(bytes(data))
    rel = os.path.relpath(victim, tmp_path / "ckpt")
    with pytest.raises(CheckpointIntegrityError, match=f"checkpoint {tmp_path / 'ckpt'}: file {rel} does not match"):
        load_checkpoint(str(tmp_path / "ckpt"))
    assert run_cli("--export", "--checkpoint", tmp_path / "ckpt", "--out", tmp_path / "hf") == 2
    err = capsys.readouterr().err
    assert rel in err and "Traceback" not in err and not (tmp_path / "hf").exists()
