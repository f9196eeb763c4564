"""gamma-mod-jax: γ-MoD (Mixture-of-Depth adaptation) for LLaVA-HR / LLaVA-1.5 in JAX.

The public API in a few lines::

    import gamma_mod_jax as gm
    config = gm.load_config("configs/llava_hr_7b.py:tiny")
    model = gm.build_model(config)                    # random weights
    gm.load_torch_state_dict(model, state_dict)       # PyTorch LLaVA / LLaVA-HR keys
    out = model(input_ids, attention_mask, pixel_values)   # out.logits, out.token_types
    tokens = gm.generate(model, batch, max_new_tokens=32, eos_id=2)
"""

import importlib

# Lazy re-exports: `import gamma_mod_jax.data` (or `.token_types`) must not import the
# models, so the package namespace loads the API only when it is first used.
_API = ("load_config", "model_config", "build_model", "abstract_model", "adapt_to_gamma_mod", "load_torch_state_dict",
        "export_torch_state_dict", "generate", "LlavaModel", "MLLMConfig", "MLLMOutput",
        "StateDictMismatchError")
__all__ = list(_API)


def __getattr__(name):
    if name in _API:
        return getattr(importlib.import_module("gamma_mod_jax.api"), name)
    raise AttributeError(f"module 'gamma_mod_jax' has no attribute {name!r}")
