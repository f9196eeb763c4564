"""Mini-Gemini training recipes (ml-collections): `--config configs/train_mgm.py:<recipe>[,tiny]`.

Recipes (official scripts; ../shared/reference/mini_gemini.md §5):
  mgm_hd_7b_stage2   MGM-7B-HD instruction tuning (MGM's stage_2_full_v7b_672_hr_1536.sh): 2x2
                     grid + global view, ConvNeXt at 1536 px (2880 image tokens), vicuna_v1
                     template, lr 2e-5, global batch 128 (4 per GPU x 32), 1 epoch, warmup 3%,
                     cosine, wd 0, max length 4096, bf16, rematerialisation; the LLM, projector
                     and patch info mining train, both vision towers are frozen.
  The ratio in a γ-MoD recipe's name is the paper's name, as in configs/train.py: the
  recipe's routing_ratio skips, per MoD layer, the paper's measured skip of γ-MoD-MGM-HD-7B
  "0.5" (58.1%, PAPER_SKIP) at MGM-HD's mean length (MEAN_LENGTH, 4000 tokens) from the 2880
  routable image tokens: 2324 tokens (routing_ratio 0.8071; the code's 0.5 skips 1440, 36.0%).
  mgm_7b_mod0.5      γ-MoD on Mini-Gemini (Gamma-MOD's mod_mgm_finetune.sh): it replaces stage 2
                     (from Vicuna-7B-v1.5 + the stage-1 projector, not from MGM-HD), MGM without
                     a grid (ConvNeXt at 768 px, 576 image tokens), layers 3..30 MoD with the
                     MGM code's routing on that layout (presets.MGM_MOD_NO_HD: its 2880-position
                     prefix makes every sequence short), routing-loss coefficient 0.01, lr 2e-5, 16 per GPU
                     (x 8 GPUs of one node: global batch 128; the script names no host file),
                     1 epoch, warmup 3%, cosine, wd 0, max length 2048, <image> moved to the front
                     (its `modified_mgm_instruction.json`); the towers frozen as in stage 2.
                     Its sequences (<= 2048) never pass the official 2880-token prefix, so the
                     short-sequence rule skips floor(s / 2) of each whatever routing_ratio is.
  mgm_hd_7b_mod0.5   the same γ-MoD recipe on the HD layout (2880 image tokens, image-only routing,
                     presets.MGM_MOD, max length 4096): the recipe behind the released HD
                     checkpoints is not published.
`<γ-MoD recipe>_distill`: with distillation from the dense init_checkpoint (configs/train.py).
The data is MGM-Instruct (`mgm_instruction.json`); MGM_INSTRUCT_RECORDS is the count the step
number is derived from: set `--config.train.num_steps` from your copy's length.
"""

from configs import train as llava_recipes

MGM_INSTRUCT_RECORDS = 1_200_000  # approximate, not read from the data: override num_steps
TOWERS_FROZEN = [("vision/clip/.*", False), ("vision/aux/.*", False), (".*", True)]
RECIPES = {  # recipe: (model argument, global batch, micro batch, max length, the ratio's name or None)
    "mgm_hd_7b_stage2": ("", 128, 4, 4096, None),
    "mgm_7b_mod0.5": ("nohd,mod", 128, 16, 2048, "0.5"),
    "mgm_hd_7b_mod0.5": ("mod", 128, 4, 4096, "0.5"),
}
# The paper's measured skip of γ-MoD-Mini-Gemini-HD-7B per ratio name (Table 2 /
# paper_numbers.md: 58.1% for "0.5"; 36.2% for "0.3", no recipe), a share of the whole sequence at
# MEAN_LENGTH: 4000 tokens (2880 image + 1120 text), the length at which the official FLOPs
# formula gives the paper's 60.2 / 39.4 / 27.8 TFLOPs (README, Mini-Gemini section).
PAPER_SKIP = {"0.5": 0.581}
MEAN_LENGTH = 4000


def get_config(arg=None):
    parts = [p for p in (arg or "mgm_hd_7b_stage2").split(",") if p]
    (recipe, distill), tiny = llava_recipes.split_distill(parts[0]), "tiny" in parts[1:]
    unknown = [p for p in parts[1:] if p != "tiny"]
    if unknown:
        raise ValueError(f"unknown recipe options {unknown}; use <recipe>[,tiny]")
    if recipe not in RECIPES:
        raise ValueError(f"unknown recipe {recipe!r}; known: {sorted(RECIPES)}")
    model_arg, global_batch, micro_batch, max_len, ratio_name = RECIPES[recipe]
    gamma_mod = ratio_name is not None
    if distill and not gamma_mod:
        raise ValueError(f"{parts[0]!r}: the {llava_recipes.DISTILL_SUFFIX} variant exists for γ-MoD recipes only")
    model_arg = ",".join(filter(None, [model_arg, "tiny" if tiny else "dtype=bf16"]))
    config = llava_recipes.base_config("configs/mgm_hd_7b.py", model_arg, stage=2, global_batch=global_batch,
                                       micro_batch=micro_batch, records=MGM_INSTRUCT_RECORDS, lr=2e-5,
                                       max_len=max_len)
    config.data.move_image_to_front = gamma_mod
    if gamma_mod:  # the tiny twin routes the same share of its own routable tokens
        config.model.mod.routing_ratio = llava_recipes.routing_ratio_for_paper_skip(
            "configs/mgm_hd_7b.py", PAPER_SKIP[ratio_name], MEAN_LENGTH)
    config.optim.freeze = TOWERS_FROZEN  # MGM freezes both towers (optimize_vision_tower{,_aux} False)
    if tiny:  # the smoke-run settings of configs/train.py's tiny recipes, kept in one place there
        smoke = llava_recipes.get_config("llava15_7b_mod0.3,tiny")
        config.train = smoke.train
        config.data.batch_size, config.data.buckets = smoke.data.batch_size, smoke.data.buckets
        config.optim.accumulation_steps = smoke.optim.accumulation_steps
        config.optim.learning_rate = smoke.optim.learning_rate
    if distill:
        llava_recipes.enable_distillation(config)
    return config
