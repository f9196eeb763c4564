"""launch.convert: PyTorch LLaVA / LLaVA-HR / γ-MoD directories in and out, through the CLI.

Source checkpoints are written here the way the original code saves them (the PyTorch
assembly's state dict with the original keys, as .bin or safetensors, single or sharded
with an index); everything is compared against those original tensors."""

import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.torch
import torch

import gamma_mod_jax as gm
from gamma_mod_jax.convert.checkpoint import load_checkpoint
from gamma_mod_jax.convert.hf_config import EXTRA_KEY, hf_config_from_mllm
from gamma_mod_jax.convert.hf_files import LazyStateDict
from gamma_mod_jax.convert.keymap import from_torch_array, param_paths, to_numpy
from launch import convert as convert_cli
from tests.conftest import rel_err
from tests.models.test_mllm import mixed_batch
from tests.torch_reference import TorchLlava, randomize_, to_nchw

SPECS = {"llava": "configs/llava15_7b.py:tiny", "llava_hr": "configs/llava_hr_7b.py:tiny",
         "gamma_mod": "configs/llava_hr_7b.py:tiny,mod"}


def original_checkpoint(rng, kind, dtype=torch.float32):
    """(our config, PyTorch assembly, its state dict under the original keys; a γ-MoD one
    holds the shared router under every MoD layer, as the official code saves it)."""
    cfg = gm.model_config(SPECS[kind])
    ref = TorchLlava(cfg)
    randomize_(ref, int(rng.integers(1 << 30)), std=0.1)
    ref.eval()
    state = {k: v.detach().clone().to(dtype) for k, v in ref.state_dict_original().items()}
    if cfg.mod is not None:
        router = torch.tensor(rng.standard_normal((2, cfg.llm.hidden_size)), dtype=dtype)
        for i in cfg.mod.layers:
            state[f"model.layers.{i}.router.weight"] = router.clone()
    return cfg, ref, state


