"""Import and export of PyTorch (HF-style) LLaVA / LLaVA-HR / γ-MoD weights."""
