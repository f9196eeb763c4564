"""State-dict import: precise errors, exact round trips."""

import numpy as np
import pytest
from flax import nnx

from gamma_mod_jax.convert.keymap import (LLAMA_KEYMAP, StateDictMismatchError, export_state_dict,
                                          load_state_dict)
from gamma_mod_jax.models.config import LlamaConfig
from gamma_mod_jax.models.llama import Llama

CFG = LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                  num_attention_heads=2, num_key_value_heads=1)


def test_round_trip_is_bit_exact(rng):
    model = Llama(CFG, rngs=nnx.Rngs(1))
    sd = {k: rng.standard_normal(v.shape).astype(np.float32) for k, v in export_state_dict(model, LLAMA_KEYMAP).items()}
    assert "model.layers.1.self_attn.k_proj.weight" in sd and sd["model.layers.1.self_attn.k_proj.weight"].shape == (8, 16)
    load_state_dict(model, sd, LLAMA_KEYMAP)
    back = export_state_dict(model, LLAMA_KEYMAP)
    assert sorted(back) == sorted(sd)
    for k in sd:
        np.testing.assert_array_equal(back[k], sd[k])


def test_bad_state_dict_names_every_offending_key(rng):
    model = Llama(CFG, rngs=nnx.Rngs(1))
    sd = export_state_dict(model, LLAMA_KEYMAP)
    del sd["model.layers.0.mlp.up_proj.weight"]
    del sd["lm_head.weight"]
    sd["model.layers.0.self_attn.extra.weight"] = np.zeros(3)
    sd["model.norm.weight"] = np.ones(17, np.float32)
    sd["model.layers.1.self_attn.rotary_emb.inv_freq"] = np.ones(4)  # a buffer: ignored
    before = {k: np.asarray(v.get_value()).copy() for k, v in nnx.to_flat_state(nnx.state(model))}
    with pytest.raises(StateDictMismatchError) as err:
        load_state_dict(model, sd, LLAMA_KEYMAP, source="ckpt.bin")
    msg = str(err.value)
    assert "ckpt.bin" in msg
    assert "model.layers.0.mlp.up_proj.weight" in msg and "lm_head.weight" in msg
    assert "model.layers.0.self_attn.extra.weight" in msg
    assert "model.norm.weight: got (17,), expected (16,)" in msg
    assert "inv_freq" not in msg
    assert err.value.missing == ["lm_head.weight", "model.layers.0.mlp.up_proj.weight"]
    # Nothing was modified.
    for k, v in nnx.to_flat_state(nnx.state(model)):
        np.testing.assert_array_equal(np.asarray(v.get_value()), before[k])



def test_shared_router_stored_once_or_under_every_mod_layer(rng):
    from gamma_mod_jax.convert.keymap import KeyMap
    cfg3 = LlamaConfig(**{**CFG.__dict__, "num_hidden_layers": 3})
    from gamma_mod_jax.mod.config import MoDConfig
    model = Llama(cfg3, mod=MoDConfig(layers=(1, 2), num_routable_tokens=4), rngs=nnx.Rngs(2))
    keymap = KeyMap(prefixes=LLAMA_KEYMAP.prefixes, shared=(("router.", ("model.layers.1.router.", "model.layers.2.router.")),))
    sd = export_state_dict(model, keymap)
    assert sd["model.layers.1.router.weight"].shape == (2, 16)
    np.testing.assert_array_equal(sd["model.layers.1.router.weight"], sd["model.layers.2.router.weight"])
    router = rng.standard_normal((2, 16)).astype(np.float32)
    once = dict(sd)
    del once["model.layers.2.router.weight"]
    once["model.layers.1.router.weight"] = router
    load_state_dict(model, once, keymap)
    np.testing.assert_array_equal(np.asarray(model.router.kernel.get_value()), router.T)
    differing = dict(sd)
    differing["model.layers.2.router.weight"] = router + 1
    with pytest.raises(StateDictMismatchError, match="copies of one shared tensor differ: model.layers.1.router.weight, model.layers.2.router.weight"):
        load_state_dict(model, differing, keymap)
    none = {k: v for k, v in sd.items() if "router" not in k}
    with pytest.raises(StateDictMismatchError, match="missing keys"):
        load_state_dict(model, none, keymap)
