"""The judge registry and its built-in kinds (python:, reward-model:, openai:) behind one interface."""

# Importing the kinds registers them, in the order a bad SPEC's message lists them: local's, then remote's.
from . import local  # noqa: F401
from .base import Judge, PairwiseJudge, PointwiseJudge, PythonJudge
from .registry import KINDS, judge_kind, parse_judge, parse_judges
from .remote import JUDGE_PROMPT

__all__ = ["JUDGE_PROMPT", "KINDS", "Judge", "PairwiseJudge", "PointwiseJudge", "PythonJudge", "judge_kind",
           "parse_judge", "parse_judges"]
