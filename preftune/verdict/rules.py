"""The verdict over a matrix -- switch objective, keep it, not decisive, or fall back to ORPO -- as a table of
small rules. Each rule reads the statistics (comparisons.py) and returns its ``Reason(code, data)`` records,
and the first that reaches a verdict ends the table; reasons.py turns the records into sentences.

    preftune decide matrix/       # the rules below, in order; see RULES for them in words (the report shows them)
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..core import objectives
from ..core.layout import Decision
from ..evaluation import stats
from .comparisons import BEHAVIOUR, MEANINGFUL, Group, Stats, cleaner, margins, short
from .reasons import Reason, render, render_summary
from .robust import against_reference, between, judged_worse, seed_spread

RULES = (
    "switch: objectives are compared on the two common yardsticks (reference-relative and length-normalized), "
    "never on their own rewards, which live on different scales and can differ before any training. The "
    "challenger objective, at the baseline's rank, ranks at least one more held-out pair correctly on a "
    "yardstick with McNemar p (x2 for the two yardsticks) < alpha / (number of challengers), is not "
    "significantly worse on the other yardstick, its accuracy interval is above chance, it is stable, and its "
    "margins are cleaner: a smaller share of its training margin lost on held-out pairs (or at most 25% for "
    "both: no inflation on either side) and a held-out margin std/|mean| not larger.",
    "rank: within the chosen objective, the lowest rank whose held-out accuracy is not significantly different "
    "from the best rank's.",
    "fallback_orpo: every cell of a preference objective (the reference-relative and reference-free families, "
    "the fallback objective aside) is unstable (NaN/inf, diverging loss, no yardstick's held-out accuracy "
    "significantly above its step-0 value, or failed with such an error) and at least one of them is "
    "numerically unstable (NaN/inf or divergence). When every cell merely learned nothing, nothing diverged: the "
    "labels carry no learnable signal (or training was too short), ORPO would not fix that, and the verdict is "
    "not_decisive.",
    "keep: the baseline is stable and learned (above its step-0 value on a yardstick), and against every "
    "challenger either "
    "the baseline is significantly better, the challenger is unstable, or they are not significantly "
    "different while the challenger's margins are not cleaner and the pairs were enough to detect a 5-point "
    "accuracy difference; otherwise not_decisive, with the held-out pairs or seeds that would settle it.",
)
# Shown in the report when a folder has several judges or seeds (where they can apply).
ROBUSTNESS_RULES = (
    "judges: a behavioural result (a cell against the reference, two cells against each other) is judge_robust "
    "when every judge gives it the same way (significantly better, significantly worse, or neither), else "
    "judge_dependent. A switch is refused while any judge, not all, finds the challenger writing significantly "
    "worse, and a round's gain that is behaviour alone does not continue the rounds when it is judge_dependent: "
    "the verdict never acts on behaviour the judges disagree about.",
    "seeds: with several seeds per cell, a difference between objectives whose seed means differ by no more than "
    "either objective's seed-to-seed standard deviation is within_seed_spread: no switch and no keep on it "
    "(not_decisive), with the seeds per cell that would settle it.",
)
LENGTH_SHIFT = 0.2                    # a behaviour win with generations 20% longer or shorter is suspect
DIVERGED_WORDS = ("nan", "inf", "diverg")

Verdict = tuple[str, Group | None, Reason]   # (verdict, the recommended group, the reason that decided it)
Found = tuple[list[Reason], Verdict | None]  # what a rule returns: its reasons, and the verdict if it reached one


@dataclass
class Case:
    """What the rules share: the statistics, the baseline, and what earlier rules found."""

    st: Stats
    baseline: dict
    base: Group | None = None
    challengers: list[tuple[Group, dict]] = field(default_factory=list)  # (group, its primary comparison)
    blocked: list[Reason] = field(default_factory=list)  # significant lifts that failed another switch condition
    notes: list[Reason] = field(default_factory=list)    # where behaviour disagrees with the pairs: the summary says
    judged: set[str] = field(default_factory=set)        # cells whose judges were compared against the reference


def decide_matrix(st: Stats, baseline: dict, data: list[Reason] | None = None) -> Decision:
    """Run the rules table over a matrix's statistics; the Decision with every reason on the way. ``data``: what
    the data audit says about it (verdict/data.py), first among the reasons; a leak is noted in the summary too."""
    case, reasons, verdict = Case(st, baseline), list(data or []), None
    for rule in TABLE:
        found, verdict = rule(case)
        reasons += found
        if verdict:
            break
    name, chosen, basis = verdict  # the last rule always decides
    elsewhere = learned_elsewhere(case) if name == "not_decisive" else []
    reasons += elsewhere
    leaks = [r.to_dict() for r in data or [] if r.code == "heldout_leak"]  # the accuracy it rests on is inflated
    basis = Reason(basis.code, {**basis.data, "behaviour": [r.to_dict() for r in case.notes],
                                **({"elsewhere": [r.to_dict() for r in elsewhere]} if elsewhere else {}),
                                **({"data": leaks} if leaks else {})})
    fallback = objectives.fallback() if name == "fallback_orpo" else baseline["objective"]
    return Decision(verdict=name, summary=render_summary(basis), basis=basis.to_dict(),
                    reasons=[r.to_dict() for r in reasons], explanation=[render(r) for r in reasons],
                    comparisons=list(st.comparisons.values()), cells=st.cells,
                    objective=chosen.objective if chosen else fallback,
                    lora_rank=chosen.lora_rank if chosen else baseline["lora_rank"], baseline=baseline,
                    groups=[g.to_dict() for g in st.groups] if any(len(g.cells) > 1 for g in st.groups) else None)


# --- the rules, in order -----------------------------------------------------------------------------------------

def unfinished(case: Case) -> Found:
    """Cells that did not finish are reported, not compared."""
    return [Reason("cell_not_finished", {"cell": c.name, "status": c.status, "error": c.error})
            for c in case.st.cells if not c.finished], None


def fallback(case: Case) -> Found:
    """Rule 3: every preference-objective cell unstable, one of them numerically: fall back to ORPO."""
    st = case.st
    judged = [g for g in st.groups if g.spec.judged]
    crashed = [c for c in st.cells if c.status == "failed" and c.objective and objectives.get(c.objective).judged
               and any(w in (c.error or "").lower() for w in DIVERGED_WORDS)]
    if not (judged or crashed) or any(not g.unstable for g in judged):
        return [], None
    if not (crashed or any(g.state == "diverged" for g in judged)):
        r = Reason("all_at_chance", {"cells": [{"cell": g.name, "accuracy": g.accuracy, "ci": list(g.ci),
                                                "problems": g.problems()} for g in judged]})
        return [r], ("not_decisive", None, r)
    out = [Reason("all_unstable", {"cells": [{"cell": g.name, "problems": g.problems()} for g in judged],
                                   "failed": [{"cell": c.name, "error": c.error} for c in crashed]})]
    families = {g.spec.family for g in judged} | {objectives.get(c.objective).family for c in crashed}
    out += [Reason("family_not_tried", {"family": f}) for f in sorted(set(objectives.PREFERENCE_FAMILIES) - families)]
    name = objectives.fallback()
    fb = [g for g in st.groups if g.spec.fallback]
    if fb and all(g.unstable for g in fb):
        r = Reason("fallback_unstable", {"objective": name, "cells": [{"cell": g.name, "problems": g.problems()}
                                                                      for g in fb]})
        return [*out, r], ("not_decisive", None, r)
    if not fb:
        r = Reason("fallback_not_run", {"objective": name})
        return [*out, r], ("fallback_orpo", None, r)
    best, ranked = rank(case, max((g for g in fb if not g.unstable), key=lambda g: g.accuracy))
    return [*out, *ranked], ("fallback_orpo", best, Reason("fallback", {
        "objective": best.objective, "lora_rank": best.lora_rank, "accuracy": best.accuracy}))


def baseline_missing(case: Case) -> Found:
    case.base = case.st.find(case.baseline["objective"], case.baseline["lora_rank"])
    if case.base is not None:
        return [], None
    r = Reason("baseline_missing", dict(case.baseline))
    return [r], ("not_decisive", None, r)


def challengers(case: Case) -> Found:
    """Each other objective at the baseline's rank (its best cell if that rank did not finish), compared."""
    st, base, out = case.st, case.base, []
    for objective in dict.fromkeys(g.objective for g in st.groups):
        if objective == base.objective:
            continue
        c = st.find(objective, base.lora_rank)
        if c is None:
            c = max((g for g in st.groups if g.objective == objective), key=lambda g: g.accuracy)
            out.append(Reason("stand_in", {"objective": objective, "lora_rank": base.lora_rank, "cell": c.name}))
        cmp = st.compare(c, base)
        if cmp is None:
            out.append(Reason("no_shared_pairs", {"a": c.name, "b": base.name}))
            continue
        out.append(Reason("comparison", {**short(cmp), "yardsticks": [
            {"yardstick": y["yardstick"], "diff": y["diff"], "mcnemar_p": y["mcnemar_p"]}
            for y in st.common(c, base)]}))
        case.challengers.append((c, st.primary(c, base)))
        out += behaviour(case, c, case.challengers[-1][1])
    return out, None


