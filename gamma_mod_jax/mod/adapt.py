"""Dense -> γ-MoD adaptation of model parameters: every weight copied unchanged, MoD
layers set, the shared router created and initialised as the MoD config says."""

from __future__ import annotations

from flax import nnx


def copy_dense_weights(dense: nnx.Module, gamma: nnx.Module) -> None:
    """Copies every parameter of `dense` into `gamma` (a model of the same architecture
    plus a router), in place. Raises if the architectures differ."""
    dense_state = nnx.state(dense, nnx.Param)
    gamma_paths = {path for path, _ in nnx.to_flat_state(nnx.state(gamma, nnx.Param))}
    dense_paths = {path for path, _ in nnx.to_flat_state(dense_state)}
    extra = sorted("/".join(map(str, p)) for p in dense_paths - gamma_paths)
    missing = sorted("/".join(map(str, p)) for p in gamma_paths - dense_paths if "router" not in p)
    if extra or missing:
        raise ValueError(f"dense and γ-MoD models differ: only in dense {extra}, only in γ-MoD {missing}")
    nnx.update(gamma, dense_state)
