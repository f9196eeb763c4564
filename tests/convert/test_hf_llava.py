"""launch.convert with transformers' LlavaForConditionalGeneration: import from both key
layouts against transformers' own logits, export that `from_pretrained` loads, and vision-tower
settings never guessed (tiny random models built with transformers here; GQA text model,
16-wide heads in text and vision)."""

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.torch
import torch
import transformers

import gamma_mod_jax as gm
from gamma_mod_jax.convert.checkpoint import load_checkpoint
from gamma_mod_jax.convert.hf_config import CLIP_HR, CONVNEXT, EXTRA_KEY, hf_config_from_mllm, mllm_config_from_hf
from gamma_mod_jax.convert.keymap_mgm import AUX_PREFIX, CLIP_PREFIX
from tests.conftest import rel_err
from tests.convert.test_convert import assert_refused, assert_same_tensors, original_checkpoint, run_cli, write_original
from tests.torch_reference import randomize_, to_nchw

IMAGE_ID = 90  # transformers' image token: an id inside the vocabulary
VOCAB = 96


def hf_llava_config(strategy="default", feature_layer=-2):
    """LLaMA 64 wide, 4 query / 2 key-value heads of 16, CLIP 64 wide with 4 heads of 16,
    3x3 patches (9 image features, 10 with 'full')."""
    text = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5,
                                    max_position_embeddings=128, rope_theta=500.0, attn_implementation="eager")
    vision = transformers.CLIPVisionConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                           num_attention_heads=4, image_size=42, patch_size=14, layer_norm_eps=1e-5,
                                           attn_implementation="eager")
    return transformers.LlavaConfig(text_config=text, vision_config=vision, image_token_index=IMAGE_ID,
                                    vision_feature_layer=feature_layer, vision_feature_select_strategy=strategy)


def hf_llava(rng, strategy="default", feature_layer=-2):
    """A tiny random LlavaForConditionalGeneration (hf_llava_config)."""
    model = transformers.LlavaForConditionalGeneration(hf_llava_config(strategy, feature_layer))
    randomize_(model, int(rng.integers(1 << 30)), std=0.1)
    return model.eval()


def write_layout(model, directory, layout):
    """`model` saved by transformers, its weights in one of the two key layouts: 'new', the
    module tree of transformers >= 4.52 (`model.language_model.` ...), or 'hub', the older one
    of the hub checkpoints, with CLIP's `vision_model.` level (`language_model.model.` ...)."""
    model.save_pretrained(directory)
    weights = os.path.join(directory, "model.safetensors")
    if layout == "new":
        state = {k: v.contiguous() for k, v in model.state_dict().items()}
    else:
        state = safetensors.torch.load_file(weights)
        assert "language_model.lm_head.weight" in state  # transformers 5 writes the hub layout ...
        state = {("vision_tower.vision_model." + k[len("vision_tower."):] if k.startswith("vision_tower.") else k): v
                 for k, v in state.items()}  # ... without transformers 4's vision_model level
    assert any(k.startswith("model.language_model." if layout == "new" else "vision_tower.vision_model.")
               for k in state)
    os.remove(weights)
    safetensors.torch.save_file(state, weights)
    return state


def prompts(rng, n_image):
    """Two right-padded prompts with the image at different places, in each convention:
    ours (one placeholder) and transformers' (one image token per feature)."""
    texts = [(rng.integers(3, IMAGE_ID, 2), rng.integers(3, IMAGE_ID, 5)),
             (rng.integers(3, IMAGE_ID, 4), rng.integers(3, IMAGE_ID, 1))]
    ours = [np.concatenate([a, [IMAGE_ID], b]) for a, b in texts]
    theirs = [np.concatenate([a, [IMAGE_ID] * n_image, b]) for a, b in texts]

    def pad(rows):
        t = max(map(len, rows))
        ids = np.zeros((len(rows), t), np.int32)
        mask = np.zeros((len(rows), t), np.int32)
        for i, row in enumerate(rows):
            ids[i, :len(row)], mask[i, :len(row)] = row, 1
        return ids, mask

    return pad(ours), pad(theirs)


def hf_logits(model, ids, mask, pixels_bhwc):
    with torch.no_grad():
        return model(input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask),
                     pixel_values=to_nchw(pixels_bhwc)).logits.numpy()


