"""What the model writes: batched sampling, the judge registry, and pairs from judged samples."""