def single_objective(case: Case) -> Found:
    if case.challengers:
        return [], None
    chosen, ranked = rank(case, case.base)
    said = {"objective": case.base.objective}
    return [Reason("single_objective", said), *ranked], \
        ("not_decisive", chosen, Reason("single_objective", {**said, "lora_rank": chosen.lora_rank}))


def switch(case: Case) -> Found:
    """Rule 1: a challenger that meets every switch condition; the most accurate of them, at its best rank."""
    out, winners, k = [], [], len(case.challengers)
    for c, cmp in case.challengers:
        found, won = switch_conditions(case, c, cmp, k)
        out += found
        winners += [(c, cmp)] if won else []
    if not winners:
        return out, None
    st, base = case.st, case.base
    win, cmp = max(winners, key=lambda w: w[0].accuracy)
    chosen, ranked = rank(case, win)
    out += ranked
    if chosen is not win:
        out.append(Reason("direct_vs_baseline", short(st.compare(chosen, base))))
    return out, ("switch", chosen, Reason("switch", {"from": base.objective, "to": win.objective,
                                                     "lora_rank": chosen.lora_rank, **short(cmp)}))


def keep(case: Case) -> Found:
    """Rule 4: keep the baseline when the evidence supports it, else not decisive with what would settle it."""
    base = case.base
    out, settled, need = keep_clauses(case)
    learned = not (base.unstable or base.ci[0] <= 0.5)
    chosen, ranked = rank(case, base)
    out += ranked
    if learned and settled:
        return out, ("keep", chosen, Reason("keep", {"objective": base.objective, "lora_rank": chosen.lora_rank,
                                                     "pairs": base.pairs, "meaningful": MEANINGFUL}))
    return out, ("not_decisive", chosen, Reason("not_decisive", {
        "baseline": base.objective, "baseline_learned": learned,
        "others": sorted({c.objective for c, _ in case.challengers}),
        "blocked": [b.to_dict() for b in case.blocked], "pairs_needed": need}))


