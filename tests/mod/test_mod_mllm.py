"""γ-MoD inside the assembled LLaVA-HR: config wiring, routing on spliced token types,
generation under both inference modes, and the γ-MoD checkpoint key layout."""

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest

from gamma_mod_jax import api as gm
from gamma_mod_jax import token_types as tt
from tests.models.test_mllm import mixed_batch

SPEC = "configs/llava_hr_7b.py:tiny,mod"


def test_gamma_mod_llava_hr_routes_only_image_and_system_tokens(rng):
    cfg = gm.model_config(SPEC)
    assert cfg.mod.layers == (1, 2) and cfg.mod.routing_ratio == 0.5
    model = gm.build_model(cfg)
    ids, mask, pixels = mixed_batch(rng, cfg)
    out = model(jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(pixels))
    selected = np.asarray(out.mod_aux["selected"])  # [n_mod, b, L]
    types = np.asarray(out.token_types)
    skip = int(0.5 * (cfg.num_image_tokens + cfg.mod.system_tokens))
    assert (selected.sum(-1) == types.shape[1] - skip).all()
    # Official policy: questions, answers and padding are always computed; an example with
    # an image skips only image/system tokens.
    forced = np.isin(types, (tt.QUESTION, tt.ANSWER, tt.PADDING))
    assert selected[:, :2][:, forced[:2]].all()
    assert np.isfinite(np.asarray(out.mod_aux["routing_loss"])).all()


@pytest.mark.parametrize("inference", ["threshold", "capacity"])
def test_generation_runs_under_both_inference_modes(rng, inference):
    cfg = gm.model_config(SPEC)
    cfg = dataclasses.replace(cfg, mod=dataclasses.replace(cfg.mod, inference=inference))
    model = gm.build_model(cfg)
    ids, mask, pixels = mixed_batch(rng, cfg)
    batch = {"input_ids": jnp.asarray(ids), "attention_mask": jnp.asarray(mask), "pixel_values": jnp.asarray(pixels)}
    tokens = np.asarray(gm.generate(model, batch, max_new_tokens=4, eos_id=cfg.llm.eos_token_id))
    assert tokens.shape == (3, 4) and ((tokens >= 0) & (tokens < cfg.llm.vocab_size)).all()


def test_gamma_mod_checkpoint_keys_round_trip(rng):
    model = gm.build_model(SPEC)
    sd = gm.export_torch_state_dict(model)
    assert "model.layers.1.router.weight" in sd and "model.layers.2.router.weight" in sd
    assert "model.layers.0.router.weight" not in sd
    router = rng.standard_normal(sd["model.layers.1.router.weight"].shape).astype(np.float32)
    sd = {k: (router if "router" in k else v) for k, v in sd.items()}
    fresh = gm.build_model(SPEC, seed=1)
    gm.load_torch_state_dict(fresh, sd)
    back = gm.export_torch_state_dict(fresh)
    for key in sd:
        np.testing.assert_array_equal(back[key], sd[key])
