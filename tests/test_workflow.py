"""The user's workflow through the command line, as the README shows it, with no glue:
train -> the workdir read by evaluate, convert --export, arank and adapt (a workdir
resolves to its model/, else to its newest verified checkpoint; a training checkpoint
converts to the same model) -> training from a converted checkpoint with only
--config.init_checkpoint and the data flags; conflicting model fields, a directory that
is no model and a model's own config.py as --config are clear errors (exit 2)."""

import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest

from gamma_mod_jax import api as gm
from gamma_mod_jax.convert.checkpoint import load_checkpoint, save_checkpoint
from gamma_mod_jax.convert.keymap import param_paths
from gamma_mod_jax.data.easy_vqa import easy_vqa_vocabulary
from gamma_mod_jax.data.tokenizer import build_word_tokenizer
from launch import adapt, arank, convert, evaluate
from tests.conftest import run_cli

DENSE_RECIPE = "configs/train.py:llava15_7b_stage1,tiny"
MOD_RECIPE = "configs/train.py:llava15_7b_mod0.3,tiny"


def launch_train(*args, timeout=600):
    """`python -m launch.train ...` in a fresh process (as a user runs it)."""
    return subprocess.run([sys.executable, "-m", "launch.train", *map(str, args)], capture_output=True, text=True,
                          env=dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=os.getcwd()), timeout=timeout)


def params(model) -> dict:
    return {p: np.asarray(v.get_value()) for p, v in param_paths(model)}


def assert_same_params(a, b):
    pa, pb = params(a), params(b)
    assert set(pa) == set(pb)
    for path in pa:
        np.testing.assert_array_equal(pa[path], pb[path], err_msg=str(path))


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok") / "tokenizer"
    build_word_tokenizer(easy_vqa_vocabulary(), str(path))
    return path


@pytest.mark.slow
def test_train_then_evaluate_export_arank_and_adapt_the_workdir(tokenizer, tmp_path, capsys):
    run = tmp_path / "run"
    result = launch_train("--config", DENSE_RECIPE, "--workdir", run, "--config.data.source=easy_vqa",
                          f"--config.data.tokenizer_path={tokenizer}", "--config.train.num_steps=2")
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout.strip().splitlines()[-1])["model"] == str(run / "model")
    # One progress line around the step's compile; no dependency INFO logs without --verbose.
    assert re.search(r"^compiling the training step for batch shape \(\d+, \d+\) \.\.\.\n\.\.\. done in \d+\.\d s$",
                     result.stdout, re.M), result.stdout[-3000:]
    assert not re.search(r"^I\d{4} ", result.stderr, re.M), result.stderr[-3000:]
    trained = load_checkpoint(str(run / "model"))
    assert trained.config == gm.model_config("configs/llava15_7b.py:tiny")
    # The final model equals the last training checkpoint read as a model (another route:
    # the train state's parameters streamed out of the Orbax training checkpoint).
    code, _, err = run_cli(convert.main, ["--checkpoint", run / "checkpoints" / "2", "--out", tmp_path / "step2"], capsys)
    assert code == 0, err
    assert_same_params(load_checkpoint(str(tmp_path / "step2")), trained)
    # ... and differs from the initial weights (it trained)
    initial = params(gm.build_model(trained.config, seed=0))
    assert any(not np.array_equal(a, initial[p]) for p, a in params(trained).items())

    # README: evaluate, export, ARank and adapt, each on the workdir
    code, out, err = run_cli(evaluate.main, ["--checkpoint", run, "--tokenizer", tokenizer, "--data", "easy_vqa",
                                             "--limit", "4", "--batch-size", "4", "--buckets", "64",
                                             "--max-new-tokens", "2", "--out", tmp_path / "eval.json"], capsys)
    assert code == 0, err
    assert json.loads((tmp_path / "eval.json").read_text())["num_examples"] == 4
    code, _, err = run_cli(convert.main, ["--export", "--checkpoint", run, "--out", tmp_path / "hf"], capsys)
    assert code == 0, err
    code, _, err = run_cli(convert.main, ["--checkpoint", tmp_path / "hf", "--out", tmp_path / "back"], capsys)
    assert code == 0, err
    assert_same_params(load_checkpoint(str(tmp_path / "back")), trained)  # the export holds the trained weights
    code, out, err = run_cli(arank.main, ["--checkpoint", run, "--data", "random", "--num-samples", "2",
                                          "--keep-dense", "2", "--out", tmp_path / "arank.json"], capsys)
    assert code == 0, err
    report = json.loads((tmp_path / "arank.json").read_text())
    assert len(report["dense_layers"]) == 2 and len(report["mod_layers"]) == 2  # exactly 2 dense, ties or not
    code, out, err = run_cli(adapt.main, ["--checkpoint", run, "--arank", tmp_path / "arank.json",
                                          "--out", tmp_path / "gmod"], capsys)
    assert code == 0, err
    gamma = load_checkpoint(str(tmp_path / "gmod"))
    assert gamma.config.mod.layers == tuple(report["mod_layers"])

    # Without model/, the workdir is its newest verified checkpoint; a corrupt newer one is skipped.
    bare = tmp_path / "bare"
    shutil.copytree(run, bare, ignore=shutil.ignore_patterns("model"))
    shutil.copytree(bare / "checkpoints" / "2", bare / "checkpoints" / "3")
    manifest = json.loads((bare / "checkpoints" / "3" / "gamma_mod_jax_manifest.json").read_text())
    victim = next(rel for rel in manifest["files"] if rel.startswith("state/") and "manifest" not in rel)
    with open(bare / "checkpoints" / "3" / victim, "r+b") as f:
        first = f.read(1)
        f.seek(0)
        f.write(bytes([first[0] ^ 0xFF]))
    code, out, err = run_cli(convert.main, ["--checkpoint", bare, "--out", tmp_path / "from_bare"], capsys)
    assert code == 0, err
    assert f"skipping checkpoint {bare}/checkpoints/3: file {victim}" in out
    assert_same_params(load_checkpoint(str(tmp_path / "from_bare")), trained)

    # A directory that is neither: the error names it and says what was expected.
    (tmp_path / "empty").mkdir()
    for main in (evaluate.main, convert.main):
        argv = ["--checkpoint", tmp_path / "empty", "--out", tmp_path / "x"]
        if main is evaluate.main:
            argv += ["--tokenizer", tokenizer, "--data", "easy_vqa"]
        code, _, err = run_cli(main, argv, capsys)
        assert code == 2 and err.startswith(f"error: {tmp_path / 'empty'}: not a model; expected a model directory")
        assert "a launch.train workdir" in err and not (tmp_path / "x").exists()