TABLE: tuple[Callable[[Case], Found], ...] = (unfinished, fallback, baseline_missing, challengers, single_objective,
                                              switch, keep)


def learned_elsewhere(case: Case) -> list[Reason]:
    """Cells that learned while the verdict rests on others that didn't: named, with the run that would test
    them (their rank as the baseline's, so a challenger meets them at it)."""
    if case.base is not None and case.base.state == "learned":
        return []  # the verdict rests on a baseline that learned: nothing is hidden behind it
    compared = {id(case.base)} | {id(c) for c, _ in case.challengers}
    out = []
    for g in case.st.groups:
        if id(g) in compared or g.state != "learned" or not g.gains:
            continue
        best = max(g.gains.items(), key=lambda kv: kv[1]["ci"][0] - kv[1]["step0"])
        out.append(Reason("learned_elsewhere", {
            "cell": g.name, "objective": g.objective, "lora_rank": g.lora_rank, "yardstick": best[0],
            "step0": best[1]["step0"], "final": best[1]["final"], "ci_low": best[1]["ci"][0],
            "baseline": {"objective": case.baseline["objective"], "lora_rank": case.baseline["lora_rank"]}}))
    return out


# --- the steps inside them -----------------------------------------------------------------------------------------

def behaviour(case: Case, c: Group, primary: dict) -> list[Reason]:
    """When both cells generated: their paired behaviour comparison, and what it says that pairs don't."""
    base = case.base
    b = case.st.compare(c, base, BEHAVIOUR)
    if b is None:
        return []
    nums = {f"{k}_{s}": g.gen(k) for k in ("win_rate", "lc_win_rate", "policy_len") for s, g in (("a", c), ("b", base))}
    notes = []
    sig = [x for x in (primary, b) if x["mcnemar_p"] < case.st.alpha]
    if sig and (primary["diff"] > 0) != (b["diff"] > 0) and primary["diff"] != 0 and b["diff"] != 0:
        notes.append(Reason("pairs_behaviour_disagree", {"cell": c.name, "pairs": short(primary),
                                                         "behaviour": short(b)}))
    notes += length_notes(c, nums)
    judges = [against_reference(case.st, g) for g in (base, c) if g.name not in case.judged]
    case.judged |= {base.name, c.name}
    judges = [r for r in (*judges, between(case.st, c, base)) if r]
    notes += [r for r in judges if r.code == "judge_dependent" and r.data["against"] == base.name]
    case.notes += notes
    # not significant: the prompts that would detect the observed difference, as pairs_needed for pairs
    need = {"prompts_needed": b["pairs_needed"]} if b["mcnemar_p"] >= case.st.alpha else {}
    return [Reason("behaviour_comparison", {**short(b), **nums, **need}), *notes,
            *(r for r in judges if r not in notes)]


