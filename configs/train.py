"""Training recipes (ml-collections): `--config configs/train.py:<recipe>[,tiny]`.

Recipes (hyperparameters from the papers / official scripts, see ../shared/reference):
  llava_hr_7b_stage1     LLaVA-HR-7B alignment: projector + fusion trained, LCS-558K,
                         lr 1e-3, global batch 256, 1 epoch, warmup 3%, cosine, wd 0
  llava_hr_7b_mod0.34    γ-MoD stage 2 on LLaVA-HR-7B, the paper's "0.3" / released "0.34" model
  llava_hr_7b_mod0.5     ... the paper's "0.5" model
  llava_hr_13b_mod0.34, llava_hr_13b_mod0.5, llava_hr_x_13b_mod0.34, llava_hr_x_13b_mod0.5,
  llava15_7b_mod0.3, llava15_7b_mod0.5
The ratio in a recipe's name is the paper's name, not `model.mod.routing_ratio`: each recipe
skips, per MoD layer, the paper's measured skip ratio (PAPER_SKIP) of the paper's mean
sequence length (MEAN_LENGTH), converted to the share of the routable image + system tokens
that routing_ratio counts (gamma_mod_jax/mod/config.py, routing_ratio_for_skip).
  <any γ-MoD recipe>_distill   the same with distillation from the dense model it starts
                         from (init_checkpoint; gamma_mod_jax/train/distill.py): loss + coef x
                         KL(teacher || student) on the answer tokens, e.g. llava_hr_7b_mod0.5_distill
Stage 2 (γ-MoD): mix665k with `<image>` moved to the front, lr 2e-5 for every parameter
(vision tower not frozen, no separate router lr), wd 0, warmup 3%, cosine, 1 epoch, global
batch 128, bf16 compute, rematerialisation, max length 2496, routing-loss coefficient 0.01.
Data: length buckets STAGE1_BUCKETS / STAGE2_BUCKETS (below), one global batch plan for all
processes (gamma_mod_jax/data/pipeline.py).
`tiny` swaps in the test-sized model twin, a few steps and small batches (smoke runs, tests).
Override anything on the command line: `--config.optim.learning_rate=1e-4`.

Parallelism (gamma_mod_jax/parallel): `parallelism` "pjit" (one jax.jit over a device mesh,
default) or "pmap" (plain data parallelism); `mesh` sizes of the (data, fsdp, tensor) axes,
-1 for all remaining devices (`--config.mesh.data=2 --config.mesh.fsdp=4`); `sharding_rules`
maps logical axis names (parallel/logical.py) to mesh axes. `data.batch_size` is per process
and micro-batch: the global batch is batch_size x processes, split over data x fsdp.
"""

import ml_collections

from configs import _model
from gamma_mod_jax.parallel.logical import DEFAULT_RULES
from gamma_mod_jax.train.distill import RECIPE_DISTILL, distill_config_defaults

MIX665K_RECORDS = 665_298
LCS558K_RECORDS = 558_128
# Static text-length buckets (placeholder included; a global batch takes the smallest that
# holds its longest example; one compilation each), chosen on the assumed length
# distributions of gamma_mod_jax/data/length_stats.py (mix665k: mean ~360 text tokens, a
# ShareGPT tail to the maximum; LCS-558K: captions of ~45-130 tokens). `python -m
# launch.padding_waste --config configs/train.py:<recipe>` prints the padding waste.
STAGE1_BUCKETS = (64, 80, 96, 128, 256, 2048)
STAGE2_BUCKETS = (256, 384, 512, 768, 1024, 1536, 2048, 2496)