@pytest.mark.slow
def test_train_from_a_converted_checkpoint_with_only_init_checkpoint(tokenizer, tmp_path):
    # A converted LLaVA-1.5 whose architecture differs from the recipe's model in several
    # fields (an HF-style directory -> launch.convert, as a user's checkpoint would be).
    recipe_model = gm.model_config("configs/llava15_7b.py:tiny")
    cfg = dataclasses.replace(recipe_model, llm=dataclasses.replace(recipe_model.llm, num_hidden_layers=3,
                                                                     intermediate_size=96, rope_theta=5e5))
    save_checkpoint(str(tmp_path / "ours"), gm.build_model(cfg, seed=4))
    assert convert.main(["--export", "--checkpoint", str(tmp_path / "ours"), "--out", str(tmp_path / "hf")]) == 0
    assert convert.main(["--checkpoint", str(tmp_path / "hf"), "--out", str(tmp_path / "converted")]) == 0

    data = ["--config.data.source=easy_vqa", f"--config.data.tokenizer_path={tokenizer}"]
    run = tmp_path / "run"
    result = launch_train("--config", MOD_RECIPE, "--workdir", run,
                          f"--config.init_checkpoint={tmp_path / 'converted'}", *data, "--config.train.num_steps=1")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "llm.num_hidden_layers (checkpoint 3, config 4)" in result.stdout  # logged, the checkpoint's kept
    got = load_checkpoint(str(run))  # the workdir's model/
    assert got.config == dataclasses.replace(cfg, mod=gm.model_config(MOD_RECIPE).mod)  # the recipe's γ-MoD

    # A model field the command line asks for that the checkpoint cannot give: exit 2, field and both values.
    result = launch_train("--config", MOD_RECIPE, "--workdir", tmp_path / "conflict",
                          f"--config.init_checkpoint={tmp_path / 'converted'}", *data,
                          "--config.model.llm.intermediate_size=128")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "llm.intermediate_size (checkpoint 96, config 128)" in result.stderr
    assert not (tmp_path / "conflict" / "model").exists() and not os.listdir(tmp_path / "conflict" / "checkpoints")

    # The checkpoint's own config.py is a model config: a clear error, nothing written.
    result = launch_train("--config", tmp_path / "converted" / "config.py", "--workdir", tmp_path / "wrong")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "not a training config" in result.stderr and "--config.init_checkpoint=" in result.stderr
    assert not (tmp_path / "wrong").exists()