@pytest.mark.parametrize("layout,strategy,feature_layer", [("new", "default", -2), ("hub", "full", -1)])
def test_transformers_llava_converts_to_its_logits(rng, tmp_path, layout, strategy, feature_layer):
    ref = hf_llava(rng, strategy, feature_layer)
    write_layout(ref, tmp_path / "src", layout)
    assert run_cli("--checkpoint", tmp_path / "src", "--out", tmp_path / "ours") == 0
    model = load_checkpoint(str(tmp_path / "ours"))
    cfg = model.config
    assert (cfg.family, cfg.llm.kv_heads, cfg.clip.num_attention_heads, cfg.image_token_index) == ("llava", 2, 4,
                                                                                                    IMAGE_ID)
    assert cfg.vision_select_feature == {"default": "patch", "full": "cls_patch"}[strategy]
    assert cfg.num_image_tokens == 9 + (strategy == "full")
    (ids, mask), (hf_ids, hf_mask) = prompts(rng, cfg.num_image_tokens)
    pixels = rng.standard_normal((2, 42, 42, 3)).astype(np.float32)
    want = hf_logits(ref, hf_ids, hf_mask, pixels)
    out = jax.jit(lambda m, a, b, c: m(a, b, c))(model, jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(pixels))
    valid = hf_mask.astype(bool)
    np.testing.assert_array_equal(np.asarray(out.attention_mask).astype(bool), valid)  # the sequences align
    got = np.asarray(out.logits)
    image = hf_ids == IMAGE_ID
    assert rel_err(got[valid & ~image], want[valid & ~image]) < 1e-4  # text positions
    assert rel_err(got[image], want[image]) < 1e-4  # and the image positions


def test_export_as_hf_llava_loads_in_transformers_with_equal_logits(rng, tmp_path):
    ref = hf_llava(rng)
    state = write_layout(ref, tmp_path / "src", "hub")
    assert run_cli("--checkpoint", tmp_path / "src", "--out", tmp_path / "ours") == 0
    # the README's command
    assert run_cli("--export", "--format", "hf-llava", "--checkpoint", tmp_path / "ours", "--out", tmp_path / "hf") == 0
    assert_same_tensors(tmp_path / "hf", state)  # the hub layout, bit for bit
    back = transformers.LlavaForConditionalGeneration.from_pretrained(str(tmp_path / "hf"), dtype=torch.float32)
    back.eval()
    _, (ids, mask) = prompts(rng, 9)
    pixels = rng.standard_normal((2, 42, 42, 3)).astype(np.float32)
    valid = mask.astype(bool)
    assert rel_err(hf_logits(back, ids, mask, pixels)[valid], hf_logits(ref, ids, mask, pixels)[valid]) <= 1e-5
    # and it imports back into the same model
    assert run_cli("--checkpoint", tmp_path / "hf", "--out", tmp_path / "again") == 0
    assert gm.model_config(str(tmp_path / "again" / "config.py")) == gm.model_config(str(tmp_path / "ours" /
                                                                                           "config.py"))


@pytest.mark.parametrize("kind", ["llava_hr", "gamma_mod"])
def test_hf_llava_export_of_a_model_transformers_cannot_hold_is_refused(rng, tmp_path, capsys, kind):
    cfg, _, state = original_checkpoint(rng, kind)
    write_original(tmp_path / "src", state, hf_config_from_mllm(cfg))
    assert run_cli("--checkpoint", tmp_path / "src", "--out", tmp_path / "ours") == 0
    capsys.readouterr()
    assert_refused(capsys, tmp_path, ["--export", "--format", "hf-llava", "--checkpoint", tmp_path / "ours"],
                   "no transformers-native class", "γ-MoD model" if kind == "gamma_mod" else "'llava_hr'",
                   "--format original")


def test_hf_llava_export_needs_an_image_token_inside_the_vocabulary(rng, tmp_path, capsys):
    cfg, _, state = original_checkpoint(rng, "llava")  # the original placeholder, -200
    write_original(tmp_path / "src", state, hf_config_from_mllm(cfg))
    assert run_cli("--checkpoint", tmp_path / "src", "--out", tmp_path / "ours") == 0
    capsys.readouterr()
    assert_refused(capsys, tmp_path, ["--export", "--format", "hf-llava", "--checkpoint", tmp_path / "ours"], "-200",
                   "--image-token-index")
    assert run_cli("--export", "--format", "hf-llava", "--image-token-index", 3, "--checkpoint", tmp_path / "ours",
                   "--out", tmp_path / "hf") == 0
    assert json.load(open(tmp_path / "hf" / "config.json"))["image_token_index"] == 3


