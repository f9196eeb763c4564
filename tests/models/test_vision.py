"""Vision parts vs PyTorch: CLIP (transformers.CLIPVisionModel, both LLaVA uses),
ConvNeXt, MR-Adapter and fusion (reference modules with the original key names), and
the exact resampling functions vs torch.nn.functional.interpolate."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from flax import nnx

from gamma_mod_jax.convert.keymap import KeyMap, load_state_dict
from gamma_mod_jax.models.clip import ClipVisionTransformer
from gamma_mod_jax.models.config import ClipConfig, ConvNextConfig
from gamma_mod_jax.models.convnext import ConvNeXt
from gamma_mod_jax.models.mr_adapter import HRFusion, MRAdapter
from gamma_mod_jax.models.resample import resample_grid_bicubic_aa, resize_bilinear_align_corners
from tests.conftest import rel_err
from tests.torch_reference import (TorchConvNeXt, TorchFusion, TorchMRAdapter, clip_hr_features, randomize_,
                                   to_nchw)
import transformers

SAME_KEYS = KeyMap(prefixes=(("", ""),))
CLIP_KEYS = SAME_KEYS  # transformers 5's CLIPVisionModel has no `vision_model.` level
TINY_CLIP = ClipConfig(image_size=56, patch_size=14, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                       num_attention_heads=4)


def hf_clip(rng, cfg=TINY_CLIP):
    model = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(
        hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads, image_size=cfg.image_size, patch_size=cfg.patch_size,
        hidden_act="quick_gelu", attn_implementation="eager"))
    randomize_(model, int(rng.integers(1 << 30)))
    return model.eval()


def ours_from(torch_module, jax_module, keymap=SAME_KEYS):
    load_state_dict(jax_module, torch_module.state_dict(), keymap)
    return jax_module


@pytest.mark.parametrize("shape", [(24, 32), (4, 7), (32, 24), (10, 3), (6, 6)])
def test_resampling_equals_torch_interpolate(rng, shape):
    src, dst = shape
    x = rng.standard_normal((2, 3, src, src + 1))
    for mode, ours in (("bilinear", resize_bilinear_align_corners), ("bicubic", resample_grid_bicubic_aa)):
        kw = dict(align_corners=True) if mode == "bilinear" else dict(align_corners=False, antialias=True)
        want = F.interpolate(torch.tensor(x), size=(dst, dst + 2), mode=mode, **kw).numpy()
        got = np.asarray(ours(jnp.asarray(x.transpose(0, 2, 3, 1), jnp.float32), dst, dst + 2)).transpose(0, 3, 1, 2)
        assert rel_err(got, want) < 1e-6, mode


def test_clip_llava15_features_match_hf(rng):
    hf = hf_clip(rng)
    ours = ours_from(hf, ClipVisionTransformer(TINY_CLIP, rngs=nnx.Rngs(0)), CLIP_KEYS)
    pixels = rng.standard_normal((2, 56, 56, 3)).astype(np.float32)
    with torch.no_grad():
        want = hf(to_nchw(pixels), output_hidden_states=True).hidden_states[-2][:, 1:].numpy()
    got = jax.jit(lambda m, x: m.features_llava15(x))(ours, jnp.asarray(pixels))
    assert rel_err(got, want) < 1e-4


@pytest.mark.parametrize("input_size,fast_size", [(128, 84), (64, 56)])
def test_clip_hr_fast_branch_matches_torch_oracle(rng, input_size, fast_size):
    hf = hf_clip(rng)
    ours = ours_from(hf, ClipVisionTransformer(TINY_CLIP, rngs=nnx.Rngs(0)), CLIP_KEYS)
    pixels = rng.standard_normal((2, input_size, input_size, 3)).astype(np.float32)
    n = (fast_size // 14) ** 2
    bumps = {1: rng.standard_normal((2, n, 32)).astype(np.float32), 2: rng.standard_normal((2, n, 32)).astype(np.float32)}
    with torch.no_grad():
        want = clip_hr_features(hf, to_nchw(pixels), fast_size,
                                lambda i, x: x + torch.tensor(bumps[i]) if i in bumps else x).numpy()
    got = ours.features_hr(jnp.asarray(pixels), fast_size,
                           layer_hook=lambda i, x: x + jnp.asarray(bumps[i]) if i in bumps else x)
    assert rel_err(got, want) < 1e-4


def test_clip_bf16_close_to_fp32(rng):
    hf = hf_clip(rng)
    pixels = jnp.asarray(rng.standard_normal((2, 56, 56, 3)), jnp.float32)
    a = ours_from(hf, ClipVisionTransformer(TINY_CLIP, rngs=nnx.Rngs(0)), CLIP_KEYS).features_llava15(pixels)
    b = ours_from(hf, ClipVisionTransformer(TINY_CLIP, dtype=jnp.bfloat16, rngs=nnx.Rngs(0)),
                  CLIP_KEYS).features_llava15(pixels)
    assert rel_err(b, a) < 2e-2


TINY_CONVNEXT = ConvNextConfig(depths=(1, 1, 2, 1), dims=(8, 16, 24, 32), layer_norm_eps=1e-6)


def test_convnext_matches_torch_reference(rng):
    ref = TorchConvNeXt(TINY_CONVNEXT.depths, TINY_CONVNEXT.dims, TINY_CONVNEXT.layer_norm_eps)
    randomize_(ref, int(rng.integers(1 << 30)))
    ours = ours_from(ref, ConvNeXt(TINY_CONVNEXT, rngs=nnx.Rngs(0)))
    pixels = rng.standard_normal((2, 64, 64, 3)).astype(np.float32)
    with torch.no_grad():
        want = ref(to_nchw(pixels)).numpy().transpose(0, 2, 3, 1)
    got = jax.jit(lambda m, x: m(x))(ours, jnp.asarray(pixels))
    assert got.shape == (2, 2, 2, 32)
    assert rel_err(got, want) < 1e-4


@pytest.mark.parametrize("slow_side", [4, 2, 8])  # equal, upsampled, pooled
def test_mr_adapter_and_fusion_match_torch_reference(rng, slow_side):
    fast_dim, slow_dim, n = 16, 12, 16
    adapter_ref, fusion_ref = TorchMRAdapter(fast_dim, slow_dim, 8), TorchFusion(fast_dim, slow_dim, 20)
    for module in (adapter_ref, fusion_ref):
        randomize_(module, int(rng.integers(1 << 30)), std=0.3)
    kw = dict(dtype=jnp.float32, param_dtype=jnp.float32, rngs=nnx.Rngs(0))
    adapter = ours_from(adapter_ref, MRAdapter(fast_dim, slow_dim, 8, **kw))
    fusion = ours_from(fusion_ref, HRFusion(fast_dim, slow_dim, 20, **kw))
    fast = rng.standard_normal((2, n, fast_dim)).astype(np.float32)
    slow = rng.standard_normal((2, slow_side, slow_side, slow_dim)).astype(np.float32)
    with torch.no_grad():
        want_a = adapter_ref(torch.tensor(fast), to_nchw(slow)).numpy()
        want_f = fusion_ref(torch.tensor(fast), to_nchw(slow)).numpy()
    assert rel_err(adapter(jnp.asarray(fast), jnp.asarray(slow)), want_a) < 1e-4
    assert rel_err(fusion(jnp.asarray(fast), jnp.asarray(slow)), want_f) < 1e-4


def test_fresh_mr_adapter_is_identity(rng):
    adapter = MRAdapter(16, 12, 8, dtype=jnp.float32, param_dtype=jnp.float32, rngs=nnx.Rngs(3))
    fast = jnp.asarray(rng.standard_normal((2, 16, 16)), jnp.float32)
    slow = jnp.asarray(rng.standard_normal((2, 4, 4, 12)), jnp.float32)
    np.testing.assert_array_equal(np.asarray(adapter(fast, slow)), np.asarray(fast))
