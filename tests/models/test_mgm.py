"""Mini-Gemini(-HD) vs a PyTorch reference with the original key names
(tests/mgm_torch_reference.py): preprocessing and views, each tower, patch info mining,
the projector and the whole forward (batch 3, image first / in the middle / absent)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from PIL import Image

from gamma_mod_jax import api as gm
from gamma_mod_jax.data.image import pad_color, preprocess_image
from gamma_mod_jax.models.mgm_vision import mgm_views
from tests.conftest import rel_err
from tests.data.test_image import clip_processor, naive_pad
from tests.mgm_torch_reference import TorchMGM, aux_backbone, torch_views, unified_resampler
from tests.models.test_mllm import check_full_forward, mixed_batch
from tests.torch_reference import randomize_, to_nchw

HD, NO_HD = "configs/mgm_hd_7b.py:tiny", "configs/mgm_hd_7b.py:tiny,nohd"


def pair(rng, spec):
    cfg = gm.model_config(spec)
    ref = TorchMGM(cfg)
    randomize_(ref, int(rng.integers(1 << 30)))
    ref.eval()
    model = gm.build_model(cfg)
    gm.load_torch_state_dict(model, ref.state_dict_original(), source="torch MGM")
    return cfg, ref, model


@pytest.mark.parametrize("grid,with_global,size", [(2, True, 64), (1, False, 32), (2, True, 1536 // 8)])
def test_preprocessing_and_views_match_pil_and_torch_interpolate(rng, grid, with_global, size):
    """Pad to a square with the mean colour, PIL bicubic to the aux size, normalise (the
    processor), then the original's bilinear grid tiles and global view."""
    pixels = rng.integers(0, 256, (int(size * 0.7), size + 5, 3), dtype=np.uint8)
    ours = preprocess_image(Image.fromarray(pixels), size)
    ref = clip_processor(size)(Image.fromarray(naive_pad(pixels, pad_color())), return_tensors="np")
    ref = ref["pixel_values"][0].transpose(1, 2, 0)
    assert np.abs(ours - ref).max() < 1e-5
    view = 28 if size < 100 else 56
    want = torch_views(to_nchw(ref[None]), view, grid, with_global).numpy()
    got = np.asarray(mgm_views(jnp.asarray(ours[None]), view, grid, with_global))
    got = got.transpose(0, 1, 4, 2, 3) if grid > 1 else got[:, 0].transpose(0, 3, 1, 2)
    assert got.shape == want.shape
    assert rel_err(got, want) < 1e-5


def test_towers_mining_and_projector_match_torch(rng):
    cfg, ref, model = pair(rng, HD)
    m = ref.lm.model
    pixels = rng.standard_normal((2, cfg.input_image_size, cfg.input_image_size, 3)).astype(np.float32)
    x = to_nchw(pixels)
    with torch.no_grad():
        aux_want = aux_backbone(m.vision_tower_aux.vision_stem, m.vision_tower_aux.vision_stages, x)
        tokens = torch.tensor(rng.standard_normal((2, 4, cfg.mm_hidden_size)), dtype=torch.float32)
        aux_tile = aux_want[:, :, :8, :8]
        _, mined = unified_resampler(m, tokens, aux_tile)
        feats_want = ref.vision_features(x)
        proj_want = m.mm_projector(feats_want)

    @jax.jit
    def ours(model, pixels, tokens, aux_tile):
        feats = model.vision(pixels)
        return model.vision.aux(pixels), model.vision.mining(tokens, aux_tile), feats, model.projector(feats)

    aux_got, mined_got, feats_got, proj_got = map(np.asarray, ours(
        model, jnp.asarray(pixels), jnp.asarray(tokens.numpy()), jnp.asarray(aux_tile.numpy().transpose(0, 2, 3, 1))))
    assert aux_got.shape == (2, 16, 16, cfg.mm_hidden_size_aux)
    assert rel_err(aux_got, aux_want.numpy().transpose(0, 2, 3, 1)) < 1e-5
    assert rel_err(mined_got, (tokens + mined).numpy()) < 1e-5  # mining adds to the raw tokens
    assert feats_got.shape == (2, 20, cfg.mm_hidden_size)  # [global | t00 | t01 | t10 | t11] x 4
    assert rel_err(feats_got, feats_want.numpy()) < 1e-5
    assert rel_err(proj_got, proj_want.numpy()) < 1e-5


@pytest.mark.parametrize("spec", [HD, NO_HD])
def test_full_forward_matches_pytorch_assembly(rng, spec):
    """Batch 3: image first, image in the middle, text only; right padding."""
    cfg = gm.model_config(spec)
    assert cfg.num_image_tokens == (20 if spec == HD else 4)
    check_full_forward(rng, *pair(rng, spec))


@pytest.mark.parametrize("skip,expected", [(0.0, 60.2), (0.362, 39.4), (0.581, 27.8)])
def test_flops_cli_reproduces_the_paper_at_4000_tokens(skip, expected):
    """MGM-HD-7B: 2880 image tokens + 1120 text tokens (mean length 4000), layers 3..30 MoD."""
    from tests.mod.test_flops import run_cli

    result = run_cli("--config", "configs/mgm_hd_7b.py:mod", "--seq-len", "4000", "--skip-ratio", str(skip))
    assert round(result["tflops_paper"], 1) == expected
    # Mining over 2880 tokens, each attending to 64 aux pixels of 2880 channels (keys, values).
    mining = 2880 * (2 * 1024 * 1024 + 64 * (4 * 2880 * 1024 + 4 * 1024)) / 1e12
    assert result["breakdown"]["vision_mining"] == pytest.approx(mining, rel=1e-6)


@pytest.mark.slow  # abstract 7B model: ~60 s of tracing on 2 cores
def test_inspect_counts_mgm_hd_7b_components():
    from launch.inspect import count_parameters

    counts = count_parameters("configs/mgm_hd_7b.py:mod")
    ln = lambda n: 2 * n
    assert counts["vision/mining"] == ln(1024) + 1024 * 1024 + 1024 + 2 * (ln(2880) + 2880 * 1024 + 1024)
    assert counts["projector"] == 1024 * 4096 + 4096 + 4096 * 4096 + 4096
    assert counts["llm"] == 2 * 32000 * 4096 + 32 * (4 * 4096 ** 2 + 3 * 4096 * 11008 + 2 * 4096) + 4096 + 4096 * 2
    convnext_l = 196_227_264  # timm convnext_large without its head (197.77 M - 1.54 M)
    assert counts["vision/aux"] == convnext_l
    assert counts["vision/clip"] == 303_507_456  # CLIP ViT-L/14-336 vision model, post-LN included


def test_bf16_compute_close_to_fp32(rng):
    """:dtype=bf16 (views, feature upsampling and RMSNorm still in float32) stays near fp32."""
    cfg = gm.model_config(HD)
    ref = TorchMGM(cfg)
    randomize_(ref, int(rng.integers(1 << 30)), std=0.05)  # a trained model's scale
    models = []
    for spec in (HD, HD + ",dtype=bf16"):
        models.append(gm.build_model(spec))
        gm.load_torch_state_dict(models[-1], ref.state_dict_original())
    ids, mask, pixels = mixed_batch(rng, cfg)
    forward = jax.jit(lambda m, a, b, c: m(a, b, c).logits)
    a, b = (np.asarray(forward(m, jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(pixels))) for m in models)
    real = int(mask.sum(1).min())  # positions that hold a real token in every row
    assert rel_err(b[:, :real], a[:, :real]) < 2e-2
