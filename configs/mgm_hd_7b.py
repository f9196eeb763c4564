"""Mini-Gemini-HD-7B (MGM-7B-HD: Vicuna-7B, CLIP-L/14-336 on a 2x2 grid of 336-px tiles plus
a global view, OpenCLIP ConvNeXt-L at 1536 px, patch info mining; 2880 image tokens).

Variants through the argument, comma-separated: `:tiny` (test-sized twin), `:nohd` (MGM-7B:
no grid, ConvNeXt at 768 px, 576 image tokens, the input of the official γ-MoD fine-tuning
script), `:dtype=bf16`, `:param_dtype=bf16`, `:mod[=ratio]` (γ-MoD on layers 3..30 with the
Mini-Gemini code's routing, `presets.MGM_MOD`: the image tokens only are routable, half of
them skip, xavier router init, short sequences skip half, decode always computes the layer;
with `nohd`, `presets.MGM_MOD_NO_HD`: the official 2880-position prefix makes every
sequence short, so ceil(s / 2) tokens are kept, those without a label first).
"""

from configs._model import get_model_config, parse_arg
from gamma_mod_jax.models import presets

HD = dict(input_image_size=1536, image_grid=2, image_global=True)
NO_HD = dict(input_image_size=768, image_grid=1, image_global=False)
TINY_HD = dict(input_image_size=64, image_grid=2, image_global=True)  # 5 views of 2x2 CLIP patches
TINY_NO_HD = dict(input_image_size=32, image_grid=1, image_global=False)


def get_config(arg=None):
    opts = parse_arg(arg)
    no_hd = bool(opts.pop("nohd", False))
    base = ",".join(k if v is True else f"{k}={v}" for k, v in opts.items())
    config = get_model_config(base, "mgm", presets.VICUNA_7B, presets.CLIP_VIT_L14_336, presets.CONVNEXT_LARGE_MLP,
                              input_image_size=1536)
    tiny = bool(opts.get("tiny"))
    layout = {(False, False): HD, (True, False): NO_HD, (False, True): TINY_HD, (True, True): TINY_NO_HD}[no_hd, tiny]
    config.model.update(layout)
    config.model.adapter_gate_hidden = 512  # LLaVA-HR only: the MLLMConfig default, as converted checkpoints get
    if config.model.mod is not None:
        config.model.mod.update(presets.MGM_MOD_NO_HD if no_hd else presets.MGM_MOD)
    return config
