"""The launchers' one CLI convention (argparse, hyphenated flags, help on each, --verbose),
launch.train's `--config.<field>=<value>` overrides through config_file.override_field, the
progress line, the one atomic-write helper, and the library's one-way dependencies."""

import argparse
import ast
import glob
import json
import os
import re
import subprocess
import sys

import ml_collections
import pytest

from gamma_mod_jax.config_file import override_field
from gamma_mod_jax.io_utils import atomic_write, write_json_atomic
from gamma_mod_jax.progress import progress
from launch import cli
from launch import train as train_cli
from tests.conftest import run_cli

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = "configs/train.py:llava15_7b_mod0.3,tiny"


def _config():
    config = ml_collections.ConfigDict({"train": {"num_steps": 10, "lr": 1e-3, "flag": True, "name": "a",
                                                  "buckets": (64, 128), "init": None}})
    config.train.path = ml_collections.config_dict.placeholder(str)
    config.train.peak = ml_collections.config_dict.placeholder(float)
    return config


def test_override_field_sets_typed_values():
    config = _config()
    for field, text in (("train.num_steps", "3"), ("train.lr", "2"), ("train.flag", "false"), ("train.name", "12"),
                        ("train.buckets", "[96]"), ("train.init", "/ckpt/x"), ("train.path", "123"),
                        ("train.peak", "2")):
        override_field(config, field, text)
    assert config.train.num_steps == 3 and config.train.lr == 2.0 and isinstance(config.train.lr, float)
    assert config.train.flag is False and config.train.name == "12" and config.train.buckets == (96,)
    assert config.train.init == "/ckpt/x" and config.train.path == "123" and config.train.peak == 2.0


@pytest.mark.parametrize("field, text, message", [
    ("train.num_stepz", "3", "--config.train.num_stepz: no field 'num_stepz'"),
    ("trian.num_steps", "3", "--config.trian.num_steps: no field 'trian'"),
    ("train.num_steps.x", "3", "--config.train.num_steps.x: no field 'x'"),
    ("train.num_steps", "many", "--config.train.num_steps=many: expected int, got str"),
    ("train.num_steps", "True", "--config.train.num_steps=True: expected int, got bool"),
    ("train.flag", "1", "--config.train.flag=1: expected bool, got int"),
    ("train.buckets", "64", "--config.train.buckets=64: expected tuple, got int"),
    ("train.peak", "fast", "--config.train.peak=fast: expected float, got str"),
])
def test_override_field_errors_name_the_field(field, text, message):
    config = _config()
    with pytest.raises(ValueError) as e:
        override_field(config, field, text, name=f"--config.{field}")
    assert str(e.value) == message
    assert config.to_dict() == _config().to_dict()  # nothing changed


