"""Deciding: paired comparisons, the verdict rules and their reasons, and the report."""
