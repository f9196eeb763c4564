"""The whole LLaVA-1.5 and LLaVA-HR forward vs a PyTorch assembly with the original
state-dict keys (image + text, batch > 1, padding, image at different positions, a
text-only example); generation; parameter counts; configs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from gamma_mod_jax import api as gm
from gamma_mod_jax import token_types as tt
from gamma_mod_jax.models import generate as generate_module
from gamma_mod_jax.models.llama import last_valid_rows
from launch.inspect import count_parameters
from tests.conftest import rel_err
from tests.torch_reference import TorchLlava, randomize_, to_nchw

IMG = -200


def mixed_batch(rng, cfg, t=10):
    """Image first, image in the middle, text only; different lengths, right padded."""
    ids = rng.integers(3, cfg.llm.vocab_size, size=(3, t)).astype(np.int32)
    lengths = np.array([t, t - 3, t - 5])
    ids[0, 0] = IMG
    ids[1, 4] = IMG
    mask = (np.arange(t)[None] < lengths[:, None]).astype(np.int32)
    ids = np.where(mask == 1, ids, 0)
    size = cfg.input_image_size
    pixels = rng.standard_normal((3, size, size, 3)).astype(np.float32)
    return ids, mask, pixels


def pair(rng, spec, std=0.1):
    cfg = gm.model_config(spec)
    ref = TorchLlava(cfg)
    randomize_(ref, int(rng.integers(1 << 30)), std=std)
    ref.eval()
    model = gm.build_model(cfg)
    gm.load_torch_state_dict(model, ref.state_dict_original(), source="torch assembly")
    return cfg, ref, model


@pytest.mark.parametrize("spec", ["configs/llava15_7b.py:tiny", "configs/llava_hr_7b.py:tiny"])
def test_full_forward_matches_pytorch_assembly(rng, spec):
    check_full_forward(rng, *pair(rng, spec))


def check_full_forward(rng, cfg, ref, model):
    """Our forward on `mixed_batch` equals the PyTorch assembly's; token types and padding."""
    ids, mask, pixels = mixed_batch(rng, cfg)
    with torch.no_grad():
        want, valid = ref(torch.tensor(ids, dtype=torch.long), torch.tensor(mask), to_nchw(pixels))
    out = jax.jit(lambda m, a, b, c: m(a, b, c))(model, jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(pixels))
    valid = valid.numpy().astype(bool)
    np.testing.assert_array_equal(np.asarray(out.attention_mask).astype(bool), valid)
    assert rel_err(np.asarray(out.logits)[valid], want.numpy()[valid]) < 1e-4
    types = np.asarray(out.token_types)
    n = cfg.num_image_tokens
    assert (types[0, :n] == tt.IMAGE).all() and (types[1, 4:4 + n] == tt.IMAGE).all()
    assert not (types[2] == tt.IMAGE).any()
    assert (types[~valid] == tt.PADDING).all()


def test_bf16_compute_close_to_fp32(rng):
    # Weights at a trained model's scale (std 0.05), as in the LLM's bf16 test.
    cfg, ref, model = pair(rng, "configs/llava_hr_7b.py:tiny", std=0.05)
    model16 = gm.build_model(gm.model_config("configs/llava_hr_7b.py:tiny,dtype=bf16"))
    gm.load_torch_state_dict(model16, ref.state_dict_original())
    ids, mask, pixels = mixed_batch(rng, cfg)
    a = model(jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(pixels))
    b = model16(jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(pixels))
    valid = np.asarray(a.attention_mask).astype(bool)
    assert rel_err(np.asarray(b.logits)[valid], np.asarray(a.logits)[valid]) < 2e-2


def test_generation_equals_repeated_full_forwards_and_compiles_once(rng):
    cfg, _, model = pair(rng, "configs/llava_hr_7b.py:tiny")
    generate_module._generate.clear_cache()
    new = 5
    for _ in range(2):  # a second batch of the same bucket must not recompile
        ids, mask, pixels = mixed_batch(rng, cfg)
        batch = {"input_ids": jnp.asarray(ids), "attention_mask": jnp.asarray(mask), "pixel_values": jnp.asarray(pixels)}
        got = np.asarray(gm.generate(model, batch, max_new_tokens=new, eos_id=cfg.llm.eos_token_id))
    assert generate_module._generate._cache_size() == 1
    for b in range(3):
        seq = list(ids[b, : mask[b].sum()])
        for step in range(new):
            out = model(jnp.asarray([seq], jnp.int32), jnp.ones((1, len(seq)), jnp.int32), jnp.asarray(pixels[b:b + 1]))
            # The last real position (a text-only example is padded up to the spliced length).
            token = int(jnp.argmax(last_valid_rows(out.logits, out.attention_mask)[0]))
            assert token == got[b, step], (b, step)
            if token == cfg.llm.eos_token_id:
                break
            seq.append(token)


@pytest.mark.slow
def test_parameter_counts_of_the_7b_configs():
    counts = count_parameters("configs/llava_hr_7b.py")
    assert counts["llm"] == 6_738_415_616
    assert counts["vision/clip"] == 303_507_456
    assert counts["vision/convnext"] == 196_227_264
    assert counts["projector"] == 20_979_712
    assert count_parameters("configs/llava15_7b.py")["llm"] == 6_738_415_616


@pytest.mark.slow
@pytest.mark.parametrize("name", ["llava_hr_7b", "llava_hr_13b", "llava_hr_x_13b", "llava15_7b", "llava15_13b"])
def test_every_config_and_its_tiny_twin_builds(name):
    full = gm.abstract_model(f"configs/{name}.py")
    tiny = gm.abstract_model(f"configs/{name}.py:tiny")
    assert full.config.family == tiny.config.family
    assert full.config.num_image_tokens == (1024 if "hr" in name else 576)


def test_bad_state_dict_names_every_offending_key(rng):
    cfg, ref, model = pair(rng, "configs/llava_hr_7b.py:tiny")
    sd = dict(ref.state_dict_original())
    del sd["model.vision_tower.align_stages_latent.1.gate.2.weight"]
    sd["model.mm_projector.0.weight"] = torch.zeros(3, 3)
    sd["model.vision_tower.extra.weight"] = torch.zeros(1)
    with pytest.raises(gm.StateDictMismatchError) as err:
        gm.load_torch_state_dict(model, sd)
    msg = str(err.value)
    assert "model.vision_tower.align_stages_latent.1.gate.2.weight" in msg
    assert f"model.mm_projector.0.weight: got (3, 3), expected ({cfg.llm.hidden_size}, {cfg.mm_hidden_size})" in msg
    assert "model.vision_tower.extra.weight" in msg
