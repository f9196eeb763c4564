"""Model input data: synthetic and file-backed batches for the analysis tools (ARank)."""