def write_original(directory, state, config, fmt="safetensors", num_shards=1):
    """An HF-style directory: config.json + weights, sharded with an index or single."""
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(config, f)
    keys = sorted(state)
    stem, ext = ("model", "safetensors") if fmt == "safetensors" else ("pytorch_model", "bin")

    def save(tensors, name):
        path = os.path.join(directory, name)
        if fmt == "safetensors":
            safetensors.torch.save_file({k: v.contiguous() for k, v in tensors.items()}, path)
        else:
            torch.save(tensors, path)

    if num_shards == 1:
        save(state, f"{stem}.{ext}")
        return
    weight_map = {}
    for s in range(num_shards):
        name = f"{stem}-{s + 1:05d}-of-{num_shards:05d}.{ext}"
        part = {k: state[k] for k in keys[s::num_shards]}
        save(part, name)
        weight_map.update({k: name for k in part})
    with open(os.path.join(directory, f"{stem}.{ext}.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)


def run_cli(*args):
    return convert_cli.main([str(a) for a in args])


def assert_same_tensors(directory, state):
    back = LazyStateDict(str(directory))
    assert sorted(back) == sorted(state)
    for key, value in state.items():
        got, want = np.asarray(back[key]), to_numpy(value)
        assert got.dtype == want.dtype and got.shape == want.shape, key
        np.testing.assert_array_equal(got.view(np.uint8), want.view(np.uint8), err_msg=key)


ROUND_TRIPS = [(kind, fmt, shards) for kind in SPECS for fmt in ("safetensors", "bin") for shards in (1, 3)]


@pytest.mark.parametrize("kind,fmt,shards", [
    pytest.param(*case, marks=() if case in {("llava", "bin", 1), ("llava_hr", "safetensors", 3),
                                              ("gamma_mod", "bin", 3)} else pytest.mark.slow)
    for case in ROUND_TRIPS])
def test_round_trip_is_bit_exact(rng, tmp_path, kind, fmt, shards):
    cfg, _, state = original_checkpoint(rng, kind)
    write_original(tmp_path / "src", state, hf_config_from_mllm(cfg), fmt, shards)
    assert run_cli("--checkpoint", tmp_path / "src", "--out", tmp_path / "ours") == 0
    assert gm.model_config(str(tmp_path / "ours" / "config.py")) == cfg  # the ml-collections config beside it
    assert run_cli("--export", "--checkpoint", tmp_path / "ours", "--out", tmp_path / "back", "--max-shard-gb",
                   0.5 / 1024) == 0
    assert os.path.exists(tmp_path / "back" / ("model.safetensors.index.json"))  # 0.5 MiB shards: sharded
    assert_same_tensors(tmp_path / "back", state)
    exported = json.load(open(tmp_path / "back" / "config.json"))
    assert exported["model_type"] == ("mod_llava_llama" if kind == "gamma_mod" else "llava")


def test_bf16_checkpoint_stays_bf16_and_round_trips_bit_exact(rng, tmp_path):
    cfg, _, state = original_checkpoint(rng, "gamma_mod", dtype=torch.bfloat16)
    write_original(tmp_path / "src", state, hf_config_from_mllm(cfg), "safetensors", 2)
    assert run_cli("--checkpoint", tmp_path / "src", "--out", tmp_path / "ours") == 0
    model = load_checkpoint(str(tmp_path / "ours"))
    assert model.config.param_dtype == "bfloat16"
    assert model.llm.embed_tokens.embedding.get_value().dtype == jnp.bfloat16
    assert run_cli("--export", "--checkpoint", tmp_path / "ours", "--out", tmp_path / "back") == 0
    assert_same_tensors(tmp_path / "back", state)


@pytest.mark.parametrize("kind", ["llava", "llava_hr"])
def test_converted_model_gives_the_pytorch_logits(rng, tmp_path, kind):
    cfg, ref, state = original_checkpoint(rng, kind)
    write_original(tmp_path / "src", state, hf_config_from_mllm(cfg), "bin", 2)
    assert run_cli("--checkpoint", tmp_path / "src", "--out", tmp_path / "ours", "--dtype", "fp32") == 0
    model = load_checkpoint(str(tmp_path / "ours"))
    ids, mask, pixels = mixed_batch(rng, cfg)
    with torch.no_grad():
        want, valid = ref(torch.tensor(ids, dtype=torch.long), torch.tensor(mask), to_nchw(pixels))
    out = jax.jit(lambda m, a, b, c: m(a, b, c))(model, jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(pixels))
    valid = valid.numpy().astype(bool)
    assert rel_err(np.asarray(out.logits)[valid], want.numpy()[valid]) < 1e-4


def test_original_config_json_is_recognised_from_the_weights(rng, tmp_path):
    """Without our own config key, vision sizes come from the weights' shapes, the settings
    they do not fix from --vision-config (no public tower has the tiny model's sizes), and the
    γ-MoD settings from the official `mod` dict."""
    cfg, _, state = original_checkpoint(rng, "gamma_mod")
    config = hf_config_from_mllm(cfg)
    del config[EXTRA_KEY]
    config["mod"]["capacity_factor"] = 0.3  # ignored by the official code, as here
    write_original(tmp_path / "src", state, config)
    (tmp_path / "towers.json").write_text(json.dumps({"clip": {"num_attention_heads": 4, "layer_norm_eps": 1e-5},
                                                      "convnext": {"layer_norm_eps": 1e-6}}))
    assert run_cli("--checkpoint", tmp_path / "src", "--out", tmp_path / "ours", "--vision-config",
                   tmp_path / "towers.json") == 0
    got = gm.model_config(str(tmp_path / "ours" / "config.py"))
    assert got.family == "llava_hr" and got.llm == cfg.llm
    assert got.convnext.depths == cfg.convnext.depths and got.convnext.dims == cfg.convnext.dims
    assert got.adapter_after_layers == cfg.adapter_after_layers
    assert got.clip.num_hidden_layers == cfg.clip.num_hidden_layers and got.clip.image_size == cfg.clip.image_size
    assert got.clip == cfg.clip and got.convnext == cfg.convnext  # 4 heads of 8 (not the 64-wide CLIP-L heads)
    assert got.mod.layers == cfg.mod.layers and got.mod.routing_ratio == 0.5


def official_log(means, samples=3, rng=None):
    lines = []
    for s in range(samples):
        for i, m in enumerate(means):
            jitter = 0.0 if rng is None else (s - 1) * 0.01
            lines.append(f"Layer {i + 1}, Heads Avg Rank: {m + jitter}")
    return "\n".join(lines) + "\n"


def test_arank_files_turn_a_dense_checkpoint_into_gamma_mod(rng, tmp_path):
    cfg, _, state = original_checkpoint(rng, "llava_hr")
    write_original(tmp_path / "src", state, hf_config_from_mllm(cfg))
    # official log, averaged over samples: layers 3 and 0 have the highest ARank
    (tmp_path / "arank.log").write_text("some other output\n" + official_log([9.0, 2.0, 1.0, 12.0], rng=rng))
    assert run_cli("--checkpoint", tmp_path / "src", "--out", tmp_path / "ours", "--arank", tmp_path / "arank.log",
                   "--keep-dense", 2) == 0
    model = load_checkpoint(str(tmp_path / "ours"))
    assert model.config.mod.layers == (1, 2)
    dense = gm.abstract_model(cfg)
    gm.load_torch_state_dict(dense, state)
    for (path, a), (_, b) in zip(param_paths(dense),
                                 [pv for pv in param_paths(model) if pv[0][:2] != ("llm", "router")]):
        np.testing.assert_array_equal(np.asarray(a.get_value()), np.asarray(b.get_value()), err_msg=str(path))
    router = np.asarray(model.llm.router.kernel.get_value())
    assert router.shape == (cfg.llm.hidden_size, 2) and np.abs(router).max() > 0
    # a γ-MoD config.json names its layers directly; default rule on the log keeps 4 dense -> error (4 layers)
    (tmp_path / "gmod.json").write_text(json.dumps({"model_type": "mod_llava_llama", "mod": {"mod_layers_idx": [2]}}))
    assert run_cli("--checkpoint", tmp_path / "src", "--out", tmp_path / "ours2", "--arank", tmp_path / "gmod.json") == 0
    assert load_checkpoint(str(tmp_path / "ours2")).config.mod.layers == (2,)


def test_restores_onto_a_device_mesh(rng, tmp_path):
    cfg, _, state = original_checkpoint(rng, "llava_hr")
    write_original(tmp_path / "src", state, hf_config_from_mllm(cfg))
    assert run_cli("--checkpoint", tmp_path / "src", "--out", tmp_path / "ours") == 0
    script = textwrap.dedent(f"""
        import numpy as np, jax
        from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
        from gamma_mod_jax.convert.checkpoint import load_checkpoint
        from gamma_mod_jax.convert.keymap import param_paths
        assert jax.device_count() == 4
        mesh = Mesh(np.array(jax.devices()).reshape(2, 2), ("data", "model"))
        def sharding_for(path, leaf):
            spec = [None] * len(leaf.shape)
            if leaf.shape and leaf.shape[-1] % 2 == 0:
                spec[-1] = "model"
            return NamedSharding(mesh, P(*spec))
        sharded = load_checkpoint({str(tmp_path / 'ours')!r}, sharding_for=sharding_for)
        single = load_checkpoint({str(tmp_path / 'ours')!r})
        n_split = 0
        for (path, a), (_, b) in zip(param_paths(sharded), param_paths(single)):
            a, b = a.get_value(), b.get_value()
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
            if a.shape and a.shape[-1] % 2 == 0:
                assert a.sharding.spec[-1] == "model" and len(a.sharding.device_set) == 4, path
                n_split += 1
        print("SHARDED", n_split)
    """)
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu",
               PYTHONPATH=os.getcwd())
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert int(result.stdout.split("SHARDED")[-1]) > 50


# --------------------------------------------------------------------------- bad inputs


@pytest.fixture
def dense_source(rng, tmp_path):
    cfg, _, state = original_checkpoint(rng, "llava_hr")
    return cfg, state, tmp_path


def assert_refused(capsys, tmp_path, args, *needles):
    dst = tmp_path / "out" / "ours"
    assert run_cli(*args, "--out", dst) == 2
    err = capsys.readouterr().err
    for needle in needles:
        assert str(needle) in err, (needle, err)
    assert not dst.exists()
    assert not (tmp_path / "out").exists() or os.listdir(tmp_path / "out") == []  # no partial directory left


def test_missing_shard_named_in_the_index(dense_source, capsys):
    cfg, state, tmp = dense_source
    write_original(tmp / "src", state, hf_config_from_mllm(cfg), "safetensors", 3)
    os.remove(tmp / "src" / "model-00002-of-00003.safetensors")
    assert_refused(capsys, tmp, ["--checkpoint", tmp / "src"], "model.safetensors.index.json", "model-00002-of-00003")


def test_truncated_safetensors_file(dense_source, capsys):
    cfg, state, tmp = dense_source
    write_original(tmp / "src", state, hf_config_from_mllm(cfg), "safetensors", 1)
    path = tmp / "src" / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 1000])
    assert_refused(capsys, tmp, ["--checkpoint", tmp / "src"], path, "truncated")


