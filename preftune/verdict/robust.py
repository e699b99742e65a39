"""Whether a verdict survives a change of judge and of seed: the rules' checks for several judges and seeds.

    preftune ablate --config c.yaml --judge python:a:j --judge python:b:j --grid seed=1,2,3 --output m/
    preftune decide m/      # judge_robust / judge_dependent per behavioural result, within_seed_spread

The rules (``judge_robust``, ``judge_dependent``, ``within_seed_spread``) and why: docs/decisions.md, Several
judges and several seeds.
"""

from __future__ import annotations

import math
import statistics

from ..evaluation import stats
from .comparisons import Group, Stats, judge_yardstick, short
from .reasons import Reason


def against_reference(st: Stats, g: Group) -> Reason | None:
    """What ``g`` writes against the reference, under each judge; None with fewer than two judges."""
    if len(g.judges) < 2:
        return None
    rows = []
    for spec in g.judges:
        prefs = list(g.correct[judge_yardstick(spec)].values())
        wins, losses = sum(p > 0.5 for p in prefs), sum(p < 0.5 for p in prefs)
        p = stats.mcnemar_exact(wins, losses)
        rows.append({"judge": spec, "n": len(prefs), "win_rate": statistics.fmean(prefs), "wins": wins,
                     "losses": losses, "mcnemar_p": p, "direction": _direction(wins - losses, p, st.alpha)})
    return _verdict(rows, {"cell": g.name, "against": "reference"})


def between(st: Stats, a: Group, b: Group) -> Reason | None:
    """``a`` against ``b`` on what they write, under each judge both have; None with fewer than two."""
    specs = [s for s in a.judges if s in b.judges]
    rows = []
    for spec in specs:
        cmp = st.compare(a, b, judge_yardstick(spec))
        if cmp is None:
            return None
        rows.append({"judge": spec, **short(cmp), "direction": _direction(cmp["diff"], cmp["mcnemar_p"], st.alpha),
                     "prompts_needed": None if cmp["mcnemar_p"] < st.alpha else cmp["pairs_needed"]})
    return _verdict(rows, {"cell": a.name, "against": b.name}) if len(rows) > 1 else None


def _direction(lead: float, p: float, alpha: float) -> str:
    return "not_significant" if p >= alpha or lead == 0 else "better" if lead > 0 else "worse"


def _verdict(rows: list[dict], where: dict) -> Reason:
    odd = [r["judge"] for r in rows if r["direction"] != rows[0]["direction"]]
    if odd:
        return Reason("judge_dependent", {**where, "disagreeing": odd, "judges": rows})
    return Reason("judge_robust", {**where, "direction": rows[0]["direction"], "judges": rows})


def judged_worse(split: Reason | None) -> bool:
    """Whether some judge, not all, finds the cell significantly worse: behaviour the judges disagree about."""
    return bool(split) and split.code == "judge_dependent" and any(
        r["direction"] == "worse" for r in split.data["judges"])


def seed_spread(st: Stats, a: Group, b: Group, cmp: dict) -> Reason | None:
    """``within_seed_spread`` when both groups ran at least two seeds and the difference of their seed means on
    ``cmp``'s yardstick is no larger than either objective's seed-to-seed standard deviation; else None."""
    ys = cmp["yardstick"]
    sa, sb = a.seed_correct.get(ys, []), b.seed_correct.get(ys, [])
    if len(sa) < 2 or len(sb) < 2:
        return None
    ids = set(a.correct[ys]) & set(b.correct[ys])  # the pairs the comparison is on
    acc_a, acc_b = ([statistics.fmean(s[i] for i in ids) for s in side] for side in (sa, sb))
    diff = statistics.fmean(acc_a) - statistics.fmean(acc_b)
    sd_a, sd_b = statistics.stdev(acc_a), statistics.stdev(acc_b)
    if abs(diff) > max(sd_a, sd_b):
        return None
    sd = math.sqrt((sd_a**2 + sd_b**2) / 2)
    return Reason("within_seed_spread", {
        "cell": a.name, "objective": a.objective, **short(cmp), "seeds_a": len(sa), "seeds_b": len(sb),
        "seed_accuracies_a": acc_a, "seed_accuracies_b": acc_b, "seed_diff": diff, "seed_sd_a": sd_a,
        "seed_sd_b": sd_b, "seeds_needed": stats.seeds_needed(sd, diff, alpha=st.alpha)})
