"""launch.convert for Mini-Gemini(-HD) and γ-MoD Mini-Gemini (`mgm` / `mod_mgm`): round
trips against the original tensors, every offending key named, vision settings never guessed."""

import dataclasses
import json

import numpy as np
import pytest
import torch

import gamma_mod_jax as gm
from gamma_mod_jax.convert.checkpoint import load_checkpoint
from gamma_mod_jax.convert.hf_config import EXTRA_KEY, hf_config_from_mllm, mllm_config_from_hf
from tests.convert.test_convert import assert_refused, assert_same_tensors, run_cli, write_original
from tests.mgm_torch_reference import TorchMGM
from tests.torch_reference import randomize_

SPECS = {"mgm": "configs/mgm_hd_7b.py:tiny,nohd", "mod_mgm": "configs/mgm_hd_7b.py:tiny,mod"}


def mgm_checkpoint(rng, kind):
    """(our config, the state dict under the original keys: a γ-MoD one with the shared
    router under every MoD layer, as the official code saves it)."""
    cfg = gm.model_config(SPECS[kind])
    ref = TorchMGM(cfg)
    randomize_(ref, int(rng.integers(1 << 30)))
    state = {k: v.detach().clone() for k, v in ref.state_dict_original().items()}
    if cfg.mod is not None:
        router = torch.tensor(rng.standard_normal((2, cfg.llm.hidden_size)), dtype=torch.float32)
        for i in cfg.mod.layers:
            state[f"model.layers.{i}.router.weight"] = router.clone()
    return cfg, state


def original_config(cfg):
    """config.json as the MGM code writes it: no key of ours."""
    out = hf_config_from_mllm(cfg)
    del out[EXTRA_KEY]
    return out


def tiny_towers(cfg, clip=True, convnext=True):
    """The tower settings of the tiny model (no public tower has its sizes), as --vision-config gives them."""
    out = {}
    if clip:
        out["clip"] = {"num_attention_heads": cfg.clip.num_attention_heads, "layer_norm_eps": cfg.clip.layer_norm_eps}
    if convnext:
        out["convnext"] = {"layer_norm_eps": cfg.convnext.layer_norm_eps}
    return out


def vision_config_args(tmp_path, cfg, **which):
    path = tmp_path / "towers.json"
    path.write_text(json.dumps(tiny_towers(cfg, **which)))
    return ["--vision-config", path]


@pytest.mark.parametrize("kind,fmt,shards", [("mod_mgm", "safetensors", 3), ("mgm", "bin", 1)])
def test_round_trip_is_bit_exact(rng, tmp_path, kind, fmt, shards):
    cfg, state = mgm_checkpoint(rng, kind)
    write_original(tmp_path / "src", state, hf_config_from_mllm(cfg), fmt, shards)
    assert run_cli("--checkpoint", tmp_path / "src", "--out", tmp_path / "ours") == 0
    assert gm.model_config(str(tmp_path / "ours" / "config.py")) == cfg
    assert run_cli("--export", "--checkpoint", tmp_path / "ours", "--out", tmp_path / "back") == 0
    assert_same_tensors(tmp_path / "back", state)
    exported = json.load(open(tmp_path / "back" / "config.json"))
    assert exported["model_type"] == kind and exported["image_grid"] == cfg.image_grid
    assert exported["mm_hidden_size_aux"] == sum(cfg.convnext.dims)


def test_original_config_json_takes_the_mgm_options_and_the_given_tower_settings(rng):
    """Without our key: the MGM γ-MoD options, the tower settings from the override (the towers
    the config names, CLIP-L/14 and ConvNeXt-L, do not have the tiny model's sizes)."""
    cfg, state = mgm_checkpoint(rng, "mod_mgm")
    got = mllm_config_from_hf(original_config(cfg), {k: tuple(v.shape) for k, v in state.items()},
                              vision_config=tiny_towers(cfg))
    assert got.clip == cfg.clip and got.convnext == cfg.convnext
    assert (got.input_image_size, got.image_grid, got.image_global) == (64, 2, True)
    assert got.mod == dataclasses.replace(cfg.mod, aux_loss_coef=0.01)
    assert got.mod.always_keep == "all_but_image" and got.mod.router_init == "xavier_uniform"


def test_router_stored_once_is_tied_on_load(rng, tmp_path):
    """Safetensors deduplication may keep the shared router under its first MoD layer only."""
    cfg, state = mgm_checkpoint(rng, "mod_mgm")
    first, *rest = cfg.mod.layers
    for i in rest:
        del state[f"model.layers.{i}.router.weight"]
    write_original(tmp_path / "src", state, original_config(cfg), "safetensors", 1)
    assert run_cli("--checkpoint", tmp_path / "src", "--out", tmp_path / "ours", *vision_config_args(tmp_path, cfg)) == 0
    router = np.asarray(load_checkpoint(str(tmp_path / "ours")).llm.router.kernel.get_value())
    np.testing.assert_array_equal(router, state[f"model.layers.{first}.router.weight"].numpy().T)


def test_bad_state_dict_names_every_offending_key(rng, tmp_path, capsys):
    cfg, state = mgm_checkpoint(rng, "mgm")
    gone = ["model.vision_tower_aux.vision_stages.2.blocks.0.gamma", "model.vlm_uni_val_projector.1.bias"]
    for key in gone:
        del state[key]
    bad = "model.vlm_uni_query_projector.1.weight"
    state[bad] = torch.zeros(3, 3)
    state["model.vision_tower_aux.vision_stages.0.blocks.0.weight"] = torch.ones(8)  # LLaVA-HR's name
    write_original(tmp_path / "src", state, original_config(cfg), "safetensors", 2)
    assert_refused(capsys, tmp_path, ["--checkpoint", tmp_path / "src", *vision_config_args(tmp_path, cfg)],
                   "missing keys (2)", *gone, "mis-shaped", bad,
                   "unexpected", "model.vision_tower_aux.vision_stages.0.blocks.0.weight")


@pytest.mark.parametrize("field,value,needle", [
    ("mm_vision_tower", "/ckpt/my-vit", "the CLIP tower's head count"),
    ("mm_vision_tower_aux", "/ckpt/my-trunk", "the ConvNeXt LayerNorm eps"),
    ("image_size_aux", None, "image_size_aux"),
    ("mm_hidden_size_aux", 1234, "mm_hidden_size_aux 1234"),
])
def test_vision_settings_are_never_guessed(rng, tmp_path, capsys, field, value, needle):
    cfg, state = mgm_checkpoint(rng, "mgm")
    config = original_config(cfg)
    config[field] = value
    write_original(tmp_path / "src", state, config, "safetensors", 1)
    given = vision_config_args(tmp_path, cfg, clip=field != "mm_vision_tower", convnext=field != "mm_vision_tower_aux")
    assert_refused(capsys, tmp_path, ["--checkpoint", tmp_path / "src", *given], tmp_path / "src" / "config.json", needle,
                   *(["--vision-config"] if "tower" in field else []))
