"""γ-MoD: Mixture-of-Depths routing for decoder layers (static shapes, shared router)."""