def test_wrong_shape(dense_source, capsys):
    cfg, state, tmp = dense_source
    key = "model.layers.1.mlp.up_proj.weight"
    state[key] = torch.zeros(state[key].shape[0] + 1, state[key].shape[1])
    write_original(tmp / "src", state, hf_config_from_mllm(cfg))
    assert_refused(capsys, tmp, ["--checkpoint", tmp / "src"], tmp / "src", "mis-shaped", key)


def test_unknown_model_type(dense_source, capsys):
    cfg, state, tmp = dense_source
    write_original(tmp / "src", state, {**hf_config_from_mllm(cfg), "model_type": "qwen2_vl"})
    assert_refused(capsys, tmp, ["--checkpoint", tmp / "src"], tmp / "src" / "config.json", "qwen2_vl")


def test_unexpected_key(dense_source, capsys):
    cfg, state, tmp = dense_source
    state["model.vision_tower.extra_head.weight"] = torch.ones(3)
    write_original(tmp / "src", state, hf_config_from_mllm(cfg), "bin", 2)
    assert_refused(capsys, tmp, ["--checkpoint", tmp / "src"], "unexpected", "model.vision_tower.extra_head.weight")


def test_router_copies_that_differ(rng, tmp_path, capsys):
    cfg, _, state = original_checkpoint(rng, "gamma_mod")
    first, second = (f"model.layers.{i}.router.weight" for i in cfg.mod.layers)
    state[second] = state[second] + 1e-3
    write_original(tmp_path / "src", state, hf_config_from_mllm(cfg))
    assert_refused(capsys, tmp_path, ["--checkpoint", tmp_path / "src"], "copies of one shared tensor differ", first, second)


