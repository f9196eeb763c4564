"""Training: optimizer, step, metrics, checkpoints and the loop."""
