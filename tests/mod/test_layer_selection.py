"""The one layer-selection reader (γ-MoD config.json, ARank JSON, official ARank log,
--mod-layers by hand), the tie rule, the empty-selection error before any work, and the
one dense -> γ-MoD adaptation shared by the API, the converter and the trainer."""

import dataclasses
import json
import shutil

import numpy as np
import pytest

from gamma_mod_jax import api as gm
from gamma_mod_jax.config_file import load_config
from gamma_mod_jax.convert.checkpoint import load_checkpoint, save_checkpoint, write_model
from gamma_mod_jax.convert.keymap import param_paths
from gamma_mod_jax.mod.arank import arank_report, select_dense_layers
from gamma_mod_jax.mod.config import MoDConfig
from gamma_mod_jax.mod.layer_selection import parse_layer_list, read_layer_selection, select_mod_layers
from gamma_mod_jax.train.trainer import model_for_training
from launch import adapt as adapt_cli
from launch import convert as convert_cli
from tests.conftest import run_cli

SPEC = "configs/llava15_7b.py:tiny"  # 4 LLM layers


@pytest.fixture(scope="module")
def dense_dir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("dense") / "model")
    save_checkpoint(path, gm.build_model(SPEC, seed=5))
    return path


def arank_json(path, means, **rule):
    stats = [{"layer": i, "mean": m, "std": 0.0, "per_sample": [m]} for i, m in enumerate(means)]
    path.write_text(json.dumps(arank_report(stats, **(rule or {"keep_dense": 1}))))
    return str(path)


# --- --mod-layers ---------------------------------------------------------------------


def test_layer_lists_and_ranges():
    assert parse_layer_list("3-30") == tuple(range(3, 31))
    assert parse_layer_list("3-5,7") == (3, 4, 5, 7)
    assert parse_layer_list(" 9, 1 ,4-4") == (1, 4, 9)
    assert parse_layer_list("0-31", num_layers=32) == tuple(range(32))


@pytest.mark.parametrize("text,message", [
    ("", "empty"),
    ("3-", "'3-' is not a layer index or a range"),
    ("a,b", "'a' is not a layer index"),
    ("-1", "'-1' is not a layer index"),
    ("5-3", "range '5-3' runs backwards"),
    ("3-5,4", r"layer\(s\) \[4\] listed twice"),
    ("1-40", r"layer\(s\) \[32, 33, 34, 35, 36, 37, 38, 39, 40\] do not exist: the model has 32 layers \(0-31\)"),
])
def test_bad_layer_lists_are_errors_naming_the_part(text, message):
    with pytest.raises(ValueError, match=r"--mod-layers '.*': " + message if text else "empty"):
        parse_layer_list(text, num_layers=32)


# --- the tie rule -----------------------------------------------------------------------


def test_ties_the_later_layer_becomes_gamma_mod_first():
    # Expected selections worked out by hand from the rule's statement.
    assert select_dense_layers([5.0] * 6, keep_dense=2) == (0, 1)
    ranks = [7.0, 9.0, 7.0, 7.0, 3.0, 7.0]  # 9 then four 7s tied for the next three places
    assert select_dense_layers(ranks, keep_dense=3) == (0, 1, 2)
    assert select_dense_layers(ranks, keep_dense=1) == (1,)
    assert select_dense_layers(ranks, keep_dense=5) == (0, 1, 2, 3, 5)
    # the paper's wording taken literally: every layer tied at the cut stays dense
    assert select_dense_layers(ranks, keep_dense=3, ties="stay_dense") == (0, 1, 2, 3, 5)
    assert select_dense_layers([5.0] * 6, keep_dense=2, ties="stay_dense") == tuple(range(6))
    with pytest.raises(ValueError, match="ties='first'"):
        select_dense_layers(ranks, keep_dense=3, ties="first")


# --- the selection reader, each format ----------------------------------------------------


