"""Shared ground of every stage: config, the objective registry, errors, files, the on-disk layout, runtime, progress, trackers."""