def test_train_cli_bad_overrides_exit_2_naming_the_field(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", list(sys.argv))  # cli.main sets the prog name in sys.argv
    workdir = tmp_path / "run"
    for argv, message in (
            (["--config.train.num_stepz=3"], "error: --config.train.num_stepz: no field 'num_stepz'"),
            (["--config.train.num_steps", "many"], "error: --config.train.num_steps=many: expected int, got str"),
            (["--config", "no_such_config:tiny"], "no shipped config has that name")):
        code, _, err = run_cli(train_cli.main, ["--config", TINY, "--workdir", workdir, *argv], capsys)
        assert code == 2 and message in err and "Traceback" not in err, err
    code, _, err = run_cli(train_cli.main, ["--config", TINY, "--workdir", workdir, "--num_processes=2"], capsys)
    assert code == 2 and "unrecognized argument '--num_processes=2'" in err  # underscores are not flags
    assert not workdir.exists()
    # Through `gamma-mod`, with a shipped config's name.
    code, _, err = run_cli(cli.main, ["train", "--config", "train:llava15_7b_mod0.3,tiny", "--workdir", workdir,
                                      "--config.optim.learning_rate=fast"], capsys)
    assert code == 2 and "--config.optim.learning_rate=fast: expected float, got str" in err
    assert not workdir.exists()


def test_train_overrides_and_explicit_model_fields():
    overrides = train_cli.config_overrides(["--config.model.llm.hidden_size=64", "--config.train.num_steps", "2"])
    assert overrides == [("model.llm.hidden_size", "64"), ("train.num_steps", "2")]
    config = train_cli.load_training_config(TINY, overrides)
    assert config.model.llm.hidden_size == 64 and config.train.num_steps == 2
    with pytest.raises(AttributeError):  # locked: the trainer cannot add a field by mistake
        config.train.new_field = 1
    assert train_cli.explicit_model_fields(overrides) == {"llm.hidden_size"}
    assert train_cli.explicit_model_fields([("model", "{}")]) is None


def _launcher_parsers(monkeypatch):
    """{command: [argparse actions]} of every launcher, from its `--help`."""
    seen = {}
    original = argparse.ArgumentParser.parse_known_args

    def capture(self, args=None, namespace=None):
        seen.setdefault(current[0], []).extend(a for a in self._actions if a.option_strings != ["-h", "--help"])
        return original(self, args, namespace)

    current = [None]
    monkeypatch.setattr(argparse.ArgumentParser, "parse_known_args", capture)
    for command in cli.commands():
        current[0] = command
        module = __import__(f"launch.{command}", fromlist=["main"])
        with pytest.raises(SystemExit) as e:
            module.main(["--help"])
        assert e.value.code == 0, command
    return seen


def test_every_launcher_flag_is_hyphenated_with_help_and_verbose(monkeypatch, capsys):
    parsers = _launcher_parsers(monkeypatch)
    capsys.readouterr()
    assert set(parsers) == set(cli.commands()) and "train" in parsers and "convert" in parsers
    for command, actions in parsers.items():
        flags = [s for a in actions for s in a.option_strings]
        assert "--verbose" in flags, command
        assert not [f for f in flags if "_" in f], (command, flags)
        assert not [a.option_strings for a in actions if not a.help], command
    convert_flags = {s for a in parsers["convert"] for s in a.option_strings}
    assert {"--checkpoint", "--out"} <= convert_flags and not {"--src", "--dst"} & convert_flags
    adapt_flags = {s for a in parsers["adapt"] for s in a.option_strings}
    assert {"--checkpoint", "--out"} <= adapt_flags


_ORBAX_SAVE = """
import sys
sys.path.insert(0, {repo!r})
import numpy as np
from absl import logging
logging.set_verbosity(logging.INFO)  # as an absl app (or a dependency) leaves it: the launcher decides
from launch._common import parse_args, parser
parse_args(parser("a launcher"), sys.argv[2:])
from orbax.checkpoint.experimental import v1 as ocp
ocp.save(sys.argv[1], {{"w": np.ones(3, np.float32)}})
print("saved")
"""


def test_dependency_info_logs_only_with_verbose(tmp_path):
    """Orbax logs its save at INFO (absl): hidden without --verbose, shown with it."""
    script = _ORBAX_SAVE.format(repo=REPO)
    env = {k: v for k, v in os.environ.items() if k not in ("TF_CPP_MIN_LOG_LEVEL",)}
    runs = {}
    for name, flags in (("quiet", []), ("verbose", ["--verbose"])):
        runs[name] = subprocess.run([sys.executable, "-c", script, str(tmp_path / name), *flags], capture_output=True,
                                    text=True, timeout=300, env=dict(env, JAX_PLATFORMS="cpu"))
        assert runs[name].returncode == 0 and "saved" in runs[name].stdout, runs[name].stderr[-2000:]
    info = lambda text: [line for line in text.splitlines() if re.match(r"I\d{4} ", line)]  # absl's INFO format
    assert info(runs["quiet"].stderr) == [], runs["quiet"].stderr[-2000:]
    assert len(info(runs["verbose"].stderr)) > 0, runs["verbose"].stderr[-2000:]


def test_progress_line(capsys):
    with progress("compiling the thing"):
        pass
    err = capsys.readouterr().err.splitlines()
    assert err[0] == "compiling the thing ..." and re.fullmatch(r"\.\.\. done in \d+\.\d s", err[1]), err
    lines = []
    with pytest.raises(RuntimeError):
        with progress("failing work", log=lines.append):
            raise RuntimeError("boom")
    assert lines == ["failing work ..."]  # no "done" for work that failed


def test_atomic_write_round_trip_and_nothing_partial_on_failure(tmp_path):
    path = tmp_path / "sub" / "out.json"
    write_json_atomic(str(path), {"a": [1, 2]})
    assert json.loads(path.read_text()) == {"a": [1, 2]}
    with atomic_write(str(tmp_path / "blob.bin"), "wb") as f:
        f.write(b"\x00\x01")
    assert (tmp_path / "blob.bin").read_bytes() == b"\x00\x01"
    for error in (RuntimeError, KeyboardInterrupt):
        with pytest.raises(error):
            with atomic_write(str(path)) as f:
                f.write("half a fil")
                raise error("stopped")
        assert json.loads(path.read_text()) == {"a": [1, 2]}  # the old file, untouched
        assert sorted(os.listdir(path.parent)) == ["out.json"]  # no temporary file left
    with pytest.raises(ValueError, match="mode"):
        with atomic_write(str(path), "a"):
            pass


def _sources():
    for path in glob.glob(os.path.join(REPO, "gamma_mod_jax", "**", "*.py"), recursive=True) + \
            glob.glob(os.path.join(REPO, "launch", "*.py")):
        with open(path, encoding="utf-8") as f:
            yield os.path.relpath(path, REPO), f.read()


def test_one_atomic_writer_one_definition_of_token_ids_and_no_import_of_the_api_below_it():
    replacing, defining, importing_api = [], [], []
    for rel, text in _sources():
        if "os.replace(" in text and rel != os.path.join("gamma_mod_jax", "io_utils.py"):
            replacing.append(rel)
        if re.search(r"^(IGNORE_INDEX|IMAGE_TOKEN_INDEX)\s*=", text, re.M) and not rel.endswith("token_types.py"):
            defining.append(rel)
        if rel.startswith("gamma_mod_jax") and rel not in (os.path.join("gamma_mod_jax", "api.py"),
                                                           os.path.join("gamma_mod_jax", "__init__.py")):
            for node in ast.walk(ast.parse(text)):
                if isinstance(node, ast.ImportFrom) and (node.module == "gamma_mod_jax.api" or (
                        node.module == "gamma_mod_jax" and any(a.name == "api" for a in node.names))):
                    importing_api.append(rel)
    assert replacing == [] and defining == [] and importing_api == []