# --------------------------------------------------------------------------- tower settings


def original_llava_without_our_key(rng, tmp_path, tower):
    """An original-layout LLaVA-1.5 checkpoint as the LLaVA code writes it (no key of ours),
    naming `tower` as its vision tower; the tiny CLIP has 4 heads of 8, not 64-wide ones."""
    cfg, _, state = original_checkpoint(rng, "llava")
    config = hf_config_from_mllm(cfg)
    del config[EXTRA_KEY]
    config["mm_vision_tower"] = tower
    write_original(tmp_path / "src", state, config)
    return cfg


def same_model(directory, cfg):
    """The converted config is `cfg` (the tiny CLIP's 4 heads), up to the MR-Adapter gate
    width, unused by LLaVA-1.5 and recorded only in our key."""
    got = gm.model_config(str(directory / "config.py"))
    return dataclasses.replace(got, adapter_gate_hidden=cfg.adapter_gate_hidden) == cfg


def clip_config_json(cfg):
    """The tower's own config.json, as a hub CLIP repo holds it (a CLIPConfig, sparse)."""
    c = cfg.clip
    return {"model_type": "clip", "vision_config": {"hidden_size": c.hidden_size, "intermediate_size":
            c.intermediate_size, "num_hidden_layers": c.num_hidden_layers, "num_attention_heads": c.num_attention_heads,
            "image_size": c.image_size, "patch_size": c.patch_size}}


def test_tower_settings_that_cannot_be_found_stop_the_conversion(rng, tmp_path, capsys):
    original_llava_without_our_key(rng, tmp_path, "/nowhere/my-vit")
    assert_refused(capsys, tmp_path, ["--checkpoint", tmp_path / "src"], "head count", "mm_vision_tower='/nowhere/my-vit'",
                   "--vision-config")


def test_a_public_tower_name_on_other_weights_is_refused(rng, tmp_path, capsys):
    original_llava_without_our_key(rng, tmp_path, "openai/clip-vit-large-patch14-336")
    assert_refused(capsys, tmp_path, ["--checkpoint", tmp_path / "src"], "does not describe the tower in the weights",
                   "hidden_size 1024 (weights: 32)")


def test_tower_settings_from_an_override_a_local_tower_or_the_hf_cache(rng, tmp_path, monkeypatch):
    # --vision-config, in our format and as the tower's config.json
    cfg = original_llava_without_our_key(rng, tmp_path, "/nowhere/my-vit")
    (tmp_path / "ours.json").write_text(json.dumps({"clip": {"num_attention_heads": 4, "layer_norm_eps": 1e-5}}))
    (tmp_path / "tower.json").write_text(json.dumps(clip_config_json(cfg)))
    for n, override in enumerate(["ours.json", "tower.json"]):
        assert run_cli("--checkpoint", tmp_path / "src", "--out", tmp_path / f"o{n}", "--vision-config",
                       tmp_path / override) == 0
        assert same_model(tmp_path / f"o{n}", cfg)
    # mm_vision_tower naming a local directory with the tower's config.json
    (tmp_path / "my-vit").mkdir()
    (tmp_path / "my-vit" / "config.json").write_text(json.dumps(clip_config_json(cfg)))
    with open(tmp_path / "src" / "config.json") as f:
        config = json.load(f)
    (tmp_path / "src" / "config.json").write_text(json.dumps({**config, "mm_vision_tower": str(tmp_path / "my-vit")}))
    assert run_cli("--checkpoint", tmp_path / "src", "--out", tmp_path / "local") == 0
    assert same_model(tmp_path / "local", cfg)
    # ... or a hub id whose config.json is in the local Hugging Face cache
    import huggingface_hub.constants
    snapshot = tmp_path / "hub" / "models--someone--tiny-vit" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text(json.dumps(clip_config_json(cfg)))
    (tmp_path / "hub" / "models--someone--tiny-vit" / "refs").mkdir()
    (tmp_path / "hub" / "models--someone--tiny-vit" / "refs" / "main").write_text("abc123")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    (tmp_path / "src" / "config.json").write_text(json.dumps({**config, "mm_vision_tower": "someone/tiny-vit"}))
    assert run_cli("--checkpoint", tmp_path / "src", "--out", tmp_path / "cached") == 0
    assert same_model(tmp_path / "cached", cfg)


