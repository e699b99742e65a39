"""The verdict over an ablation matrix: switch objective, keep it, not decisive, or fall back to ORPO.

Three parts: statistics (:class:`Stats`: paired comparison records), rules (:class:`_Rules`: the verdict and
``Reason(code, data)`` records, no prose) and a renderer (preftune/reasons.py: sentences from the records).

    preftune decide matrix/                         # writes matrix/decision.json

Every comparison is paired: two cells scored on the same held-out pairs (joined by ``id``) are compared with
McNemar's exact test on the pairs only one of them ranks correctly, a paired bootstrap interval of the accuracy
difference, and the pairs a test would need (Connor) -- under the run's own reward and under every
objective-free yardstick (preftune/yardsticks.py: reference-relative ``refrel``, length-normalized ``lennorm``).

Verdict rules: see ``RULES`` (the report shows them).

Several seeds per (objective, rank) are pooled per pair: a pair's correctness is its mean over seeds, the
accuracy is the mean over pairs (= the mean of the seeds' accuracies), and McNemar becomes a sign test over
pairs on which one side is right more often -- pairs stay the independent unit.
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from statistics import NormalDist
from typing import Any

from ..core import objectives
from ..core.config import load_yaml
from ..core.errors import InputError
from ..core.files import atomic_write_json
from ..evaluation import stats, yardsticks
from ..evaluation.review import NUMERIC, Log, Review, clean_json, diagnose, load, margin_gap
from .reasons import Reason, render, render_summary

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
MEANINGFUL = 0.05                     # accuracy difference a "keep" must have been able to detect
NO_INFLATION = 0.25                   # a train-held-out gap of at most this share of the training margin is fine
LENGTH_SHIFT = 0.2                    # a behaviour win with generations 20% longer or shorter is suspect
COMMON = tuple(y.name for y in yardsticks.logprob_yardsticks())  # objective-free: the fair ground between objectives
YARDSTICKS = {"own": "margin", **{y: f"{y}_margin" for y in COMMON}}
BEHAVIOUR = yardsticks.BEHAVIOUR     # what the model writes, judged against the reference (cells with gen_eval)
DIVERGED_WORDS = ("nan", "inf", "diverg")


@dataclass
class Group:
    """One (objective, lora_rank) over its seeds."""

    name: str
    objective: str
    lora_rank: int
    cells: list[dict] = field(default_factory=list)
    correct: dict[str, dict[str, float]] = field(default_factory=dict)   # yardstick -> id -> mean over seeds

    def mean(self, key: str) -> float | None:
        xs = [c[key] for c in self.cells if c.get(key) is not None and math.isfinite(c[key])]
        return statistics.fmean(xs) if xs else None

    @property
    def accuracy(self) -> float:
        own = self.correct["own"]
        return statistics.fmean(own.values()) if own else 0.0

    @property
    def pairs(self) -> int:
        return len(self.correct["own"])

    @property
    def ci(self) -> tuple[float, float]:
        return stats.wilson_interval(self.accuracy * self.pairs, self.pairs)

    @property
    def unstable(self) -> bool:
        return any(c["unstable"] for c in self.cells)

    @property
    def spec(self) -> objectives.Objective:
        return objectives.get(self.objective)

    def gen(self, key: str) -> float | None:
        """A behavioural number (gen_eval) averaged over the seeds, None without a behavioural evaluation."""
        xs = [c["gen_eval"][key] for c in self.cells if c.get("gen_eval") and c["gen_eval"].get(key) is not None]
        return statistics.fmean(xs) if xs and len(xs) == len(self.cells) else None

    def problems(self) -> list[str]:
        """The finding codes that make it unstable (nonfinite, divergence, not_learned, at_chance)."""
        return sorted({f["code"] for c in self.cells for f in c["findings"] if f["code"] in
                       ("nonfinite", "divergence", "not_learned", "at_chance")})

    def spread(self) -> float:
        """Held-out margin std relative to its mean (scale-free); inf when the mean margin is 0 or unknown."""
        std, margin = self.mean("margin_std"), self.mean("margin")
        return std / abs(margin) if std is not None and margin else math.inf

    def gap_share(self) -> float:
        """Share of the training margin that does not reach the held-out pairs; inf when unknown."""
        gap, train = self.mean("margin_gap"), self.mean("train_margin")
        return gap / train if gap is not None and train and train > 0 else math.inf

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "objective": self.objective, "lora_rank": self.lora_rank,
                "seeds": [c["seed"] for c in self.cells], "accuracy": self.accuracy, "ci": list(self.ci),
                "seed_accuracies": [c["accuracy"] for c in self.cells], "margin": self.mean("margin"),
                "margin_gap": self.mean("margin_gap"), "margin_std": self.mean("margin_std"),
                "pairs": self.pairs, "unstable": self.unstable}


def decide(matrix_dir: str | Path, *, alpha: float = 0.05, baseline: dict | None = None,
           n_boot: int = 10000) -> dict:
    """Compare the matrix's finished cells on their shared held-out pairs and return the decision.json dict.

        d = decide("matrix/")               # preftune decide matrix/
        print(d["verdict"], d["objective"], d["lora_rank"], d["summary"])
    """
    st = Stats(Path(matrix_dir), alpha, n_boot)
    return _Rules(st, st.baseline(baseline)).run()


def write_decision(matrix_dir: str | Path, decision: dict) -> Path:
    """Write ``decision.json`` into the matrix folder (atomically, strict JSON) and return its path."""
    path = Path(matrix_dir) / "decision.json"
    atomic_write_json(path, clean_json(decision))
    return path


# --- loading -------------------------------------------------------------------------------------------------

def read_matrix(matrix_dir: Path) -> tuple[dict, list[dict]]:
    """(factors, cells) of matrix.json, validated."""
    path = matrix_dir / "matrix.json"
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise InputError(f"cannot read: {e.strerror} (is this a matrix folder?)", path=str(path)) from None
    except json.JSONDecodeError as e:
        raise InputError(f"not valid JSON ({e.msg})", path=str(path), line=e.lineno) from None
    cells = obj.get("cells") if isinstance(obj, dict) else None
    if not isinstance(cells, list) or not all(isinstance(c, dict) and isinstance(c.get("name"), str)
                                              for c in cells):
        raise InputError("needs a 'cells' list of objects with a 'name'", path=str(path), field="cells")
    factors = obj.get("factors") or {}
    if not isinstance(factors, dict):
        raise InputError("must be an object of factor: [values]", path=str(path), field="factors")
    return factors, cells


def load_cell(matrix_dir: Path, entry: dict, folder: Path | None = None) -> tuple[dict, Log | None]:
    """A decision.json cell entry (statistics filled in when finished) and the cell's loaded log (the run
    folder ``matrix/cells/<name>``, or ``folder``)."""
    values = entry.get("values") or {}
    status = entry.get("status", "finished")
    out: dict[str, Any] = {"name": entry["name"], "status": status, "error": entry.get("error"),
                           "objective": values.get("objective"), "lora_rank": values.get("lora_rank"),
                           "seed": values.get("seed")}
    if status != "finished":
        return out, None
    folder = folder or matrix_dir / "cells" / entry["name"]
    cfg = load_yaml(folder / "config.yaml")
    out.update({k: cfg.get(k) for k in ("objective", "lora_rank", "seed") if out[k] is None})
    if not isinstance(out["objective"], str) or not isinstance(out["lora_rank"], int):
        raise InputError("needs 'objective' (text) and 'lora_rank' (integer)", path=str(folder / "config.yaml"))
    log = load(folder)
    if not log.pairs:
        raise InputError("a finished cell needs eval_pairs.jsonl", path=str(folder))
    rev = Review(log.source, log.kind, diagnose(log))
    margins = [p["margin"] for p in log.pairs if math.isfinite(p["margin"])]
    k, n = sum(bool(p["correct"]) for p in log.pairs), len(log.pairs)
    gap = margin_gap(log)
    out.update(accuracy=k / n, ci=list(stats.wilson_interval(k, n)), pairs=n,
               margin=statistics.fmean(margins) if margins else None,
               margin_gap=gap[2] if gap else None, train_margin=gap[0] if gap else None,
               margin_std=statistics.stdev(margins) if len(margins) > 1 else None,
               unstable=rev.unstable, findings=[f.to_dict() for f in rev.findings])
    if g := log.gen_eval:  # what the cell's policy writes, against the shared reference generations
        out["gen_eval"] = {**{k: g.get(k) for k in ("prompts", "win_rate", "win_rate_ci", "tie_rate", "lc_win_rate",
                                                     "lc_win_rate_se", "len_ratio")},
                           "policy_len": g["policy"]["mean_len"], "reference_len": g["reference"]["mean_len"]}
    return out, log


def _correct(rows: list[dict], key: str) -> dict[str, float] | None:
    if key == "margin":
        return {str(r["id"]): float(bool(r["correct"])) for r in rows}
    if not all(isinstance(r.get(key), (int, float)) for r in rows):
        return None
    return {str(r["id"]): float(r[key] > 0) for r in rows}


def _group(cells: list[tuple[dict, Log]], by: tuple[str, ...] = ("objective", "lora_rank")) -> list[Group]:
    groups: dict[tuple, Group] = {}
    for cell, log in cells:
        key = tuple(cell[k] for k in by)
        g = groups.setdefault(key, Group(cell["name"], cell["objective"], cell["lora_rank"]))
        g.cells.append(cell | {"_pairs": log.pairs, "_gen": log.generations})
    for g in groups.values():
        if len(g.cells) > 1:
            g.name = f"objective={g.objective},lora_rank={g.lora_rank}"
        sticks = {ys: [_correct(c["_pairs"], key) for c in g.cells] for ys, key in YARDSTICKS.items()}
        # behaviour: the judge's preference over the reference, per prompt
        sticks[BEHAVIOUR] = [c["_gen"] and {str(r["id"]): float(r["preference"]) for r in c["_gen"]} for c in g.cells]
        for ys, per_seed in sticks.items():
            if all(per_seed):
                ids = set.intersection(*(set(p) for p in per_seed))
                g.correct[ys] = {i: statistics.fmean(p[i] for p in per_seed) for i in sorted(ids)}
        for c in g.cells:
            del c["_pairs"], c["_gen"]
    return list(groups.values())


# --- statistics ----------------------------------------------------------------------------------------------

class Stats:
    """The matrix's cells, grouped per (objective, rank), and paired comparison records between groups."""

    def __init__(self, matrix_dir: Path, alpha: float, n_boot: int, loaded: list | None = None,
                 by: tuple[str, ...] = ("objective", "lora_rank")) -> None:
        """The matrix's cells from matrix.json, or ``loaded`` (cell, log) pairs grouped ``by`` (iterate's rounds)."""
        self.dir, self.alpha, self.n_boot, self.factors = matrix_dir, alpha, n_boot, {}
        if loaded is None:
            self.factors, entries = read_matrix(matrix_dir)
            loaded = [load_cell(matrix_dir, e) for e in entries]
        self.cells = [c for c, _ in loaded]
        self.groups = _group([(c, log) for c, log in loaded if log is not None], by)
        self.comparisons: dict[tuple[str, str, str], dict] = {}

    def baseline(self, given: dict | None) -> dict:
        if given:
            if "objective" not in given or "lora_rank" not in given:
                raise InputError("baseline needs 'objective' and 'lora_rank'", field="baseline")
            if self.find(given["objective"], int(given["lora_rank"])) is None:
                raise InputError(f"no finished cell with objective {given['objective']} and lora_rank "
                                 f"{given['lora_rank']}", path=str(self.dir), field="baseline")
            return {"objective": given["objective"], "lora_rank": int(given["lora_rank"])}
        first = next((c for c in self.cells if c["objective"] is not None), None)
        return {k: (self.factors.get(k) or [first and first[k]])[0] for k in ("objective", "lora_rank")}

    def find(self, objective: str, rank: int) -> Group | None:
        return next((g for g in self.groups if g.objective == objective and g.lora_rank == rank), None)

    def compare(self, a: Group, b: Group, yardstick: str = "own") -> dict | None:
        """McNemar, paired bootstrap and sample sizes of ``a`` vs ``b`` on their shared pairs, or None."""
        key = (a.name, b.name, yardstick)
        if key not in self.comparisons:
            ca, cb = a.correct.get(yardstick), b.correct.get(yardstick)
            ids = sorted(set(ca) & set(cb)) if ca and cb else []
            if not ids:
                return None
            xa, xb = [ca[i] for i in ids], [cb[i] for i in ids]
            a_only, b_only = sum(x > y for x, y in zip(xa, xb)), sum(y > x for x, y in zip(xa, xb))
            acc_a, acc_b = statistics.fmean(xa), statistics.fmean(xb)
            discordant = statistics.fmean(abs(x - y) for x, y in zip(xa, xb))
            diff, lo, hi = stats.paired_bootstrap(xa, xb, n_boot=self.n_boot, seed=0)
            self.comparisons[key] = {
                "a": a.name, "b": b.name, "yardstick": yardstick, "n": len(ids), "acc_a": acc_a, "acc_b": acc_b,
                "diff": diff, "ci": [lo, hi], "mcnemar_p": stats.mcnemar_exact(a_only, b_only),
                "a_only": a_only, "b_only": b_only, "discordant": discordant,
                "pairs_needed": stats.pairs_needed(acc_a, acc_b, discordant, alpha=self.alpha),
                "pairs_to_detect": stats.pairs_needed(acc_b + MEANINGFUL, acc_b, discordant, alpha=self.alpha)}
        return self.comparisons[key]

    def common(self, c: Group, base: Group) -> list[dict]:
        return [y for y in (self.compare(c, base, y) for y in COMMON) if y]

    def primary(self, c: Group, base: Group) -> dict | None:
        """The common-yardstick comparison with the most evidence for the challenger (a gain before a loss), its p
        Bonferroni-adjusted over the yardsticks.

        Own rewards are not comparable across objectives (SimPO's is a length-normalized log-prob that can rank
        pairs well before any training, DPO's starts at an exact tie), so objectives are judged here.
        """
        ys = self.common(c, base)
        if not ys:
            return self.compare(c, base)  # logs without yardsticks: own reward is all there is
        best = min(ys, key=lambda y: (y["diff"] <= 0, y["mcnemar_p"], -y["diff"]))  # the challenger's best case
        return {**best, "mcnemar_p": min(1.0, best["mcnemar_p"] * len(ys)), "p_raw": best["mcnemar_p"]}


