"""The gate between "this cell won" and "ship it": named checks, each a rule over what every judge said about
the candidate's and the replaced model's answers to the same prompts. The verdict is ``ship`` when every check
passes under every judge, else ``hold``; each step is a Reason record with its numbers.

    d = gate_verdict([(check, rows), ...])      # rows: evaluation/checks.py; d["verdict"] in ("ship", "hold")

The rules (``not_worse``, ``at_least``, ``at_most``), their bounds and the reason codes: docs/pipeline.md, The
gate.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from statistics import NormalDist
from typing import Any

from ..core.errors import InputError
from ..evaluation import stats
from .reasons import Reason, render

PASS = 0.5   # a score at or above this counts as "judged to pass" for the share rules (scores in [0, 1])
POWER = 0.8  # prompts needed: to show the observed difference with this power


@dataclass(frozen=True)
class Check:
    """One named gate check (the recipe's ``gate.checks`` entry)."""

    name: str
    prompts: str
    judges: tuple[str, ...]
    rule: str                       # not_worse | at_least | at_most
    threshold: float | None = None  # at_least / at_most: the share the interval must clear
    margin: float = 0.05            # not_worse: how far below the replaced model's mean score is still not worse
    alpha: float = 0.05
    max_prompts: int | None = None


def gate_verdict(checks: list[tuple[Check, list[dict[str, Any]]]]) -> dict[str, Any]:
    """The gate record (gate.json): verdict, reasons as data and sentences, and every check's numbers."""
    reasons, table = [], []
    for check, rows in checks:
        found = [judge_check(check, rows, spec) for spec in check.judges]
        passed = [r for r in found if r.code == "check_passed"]
        reasons += found
        if passed and len(passed) < len(found):
            reasons.append(Reason("check_judge_dependent", {
                "check": check.name, "passing": [r.data["judge"] for r in passed],
                "failing": [r.data["judge"] for r in found if r.code != "check_passed"]}))
        table.append({"check": check.name, "rule": check.rule, "passed": len(passed) == len(found),
                      "judges": {r.data["judge"]: r.to_dict() for r in found}})
    failed = [t["check"] for t in table if not t["passed"]]
    basis = Reason("hold" if failed else "ship", {"failed": failed, "checks": [t["check"] for t in table]})
    reasons.append(basis)
    return {"verdict": basis.code, "basis": basis.to_dict(), "reasons": [r.to_dict() for r in reasons],
            "explanation": [render(r) for r in reasons], "checks": table}


def judge_check(check: Check, rows: list[dict[str, Any]], spec: str) -> Reason:
    """``check_passed`` or ``check_failed`` for one judge, with the numbers behind it."""
    said = [r["judges"][spec] for r in rows]
    head = {"check": check.name, "rule": check.rule, "judge": spec, "n": len(rows), "alpha": check.alpha}
    if check.rule == "not_worse":
        diffs = [s["candidate"] - s["replaced"] if s["candidate"] is not None else 2 * s["preference"] - 1
                 for s in said]
        return _not_worse(head, diffs, check.margin, check.alpha)
    if any(s["candidate"] is None for s in said):
        raise InputError(f"judge {spec} compares two answers; rule {check.rule} needs a judge that scores one "
                         "(python:, reward-model:, openai-rubric:)", field=f"gate.{check.name}.judge")
    k = sum(s["candidate"] >= PASS for s in said)
    return _share(head, k, len(said), check.threshold or 0.0, check.alpha, at_least=check.rule == "at_least")


def _not_worse(head: dict, diffs: list[float], margin: float, alpha: float) -> Reason:
    mean = statistics.fmean(diffs)
    sd = statistics.stdev(diffs) if len(diffs) > 1 else 0.0
    low = stats.mean_ci(diffs, level=1 - 2 * alpha)[1] if sd > 0 and len(diffs) > 1 else mean
    z = NormalDist().inv_cdf(1 - alpha) + NormalDist().inv_cdf(POWER)
    needed = math.ceil((z * sd / (mean + margin)) ** 2) if mean + margin > 0 and sd > 0 else None
    data = {**head, "mean_diff": mean, "lower": low, "margin": margin, "prompts_needed": needed,
            "shortfall": max(0.0, -margin - low)}
    return Reason("check_passed" if low > -margin else "check_failed", data)


def _share(head: dict, k: int, n: int, threshold: float, alpha: float, *, at_least: bool) -> Reason:
    lo, hi = stats.wilson_interval(k, n, 1 - 2 * alpha)
    bound = lo if at_least else hi
    ok = bound >= threshold if at_least else bound <= threshold
    data = {**head, "passing": k, "share": k / n if n else 0.0, "bound": bound, "threshold": threshold,
            "shortfall": 0.0 if ok else abs(threshold - bound),
            "prompts_needed": None if ok else _prompts_to_clear(k / n if n else 0.0, threshold, alpha, at_least)}
    return Reason("check_passed" if ok else "check_failed", data)


def _prompts_to_clear(share: float, threshold: float, alpha: float, at_least: bool) -> int | None:
    """Prompts at which the observed share's Wilson bound would clear the threshold; None when it never can
    (the share itself is on the wrong side)."""
    if (share <= threshold) if at_least else (share >= threshold):
        return None
    ok = (lambda n: stats.wilson_interval(share * n, n, 1 - 2 * alpha)[0] >= threshold) if at_least else \
        (lambda n: stats.wilson_interval(share * n, n, 1 - 2 * alpha)[1] <= threshold)
    hi = 1
    while not ok(hi):
        hi *= 2
        if hi > 10**7:
            return None
    lo = hi // 2
    while lo + 1 < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if ok(mid) else (mid, hi)
    return hi


def table_cells(rule: str, r: dict[str, Any]) -> tuple[str, str]:
    """(evidence, interval bound) of one judge's record, for the gate tables of the report and the model card."""
    if rule == "not_worse":
        return f"mean diff {r['mean_diff']:+.3f} on {r['n']}", f"{r['lower']:+.3f} > -{r['margin']:g}"
    side = ">=" if rule == "at_least" else "<="
    return f"{r['passing']} of {r['n']} ({r['share']:.3f})", f"{r['bound']:.3f} {side} {r['threshold']:g}"
