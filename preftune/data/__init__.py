"""Preference data as users bring it: reading and validating rows, TRL-identical tokenization, splits and batch order."""