MODELS = {
    "llava_hr_7b": ("configs/llava_hr_7b.py", "llava_hr"),
    "llava_hr_13b": ("configs/llava_hr_13b.py", "llava_hr"),
    "llava_hr_x_13b": ("configs/llava_hr_x_13b.py", "llava_hr"),
    "llava15_7b": ("configs/llava15_7b.py", "llava"),
}
# The paper's measured skip ratio of each recipe (arXiv v1 Table 2 / paper_numbers.md), a
# share of the whole sequence at MEAN_LENGTH. The paper reports none for LLaVA-HR-X-13B:
# its recipes take the 13B figures (the same Vicuna-13B LLM and 1024 image tokens).
PAPER_SKIP = {
    ("llava_hr_7b", "0.34"): 0.379, ("llava_hr_7b", "0.5"): 0.577,
    ("llava_hr_13b", "0.34"): 0.349, ("llava_hr_13b", "0.5"): 0.551,
    ("llava_hr_x_13b", "0.34"): 0.349, ("llava_hr_x_13b", "0.5"): 0.551,
    ("llava15_7b", "0.3"): 0.310, ("llava15_7b", "0.5"): 0.564,
}
# The paper's mean sequence length per family: 1400 tokens for LLaVA-HR (1024 image tokens;
# the paper's TFLOPs column is reproduced at it), 800 for LLaVA-1.5 (576 image tokens; the
# length at which the official FLOPs formula gives the paper's 10.7 / 7.7 / 5.3 TFLOPs).
MEAN_LENGTH = {"llava_hr": 1400, "llava": 800}
STAGE1_TRAINABLE = [("projector/.*", True), ("vision/fusion/.*", True), (".*", False)]
ALL_TRAINABLE = [(".*", True)]


def paper_routing_ratio(model: str, ratio_name: str) -> float:
    """model.mod.routing_ratio of recipe `<model>_mod<ratio_name>`: the paper's measured skip
    at the family's mean length, as a share of the full-size model's routable tokens."""
    if (model, ratio_name) not in PAPER_SKIP:
        known = sorted(f"{m}_mod{r}" for m, r in PAPER_SKIP)
        raise ValueError(f"unknown γ-MoD recipe {model}_mod{ratio_name}; known: {known}")
    model_file, family = MODELS[model]
    return routing_ratio_for_paper_skip(model_file, PAPER_SKIP[model, ratio_name], MEAN_LENGTH[family])


def routing_ratio_for_paper_skip(model_file: str, skip: float, mean_length: int) -> float:
    """The routing_ratio that skips `skip` of `mean_length` tokens per MoD layer on the
    full-size γ-MoD model of `model_file` (its routable token count; also configs/train_mgm.py)."""
    from gamma_mod_jax.api import model_config
    from gamma_mod_jax.config_file import load_config
    from gamma_mod_jax.mod.config import routing_ratio_for_skip

    cfg = model_config(load_config(f"{model_file}:mod").model)
    return routing_ratio_for_skip(skip, mean_length, cfg.mod.routable_count(cfg.num_image_tokens))


def data_config(**overrides):
    """The data section: the pipeline's defaults (gamma_mod_jax/data/pipeline.py) + overrides."""
    from gamma_mod_jax.data.pipeline import data_config_defaults

    d = data_config_defaults()
    d.num_epochs = 1
    d.uint8_pixels = True  # pixels travel as uint8, normalised on the device (the same values)
    d.update(overrides)
    return d


