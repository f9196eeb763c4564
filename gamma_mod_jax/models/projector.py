"""LLaVA's `mlp2x_gelu` projector: Linear(mm_hidden, H) -> GELU -> Linear(H, H)."""

from __future__ import annotations

from flax import nnx

from gamma_mod_jax.models.layers import gelu_exact, linear


class Projector(nnx.Module):
    """Maps vision features [b, n, mm_hidden] into the LLM embedding space [b, n, hidden].
    `fc1` / `fc2` are PyTorch's `mm_projector.0` / `mm_projector.2`."""

    def __init__(self, in_features: int, hidden_size: int, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(use_bias=True, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.fc1 = linear(in_features, hidden_size, **kw)
        self.fc2 = linear(hidden_size, hidden_size, **kw)

    def __call__(self, x_bnd):
        return self.fc2(gelu_exact(self.fc1(x_bnd)))