def length_notes(c: Group, nums: dict[str, float | None]) -> list[Reason]:
    """A behaviour win of ``c`` that is mostly length, or comes with much longer or shorter answers."""
    raw, lc = (nums["win_rate_a"], nums["win_rate_b"]), (nums["lc_win_rate_a"], nums["lc_win_rate_b"])
    la, lb = nums["policy_len_a"], nums["policy_len_b"]
    if None in raw + lc or raw[0] - raw[1] < MEANINGFUL:
        return []
    out = []
    if lc[0] - lc[1] < (raw[0] - raw[1]) / 2:  # more than half of the raw gain disappears once length is held
        out.append(Reason("lc_erases_win", {"cell": c.name, "win_rate_a": raw[0], "win_rate_b": raw[1],
                                            "lc_win_rate_a": lc[0], "lc_win_rate_b": lc[1]}))
    if la and lb and abs(la / lb - 1) >= LENGTH_SHIFT:
        out.append(Reason("win_with_length_shift", {"cell": c.name, "policy_len_a": la, "policy_len_b": lb,
                                                    "len_change": la / lb - 1}))
    return out


def switch_conditions(case: Case, c: Group, cmp: dict, k: int) -> tuple[list[Reason], bool]:
    """(its reasons, whether ``c`` meets every switch condition against the baseline)."""
    st, base, alpha = case.st, case.base, case.st.alpha
    more = (cmp["acc_a"] - cmp["acc_b"]) * cmp["n"] >= 1 - 1e-9
    if not more or cmp["mcnemar_p"] >= alpha:
        own = st.compare(c, base)
        if own and own["yardstick"] != cmp["yardstick"] and own["diff"] > 0 and own["mcnemar_p"] < alpha:
            case.blocked.append(Reason("own_reward_only", {"cell": c.name, "objective": c.objective,
                                                           "own": short(own), "best": short(cmp)}))
            return case.blocked[-1:], False
        return [], False
    behaviour = [b] if (b := st.compare(c, base, BEHAVIOUR)) else []
    split, spread = between(st, c, base), seed_spread(st, c, base, cmp)
    worse = [y for y in st.common(c, base) + behaviour  # a behaviour loss the judges disagree about: below
             if y["yardstick"] != cmp["yardstick"] and y["diff"] < 0 and y["mcnemar_p"] < alpha
             and not (y["yardstick"] == BEHAVIOUR and split and split.code == "judge_dependent")]
    level, (lo, hi), clean = alpha / k, stats.wilson_interval(cmp["acc_a"] * cmp["n"], cmp["n"]), cleaner(c, base)
    common = {"cell": c.name, "objective": c.objective, **short(cmp)}
    conditions = (  # the switch conditions in order: the first one failed is the reason the lift is no switch
        (cmp["mcnemar_p"] >= level, lambda: ("not_significant_adjusted", {"level": level, "challengers": k})),
        (spread is not None, lambda: ("within_seed_spread", spread.data)),
        (c.unstable, lambda: (f"challenger_{c.state}", {"problems": c.problems()})),
        (lo <= 0.5, lambda: ("not_above_chance", {"ci_low": lo})),
        (clean != "cleaner", lambda: ("margins_equal" if clean == "equal" else "margins_not_cleaner",
                                      margins(c, base))),
        (bool(worse), lambda: ("worse_other_yardstick", {"worse": [short(y) for y in worse]})),
        (judged_worse(split), lambda: ("judge_dependent", split.data)))
    for failed, why in conditions:
        if failed:
            code, data = why()
            case.blocked.append(Reason(code, {**common, **data}))
            return case.blocked[-1:], False
    return [Reason("switch_rule_met", {**common, "level": level, "alpha": alpha, "challengers": k, "ci_low": lo,
                                       "ci_high": hi, **margins(c, base)})], True