def base_config(model_file, model_arg, *, stage, global_batch, micro_batch, records, lr, max_len):
    from gamma_mod_jax.config_file import load_config

    config = ml_collections.ConfigDict()
    config.model = load_config(f"{model_file}:{model_arg}").model
    config.init_checkpoint = ""        # our checkpoint dir (stage 2: the stage-1 / adapted model)
    config.seed = 0
    buckets = tuple(b for b in (STAGE1_BUCKETS if stage == 1 else STAGE2_BUCKETS) if b < max_len) + (max_len,)
    # stage 2: batches all multimodal or all text-only, as LLaVA-1.5's finetune script
    # (--group_by_modality_length True); ShareGPT's long text-only chats then do not set
    # the length of the image batches
    config.data = data_config(buckets=buckets, batch_size=micro_batch, move_image_to_front=stage == 2,
                              group_by_modality=stage == 2)
    config.optim = ml_collections.ConfigDict(dict(
        learning_rate=lr, warmup_ratio=0.03, weight_decay=0.0, b1=0.9, b2=0.999, eps=1e-8, grad_clip_norm=1.0,
        accumulation_steps=max(global_batch // micro_batch, 1),
        freeze=STAGE1_TRAINABLE if stage == 1 else ALL_TRAINABLE))
    config.train = ml_collections.ConfigDict(dict(
        num_steps=max(records // global_batch, 1), log_every=10, checkpoint_every=500, keep_checkpoints=3,
        async_checkpoints=True, max_nonfinite_in_a_row=20, remat="full", tensorboard=True, progress_bar=True,
        # mfu's denominator; None: the device's from train/metrics.py PEAK_BF16_FLOPS (none on CPU)
        peak_flops_per_device=ml_collections.config_dict.placeholder(float),
        guard_host_transfers=True))  # a device-to-host read inside an update is an error
    config.parallelism = "pjit"        # pjit | pmap
    config.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
    config.sharding_rules = DEFAULT_RULES  # (logical name, mesh axes or None) pairs
    config.distill = distill_config_defaults()  # off (coef 0); see gamma_mod_jax/train/distill.py
    return config


DISTILL_SUFFIX = "_distill"


def split_distill(recipe: str):
    """(the recipe without a `_distill` suffix, whether it had one)."""
    return (recipe[: -len(DISTILL_SUFFIX)], True) if recipe.endswith(DISTILL_SUFFIX) else (recipe, False)


def enable_distillation(config, **overrides):
    """Distillation on (RECIPE_DISTILL + overrides) in a γ-MoD fine-tuning config; the
    teacher is config.init_checkpoint unless `teacher_checkpoint` is given."""
    config.distill.update(dict(RECIPE_DISTILL, **overrides))
    return config


def get_config(arg=None):
    parts = [p for p in (arg or "llava_hr_7b_mod0.34").split(",") if p]
    (recipe, distill), tiny = split_distill(parts[0]), "tiny" in parts[1:]
    unknown = [p for p in parts[1:] if p != "tiny"]
    if unknown:
        raise ValueError(f"unknown recipe options {unknown}; use <recipe>[,tiny]")
    if distill and "_mod" not in recipe:
        raise ValueError(f"{parts[0]!r}: the {DISTILL_SUFFIX} variant exists for γ-MoD recipes only")
    if recipe.endswith("_stage1"):
        model, stage, ratio = recipe[: -len("_stage1")], 1, None
    elif "_mod" in recipe:
        model, ratio = recipe.split("_mod")
        stage = 2
    else:
        raise ValueError(f"unknown recipe {recipe!r}; see configs/train.py")
    if model not in MODELS:
        raise ValueError(f"unknown model {model!r} in recipe {recipe!r}; known: {sorted(MODELS)}")
    model_file, family = MODELS[model]
    routing_ratio = paper_routing_ratio(model, ratio) if stage == 2 else None
    model_arg = ",".join(filter(None, ["tiny" if tiny else "", "stage1" if stage == 1 and family == "llava_hr" else "",
                                       "mod" if stage == 2 else "",
                                       "" if tiny else "dtype=bf16"]))
    if stage == 1:
        config = base_config(model_file, model_arg, stage=1, global_batch=256, micro_batch=16,
                             records=LCS558K_RECORDS, lr=1e-3, max_len=2048)
        if family == "llava_hr":
            config.model.input_image_size = 384 if not tiny else config.model.input_image_size  # 576 tokens
    else:
        config = base_config(model_file, model_arg, stage=2, global_batch=128, micro_batch=4,
                             records=MIX665K_RECORDS, lr=2e-5, max_len=2496)
        config.model.mod["routing_ratio"] = routing_ratio
    if tiny:
        config.data.batch_size = 2
        config.data.buckets = (48, 96)
        config.optim.accumulation_steps = 1
        config.optim.learning_rate = 1e-3
        config.train.num_steps = 6
        config.train.log_every = 1
        config.train.checkpoint_every = 3
        config.train.remat = "none"
        config.train.progress_bar = False
        config.train.async_checkpoints = False
    if distill:
        enable_distillation(config)
    return config
