"""gamma-mod-jax: γ-MoD (Mixture-of-Depth adaptation) for LLaVA-HR / LLaVA-1.5 in JAX."""
