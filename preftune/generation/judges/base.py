"""The one interface of every judge, written once for pointwise and once for pairwise judges, and the disk cache
that makes a re-run pay nothing twice.

    prefs, scores_a, scores_b = judge.prefer(["sort: 3 1 2 ="], [" 1 2 3"], [" 3 2 1"])  # [1.0], [1.0], [0.33]
    judge.score_groups(["sort: 3 1 2 ="], [[" 1 2 3", " 3 2 1", " 1 3 2"]])                # [[1.0, 0.33, 0.33]]

A pointwise judge implements ``score(prompts, completions) -> list[float]``; a pairwise judge implements
``compare(prompts, a, b) -> list[float]``: 1 if a is better, 0 if b is, 0.5 for a tie. Nothing outside the
judges asks which of the two a judge is.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ...core.errors import InputError, one_line
from ...core.files import read_jsonl
from ...core.layout import JUDGE_CACHE
from ...data.rows import Content, as_text

Preferences = tuple[list[float], list[float] | None, list[float] | None]  # (prefs of a over b, scores a, scores b)


class Judge(ABC):
    """Every judge: ``prefer`` compares two completions per prompt, ``score_groups`` ranks each prompt's samples."""

    spec = ""  # the SPEC it was parsed from (parse_judge sets it): gen_eval's "judge", and every error names it

    @abstractmethod
    def prefer(self, prompts: Sequence[Content], a: Sequence[str], b: Sequence[str]) -> Preferences:
        """(preference of a over b in {1, 0.5, 0}, scores of a, scores of b); no scores from a pairwise judge."""

    @abstractmethod
    def score_groups(self, prompts: Sequence[Content], groups: Sequence[Sequence[str]]) -> list[list[float]]:
        """A score per completion of each prompt's group (its K samples), higher is better."""

    def position_flips(self, prompts: Sequence[Content], a: Sequence[str],
                       b: Sequence[str]) -> list[bool | None] | None:
        """After ``prefer``: per comparison, whether the answer flipped when the order of a and b was swapped
        (None where nothing was asked). None from a judge that sees no order (pointwise) or asks one order only;
        a pairwise judge that asks both orders says so here, and its position bias is measured."""
        return None


class PointwiseJudge(Judge):
    """Scores each completion alone; subclasses implement ``score``."""

    @abstractmethod
    def score(self, prompts: Sequence[Content], completions: Sequence[str]) -> list[float]:
        """One score per (prompt, completion)."""

    def _scores(self, prompts: Sequence[Content], completions: Sequence[str]) -> list[float]:
        return check_scores(self.spec, self.score(prompts, completions), len(completions))

    def prefer(self, prompts: Sequence[Content], a: Sequence[str], b: Sequence[str]) -> Preferences:
        """Both sides scored in one call; equal scores are a tie."""
        scores = self._scores(list(prompts) + list(prompts), list(a) + list(b))
        sa, sb = scores[:len(a)], scores[len(a):]
        return [1.0 if x > y else 0.0 if x < y else 0.5 for x, y in zip(sa, sb)], sa, sb

    def score_groups(self, prompts: Sequence[Content], groups: Sequence[Sequence[str]]) -> list[list[float]]:
        flat = iter(self._scores([p for p, g in zip(prompts, groups) for _ in g], [c for g in groups for c in g]))
        return [[next(flat) for _ in g] for g in groups]


class PairwiseJudge(Judge):
    """Compares two completions of a prompt given as text; subclasses implement ``compare``. It should ask both
    orders and call a disagreement a tie, so position bias shows up as ties, never as wins."""

    @abstractmethod
    def compare(self, prompts: Sequence[str], a: Sequence[str], b: Sequence[str]) -> list[float]:
        """Preference of a over b per prompt: 1, 0.5 or 0."""

    def prefer(self, prompts: Sequence[Content], a: Sequence[str], b: Sequence[str]) -> Preferences:
        prefs = self.compare([as_text(p) for p in prompts], list(a), list(b))
        if len(prefs) != len(a):
            raise InputError(f"judge {self.spec} returned {len(prefs)} preferences for {len(a)} pairs", field="judge")
        for p in prefs:
            if isinstance(p, bool) or p not in (0, 0.5, 1):
                raise InputError(f"judge {self.spec} returned {p!r}; 1, 0.5 or 0 is needed", field="judge")
        return [float(p) for p in prefs], None, None

    def score_groups(self, prompts: Sequence[Content], groups: Sequence[Sequence[str]]) -> list[list[float]]:
        """Round robin: each completion's mean preference over the others of its prompt (ties one half)."""
        asks = [(g, i, j) for g, group in enumerate(groups) for i in range(len(group)) for j in range(i + 1, len(group))]
        prefs, _, _ = self.prefer([prompts[g] for g, _, _ in asks], [groups[g][i] for g, i, _ in asks],
                                  [groups[g][j] for g, _, j in asks])
        scores = [[0.0] * len(group) for group in groups]
        for (g, i, j), p in zip(asks, prefs):
            k = len(groups[g]) - 1
            scores[g][i] += p / k
            scores[g][j] += (1 - p) / k
        return scores


class PythonJudge(PointwiseJudge):
    """``fn(prompt: str, completion: str) -> float``; message-list prompts are passed as ``role: content`` text."""

    def __init__(self, spec: str, fn: Callable[[str, str], float]) -> None:
        self.spec, self.fn = spec, fn

    def score(self, prompts: Sequence[Content], completions: Sequence[str]) -> list[float]:
        if len(prompts) != len(completions):
            raise ValueError("prompts and completions differ in length")
        out = []
        for p, c in zip(prompts, completions):
            try:
                out.append(self.fn(as_text(p), c))
            except Exception as e:  # the user's function failed: report it as bad input, one line
                raise InputError(f"judge {self.spec} raised {type(e).__name__}: {one_line(e)}",
                                 field="judge") from None
        return out


class DiskCache:
    """Append-only JSONL of {key: value} under the cache folder's ``judges/``: a re-run pays nothing twice; a
    torn last line is ignored."""

    def __init__(self, cache_dir: Path, identity: str) -> None:
        self.path = Path(cache_dir) / JUDGE_CACHE / f"{identity}.jsonl"
        self._mem: dict[str, Any] | None = None

    def load(self) -> dict[str, Any]:
        if self._mem is None:
            self._mem = {row["k"]: row["v"] for row in read_jsonl(self.path)} if self.path.exists() else {}
        return self._mem

    def add(self, items: dict[str, Any]) -> None:
        if not items:
            return
        self.load().update(items)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as f:  # one write of whole lines, then fsync
            f.write("".join(json.dumps({"k": k, "v": v}) + "\n" for k, v in items.items()))
            f.flush()
            os.fsync(f.fileno())


def content_hash(*parts: Any) -> str:
    """A cache key: the parts' JSON, hashed."""
    return hashlib.blake2b(json.dumps(parts, ensure_ascii=False).encode(), digest_size=16).hexdigest()


def check_scores(spec: str, scores: Sequence[Any], n: int) -> list[float]:
    """``n`` finite numbers as floats, or an InputError naming the judge."""
    if len(scores) != n:
        raise InputError(f"judge {spec} returned {len(scores)} scores for {n} completions", field="judge")
    for s in scores:
        if isinstance(s, bool) or not isinstance(s, (int, float)) or not math.isfinite(float(s)):
            raise InputError(f"judge {spec} returned {s!r}; a finite number is needed", field="judge")
    return [float(s) for s in scores]