def _short(cmp: dict) -> dict:
    """The numbers of a comparison a reason carries."""
    return {k: cmp[k] for k in ("a", "b", "yardstick", "n", "acc_a", "acc_b", "diff", "ci", "mcnemar_p",
                                "a_only", "b_only")}


def _margins(c: Group, base: Group) -> dict:
    return {"gap": c.mean("margin_gap"), "gap_share": c.gap_share(), "spread": c.spread(),
            "baseline_gap": base.mean("margin_gap"), "baseline_gap_share": base.gap_share(),
            "baseline_spread": base.spread()}


def cleaner(c: Group, base: Group) -> str:
    """``cleaner``, ``equal`` or ``not_cleaner``: a smaller share of the training margin lost on held-out pairs
    (or no inflation on either side) and a held-out margin spread no larger; equal numbers are not cleaner."""
    m = _margins(c, base)
    if all(math.isclose(m[k], m[f"baseline_{k}"], rel_tol=1e-9) or m[k] == m[f"baseline_{k}"]
           for k in ("gap_share", "spread")):
        return "equal"
    gap = m["gap_share"] < m["baseline_gap_share"] or max(m["gap_share"], m["baseline_gap_share"]) <= NO_INFLATION
    return "cleaner" if gap and m["spread"] <= m["baseline_spread"] else "not_cleaner"