def vision_shapes(cfg):
    """{key: shape} of the vision-tower weights the config reader looks at, for `cfg`'s towers
    under the original keys (LLaVA-HR or MGM)."""
    clip_prefix, trunk, stages = ((CLIP_HR, CONVNEXT, "stages") if cfg.family == "llava_hr"
                                  else (CLIP_PREFIX, AUX_PREFIX, "vision_stages"))
    c, side = cfg.clip, cfg.clip.image_size // cfg.clip.patch_size
    shapes = {clip_prefix + "embeddings.patch_embedding.weight": (c.hidden_size, 3, c.patch_size, c.patch_size),
              clip_prefix + "embeddings.position_embedding.weight": (side * side + 1, c.hidden_size),
              trunk + "stem.0.weight": (cfg.convnext.dims[0], 3, 4, 4)}
    for i in range(c.num_hidden_layers):
        shapes[clip_prefix + f"encoder.layers.{i}.mlp.fc1.weight"] = (c.intermediate_size, c.hidden_size)
    for s, (depth, dim) in enumerate(zip(cfg.convnext.depths, cfg.convnext.dims)):
        for b in range(depth):
            shapes[f"{trunk}{stages}.{s}.blocks.{b}.conv_dw.weight"] = (dim, 1, 7, 7)
    return shapes


@pytest.mark.parametrize("spec", ["configs/llava_hr_7b.py", "configs/llava_hr_x_13b.py", "configs/mgm_hd_7b.py"])
def test_public_towers_named_in_config_json_give_their_settings(spec):
    """config.json as the original code writes it (no key of ours) for the published models:
    CLIP-L/14-336's 16 heads, ConvNeXt-L's / -XXL's LayerNorm eps (1e-6 / 1e-5) from the table,
    on the full-size towers' weight shapes."""
    cfg = gm.model_config(spec)
    config = hf_config_from_mllm(cfg)
    del config[EXTRA_KEY]
    got = mllm_config_from_hf(config, vision_shapes(cfg))
    assert got.clip == cfg.clip and got.convnext == cfg.convnext
    assert got.clip.num_attention_heads == 16


def test_an_override_that_contradicts_the_checkpoint_is_refused(rng, tmp_path, capsys):
    write_layout(hf_llava(rng), tmp_path / "src", "new")
    (tmp_path / "towers.json").write_text(json.dumps({"clip": {"num_attention_heads": 2, "layer_norm_eps": 1e-5}}))
    assert_refused(capsys, tmp_path, ["--checkpoint", tmp_path / "src", "--vision-config", tmp_path / "towers.json"],
                   "contradicts", "num_attention_heads 2 (checkpoint: 4)")


@pytest.mark.parametrize("change,needle", [
    ({"vision_feature_layer": [-2, -1]}, "'vision_feature_layer' is [-2, -1]"),
    ({"vision_feature_layer": 3}, "in [-3, 3)"),
    ({"vision_feature_select_strategy": "cls"}, "'default' or 'full'"),
    ({"image_token_index": VOCAB}, f"'image_token_index' is {VOCAB}"),
    ({"vision_config": {"model_type": "siglip_vision_model"}}, "siglip_vision_model"),
    ({"text_config": {"model_type": "qwen2"}}, "'text_config.model_type' is \"qwen2\""),
    ({"text_config": {"hidden_size": "64"}}, "'hidden_size' is \"64\""),
])
def test_unsupported_or_bad_llava_config_fields_are_named(tmp_path, capsys, change, needle):
    """Refused from config.json alone, before any weight is read (there are none)."""
    config = hf_llava_config().to_dict()
    for key, value in change.items():
        config[key] = {**config[key], **value} if isinstance(value, dict) else value
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "config.json").write_text(json.dumps(config))
    assert_refused(capsys, tmp_path, ["--checkpoint", tmp_path / "src"], tmp_path / "src" / "config.json", needle)
