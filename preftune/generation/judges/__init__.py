"""The judge registry and its built-in kinds (python:, reward-model:, openai:) behind one interface."""

# Importing the kinds registers them, in the order a bad SPEC's message lists them.
# isort: off
from . import local  # noqa: F401
from . import remote  # noqa: F401
# isort: on
from .base import DiskCache, Judge, PairwiseJudge, PointwiseJudge, Preferences, PythonJudge
from .local import RewardModelJudge
from .registry import KINDS, JudgeKind, judge_kind, parse_judge, parse_judges
from .remote import JUDGE_PROMPT, PROMPT_VERSION, OpenAIJudge

__all__ = ["JUDGE_PROMPT", "KINDS", "PROMPT_VERSION", "DiskCache", "Judge", "JudgeKind", "OpenAIJudge",
           "PairwiseJudge", "PointwiseJudge", "Preferences", "PythonJudge", "RewardModelJudge", "judge_kind",
           "parse_judge", "parse_judges"]