# --- rules -----------------------------------------------------------------------------------------------------

class _Rules:
    """The verdict rules (``RULES``), each step recorded as a Reason with its numbers."""

    def __init__(self, st: Stats, baseline: dict) -> None:
        self.st, self.alpha, self.baseline = st, st.alpha, baseline
        self.reasons: list[Reason] = []
        self.blocked: list[Reason] = []      # significant lifts that failed another switch condition
        self.basis_notes: list[Reason] = []  # where behaviour disagrees with the pairs: the summary says so

    def add(self, code: str, **data: Any) -> Reason:
        r = Reason(code, data)
        self.reasons.append(r)
        return r

    def run(self) -> dict:
        verdict, chosen, basis = self._verdict()
        st = self.st
        fallback = objectives.fallback() if verdict == "fallback_orpo" else self.baseline["objective"]
        basis = Reason(basis.code, {**basis.data, "behaviour": [r.to_dict() for r in self.basis_notes]})
        return {"verdict": verdict, "objective": chosen.objective if chosen else fallback,
                "lora_rank": chosen.lora_rank if chosen else self.baseline["lora_rank"],
                "baseline": self.baseline, "summary": render_summary(basis), "basis": basis.to_dict(),
                "reasons": [r.to_dict() for r in self.reasons], "explanation": [render(r) for r in self.reasons],
                "comparisons": list(st.comparisons.values()), "cells": st.cells,
                **({"groups": [g.to_dict() for g in st.groups]} if any(len(g.cells) > 1 for g in st.groups)
                   else {})}

    def _verdict(self) -> tuple[str, Group | None, Reason]:
        st = self.st
        for c in st.cells:
            if c["status"] != "finished":
                self.add("cell_not_finished", cell=c["name"], status=c["status"], error=c["error"])
        fallback = self._fallback()
        if fallback:
            return fallback
        base = st.find(self.baseline["objective"], self.baseline["lora_rank"])
        if base is None:
            return "not_decisive", None, self.add("baseline_missing", **self.baseline)
        challengers = self._challengers(base)
        if not challengers:
            self.add("single_objective", objective=base.objective)
            chosen = self._rank(base)
            return "not_decisive", chosen, Reason("single_objective", {"objective": base.objective,
                                                                       "lora_rank": chosen.lora_rank})
        winners = [c for c, cmp in challengers if self._switch(c, base, cmp, len(challengers))]
        if winners:
            win = max(winners, key=lambda g: g.accuracy)
            cmp = st.primary(win, base)
            chosen = self._rank(win)
            if chosen is not win:
                self.add("direct_vs_baseline", **_short(st.compare(chosen, base)))
            return "switch", chosen, Reason("switch", {"from": base.objective, "to": win.objective,
                                                       "lora_rank": chosen.lora_rank, **_short(cmp)})
        keep, need = self._keep(base, challengers)
        chosen = self._rank(base)
        if keep:
            return "keep", chosen, Reason("keep", {"objective": base.objective, "lora_rank": chosen.lora_rank,
                                                   "pairs": base.pairs, "meaningful": MEANINGFUL})
        others = sorted({c.objective for c, _ in challengers})
        return "not_decisive", chosen, Reason("not_decisive", {
            "baseline": base.objective, "baseline_learned": not (base.unstable or base.ci[0] <= 0.5), "others": others,
            "blocked": [b.to_dict() for b in self.blocked], "pairs_needed": need})

    def _fallback(self) -> tuple[str, Group | None, Reason] | None:
        st = self.st
        judged = [g for g in st.groups if g.spec.judged]
        crashed = [c for c in st.cells if c["status"] == "failed" and c["objective"]
                   and objectives.get(c["objective"]).judged
                   and any(w in (c["error"] or "").lower() for w in DIVERGED_WORDS)]
        if not (judged or crashed) or any(not g.unstable for g in judged):
            return None
        numeric = crashed or any(set(g.problems()) & set(NUMERIC) for g in judged)
        if not numeric:
            return "not_decisive", None, self.add("all_at_chance", cells=[
                {"cell": g.name, "accuracy": g.accuracy, "ci": list(g.ci), "problems": g.problems()} for g in judged])
        self.add("all_unstable", cells=[{"cell": g.name, "problems": g.problems()} for g in judged],
                 failed=[{"cell": c["name"], "error": c["error"]} for c in crashed])
        families = {g.spec.family for g in judged} | {objectives.get(c["objective"]).family for c in crashed}
        for missing in sorted(set(objectives.PREFERENCE_FAMILIES) - families):
            self.add("family_not_tried", family=missing)
        name = objectives.fallback()
        fb = [g for g in st.groups if g.spec.fallback]
        if fb and all(g.unstable for g in fb):
            return "not_decisive", None, self.add("fallback_unstable", objective=name,
                                                  cells=[{"cell": g.name, "problems": g.problems()} for g in fb])
        if not fb:
            return "fallback_orpo", None, self.add("fallback_not_run", objective=name)
        best = self._rank(max((g for g in fb if not g.unstable), key=lambda g: g.accuracy))
        return "fallback_orpo", best, Reason("fallback", {"objective": best.objective, "lora_rank": best.lora_rank,
                                                          "accuracy": best.accuracy})

    def _challengers(self, base: Group) -> list[tuple[Group, dict]]:
        """Each other objective at the baseline's rank (its best cell if that rank did not finish)."""
        st, out = self.st, []
        for objective in dict.fromkeys(g.objective for g in st.groups):
            if objective == base.objective:
                continue
            c = st.find(objective, base.lora_rank)
            if c is None:
                c = max((g for g in st.groups if g.objective == objective), key=lambda g: g.accuracy)
                self.add("stand_in", objective=objective, lora_rank=base.lora_rank, cell=c.name)
            cmp = st.compare(c, base)
            if cmp is None:
                self.add("no_shared_pairs", a=c.name, b=base.name)
                continue
            self.add("comparison", **_short(cmp), yardsticks=[
                {"yardstick": y["yardstick"], "diff": y["diff"], "mcnemar_p": y["mcnemar_p"]}
                for y in st.common(c, base)])
            out.append((c, st.primary(c, base)))
            self._behaviour(c, base, out[-1][1])
        return out

    def _behaviour(self, c: Group, base: Group, primary: dict) -> None:
        """When both cells generated: their paired behaviour comparison, and what it says that pairs don't."""
        b = self.st.compare(c, base, BEHAVIOUR)
        if b is None:
            return
        keys = ("win_rate", "lc_win_rate", "policy_len")
        nums = {f"{k}_{s}": g.gen(k) for k in keys for s, g in (("a", c), ("b", base))}
        self.add("behaviour_comparison", **_short(b), **nums)
        sig = [x for x in (primary, b) if x["mcnemar_p"] < self.alpha]
        if sig and (primary["diff"] > 0) != (b["diff"] > 0) and primary["diff"] != 0 and b["diff"] != 0:
            self.basis_notes.append(self.add("pairs_behaviour_disagree", cell=c.name, pairs=_short(primary),
                                             behaviour=_short(b)))
        raw, lc = (nums["win_rate_a"], nums["win_rate_b"]), (nums["lc_win_rate_a"], nums["lc_win_rate_b"])
        la, lb = nums["policy_len_a"], nums["policy_len_b"]
        if None in raw + lc or raw[0] - raw[1] < MEANINGFUL:
            return
        if lc[0] - lc[1] < (raw[0] - raw[1]) / 2:  # more than half of the raw gain disappears once length is held
            self.basis_notes.append(self.add("lc_erases_win", cell=c.name, win_rate_a=raw[0], win_rate_b=raw[1],
                                             lc_win_rate_a=lc[0], lc_win_rate_b=lc[1]))
        if la and lb and abs(la / lb - 1) >= LENGTH_SHIFT:
            self.basis_notes.append(self.add("win_with_length_shift", cell=c.name, policy_len_a=la, policy_len_b=lb,
                                             len_change=la / lb - 1))

    def _switch(self, c: Group, base: Group, cmp: dict, k: int) -> bool:
        st, level = self.st, self.alpha / k
        more = (cmp["acc_a"] - cmp["acc_b"]) * cmp["n"] >= 1 - 1e-9
        if not more or cmp["mcnemar_p"] >= self.alpha:
            own = st.compare(c, base)
            if own and own["yardstick"] != cmp["yardstick"] and own["diff"] > 0 and own["mcnemar_p"] < self.alpha:
                self.blocked.append(self.add("own_reward_only", cell=c.name, objective=c.objective, own=_short(own),
                                             best=_short(cmp)))
            return False
        behaviour = [b] if (b := st.compare(c, base, BEHAVIOUR)) else []
        worse = [y for y in st.common(c, base) + behaviour
                 if y["yardstick"] != cmp["yardstick"] and y["diff"] < 0 and y["mcnemar_p"] < self.alpha]
        lo, hi = stats.wilson_interval(cmp["acc_a"] * cmp["n"], cmp["n"])
        margins = cleaner(c, base)
        common = {"cell": c.name, "objective": c.objective, **_short(cmp)}
        if cmp["mcnemar_p"] >= level:
            r = Reason("not_significant_adjusted", {**common, "level": level, "challengers": k})
        elif c.unstable:
            r = Reason("challenger_unstable", {**common, "problems": c.problems()})
        elif lo <= 0.5:
            r = Reason("not_above_chance", {**common, "ci_low": lo})
        elif margins != "cleaner":
            r = Reason("margins_equal" if margins == "equal" else "margins_not_cleaner",
                       {**common, **_margins(c, base)})
        elif worse:
            r = Reason("worse_other_yardstick", {**common, "worse": [_short(y) for y in worse]})
        else:
            self.add("switch_rule_met", **common, level=level, alpha=self.alpha, challengers=k, ci_low=lo, ci_high=hi,
                     **_margins(c, base))
            return True
        self.reasons.append(r)
        self.blocked.append(r)
        return False

    def _keep(self, base: Group, challengers: list[tuple[Group, dict]]) -> tuple[bool, int | None]:
        """(whether the evidence supports staying with the baseline, held-out pairs that would settle it)."""
        keep, need = not (base.unstable or base.ci[0] <= 0.5), []
        if base.unstable:
            self.add("baseline_unstable", cell=base.name, problems=base.problems())
        elif base.ci[0] <= 0.5:
            self.add("baseline_not_above_chance", cell=base.name, accuracy=base.accuracy, ci=list(base.ci))
        for c, cmp in challengers:
            if c.unstable:
                self.add("challenger_unstable", cell=c.name, objective=c.objective, problems=c.problems(),
                         favours="baseline")
                continue
            significant = cmp["mcnemar_p"] < self.alpha
            if significant and cmp["diff"] < 0:
                self.add("baseline_better", **_short(cmp))
                continue
            margins = cleaner(c, base)
            to_detect = cmp["pairs_to_detect"]
            powered = to_detect is not None and cmp["n"] >= to_detect
            if not significant and margins != "cleaner" and powered:
                self.add("no_difference", **_short(cmp), pairs_to_detect=to_detect, meaningful=MEANINGFUL)
                continue
            keep = False
            if significant:
                continue  # a real lift that failed another switch condition: reported by _switch
            need.append(cmp["pairs_needed"] or to_detect)
            self.add("not_significant", **_short(cmp), **self._settle(c, base, cmp), margins=margins,
                     **(_margins(c, base) if margins == "cleaner" else {}),
                     pairs_to_detect=to_detect, powered=powered, meaningful=MEANINGFUL,
                     # no pairs can detect it: the baseline is at the ceiling, or the two runs never disagree
                     power_unknown=None if to_detect is not None else
                     "ceiling" if cmp["acc_b"] + MEANINGFUL > 1 else "zero_variance")
        return keep, max((x for x in need if x), default=None)

    def _settle(self, c: Group, base: Group, cmp: dict) -> dict:
        """Held-out pairs (and seeds) that would settle a difference that is not significant."""
        accs = [[x["accuracy"] for x in g.cells] for g in (c, base)]
        out: dict[str, Any] = {"pairs_needed": cmp["pairs_needed"], "seeds": min(len(a) for a in accs)}
        if out["seeds"] < 2:
            return out
        sd = math.sqrt((statistics.variance(accs[0]) + statistics.variance(accs[1])) / 2)
        d = abs(statistics.fmean(accs[0]) - statistics.fmean(accs[1]))
        z = NormalDist().inv_cdf(1 - self.alpha / 2) + NormalDist().inv_cdf(0.8)
        return {**out, "seed_sd": sd, "seeds_needed": math.ceil(2 * (z * sd / d) ** 2) if d > 0 and sd > 0 else None}

    def _rank(self, anchor: Group) -> Group:
        """Rule 2: the lowest rank of ``anchor``'s objective not significantly different from its best rank."""
        st = self.st
        same = [g for g in st.groups if g.objective == anchor.objective and (not g.unstable or g is anchor)]
        top = max(same, key=lambda g: (g.accuracy, -g.lora_rank))
        for g in sorted(same, key=lambda g: g.lora_rank):
            if g is top:
                break
            cmp = st.compare(g, top)
            if cmp and cmp["mcnemar_p"] >= self.alpha:
                self.add("lower_rank_equivalent", objective=g.objective, lora_rank=g.lora_rank,
                         best_rank=top.lora_rank, **_short(cmp), train_margin=g.mean("train_margin"),
                         best_train_margin=top.mean("train_margin"))
                return g
        if len(same) > 1:
            self.add("best_rank", objective=top.objective, lora_rank=top.lora_rank, accuracy=top.accuracy,
                     lower_ranks_worse=top.lora_rank > min(g.lora_rank for g in same))
        return top