def keep_clauses(case: Case) -> tuple[list[Reason], bool, int | None]:
    """(the reasons for and against keeping the baseline, whether every challenger is settled in its favour,
    the held-out pairs that would settle the open ones)."""
    base, out, settled, need = case.base, [], True, []
    if base.unstable:
        out.append(Reason(f"baseline_{base.state}", {"cell": base.name, "problems": base.problems()}))
    elif base.ci[0] <= 0.5:
        out.append(Reason("baseline_not_above_chance", {"cell": base.name, "accuracy": base.accuracy,
                                                        "ci": list(base.ci)}))
    for c, cmp in case.challengers:
        if c.unstable:  # it favours the baseline only when the baseline itself learned
            out.append(Reason(f"challenger_{c.state}", {"cell": c.name, "objective": c.objective,
                                                        "problems": c.problems(), "baseline_state": base.state,
                                                        "favours": "baseline" if base.state == "learned" else None}))
            continue
        significant = cmp["mcnemar_p"] < case.st.alpha
        if significant and cmp["diff"] < 0:
            spread = seed_spread(case.st, c, base, cmp)
            if spread is not None:  # the baseline's lead is no larger than the seeds' own spread: not settled
                settled = False
                case.blocked.append(spread)
            out.append(spread or Reason("baseline_better", short(cmp)))
            continue
        margin = cleaner(c, base)
        to_detect = cmp["pairs_to_detect"]
        powered = to_detect is not None and cmp["n"] >= to_detect
        if not significant and margin != "cleaner" and powered:
            out.append(Reason("no_difference", {**short(cmp), "pairs_to_detect": to_detect, "meaningful": MEANINGFUL}))
            continue
        settled = False
        if significant:
            continue  # a real lift that failed another switch condition: reported by switch_conditions
        need.append(cmp["pairs_needed"] or to_detect)
        out.append(Reason("not_significant", {
            **short(cmp), **settle(case, c, cmp), "margins": margin,
            **(margins(c, base) if margin == "cleaner" else {}), "pairs_to_detect": to_detect, "powered": powered,
            "meaningful": MEANINGFUL,
            # no pairs can detect it: the baseline is at the ceiling, or the two runs never disagree
            "power_unknown": None if to_detect is not None else
            "ceiling" if cmp["acc_b"] + MEANINGFUL > 1 else "zero_variance"}))
    return out, settled, max((x for x in need if x), default=None)


def settle(case: Case, c: Group, cmp: dict) -> dict:
    """Held-out pairs (and seeds) that would settle a difference that is not significant."""
    accs = [[x.accuracy for x in g.cells] for g in (c, case.base)]
    out: dict[str, Any] = {"pairs_needed": cmp["pairs_needed"], "seeds": min(len(a) for a in accs)}
    if out["seeds"] < 2:
        return out
    sd = math.sqrt((statistics.variance(accs[0]) + statistics.variance(accs[1])) / 2)
    d = abs(statistics.fmean(accs[0]) - statistics.fmean(accs[1]))
    return {**out, "seed_sd": sd, "seeds_needed": stats.seeds_needed(sd, d, alpha=case.st.alpha)}


def rank(case: Case, anchor: Group) -> tuple[Group, list[Reason]]:
    """Rule 2: the lowest rank of ``anchor``'s objective not significantly different from its best rank."""
    st = case.st
    same = [g for g in st.groups if g.objective == anchor.objective and (not g.unstable or g is anchor)]
    top = max(same, key=lambda g: (g.accuracy, -g.lora_rank))
    for g in sorted(same, key=lambda g: g.lora_rank):
        if g is top:
            break
        cmp = st.compare(g, top)
        if cmp and cmp["mcnemar_p"] >= case.st.alpha:
            return g, [Reason("lower_rank_equivalent", {
                "objective": g.objective, "lora_rank": g.lora_rank, "best_rank": top.lora_rank, **short(cmp),
                "train_margin": g.mean("train_margin"), "best_train_margin": top.mean("train_margin")})]
    if len(same) > 1:
        return top, [Reason("best_rank", {"objective": top.objective, "lora_rank": top.lora_rank,
                                          "accuracy": top.accuracy,
                                          "lower_ranks_worse": top.lora_rank > min(g.lora_rank for g in same)})]
    return top, []
