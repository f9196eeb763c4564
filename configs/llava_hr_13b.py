"""LLaVA-HR-13B (Vicuna-13B, CLIP-L@448 + ConvNeXt-L@1024).

Variants through the argument: `configs/llava_hr_13b.py:tiny` (test-sized twin),
`:dtype=bf16` (bf16 compute), `:param_dtype=bf16`, `:stage1` (no MR-Adapters), `:mod[=ratio]` (γ-MoD), comma-separated.
"""

from configs._model import get_model_config
from gamma_mod_jax.models import presets


def get_config(arg=None):
    return get_model_config(arg, "llava_hr", presets.VICUNA_13B, presets.CLIP_VIT_L14_336, presets.CONVNEXT_LARGE_MLP, input_image_size=1024)
