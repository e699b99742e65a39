"""The verdict over an ablation matrix: switch objective, keep it, not decisive, or fall back to ORPO.

    preftune decide matrix/                         # writes matrix/decision.json

Every comparison is paired: two cells scored on the same held-out pairs (joined by ``id``) are compared with
McNemar's exact test on the pairs only one of them ranks correctly, a paired bootstrap interval of the accuracy
difference, and the pairs a test would need (Connor) -- under the run's own reward and under both common
yardsticks (reference-relative ``refrel_margin > 0``, length-normalized ``lennorm_margin > 0``).

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

from . import stats
from .config import load_yaml
from .errors import InputError
from .files import atomic_write_json
from .review import Log, Review, clean_json, diagnose, load, margin_gap

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
    "fallback_orpo: every DPO-family and SimPO cell is unstable (NaN/inf, diverging loss, held-out accuracy at "
    "or below chance, or failed with such an error) and at least one of them is numerically unstable (NaN/inf "
    "or divergence). When every cell merely sits at chance, nothing diverged: the labels carry no learnable "
    "signal (or training was too short), ORPO would not fix that, and the verdict is not_decisive.",
    "keep: the baseline is stable, its accuracy interval is above chance, and against every challenger either "
    "the baseline is significantly better, the challenger is unstable, or they are not significantly "
    "different while the challenger's margins are not cleaner and the pairs were enough to detect a 5-point "
    "accuracy difference; otherwise not_decisive, with the held-out pairs or seeds that would settle it.",
)
NOT_JUDGED = ("orpo", "sft")          # rule 3 judges every other objective: the DPO family and SimPO
FALLBACK = "orpo"
MEANINGFUL = 0.05                     # accuracy difference a "keep" must have been able to detect
NO_INFLATION = 0.25                   # a train-held-out gap of at most this share of the training margin is fine
YARDSTICKS = {"own": "margin", "refrel": "refrel_margin", "lennorm": "lennorm_margin"}
COMMON = ("refrel", "lennorm")        # objective-free yardsticks: the only fair ground between objectives
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
    return _Decider(Path(matrix_dir), alpha, baseline, n_boot).run()


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


def load_cell(matrix_dir: Path, entry: dict) -> tuple[dict, Log | None]:
    """A decision.json cell entry (statistics filled in when finished) and the cell's loaded log."""
    values = entry.get("values") or {}
    status = entry.get("status", "finished")
    out: dict[str, Any] = {"name": entry["name"], "status": status, "error": entry.get("error"),
                           "objective": values.get("objective"), "lora_rank": values.get("lora_rank"),
                           "seed": values.get("seed")}
    if status != "finished":
        return out, None
    folder = matrix_dir / "cells" / entry["name"]
    cfg = load_yaml(folder / "config.yaml")
    for key in ("objective", "lora_rank", "seed"):
        if out[key] is None:
            out[key] = cfg.get(key)
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
    return out, log


def _correct(rows: list[dict], key: str) -> dict[str, float] | None:
    if key == "margin":
        return {str(r["id"]): float(bool(r["correct"])) for r in rows}
    if not all(isinstance(r.get(key), (int, float)) for r in rows):
        return None
    return {str(r["id"]): float(r[key] > 0) for r in rows}


def _group(cells: list[tuple[dict, Log]]) -> list[Group]:
    groups: dict[tuple[str, int], Group] = {}
    for cell, log in cells:
        key = (cell["objective"], cell["lora_rank"])
        g = groups.setdefault(key, Group(cell["name"], *key))
        g.cells.append(cell | {"_pairs": log.pairs})
    for g in groups.values():
        if len(g.cells) > 1:
            g.name = f"objective={g.objective},lora_rank={g.lora_rank}"
        for ys, key in YARDSTICKS.items():
            per_seed = [_correct(c["_pairs"], key) for c in g.cells]
            if any(p is None for p in per_seed):
                continue
            ids = set.intersection(*(set(p) for p in per_seed))
            g.correct[ys] = {i: statistics.fmean(p[i] for p in per_seed) for i in sorted(ids)}
        for c in g.cells:
            del c["_pairs"]
    return list(groups.values())


