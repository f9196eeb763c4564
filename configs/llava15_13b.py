"""LLaVA-1.5-13B (Vicuna-13B, CLIP-L@336).

Variants through the argument: `configs/llava15_13b.py:tiny` (test-sized twin),
`:dtype=bf16` (bf16 compute), `:param_dtype=bf16`, `:mod[=ratio]` (γ-MoD), comma-separated.
"""

from configs._model import get_model_config
from gamma_mod_jax.models import presets


def get_config(arg=None):
    return get_model_config(arg, "llava", presets.VICUNA_13B, presets.CLIP_VIT_L14_336, None, input_image_size=336)