def test_every_selection_format(tmp_path):
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"model_type": "mod_llava_llama", "mod": {"mod_layers_idx": [3, 1, 2]}}))
    assert read_layer_selection(str(config), num_layers=5) == ((1, 2, 3), f"γ-MoD config {config}")
    with pytest.raises(ValueError, match="names its MoD layers; --keep-dense"):
        read_layer_selection(str(config), num_layers=5, keep_dense=2)

    tied = arank_json(tmp_path / "tied.json", [4.0, 4.0, 4.0, 4.0, 4.0], keep_dense=2)
    assert json.loads(open(tied).read())["rule"] == {"type": "keep_dense", "n": 2, "ties": "later_mod"}
    assert read_layer_selection(tied, num_layers=5)[0] == (2, 3, 4)  # its own selection
    assert read_layer_selection(tied, num_layers=5, keep_dense=3)[0] == (3, 4)  # reselected from its means
    with pytest.raises(ValueError, match="no γ-MoD layers"):
        read_layer_selection(tied, num_layers=5, keep_dense=1, ties="stay_dense")  # all tie: all stay dense

    log = tmp_path / "arank.log"
    # the official code prints one line per layer and sample (1-based); the means are 2, 6, 4, 8, 1
    log.write_text("".join(f"Layer {i + 1}, Heads Avg Rank: {v:.2f}\n"
                           for sample in ([1.0, 5.0, 3.0, 9.0, 1.0], [3.0, 7.0, 5.0, 7.0, 1.0])
                           for i, v in enumerate(sample)))
    assert read_layer_selection(str(log), num_layers=5, keep_dense=2) == (
        (0, 2, 4), f"official ARank log {log} (keep 2 dense, ties later_mod)")
    assert read_layer_selection(str(log), num_layers=5, threshold=3.5)[0] == (0, 4)
    with pytest.raises(ValueError, match="no γ-MoD layers"):
        read_layer_selection(str(log), num_layers=5, threshold=0.5)

    other = tmp_path / "other.json"
    other.write_text(json.dumps({"layers": [1, 2]}))
    with pytest.raises(ValueError, match="neither a γ-MoD config.json"):
        read_layer_selection(str(other), num_layers=5)
    assert select_mod_layers(num_layers=5, mod_layers="1-2,4") == ((1, 2, 4), "--mod-layers 1-2,4")
    with pytest.raises(ValueError, match="every layer would be a MoD layer"):
        select_mod_layers(num_layers=5, mod_layers="0-4")
    with pytest.raises(ValueError, match="not both"):
        select_mod_layers(num_layers=5, mod_layers="1", selection=str(log))
    with pytest.raises(ValueError, match="--mod-layers names the layers"):
        select_mod_layers(num_layers=5, mod_layers="1", keep_dense=2)


def test_an_empty_selection_is_exit_2_before_any_weight_is_read(dense_dir, tmp_path, capsys):
    # A model whose parameters are gone: any attempt to read a weight would fail differently.
    hollow = tmp_path / "hollow"
    shutil.copytree(dense_dir, hollow)
    shutil.rmtree(hollow / "params")
    (hollow / "params").mkdir()
    (hollow / "gamma_mod_jax_manifest.json").unlink()
    all_dense = arank_json(tmp_path / "a.json", [4.0, 3.0, 2.0, 1.0], threshold=0.0)
    for main in (adapt_cli.main, convert_cli.main):
        code, _, err = run_cli(main, ["--checkpoint", hollow, "--arank", all_dense, "--out", tmp_path / "out"], capsys)
        assert code == 2 and err.startswith(f"error: {all_dense}: the selection has no γ-MoD layers"), err
        assert err.count("\n") == 1 and not (tmp_path / "out").exists()
        code, _, err = run_cli(main, ["--checkpoint", hollow, "--mod-layers", "2-9", "--out", tmp_path / "out"], capsys)
        assert code == 2 and "layer(s) [4, 5, 6, 7, 8, 9] do not exist: the model has 4 layers" in err, err


def test_mod_layers_by_hand_through_adapt_and_convert(dense_dir, tmp_path, capsys):
    code, out, err = run_cli(adapt_cli.main, ["--checkpoint", dense_dir, "--mod-layers", "1-2", "--out", tmp_path / "a",
                                              "--routing-ratio", "0.25"], capsys)
    assert code == 0, err
    assert "γ-MoD layers [1, 2], dense layers [0, 3]" in out
    assert load_checkpoint(str(tmp_path / "a")).config.mod == MoDConfig(layers=(1, 2), routing_ratio=0.25)
    code, out, err = run_cli(convert_cli.main, ["--checkpoint", dense_dir, "--mod-layers", "3", "--out", tmp_path / "c"],
                             capsys)
    assert code == 0, err
    assert json.loads(out.strip().splitlines()[-1])["mod_layers"] == [3]


# --- one adaptation ----------------------------------------------------------------------


def test_api_converter_and_trainer_adapt_alike(dense_dir, tmp_path):
    """The three users of the adaptation give the same γ-MoD model for one seed: dense
    weights copied, the router as the γ-MoD model's own initialisation at that seed draws
    it (here built eagerly, whole, as the independent reference)."""
    dense = load_checkpoint(dense_dir)
    mod = MoDConfig(layers=(1, 2))
    gamma_cfg = dataclasses.replace(dense.config, mod=mod)
    want_router = np.asarray(gm.build_model(gamma_cfg, seed=11).llm.router.kernel.get_value())

    by_api = gm.adapt_to_gamma_mod(dense, mod, seed=11)
    write_model(dense_dir, str(tmp_path / "conv"), mod=mod, seed=11, log=lambda *_: None)
    by_converter = load_checkpoint(str(tmp_path / "conv"))
    config = load_config("configs/train.py:llava15_7b_mod0.3,tiny")
    config.model.mod = dict(layers=(1, 2))
    config.init_checkpoint, config.seed = dense_dir, 11
    by_trainer = model_for_training(config, log=lambda *_: None)

    dense_params = {p: np.asarray(v.get_value()) for p, v in param_paths(dense)}
    for model in (by_api, by_converter, by_trainer):
        assert model.config.mod.layers == (1, 2)
        got = {p: np.asarray(v.get_value()) for p, v in param_paths(model)}
        assert set(got) == set(dense_params) | {("llm", "router", "kernel")}
        np.testing.assert_array_equal(got[("llm", "router", "kernel")], want_router)
        for path, value in dense_params.items():
            np.testing.assert_array_equal(got[path], value)