def test_arank_file_naming_a_layer_that_does_not_exist(dense_source, capsys):
    cfg, state, tmp = dense_source
    write_original(tmp / "src", state, hf_config_from_mllm(cfg))
    (tmp / "gmod.json").write_text(json.dumps({"mod": {"mod_layers_idx": [1, 7]}}))
    assert_refused(capsys, tmp, ["--checkpoint", tmp / "src", "--arank", tmp / "gmod.json"], tmp / "gmod.json",
                   "[7] do not exist", "4 layers")
    (tmp / "arank.log").write_text(official_log([1.0, 2.0, 3.0, 4.0, 5.0]))
    assert_refused(capsys, tmp, ["--checkpoint", tmp / "src", "--arank", tmp / "arank.log"], tmp / "arank.log",
                   "5 layers", "4 layers")


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):  # unpickling this would create the marker file
        return (open, (self.marker, "w"))


def test_pickle_that_runs_code_is_refused_and_never_run(dense_source, capsys):
    cfg, state, tmp = dense_source
    write_original(tmp / "src", state, hf_config_from_mllm(cfg), "bin", 1)
    marker = tmp / "pwned"
    torch.save({**state, "model.norm.weight": _RunsCode(str(marker))}, tmp / "src" / "pytorch_model.bin")
    assert_refused(capsys, tmp, ["--checkpoint", tmp / "src"], tmp / "src" / "pytorch_model.bin", "refused")
    assert not marker.exists()


def test_failure_midway_leaves_nothing(dense_source, capsys, monkeypatch):
    cfg, state, tmp = dense_source
    write_original(tmp / "src", state, hf_config_from_mllm(cfg), "safetensors", 3)
    from gamma_mod_jax.convert import checkpoint
    calls = []

    def failing(path, value, dtype):
        calls.append(path)
        if len(calls) > 100:
            raise OSError("disk full (simulated)")
        return from_torch_array(path, value, dtype)

    monkeypatch.setattr(checkpoint, "from_torch_array", failing)
    assert_refused(capsys, tmp, ["--checkpoint", tmp / "src"], "disk full")
    assert len(calls) == 101


def test_existing_destination_is_not_overwritten(dense_source, capsys):
    cfg, state, tmp = dense_source
    write_original(tmp / "src", state, hf_config_from_mllm(cfg))
    (tmp / "taken").mkdir()
    (tmp / "taken" / "keep.txt").write_text("mine")
    assert run_cli("--checkpoint", tmp / "src", "--out", tmp / "taken") == 2
    assert "already exists" in capsys.readouterr().err
    assert os.listdir(tmp / "taken") == ["keep.txt"]
