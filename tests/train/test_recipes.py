"""Each γ-MoD recipe skips the paper's measured share of the paper's mean sequence length.

Hand-worked (routing_ratio counts the routable image + 35 system tokens, a fixed number of
them skipping each MoD layer, see gamma_mod_jax/mod/config.py):
  LLaVA-HR  1024 image + 35 = 1059 routable, 1400 tokens:  37.9% -> 531, 57.7% -> 808,
            (13B, X-13B) 34.9% -> 489, 55.1% -> 771
  LLaVA-1.5  576 image + 35 =  611 routable,  800 tokens:  31.0% -> 248, 56.4% -> 451
  MGM-HD    2880 image (no system tokens) routable, 4000 tokens:  58.1% -> 2324
  MGM (no HD) 576 image tokens but the official 2880-position prefix: every sequence (<= 2048)
            is short, floor(s / 2) skip: 800 -> 400, 2048 -> 1024
"""

import pytest

from configs import train as recipes
from configs import train_mgm
from gamma_mod_jax import api as gm
from gamma_mod_jax.mod.config import MoDConfig

# recipe: (image tokens, routable tokens, mean length, tokens skipped, the paper's skip)
CASES = {
    "llava_hr_7b_mod0.34": (1024, 1059, 1400, 531, 0.379),
    "llava_hr_7b_mod0.5": (1024, 1059, 1400, 808, 0.577),
    "llava_hr_13b_mod0.34": (1024, 1059, 1400, 489, 0.349),
    "llava_hr_13b_mod0.5": (1024, 1059, 1400, 771, 0.551),
    "llava_hr_x_13b_mod0.34": (1024, 1059, 1400, 489, 0.349),
    "llava_hr_x_13b_mod0.5": (1024, 1059, 1400, 771, 0.551),
    "llava15_7b_mod0.3": (576, 611, 800, 248, 0.310),
    "llava15_7b_mod0.5": (576, 611, 800, 451, 0.564),
}


@pytest.mark.parametrize("recipe", sorted(CASES))
def test_recipe_skips_the_papers_measured_share_at_its_mean_length(recipe):
    n_img, routable, length, skipped, paper_skip = CASES[recipe]
    config = recipes.get_config(recipe)
    cfg = gm.model_config(config.model)
    assert cfg.num_image_tokens == n_img and cfg.mod.system_tokens == 35
    ratio = config.model.mod.routing_ratio
    # the ratio semantics by hand: int(ratio x routable) tokens skip each MoD layer
    assert int(ratio * routable) == skipped
    assert round(skipped / length, 3) == paper_skip
    # ... and what the model's capacity code computes
    assert MoDConfig.from_dict(config.model.mod).num_skipped(length, n_img) == skipped
    assert config.model.mod.layers == tuple(range(3, cfg.llm.num_hidden_layers - 1))
    # the tiny twin routes the same share of its own routable tokens
    assert recipes.get_config(recipe + ",tiny").model.mod.routing_ratio == ratio


def test_released_constant_and_old_ratio_reading_are_not_the_papers_skip():
    # the released code's 0.5 of 1059 is 529 tokens, 37.8% of 1400; reading "0.34" as the
    # routable share skips int(0.34 x 1059) = 360 tokens, 25.7%
    assert round(int(0.5 * 1059) / 1400, 3) == 0.378
    assert round(int(0.34 * 1059) / 1400, 3) == 0.257
    assert recipes.get_config("llava_hr_7b_mod0.34").model.mod.routing_ratio != 0.34


def test_llava15_mean_length_reproduces_the_papers_tflops():
    """800 tokens: the official FLOPs formula (8sh^2 + 4s^2h + 6shf per decoder layer, 4 dense
    + 28 MoD layers at their kept length) gives the paper's 10.7 / 7.7 / 5.3 TFLOPs."""
    h, f = 4096, 11008
    layer = lambda s: 8 * s * h * h + 4 * s * s * h + 6 * s * h * f
    assert round(32 * layer(800) / 1e12, 1) == 10.7
    assert round((4 * layer(800) + 28 * layer(800 - 248)) / 1e12, 1) == 7.7
    assert round((4 * layer(800) + 28 * layer(800 - 451)) / 1e12, 1) == 5.3


def test_unknown_ratio_name_is_an_error_naming_the_known_recipes():
    with pytest.raises(ValueError, match="unknown γ-MoD recipe llava_hr_7b_mod0.42.*llava_hr_7b_mod0.34"):
        recipes.get_config("llava_hr_7b_mod0.42")


def test_mgm_recipes_skip_the_papers_share_at_mgm_hds_mean_length():
    """mgm_hd_7b_mod0.5: 58.1% of 4000 tokens = 2324 of the 2880 routable image tokens skip
    each MoD layer; mgm_7b_mod0.5 has the same routing_ratio (the name means the same), but
    its sequences never pass the official 2880-token prefix, so half of each skips."""
    hd = train_mgm.get_config("mgm_hd_7b_mod0.5")
    cfg = gm.model_config(hd.model)
    assert cfg.num_image_tokens == 2880 and cfg.mod.routable_count(2880) == 2880
    ratio = hd.model.mod.routing_ratio
    assert int(ratio * 2880) == 2324 and round(2324 / 4000, 3) == 0.581
    assert cfg.mod.num_skipped(4000, 2880) == 2324
    assert hd.model.mod.layers == tuple(range(3, 31))
    no_hd = train_mgm.get_config("mgm_7b_mod0.5")
    cfg = gm.model_config(no_hd.model)
    assert cfg.num_image_tokens == 576 and no_hd.model.mod.routing_ratio == ratio
    assert [cfg.mod.num_skipped(s, 576) for s in (800, 2048)] == [400, 1024]
    assert train_mgm.get_config("mgm_hd_7b_mod0.5,tiny").model.mod.routing_ratio == ratio
    assert not train_mgm.get_config("mgm_hd_7b_stage2").model.get("mod")  # dense stage 2


def test_mgm_hd_mean_length_reproduces_the_papers_tflops():
    """4000 tokens: the official FLOPs formula gives the paper's MGM-HD 60.2 TFLOPs dense and
    27.8 at 58.1% skip (28 MoD layers at int(4000 x 0.419) = 1676 kept tokens)."""
    h, f = 4096, 11008
    layer = lambda s: 8 * s * h * h + 4 * s * s * h + 6 * s * h * f
    assert round(32 * layer(4000) / 1e12, 1) == 60.2
    assert round((4 * layer(4000) + 28 * layer(1676)) / 1e12, 1) == 27.8