# --- deciding ------------------------------------------------------------------------------------------------

def _p(x: float) -> str:
    return f"{x:.2g}" if x < 0.01 else f"{x:.2f}"


def _n(x: float | None) -> str:
    return "n/a" if x is None or not math.isfinite(x) else f"{x:.3g}"


class _Decider:
    def __init__(self, matrix_dir: Path, alpha: float, baseline: dict | None, n_boot: int) -> None:
        self.dir, self.alpha, self.n_boot = matrix_dir, alpha, n_boot
        self.factors, entries = read_matrix(matrix_dir)
        loaded = [load_cell(matrix_dir, e) for e in entries]
        self.cells = [c for c, _ in loaded]
        self.groups = _group([(c, log) for c, log in loaded if log is not None])
        self.baseline = self._baseline(baseline)
        self.comparisons: dict[tuple[str, str, str], dict] = {}
        self.reasons: list[str] = []
        self.blocked: list[str] = []      # significant lifts that failed another switch condition

    def _baseline(self, given: dict | None) -> dict:
        if given:
            if "objective" not in given or "lora_rank" not in given:
                raise InputError("baseline needs 'objective' and 'lora_rank'", field="baseline")
            if not any(g.objective == given["objective"] and g.lora_rank == int(given["lora_rank"])
                       for g in self.groups):
                raise InputError(f"no finished cell with objective {given['objective']} and lora_rank "
                                 f"{given['lora_rank']}", path=str(self.dir), field="baseline")
            return {"objective": given["objective"], "lora_rank": int(given["lora_rank"])}
        first = next((c for c in self.cells if c["objective"] is not None), None)
        objective = (self.factors.get("objective") or [first and first["objective"]])[0]
        rank = (self.factors.get("lora_rank") or [first and first["lora_rank"]])[0]
        return {"objective": objective, "lora_rank": rank}

    def find(self, objective: str, rank: int) -> Group | None:
        return next((g for g in self.groups if g.objective == objective and g.lora_rank == rank), None)

    def compare(self, a: Group, b: Group, yardstick: str = "own") -> dict | None:
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
                "a_only": a_only, "b_only": b_only,
                "pairs_needed": stats.pairs_needed(acc_a, acc_b, discordant, alpha=self.alpha),
                "pairs_to_detect": stats.pairs_needed(acc_b + MEANINGFUL, acc_b, discordant, alpha=self.alpha)}
        return self.comparisons[key]

    def run(self) -> dict:
        verdict, chosen, summary = self._verdict()
        fallback = FALLBACK if verdict == "fallback_orpo" else self.baseline["objective"]
        return {"verdict": verdict, "objective": chosen.objective if chosen else fallback,
                "lora_rank": chosen.lora_rank if chosen else self.baseline["lora_rank"],
                "baseline": self.baseline, "summary": summary, "reasons": self.reasons,
                "comparisons": list(self.comparisons.values()), "cells": self.cells,
                **({"groups": [g.to_dict() for g in self.groups]} if any(len(g.cells) > 1 for g in self.groups)
                   else {})}

    def _verdict(self) -> tuple[str, Group | None, str]:
        for c in self.cells:
            if c["status"] != "finished":
                self.reasons.append(f"cell {c['name']} {c['status']}" + (f": {c['error']}" if c["error"] else "")
                                    + "; reported, not compared")
        fallback = self._fallback()
        if fallback:
            return fallback
        base = self.find(self.baseline["objective"], self.baseline["lora_rank"])
        if base is None:
            self.reasons.append(f"the baseline cell ({self.baseline['objective']}, rank "
                                f"{self.baseline['lora_rank']}) did not finish: nothing to compare against")
            return "not_decisive", None, "Not decisive: the baseline cell did not finish."
        challengers = self._challengers(base)
        if not challengers:
            self.reasons.append(f"no other objective finished beside {base.objective}: the objective cannot be "
                                f"judged (only the rank)")
            chosen = self._rank(base)
            return "not_decisive", chosen, (f"Not decisive: only {base.objective} finished, so the objective "
                                            f"was not tested; rank {chosen.lora_rank} is recommended.")
        winners = [c for c, cmp in challengers if self._switch(c, base, cmp, len(challengers))]
        if winners:
            win = max(winners, key=lambda g: g.accuracy)
            cmp = self.primary(win, base)
            chosen = self._rank(win)
            if chosen is not win:
                final = self.compare(chosen, base)
                self.reasons.append(f"{chosen.name} vs the baseline {base.name} directly: accuracy "
                                    f"{_n(final['acc_a'])} vs {_n(final['acc_b'])} (p={_p(final['mcnemar_p'])})")
            return "switch", chosen, (
                f"Switch from {base.objective} to {win.objective} (rank {chosen.lora_rank}): it ranks "
                f"{cmp['a_only'] - cmp['b_only']} more of {cmp['n']} held-out pairs correctly on the "
                f"{cmp['yardstick']} yardstick (McNemar p={_p(cmp['mcnemar_p'])}, adjusted) with cleaner margins.")
        keep, need = self._keep(base, challengers)
        chosen = self._rank(base)
        weak = base.unstable or base.ci[0] <= 0.5
        if keep:
            return "keep", chosen, (f"Keep {base.objective} (rank {chosen.lora_rank}): on {base.pairs} held-out "
                                    f"pairs every other objective was significantly worse, unstable, or no "
                                    f"different where a {MEANINGFUL * 100:.0f}-point difference would have shown.")
        settle = f"; about {need} held-out pairs (or more seeds) would settle it" if need else ""
        others = ", ".join(sorted({c.objective for c, _ in challengers}))
        why = (f"the baseline {base.objective} shows no reliable held-out learning" if weak else
               "; ".join(self.blocked) if self.blocked else
               f"the held-out evidence does not separate {base.objective} from {others}")
        return "not_decisive", chosen, f"Not decisive: {why}{settle}."

    def _fallback(self) -> tuple[str, Group | None, str] | None:
        judged = [g for g in self.groups if g.objective not in NOT_JUDGED]
        crashed = [c for c in self.cells if c["status"] == "failed" and c["objective"] not in NOT_JUDGED
                   and any(w in (c["error"] or "").lower() for w in DIVERGED_WORDS)]
        if not (judged or crashed) or any(not g.unstable for g in judged):
            return None
        numeric = crashed or any(f["code"] in ("nonfinite", "divergence")
                                 for g in judged for c in g.cells for f in c["findings"])
        if not numeric:
            self.reasons.append(
                "every DPO-family and SimPO cell is at chance on the held-out pairs and none diverged: "
                + "; ".join(f"{g.name} {_n(g.accuracy)} (95% CI {_n(g.ci[0])}-{_n(g.ci[1])})" for g in judged)
                + ". No objective learned a held-out preference, so switching objective (ORPO included) would "
                  "not help: check that chosen/rejected labels are meaningful (not random or flipped), or train "
                  "longer")
            return "not_decisive", None, ("Not decisive: no objective learned a held-out preference (every cell "
                                          "is at chance and none diverged); check the labels or train longer.")
        families = {("SimPO" if g.objective == "simpo" else "DPO-family") for g in judged} | \
                   {("SimPO" if c["objective"] == "simpo" else "DPO-family") for c in crashed}
        self.reasons.append("every DPO-family and SimPO cell is unstable: "
                            + "; ".join(f"{g.name} ({self._why_unstable(g)})" for g in judged)
                            + "".join(f"; {c['name']} failed: {c['error']}" for c in crashed))
        for missing in sorted({"DPO-family", "SimPO"} - families):
            self.reasons.append(f"no {missing} cell was in the matrix; it was not tried")
        orpo = [g for g in self.groups if g.objective == FALLBACK]
        if orpo and all(g.unstable for g in orpo):
            self.reasons.append("the ORPO cells are unstable too: "
                                + "; ".join(f"{g.name} ({self._why_unstable(g)})" for g in orpo))
            return "not_decisive", None, ("Not decisive: every cell, ORPO included, is unstable or at chance; "
                                          "check the data (are labels meaningful?) and the learning rate.")
        if not orpo:
            self.reasons.append("ORPO was not in the matrix: run it to confirm it trains stably")
            return "fallback_orpo", None, ("Fall back to ORPO: every DPO-family and SimPO cell was unstable "
                                           "or at chance.")
        best = self._rank(max((g for g in orpo if not g.unstable), key=lambda g: g.accuracy))
        return "fallback_orpo", best, (f"Fall back to ORPO (rank {best.lora_rank}): every DPO-family and SimPO "
                                       f"cell was unstable or at chance; ORPO reached held-out accuracy "
                                       f"{_n(best.accuracy)}.")

    @staticmethod
    def _why_unstable(g: Group) -> str:
        return ", ".join(sorted({f["sentence"] for c in g.cells for f in c["findings"]
                                 if f["code"] in ("nonfinite", "divergence", "at_chance")}))

    def _challengers(self, base: Group) -> list[tuple[Group, dict]]:
        """Each other objective at the baseline's rank (its best cell if that rank did not finish)."""
        out = []
        for objective in dict.fromkeys(g.objective for g in self.groups):
            if objective == base.objective:
                continue
            c = self.find(objective, base.lora_rank)
            if c is None:
                c = max((g for g in self.groups if g.objective == objective), key=lambda g: g.accuracy)
                self.reasons.append(f"{objective} has no finished cell at rank {base.lora_rank}; its best cell "
                                    f"{c.name} stands in (objective and rank are confounded there)")
            cmp = self.compare(c, base)
            if cmp is None:
                self.reasons.append(f"{c.name} shares no held-out pair ids with {base.name}: not compared")
                continue
            ys = [self.compare(c, base, y) for y in COMMON]
            self.reasons.append(
                f"{c.name} vs {base.name} on {cmp['n']} held-out pairs: accuracy {_n(cmp['acc_a'])} vs "
                f"{_n(cmp['acc_b'])} (diff {cmp['diff']:+.3f}, 95% CI {cmp['ci'][0]:+.3f} to {cmp['ci'][1]:+.3f}), "
                f"{cmp['a_only']} pairs only {c.objective} gets right, {cmp['b_only']} only {base.objective}, "
                f"McNemar p={_p(cmp['mcnemar_p'])}"
                + "".join(f"; {y['yardstick']} yardstick {y['diff']:+.3f} (p={_p(y['mcnemar_p'])})"
                          for y in ys if y))
            out.append((c, self.primary(c, base)))
        return out

    def primary(self, c: Group, base: Group) -> dict:
        """The common-yardstick comparison with the most evidence, its p Bonferroni-adjusted over the yardsticks.

        Own rewards are not comparable across objectives (SimPO's is a length-normalized log-prob that can rank
        pairs well before any training, DPO's starts at an exact tie), so objectives are judged here.
        """
        ys = [y for y in (self.compare(c, base, y) for y in COMMON) if y]
        if not ys:
            return self.compare(c, base)  # logs without yardsticks: own reward is all there is
        best = min(ys, key=lambda y: (y["mcnemar_p"], -y["diff"]))
        return {**best, "mcnemar_p": min(1.0, best["mcnemar_p"] * len(ys)), "p_raw": best["mcnemar_p"]}

    def _cleaner(self, c: Group, base: Group) -> bool:
        gap = c.gap_share() < base.gap_share() or max(c.gap_share(), base.gap_share()) <= NO_INFLATION
        return gap and c.spread() <= base.spread()

    def _margins(self, c: Group, base: Group) -> str:
        return (f"train-held-out gap {_n(c.mean('margin_gap'))} ({_n(c.gap_share() * 100)}% of its training "
                f"margin) vs {_n(base.mean('margin_gap'))} ({_n(base.gap_share() * 100)}%), held-out margin "
                f"std/|mean| {_n(c.spread())} vs {_n(base.spread())}")

    def _switch(self, c: Group, base: Group, cmp: dict, k: int) -> bool:
        level = self.alpha / k
        more = (cmp["acc_a"] - cmp["acc_b"]) * cmp["n"] >= 1 - 1e-9
        if not more or cmp["mcnemar_p"] >= self.alpha:
            own = self.compare(c, base)
            if own and own is not cmp and own["diff"] > 0 and own["mcnemar_p"] < self.alpha:
                text = (f"{c.objective} ranks more held-out pairs correctly on its own reward "
                        f"({_n(own['acc_a'])} vs {_n(own['acc_b'])}, p={_p(own['mcnemar_p'])}) but not on a common "
                        f"yardstick (best: {cmp['yardstick']} {cmp['diff']:+.3f}, adjusted p={_p(cmp['mcnemar_p'])})"
                        f": the lift comes from how its own reward scores pairs, not from a policy that ranks "
                        f"them better")
                self.blocked.append(text)
                self.reasons.append(f"no switch to {c.name}: {text}")
            return False
        worse = [y for y in (self.compare(c, base, y) for y in COMMON)
                 if y and y["yardstick"] != cmp["yardstick"] and y["diff"] < 0 and y["mcnemar_p"] < self.alpha]
        if cmp["mcnemar_p"] >= level:
            why = "its p is not below alpha", f"p is not below alpha/{k} = {_p(level)} ({k} challengers tested)"
        elif c.unstable:
            why = "it is unstable", self._why_unstable(c)
        elif c.ci[0] <= 0.5:
            why = "it is not above chance", f"its accuracy interval starts at {_n(c.ci[0])}"
        elif not self._cleaner(c, base):
            why = "its margins are not cleaner", self._margins(c, base)
        elif worse:
            why = "it is significantly worse on the other yardstick", ", ".join(
                f"{y['yardstick']} {y['diff']:+.3f}, p={_p(y['mcnemar_p'])}" for y in worse)
        else:
            self.reasons.append(
                f"switch: {c.name} ranks {cmp['a_only'] - cmp['b_only']} more pairs correctly on the "
                f"{cmp['yardstick']} yardstick, adjusted p={_p(cmp['mcnemar_p'])} < {_p(level)} "
                f"(alpha {self.alpha} over {k} challenger(s)), accuracy "
                f"interval {_n(c.ci[0])}-{_n(c.ci[1])} above chance, cleaner margins: {self._margins(c, base)}")
            return True
        self.blocked.append(f"{c.objective} ranks more held-out pairs correctly on the {cmp['yardstick']} "
                            f"yardstick (p={_p(cmp['mcnemar_p'])}) but {why[0]}")
        self.reasons.append(f"{c.name} is better (p={_p(cmp['mcnemar_p'])}) but no switch: {why[0]} ({why[1]})")
        return False

    def _keep(self, base: Group, challengers: list[tuple[Group, dict]]) -> tuple[bool, int | None]:
        """(whether the evidence supports staying with the baseline, held-out pairs that would settle it)."""
        keep, need = True, []
        if base.unstable:
            keep = False
            self.reasons.append(f"the baseline {base.name} is unstable ({self._why_unstable(base)}): not a "
                                f"position to keep")
        elif base.ci[0] <= 0.5:
            keep = False
            self.reasons.append(f"the baseline {base.name}'s held-out accuracy {_n(base.accuracy)} has a 95% "
                                f"interval {_n(base.ci[0])}-{_n(base.ci[1])} that includes chance: no evidence it "
                                f"learned the preference, nothing to keep")
        for c, cmp in challengers:
            if c.unstable:
                self.reasons.append(f"{c.name} is unstable ({self._why_unstable(c)}): favours the baseline")
                continue
            significant = cmp["mcnemar_p"] < self.alpha
            if significant and cmp["diff"] < 0:
                self.reasons.append(f"{base.name} is significantly better than {c.name} "
                                    f"(p={_p(cmp['mcnemar_p'])}): favours the baseline")
                continue
            powered = cmp["pairs_to_detect"] is not None and cmp["n"] >= cmp["pairs_to_detect"]
            if not significant and not self._cleaner(c, base) and powered:
                self.reasons.append(f"{c.name} is not significantly different (p={_p(cmp['mcnemar_p'])}), its "
                                    f"margins are not cleaner, and {cmp['n']} pairs were enough to detect a "
                                    f"{MEANINGFUL * 100:.0f}-point difference (needs {cmp['pairs_to_detect']}): "
                                    f"favours the baseline")
                continue
            keep = False
            if significant:
                continue  # a real lift that failed another switch condition: reported by _switch
            need.append(cmp["pairs_needed"] or cmp["pairs_to_detect"])
            why = f"not significantly different (p={_p(cmp['mcnemar_p'])})"
            if self._cleaner(c, base):
                why += f", its margins are cleaner ({self._margins(c, base)})"
            if not powered:
                why += (f", {cmp['n']} pairs cannot detect a {MEANINGFUL * 100:.0f}-point difference "
                        f"(needs {cmp['pairs_to_detect']})")
            self.reasons.append(f"{c.name} vs {base.name}: {why}; " + self._settle(c, base, cmp))
        return keep, max((x for x in need if x), default=None)

    def _settle(self, c: Group, base: Group, cmp: dict) -> str:
        pairs = (f"the observed difference {cmp['diff']:+.3f} would need about {cmp['pairs_needed']} held-out "
                 f"pairs to reach p<{self.alpha}" if cmp["pairs_needed"] else
                 "the two rank the held-out pairs identically on balance")
        accs = [[x["accuracy"] for x in g.cells] for g in (c, base)]
        if min(len(a) for a in accs) < 2:
            return pairs + "; run >= 3 seeds per cell to see the seed-to-seed spread"
        sd = math.sqrt((statistics.variance(accs[0]) + statistics.variance(accs[1])) / 2)
        d = abs(statistics.fmean(accs[0]) - statistics.fmean(accs[1]))
        z = NormalDist().inv_cdf(1 - self.alpha / 2) + NormalDist().inv_cdf(0.8)
        seeds = math.ceil(2 * (z * sd / d) ** 2) if d > 0 else None
        return pairs + (f"; with seed std {_n(sd)}, about {seeds} seeds per cell would separate the means"
                        if seeds else "; the seed means are identical")

    def _rank(self, anchor: Group) -> Group:
        """Rule 2: the lowest rank of ``anchor``'s objective not significantly different from its best rank."""
        same = [g for g in self.groups if g.objective == anchor.objective and (not g.unstable or g is anchor)]
        top = max(same, key=lambda g: (g.accuracy, -g.lora_rank))
        for g in sorted(same, key=lambda g: g.lora_rank):
            if g is top:
                break
            cmp = self.compare(g, top)
            if cmp and cmp["mcnemar_p"] >= self.alpha:
                tm, tt = g.mean("train_margin"), top.mean("train_margin")
                self.reasons.append(
                    f"rank {g.lora_rank} is not significantly different from rank {top.lora_rank} for "
                    f"{g.objective} (accuracy {_n(cmp['acc_a'])} vs {_n(cmp['acc_b'])}, p={_p(cmp['mcnemar_p'])}"
                    f"; training margin {_n(tm)} vs {_n(tt)}): prefer the lower rank {g.lora_rank}")
                return g
        if len(same) > 1:
            lower = ("lower ranks are significantly worse" if top.lora_rank > min(g.lora_rank for g in same)
                     else "also the lowest")
            self.reasons.append(f"rank {top.lora_rank} is the best rank for {top.objective} (held-out accuracy "
                                f"{_n(top.accuracy)}), {lower}")
        return top
