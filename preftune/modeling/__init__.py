"""The model: loading with LoRA, precision, per-sequence log-probs, and cached reference log-probs."""