# --- rounds of preftune iterate ----------------------------------------------------------------------------------

def decide_rounds(iter_dir: str | Path, *, alpha: float = 0.05, n_boot: int = 10000) -> dict:
    """Did the last round beat the first, and should iterating go on? (``preftune decide iter/``)

    Rounds are compared with the same paired tests as matrix cells, on the same held-out pairs and prompts:
    behaviour (against the original reference, shared by every round) and the yardsticks whose reference every
    round shares (``--reference initial``: all of them; ``round``: the reference-free ones). Verdict ``continue``
    when the last round gained significantly over the one before on one of them, the gain is not only length,
    and what the policy writes did not get worse (a log-prob gain with a lower win rate is ``round_pairs_only``:
    what users ship is the generations); else ``stop``. "Beats the first" follows the same rule.
    """
    root = Path(iter_dir)
    try:
        meta = json.loads((root / "iterate.json").read_text())
    except (OSError, ValueError):
        raise InputError("not an iterate folder (no iterate.json)", path=str(root)) from None
    folders = sorted((p for p in root.glob("round-*") if (p / "summary.json").exists()
                      and json.loads((p / "summary.json").read_text()).get("status") == "finished"),
                     key=lambda p: int(p.name.split("-")[1]))
    if not folders:
        raise InputError("no finished round", path=str(root))
    loaded = [load_cell(root, {"name": p.name}, p) for p in folders]
    for cell, _ in loaded:
        cell["round"] = int(cell["name"].split("-")[1])
    st = Stats(root, alpha, n_boot, loaded, by=("round",))  # a matrix's statistics, over rounds
    same_ref = meta["settings"]["reference"] == "initial"
    sticks = [BEHAVIOUR] + [y.name for y in yardsticks.logprob_yardsticks() if same_ref or not y.needs_reference]
    reasons: list[Reason] = []

    def gain(a: Group, b: Group) -> tuple[list[dict], dict | None]:
        """(significant gains, the behaviour comparison when it falls while only log-prob yardsticks rose)."""
        cmps = [c for c in (st.compare(a, b, y) for y in sticks) if c]
        up = [c for c in cmps if c["diff"] > 0 and c["mcnemar_p"] < alpha]
        down = [c for c in cmps if c["diff"] < 0 and c["mcnemar_p"] < alpha]
        reasons.append(Reason("round_comparison", {"a": a.name, "b": b.name, "gains": [_short(c) for c in up],
                                                   "losses": [_short(c) for c in down],
                                                   "compared": [c["yardstick"] for c in cmps]}))
        fell = next((c for c in cmps if c["yardstick"] == BEHAVIOUR and c["diff"] < 0), None)
        return up, fell if up else None

    first, last = st.groups[0], st.groups[-1]
    beats, basis = False, Reason("single_round", {"round": last.name})
    if last is not first:
        up, fell = gain(last, first)
        beats, prev = bool(up) and fell is None, st.groups[-2]
        if prev is not first:
            up, fell = gain(last, prev)
        if fell:
            reasons.append(Reason("round_pairs_only", {"round": last.name, "yardsticks": [c["yardstick"] for c in up],
                                                       **_short(fell)}))
        raw = (last.gen("win_rate"), prev.gen("win_rate"))
        lc = (last.gen("lc_win_rate"), prev.gen("lc_win_rate"))
        length_only = (None not in raw + lc and raw[0] - raw[1] > 0 and lc[0] - lc[1] < (raw[0] - raw[1]) / 2
                       and all(c["yardstick"] == BEHAVIOUR for c in up))
        if length_only:
            reasons.append(Reason("round_length_only", {"round": last.name, "win_rate_a": raw[0], "win_rate_b": raw[1],
                                                        "lc_win_rate_a": lc[0], "lc_win_rate_b": lc[1]}))
        basis = Reason("round_gain" if up and not (length_only or fell) else "round_no_gain",
                       {"round": last.name, "previous": prev.name, "last_beats_first": beats, "length_only": length_only,
                        "pairs_only": fell is not None, "yardsticks": [c["yardstick"] for c in up]})
    best = max(st.groups, key=lambda g: (g.gen("win_rate") or 0.0, g.accuracy))
    return {"verdict": "continue" if basis.code == "round_gain" else "stop", "last_beats_first": beats,
            "best_round": best.name, "summary": render_summary(basis), "basis": basis.to_dict(),
            "reasons": [r.to_dict() for r in reasons], "explanation": [render(r) for r in reasons],
            "comparisons": list(st.comparisons.values()), "rounds": st.cells}
