"""Measuring runs: held-out pairs, objective-free yardsticks, behaviour, statistics, run logs and their review."""
