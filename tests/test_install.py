"""The project installs (`pip install .`) and works from a directory outside the checkout:
the `gamma-mod` command, configs found by name, `gm.load_config` on a shipped name."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from gamma_mod_jax.config_file import load_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCES = ("gamma_mod_jax", "configs", "launch", "pyproject.toml", "README.md", "requirements.txt")


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(site folder, a working directory outside the checkout) after `pip install` of a copy
    of the sources (the build writes into its source tree, so not into the checkout)."""
    root = tmp_path_factory.mktemp("install")
    src = root / "src"
    for name in SOURCES:
        from_path = os.path.join(REPO, name)
        if os.path.isdir(from_path):
            shutil.copytree(from_path, src / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            os.makedirs(src, exist_ok=True)
            shutil.copy(from_path, src / name)
    site = root / "site"
    # --no-deps: the dependencies are this environment's; --no-build-isolation: no download.
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                    "--target", str(site), str(src)], check=True, capture_output=True, timeout=300)
    elsewhere = root / "elsewhere"
    elsewhere.mkdir()
    return site, elsewhere


def run_outside(installed, args, **kwargs):
    site, elsewhere = installed
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(PYTHONPATH=str(site), JAX_PLATFORMS="cpu")
    return subprocess.run(args, cwd=elsewhere, env=env, capture_output=True, text=True, timeout=600, **kwargs)


def test_installed_package_loads_shipped_configs_by_name(installed):
    site, _ = installed
    code = ("import json, gamma_mod_jax as gm; c = gm.load_config('llava15_7b:tiny');"
            "print(json.dumps({'file': gm.__file__, 'model': c.model.to_dict()}))")
    result = run_outside(installed, [sys.executable, "-c", code])
    assert result.returncode == 0, result.stderr[-3000:]
    got = json.loads(result.stdout.strip().splitlines()[-1])
    assert got["file"].startswith(str(site))  # the installed copy, not the checkout
    # The same config as the checkout's file, loaded by path here.
    expected = json.loads(json.dumps(load_config(os.path.join(REPO, "configs/llava15_7b.py:tiny")).model.to_dict()))
    assert got["model"] == expected


def test_gamma_mod_command_help_and_errors(installed):
    site, _ = installed
    command = str(site / "bin" / "gamma-mod")
    listing = run_outside(installed, [sys.executable, command, "--help"])
    assert listing.returncode == 0 and "convert" in listing.stdout and "train" in listing.stdout
    helped = run_outside(installed, [sys.executable, command, "convert", "--help"])
    assert helped.returncode == 0, helped.stderr[-3000:]
    assert helped.stdout.startswith("usage: gamma-mod convert")
    unknown = run_outside(installed, [sys.executable, command, "no_such_command"])
    assert unknown.returncode == 2 and "unknown command 'no_such_command'" in unknown.stderr
    missing = run_outside(installed, [sys.executable, command, "train", "--config", "no_such_config:tiny",
                                      "--workdir", "run"])
    assert missing.returncode == 2 and "no shipped config has that name" in missing.stderr
    assert "Traceback" not in missing.stderr


@pytest.mark.slow
def test_gamma_mod_train_runs_from_outside_the_checkout(installed, tmp_path):
    from gamma_mod_jax.data.easy_vqa import easy_vqa_vocabulary
    from gamma_mod_jax.data.tokenizer import build_word_tokenizer
    from gamma_mod_jax.train.metrics import read_metrics

    site, _ = installed
    tokenizer = tmp_path / "tokenizer"
    build_word_tokenizer(easy_vqa_vocabulary(), str(tokenizer))
    workdir = tmp_path / "run"
    result = run_outside(installed, [
        sys.executable, str(site / "bin" / "gamma-mod"), "train", "--config", "train:llava15_7b_mod0.3,tiny",
        "--workdir", str(workdir), "--config.train.num_steps=2", "--config.train.log_every=1",
        "--config.train.progress_bar=False", "--config.data.source=easy_vqa",
        f"--config.data.tokenizer_path={tokenizer}", "--config.data.buckets=(64,)",
        "--config.data.max_records=32"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert [r["step"] for r in read_metrics(str(workdir))] == [1, 2]
