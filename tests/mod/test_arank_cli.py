"""ARank over a data stream and its command-line tools: synthetic / .npz batches,
compute_arank vs an independent numpy computation on the probed attention maps,
`launch.arank` (JSON + plot), `launch.adapt` (dense checkpoint -> γ-MoD checkpoint that
equals the dense model when every token is kept), and the errors for bad inputs."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gamma_mod_jax import api as gm
from gamma_mod_jax.convert.checkpoint import load_checkpoint, save_checkpoint
from gamma_mod_jax.data.synthetic import batches_from_spec, random_prompt_layout
from gamma_mod_jax.mod.arank import ARANK_FORMAT, arank_report, mod_layers_from_arank_json
from gamma_mod_jax.mod.arank_run import compute_arank
from gamma_mod_jax.mod.config import MoDConfig
from launch import adapt as adapt_cli
from launch import arank as arank_cli
from tests.conftest import run_cli

SPEC = "configs/llava15_7b.py:tiny"
HR_SPEC = "configs/llava_hr_7b.py:tiny"
NUM_LAYERS = 4  # the tiny twins' LLM


@pytest.fixture(scope="module")
def dense():
    return gm.build_model(SPEC, seed=7)


@pytest.fixture(scope="module")
def dense_ckpt(dense, tmp_path_factory):
    path = str(tmp_path_factory.mktemp("ckpt") / "dense")
    save_checkpoint(path, dense)
    return path


def concat(batches):
    batches = list(batches)
    return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}


# --- data ---------------------------------------------------------------------------


def test_random_batches_follow_the_token_layout_and_do_not_depend_on_batch_size():
    cfg = gm.model_config(SPEC)
    system, t = random_prompt_layout(cfg)
    batches = list(batches_from_spec("random", cfg, batch_size=2, num_samples=5, seed=3))
    assert [b["input_ids"].shape for b in batches] == [(2, t), (2, t), (1, t)]
    data = concat(batches)
    assert data["pixel_values"].shape == (5, cfg.input_image_size, cfg.input_image_size, 3)
    ids, mask = data["input_ids"], data["attention_mask"]
    assert ((ids == cfg.image_token_index).sum(1) == 1).all()  # one image each, after BOS + system
    assert (ids[:, 1 + system] == cfg.image_token_index).all() and (ids[:, 0] == cfg.llm.bos_token_id).all()
    lengths = mask.sum(1)
    np.testing.assert_array_equal(mask, np.arange(t)[None] < lengths[:, None])  # right padded
    assert len(set(lengths)) > 1 and (ids[mask == 0] == cfg.llm.pad_token_id).all()
    text = ids[(mask == 1) & (ids != cfg.image_token_index)]
    assert ((text >= 0) & (text < cfg.llm.vocab_size)).all()
    again = concat(batches_from_spec("random", cfg, batch_size=3, num_samples=5, seed=3))
    for k in data:
        np.testing.assert_array_equal(again[k], data[k])
    other = concat(batches_from_spec("random", cfg, batch_size=5, num_samples=5, seed=4))
    assert not np.array_equal(other["pixel_values"], data["pixel_values"])
    with pytest.raises(ValueError, match="no samples"):
        batches_from_spec("random", cfg, batch_size=2, num_samples=0, seed=0)
    with pytest.raises(ValueError, match="unknown data spec 'imagenet'"):
        batches_from_spec("imagenet", cfg, batch_size=2, num_samples=1, seed=0)


def test_npz_batches_in_order_and_clear_errors(tmp_path):
    cfg = gm.model_config(SPEC)
    data = concat(batches_from_spec("random", cfg, batch_size=4, num_samples=4, seed=0))
    data["token_types"] = np.where(data["attention_mask"] == 1, 3, 0).astype(np.int32)
    path = str(tmp_path / "data.npz")
    np.savez(path, **data)
    got = list(batches_from_spec(f"npz:{path}", cfg, batch_size=3, num_samples=4, seed=99))
    assert [b["input_ids"].shape[0] for b in got] == [3, 1]
    for k, v in concat(got).items():
        np.testing.assert_array_equal(v, data[k])
    assert len(list(batches_from_spec(f"npz:{path}", cfg, batch_size=3, num_samples=2, seed=0))) == 1

    missing = str(tmp_path / "missing.npz")
    np.savez(missing, input_ids=data["input_ids"], pixel_values=data["pixel_values"])
    with pytest.raises(ValueError, match=r"missing\.npz: missing array\(s\) \['attention_mask'\]"):
        batches_from_spec(f"npz:{missing}", cfg, batch_size=2, num_samples=1, seed=0)
    bad = str(tmp_path / "bad.npz")
    np.savez(bad, **{**data, "pixel_values": data["pixel_values"][:, :20]})
    with pytest.raises(ValueError, match=r"bad\.npz: pixel_values has shape \(4, 20, 28, 3\), expected \(4, 28, 28, 3\)"):
        batches_from_spec(f"npz:{bad}", cfg, batch_size=2, num_samples=1, seed=0)
    with pytest.raises(ValueError, match="holds 4 samples, 5 requested"):
        batches_from_spec(f"npz:{path}", cfg, batch_size=2, num_samples=5, seed=0)
    with pytest.raises(ValueError, match="nope.npz: data file not found"):
        batches_from_spec(f"npz:{tmp_path}/nope.npz", cfg, batch_size=2, num_samples=1, seed=0)


# --- compute_arank --------------------------------------------------------------------


def numpy_arank(model, batch):
    """Per layer, per example: the official definition computed with numpy on the maps the
    attention probe returns (strictly lower triangle of the valid block, float32,
    numpy's default matrix_rank tolerance, mean over heads)."""

    @jax.jit
    def maps(state, ids, mask, pixels):
        m = nnx.merge(graphdef, state)
        embeds, valid, types, _ = m.embed_multimodal(ids, mask, pixels)
        _, _, aux = m.llm(inputs_embeds=embeds, attention_mask=valid, token_types=types,
                          attention_probe=lambda probs, v: probs)
        return aux["attention_probe"], valid

    graphdef, state = nnx.split(model)
    probs, valid = maps(state, *(jnp.asarray(batch[k]) for k in ("input_ids", "attention_mask", "pixel_values")))
    valid = np.asarray(valid)
    out = []
    for layer_probs in probs:
        layer_probs = np.asarray(layer_probs, np.float32)
        row = []
        for b, n in enumerate(valid.sum(1)):
            assert valid[b, :n].all()  # right padded after the splice
            heads = [np.linalg.matrix_rank(np.tril(layer_probs[b, h, :n, :n], k=-1)) for h in range(layer_probs.shape[1])]
            row.append(float(np.mean(heads)))
        out.append(row)
    return out


def test_compute_arank_equals_numpy_on_the_probed_maps(dense):
    logs = []
    batches = batches_from_spec("random", dense.config, batch_size=2, num_samples=5, seed=11)
    stats = compute_arank(dense, batches, log=logs.append, num_samples=5)
    # one compile (the short last batch is filled up to the batch size), with its progress line
    assert logs[0].startswith("compiling the ARank pass for batch shape (2, ") and logs[1].startswith("... done in")
    assert logs[2:] == ["ARank: 2/5 samples", "ARank: 4/5 samples", "ARank: 5/5 samples"]
    want = numpy_arank(dense, concat(batches_from_spec("random", dense.config, batch_size=5, num_samples=5, seed=11)))
    assert [s["layer"] for s in stats] == list(range(NUM_LAYERS))
    for layer, s in enumerate(stats):
        assert s["per_sample"] == want[layer], layer
        assert s["mean"] == pytest.approx(np.mean(want[layer])) and s["std"] == pytest.approx(np.std(want[layer]))


def test_compute_arank_errors(dense):
    with pytest.raises(ValueError, match="no samples"):
        compute_arank(dense, iter([]), log=lambda _: None)
    batches = batches_from_spec("random", dense.config, batch_size=1, num_samples=1, seed=0)
    with pytest.raises(ValueError, match=r"keep_dense=5 must be between 1 and the number of layers \(4\)"):
        compute_arank(dense, batches, log=lambda _: None, keep_dense=5)
    gamma = gm.abstract_model(dataclasses.replace(dense.config, mod=gm.model_config(f"{SPEC},mod").mod))
    with pytest.raises(ValueError, match="dense model"):
        compute_arank(gamma, batches, log=lambda _: None)


# --- launch.arank ---------------------------------------------------------------------


def test_arank_cli_writes_the_report_and_the_plot(dense_ckpt, tmp_path, capsys):
    out, png = tmp_path / "out" / "arank.json", tmp_path / "arank.png"
    code, stdout, _ = run_cli(arank_cli.main, ["--config", SPEC, "--checkpoint", dense_ckpt, "--data", "random",
                                               "--num-samples", "3", "--batch-size", "2", "--keep-dense", "2",
                                               "--out", str(out), "--plot", str(png)], capsys)
    assert code == 0
    assert "ARank: 3/3 samples" in stdout
    report = json.loads(out.read_text())
    assert report["format"] == ARANK_FORMAT and report["num_layers"] == NUM_LAYERS and report["num_samples"] == 3
    assert report["rule"] == {"type": "keep_dense", "n": 2, "ties": "later_mod"}
    means = [s["mean"] for s in report["layers"]]
    assert len(report["dense_layers"]) >= 2
    assert min(means[i] for i in report["dense_layers"]) >= max([means[i] for i in report["mod_layers"]], default=0)
    assert sorted(report["dense_layers"] + report["mod_layers"]) == list(range(NUM_LAYERS))
    assert f"dense layers {report['dense_layers']}" in stdout
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    assert not [p for p in out.parent.iterdir() if p.name != "arank.json"]  # no temporary left behind
    assert mod_layers_from_arank_json(str(out), num_layers=NUM_LAYERS) == tuple(report["mod_layers"])


def test_arank_cli_with_the_checkpoint_alone_on_npz_data_and_a_threshold(dense, dense_ckpt, tmp_path, capsys):
    data = concat(batches_from_spec("random", dense.config, batch_size=2, num_samples=2, seed=5))
    np.savez(tmp_path / "d.npz", **data)
    out = tmp_path / "arank.json"
    code, _, err = run_cli(arank_cli.main, ["--checkpoint", dense_ckpt, "--data", f"npz:{tmp_path}/d.npz",
                                            "--num-samples", "2", "--threshold", "0", "--out", str(out)], capsys)
    assert code == 0, err
    report = json.loads(out.read_text())
    assert report["rule"] == {"type": "threshold", "value": 0.0} and report["num_samples"] == 2
    assert report["dense_layers"] == list(range(NUM_LAYERS)) and report["mod_layers"] == []
    assert "no γ-MoD layers selected" in err
    want = numpy_arank(dense, data)
    assert [s["per_sample"] for s in report["layers"]] == want


# --- launch.adapt ---------------------------------------------------------------------


def fake_report(path, means, keep_dense=1):
    stats = [{"layer": i, "mean": m, "std": 0.0, "per_sample": [m]} for i, m in enumerate(means)]
    path.write_text(json.dumps(arank_report(stats, keep_dense=keep_dense)))
    return str(path)


def test_adapt_cli_gives_a_gamma_mod_checkpoint_equal_to_dense_when_every_token_is_kept(
        dense, dense_ckpt, tmp_path, capsys, rng):
    arank = fake_report(tmp_path / "arank.json", [9.0, 3.0, 2.0, 8.0], keep_dense=2)  # MoD: 1, 2
    dst = str(tmp_path / "gamma")
    code, stdout, stderr = run_cli(adapt_cli.main, ["--checkpoint", dense_ckpt, "--arank", arank, "--out", dst,
                                                    "--routing-ratio", "0.25"], capsys)
    assert code == 0, stderr
    assert "γ-MoD layers [1, 2], dense layers [0, 3]" in stdout
    gamma = load_checkpoint(dst)
    assert gamma.config.mod == MoDConfig(layers=(1, 2), routing_ratio=0.25)  # other options at their defaults
    assert dataclasses.replace(gamma.config, mod=None) == dense.config
    # Every weight but the router is the dense one.
    dense_params = dict(nnx.to_flat_state(nnx.state(dense, nnx.Param)))
    for path, var in nnx.to_flat_state(nnx.state(gamma, nnx.Param)):
        if "router" not in path:
            np.testing.assert_array_equal(np.asarray(var.get_value()), np.asarray(dense_params[path].get_value()))
    # The same weights with every token kept and the router weight straight-through: dense logits.
    keep_all = dataclasses.replace(gamma.config.mod, routing_ratio=0.0, router_weight="straight_through")
    forced = gm.abstract_model(dataclasses.replace(gamma.config, mod=keep_all))
    nnx.update(forced, nnx.state(gamma, nnx.Param))
    batch = concat(batches_from_spec("random", dense.config, batch_size=3, num_samples=3, seed=int(rng.integers(99))))
    args = [jnp.asarray(batch[k]) for k in ("input_ids", "attention_mask", "pixel_values")]
    a = jax.jit(lambda m, *x: m(*x))(dense, *args)
    b = jax.jit(lambda m, *x: m(*x))(forced, *args)
    assert np.asarray(b.mod_aux["selected"]).all()
    np.testing.assert_allclose(np.asarray(b.logits), np.asarray(a.logits), rtol=1e-6, atol=1e-6)

    # Reselection from the report's statistics; --out must be new.
    dst2 = str(tmp_path / "gamma_k3")
    assert run_cli(adapt_cli.main, ["--checkpoint", dense_ckpt, "--arank", arank, "--out", dst2, "--keep-dense", "3"],
                   capsys)[0] == 0
    assert load_checkpoint(dst2).config.mod.layers == (2,)
    code, _, stderr = run_cli(adapt_cli.main, ["--checkpoint", dense_ckpt, "--arank", arank, "--out", dst2], capsys)
    assert code == 2 and "already exists" in stderr


# --- bad inputs -----------------------------------------------------------------------


def arank_argv(tmp_path, *extra):
    return ["--config", SPEC, "--data", "random", "--num-samples", "2", "--out", str(tmp_path / "a.json"), *extra]


def test_arank_cli_refuses_zero_samples_and_too_many_dense_layers(tmp_path, capsys):
    code, _, err = run_cli(arank_cli.main, arank_argv(tmp_path)[:-4] + ["--num-samples", "0", "--out",
                                                                          str(tmp_path / "a.json")], capsys)
    assert code == 2 and err.startswith("error: no samples") and err.count("\n") == 1
    code, _, err = run_cli(arank_cli.main, arank_argv(tmp_path, "--keep-dense", "9"), capsys)
    assert code == 2 and "--keep-dense 9" in err and "the model has 4 layers" in err
    code, _, err = run_cli(arank_cli.main, arank_argv(tmp_path)[:2] + ["--data", "imagenet", "--num-samples", "1",
                                                                       "--out", str(tmp_path / "a.json")], capsys)
    assert code == 2 and "unknown data spec 'imagenet'" in err
    assert not (tmp_path / "a.json").exists()


def test_arank_cli_refuses_a_checkpoint_that_does_not_match_the_config(dense_ckpt, tmp_path, capsys):
    argv = ["--config", HR_SPEC, "--checkpoint", dense_ckpt, "--data", "random", "--num-samples", "1",
            "--out", str(tmp_path / "a.json")]
    code, _, err = run_cli(arank_cli.main, argv, capsys)
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1
    assert "does not match --config" in err and "family ('llava_hr' vs 'llava')" in err
    assert "input_image_size (128 vs 28)" in err
    assert not (tmp_path / "a.json").exists()


def test_adapt_cli_refuses_bad_arank_files(dense_ckpt, tmp_path, capsys):
    report = json.loads(open(fake_report(tmp_path / "ok.json", [9.0, 3.0, 2.0, 8.0])).read())
    cases = {
        "layer40.json": (json.dumps({**report, "mod_layers": [1, 40]}),
                         "'mod_layers': layer(s) [40] do not exist: the model has 4 layers"),
        "broken.json": ("{\"layers\": [", "not valid JSON"),
        "nokeys.json": (json.dumps({"format": ARANK_FORMAT, "layers": []}), "missing key(s) ['mod_layers', 'dense_layers']"),
        "all.json": (json.dumps({**report, "mod_layers": [0, 1, 2, 3], "dense_layers": []}), "at least one must stay dense"),
    }
    for name, (text, message) in cases.items():
        path = tmp_path / name
        path.write_text(text)
        dst = tmp_path / f"out_{name}"
        code, _, err = run_cli(adapt_cli.main, ["--checkpoint", dense_ckpt, "--arank", str(path), "--out", str(dst)], capsys)
        assert code == 2 and err.startswith(f"error: {path}") and message in err, (name, err)
        assert err.count("\n") == 1 and not dst.exists()
    assert mod_layers_from_arank_json(str(tmp_path / "ok.json"), num_layers=4, threshold=5.0) == (1, 2)
    with pytest.raises(ValueError, match=r"five.json: 'layers': layer\(s\) \[4\] do not exist: the model has 4 layers"):
        mod_layers_from_arank_json(fake_report(tmp_path / "five.json", [1.0] * 5), num_layers=4, keep_dense=1)


@pytest.mark.slow
def test_compute_arank_on_llava_hr_equals_numpy(rng):
    model = gm.build_model(HR_SPEC, seed=int(rng.integers(1 << 20)))
    seed = int(rng.integers(1 << 20))
    stats = compute_arank(model, batches_from_spec("random", model.config, batch_size=2, num_samples=3, seed=seed),
                          log=lambda _: None)
    want = numpy_arank(model, concat(batches_from_spec("random", model.config, batch_size=3, num_samples=3, seed=seed)))
    assert [s["per_sample"] for s in stats] == want
