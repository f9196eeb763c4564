"""Key rules of Mini-Gemini(-HD) and γ-MoD Mini-Gemini checkpoints (`model_type` `mgm` /
`mod_mgm`), in the declarative style of `keymap.py`.

Only one name differs in kind from LLaVA-HR's: OpenCLIP's timm trunk stores the ConvNeXt
layer scale as `gamma`, which our block calls `weight`.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Sequence, Tuple

from gamma_mod_jax.convert.keymap import DEFAULT_IGNORED, KeyMap

CLIP_PREFIX = "model.vision_tower.vision_tower.vision_model."
AUX_PREFIX = "model.vision_tower_aux."
_LAYER_SCALE = re.compile(r"(vision_stages\.\d+\.blocks\.\d+)\.weight$")


@dataclasses.dataclass(frozen=True)
class MGMKeyMap(KeyMap):
    """A KeyMap whose ConvNeXt block layer scale is `...blocks.{i}.gamma`."""

    def torch_keys(self, path: Tuple) -> Tuple[str, ...]:
        return tuple(_LAYER_SCALE.sub(r"\1.gamma", key) for key in super().torch_keys(path))


def mgm_keymap(mod_layers: Sequence[int] = ()) -> MGMKeyMap:
    """Our MGM parameter paths <-> the original keys (the γ-MoD router stored as
    `model.layers.{i}.router.weight` for every MoD layer i, as for LLaVA-HR)."""
    prefixes = (("llm.lm_head.", "lm_head."), ("llm.", "model."),
                ("projector.fc1.", "model.mm_projector.0."), ("projector.fc2.", "model.mm_projector.2."),
                ("vision.clip.", CLIP_PREFIX),
                ("vision.aux.trunk.stem.", AUX_PREFIX + "vision_stem."),
                ("vision.aux.trunk.stages.", AUX_PREFIX + "vision_stages."),
                ("vision.mining.", "model.vlm_uni_"))
    shared = ((("llm.router.", tuple(f"model.layers.{i}.router." for i in sorted(mod_layers))),)
              if mod_layers else ())
    return MGMKeyMap(prefixes=prefixes, ignored=DEFAULT_IGNORED, shared=shared)
