"""The statistics under every verdict: finished cells (or rounds) loaded into CellResult records, grouped per
(objective, rank) over their seeds, and paired comparison records between groups.

    st = Stats.of_matrix(MatrixDir(Path("matrix")), alpha=0.05, n_boot=10000)
    st.compare(st.find("simpo", 16), st.find("dpo", 16), "refrel")   # McNemar, bootstrap CI, pairs needed

Every comparison is paired (joined by ``id``), under the run's own reward and every yardstick: the tests and
yardsticks are docs/decisions.md, Paired tests and Two common yardsticks.

Several seeds per (objective, rank) are pooled per pair: a pair's correctness is its mean over seeds, the
accuracy is the mean over pairs (= the mean of the seeds' accuracies), and McNemar becomes a sign test over
pairs on which one side is right more often -- pairs stay the independent unit.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from typing import Any

from ..core import objectives
from ..core.config import load_yaml
from ..core.errors import InputError
from ..core.files import DamagedFile
from ..core.layout import CellEntry, CellResult, MatrixDir, RunDir
from ..evaluation import stats, yardsticks
from ..evaluation.review import MARGIN_EPS, NUMERIC, UNSTABLE, Review, diagnose, learning, margin_gap
from ..evaluation.runlog import Log, load

MEANINGFUL = 0.05                     # accuracy difference a "keep" must have been able to detect
NO_INFLATION = 0.25                   # a train-held-out gap of at most this share of the training margin is fine
COMMON = tuple(y.name for y in yardsticks.logprob_yardsticks())  # objective-free: the fair ground between objectives
YARDSTICKS = {"own": "margin", **{y: f"{y}_margin" for y in COMMON}}
BEHAVIOUR = yardsticks.BEHAVIOUR     # what the model writes, judged against the reference (cells with gen_eval)
GEN_KEYS = ("prompts", "win_rate", "win_rate_ci", "tie_rate", "lc_win_rate", "lc_win_rate_se", "len_ratio")
POSITION_KEYS = ("position_bias", "position_flips", "position_compared")  # a pairwise judge asking both orders
JUDGE_KEYS = ("win_rate", "win_rate_ci", "tie_rate", "lc_win_rate", "lc_win_rate_se", *POSITION_KEYS)


def judge_yardstick(spec: str) -> str:
    """The yardstick of one judge's preferences when a cell has several judges: ``behaviour[SPEC]``."""
    return f"{BEHAVIOUR}[{spec}]"


@dataclass
class Group:
    """One (objective, lora_rank) over its seeds (or one round)."""

    name: str
    objective: str
    lora_rank: int
    cells: list[CellResult] = field(default_factory=list)
    correct: dict[str, dict[str, float]] = field(default_factory=dict)   # yardstick -> id -> mean over seeds
    gains: dict[str, dict[str, Any]] = field(default_factory=dict)       # yardstick -> step 0 vs end (1st seed)
    seed_correct: dict[str, list[dict[str, float]]] = field(default_factory=dict)  # yardstick -> per seed

    def mean(self, key: str) -> float | None:
        xs = [x for c in self.cells if (x := getattr(c, key)) is not None and math.isfinite(x)]
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
        """Diverged, or learned nothing on the held-out pairs: either way not a setup to recommend."""
        return any(c.unstable for c in self.cells)

    @property
    def state(self) -> str:
        """``diverged`` (NaN/inf or a diverging loss), ``not_learned`` (no yardstick rose above its step-0
        accuracy, or at chance), or ``learned``: two different troubles, never both called unstable."""
        problems = set(self.problems())
        return "diverged" if problems & set(NUMERIC) else "not_learned" if problems else "learned"

    @property
    def spec(self) -> objectives.Objective:
        return objectives.get(self.objective)

    @property
    def judges(self) -> list[str]:
        """The specs of the judges every seed was judged by, when there are several (first judge first)."""
        return [k[len(BEHAVIOUR) + 1:-1] for k in self.correct if k.startswith(f"{BEHAVIOUR}[")]

    def gen(self, key: str) -> float | None:
        """A behavioural number (gen_eval) averaged over the seeds, None without a behavioural evaluation."""
        xs = [c.gen_eval[key] for c in self.cells if c.gen_eval and c.gen_eval.get(key) is not None]
        return statistics.fmean(xs) if xs and len(xs) == len(self.cells) else None

    def problems(self) -> list[str]:
        """The finding codes that make it unstable (nonfinite, divergence, not_learned, at_chance)."""
        return sorted({f["code"] for c in self.cells for f in c.findings or [] if f["code"] in UNSTABLE})

    def spread(self) -> float:
        """Held-out margin std relative to its mean (scale-free); inf when the mean margin is 0 or unknown."""
        std, margin = self.mean("margin_std"), self.mean("margin")
        return std / abs(margin) if std is not None and margin else math.inf

    def gap_share(self) -> float:
        """Share of the training margin that does not reach the held-out pairs; inf when unknown, and when the
        training margin is within MARGIN_EPS of 0 (a share of a margin that may be 0 is any number at all; review's
        floor is MARGIN_EPS or 1.96 standard errors of the margin, whichever is larger: evaluation/review.py)."""
        gap, train = self.mean("margin_gap"), self.mean("train_margin")
        return gap / train if gap is not None and train is not None and train > MARGIN_EPS else math.inf

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "objective": self.objective, "lora_rank": self.lora_rank,
                "seeds": [c.seed for c in self.cells], "accuracy": self.accuracy, "ci": list(self.ci),
                "seed_accuracies": [c.accuracy for c in self.cells], "margin": self.mean("margin"),
                "margin_gap": self.mean("margin_gap"), "margin_std": self.mean("margin_std"),
                "pairs": self.pairs, "unstable": self.unstable}


# --- loading -------------------------------------------------------------------------------------------------

def load_cell(entry: CellEntry, run: RunDir) -> tuple[CellResult, Log | None]:
    """A cell's record (statistics filled in when finished) and its loaded log (None unless finished)."""
    values = entry.values
    out = CellResult(entry.name, entry.status, entry.error, values.get("objective"), values.get("lora_rank"),
                     values.get("seed"))
    if not out.finished:
        return out, None
    if run.summary.exists():
        try:
            run.verify_summary()  # checked against its checksum: a damaged cell is reported by name, not compared
        except DamagedFile as e:
            out.status, out.error = "damaged", str(e)
            return out, None
    cfg = load_yaml(run.config)
    for k in ("objective", "lora_rank", "seed"):
        if getattr(out, k) is None:
            setattr(out, k, cfg.get(k))
    if not isinstance(out.objective, str) or not isinstance(out.lora_rank, int):
        raise InputError("needs 'objective' (text) and 'lora_rank' (integer)", path=str(run.config))
    log = load(run.path)
    if not log.pairs:
        raise InputError("a finished cell needs eval_pairs.jsonl", path=str(run.path))
    rev = Review(log.source, log.kind, diagnose(log))
    margins = [p["margin"] for p in log.pairs if math.isfinite(p["margin"])]
    k, n = sum(bool(p["correct"]) for p in log.pairs), len(log.pairs)
    gap = margin_gap(log)
    out.accuracy, out.ci, out.pairs = k / n, list(stats.wilson_interval(k, n)), n
    out.margin = statistics.fmean(margins) if margins else None
    out.margin_gap, out.train_margin = (gap[2], gap[0]) if gap else (None, None)
    out.margin_std = statistics.stdev(margins) if len(margins) > 1 else None
    out.unstable, out.findings = rev.unstable, [f.to_dict() for f in rev.findings]
    if g := log.gen_eval:  # what the cell's policy writes, against the shared reference generations
        out.gen_eval = {**{k: g.get(k) for k in GEN_KEYS}, "policy_len": g["policy"]["mean_len"],
                        "reference_len": g["reference"]["mean_len"], **{k: g[k] for k in POSITION_KEYS if k in g}}
        if "judges" in g:  # several judges: each one's numbers, and how each two agree
            out.gen_eval["judges"] = {s: {k: v[k] for k in JUDGE_KEYS if k in v} for s, v in g["judges"].items()}
            out.gen_eval["agreement"] = g.get("agreement", [])
    return out, log


def _correct(rows: list[dict], key: str) -> dict[str, float] | None:
    if key == "margin":
        return {str(r["id"]): float(bool(r["correct"])) for r in rows}
    if not all(isinstance(r.get(key), (int, float)) for r in rows):
        return None
    return {str(r["id"]): float(r[key] > 0) for r in rows}


def _per_seed(log: Log) -> dict[str, dict[str, float] | None]:
    """Per yardstick, {pair or prompt id: 1.0 right / 0.0 wrong} of one cell (behaviour: the judge's preference)."""
    out = {ys: _correct(log.pairs or [], key) for ys, key in YARDSTICKS.items()}
    gens = log.generations
    out[BEHAVIOUR] = gens and {str(r["id"]): float(r["preference"]) for r in gens}
    if gens and all(isinstance(r.get("judges"), dict) for r in gens):  # several judges: each one's preferences
        for spec in gens[0]["judges"]:
            out[judge_yardstick(spec)] = {str(r["id"]): float(r["judges"][spec]["preference"]) for r in gens
                                          if spec in r["judges"]}
    return out


def group(loaded: list[tuple[CellResult, Log]], by: tuple[str, ...]) -> list[Group]:
    """The finished cells grouped by the ``by`` attributes, each yardstick's correctness pooled over seeds."""
    groups: dict[tuple, Group] = {}
    sticks: dict[tuple, list[dict]] = {}
    for cell, log in loaded:
        key = tuple(getattr(cell, k) for k in by)
        g = groups.setdefault(key, Group(cell.name, cell.objective, cell.lora_rank, gains=learning(log)))
        g.cells.append(cell)
        sticks.setdefault(key, []).append(_per_seed(log))
    for key, g in groups.items():
        if len(g.cells) > 1:
            g.name = f"objective={g.objective},lora_rank={g.lora_rank}"
        for ys in sticks[key][0]:
            per_seed = [s.get(ys) for s in sticks[key]]
            if all(per_seed):
                ids = set.intersection(*(set(p) for p in per_seed))
                g.correct[ys] = {i: statistics.fmean(p[i] for p in per_seed) for i in sorted(ids)}
                g.seed_correct[ys] = per_seed
    return list(groups.values())


# --- statistics ----------------------------------------------------------------------------------------------

class Stats:
    """The cells, grouped, and the paired comparison records between groups (in the order first asked for)."""

    def __init__(self, loaded: list[tuple[CellResult, Log | None]], alpha: float, n_boot: int, *,
                 by: tuple[str, ...] = ("objective", "lora_rank"), factors: dict | None = None,
                 where: str = "") -> None:
        self.alpha, self.n_boot, self.factors, self.where = alpha, n_boot, factors or {}, where
        self.cells = [c for c, _ in loaded]
        self.groups = group([(c, log) for c, log in loaded if log is not None], by)
        self.comparisons: dict[tuple[str, str, str], dict] = {}

    @classmethod
    def of_matrix(cls, matrix: MatrixDir, alpha: float, n_boot: int) -> Stats:
        index = matrix.read_index()
        return cls([load_cell(e, matrix.cell(e.name)) for e in index.cells], alpha, n_boot, factors=index.factors,
                   where=str(matrix.path))

    def baseline(self, given: dict | None) -> dict:
        if given:
            if "objective" not in given or "lora_rank" not in given:
                raise InputError("baseline needs 'objective' and 'lora_rank'", field="baseline")
            if self.find(given["objective"], int(given["lora_rank"])) is None:
                raise InputError(f"no finished cell with objective {given['objective']} and lora_rank "
                                 f"{given['lora_rank']}", path=self.where, field="baseline")
            return {"objective": given["objective"], "lora_rank": int(given["lora_rank"])}
        first = next((c for c in self.cells if c.objective is not None), None)
        return {k: (self.factors.get(k) or [first and getattr(first, k)])[0] for k in ("objective", "lora_rank")}

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


def short(cmp: dict) -> dict:
    """The numbers of a comparison a reason carries."""
    return {k: cmp[k] for k in ("a", "b", "yardstick", "n", "acc_a", "acc_b", "diff", "ci", "mcnemar_p",
                                "a_only", "b_only")}


def margins(c: Group, base: Group) -> dict:
    return {"gap": c.mean("margin_gap"), "gap_share": c.gap_share(), "spread": c.spread(),
            "baseline_gap": base.mean("margin_gap"), "baseline_gap_share": base.gap_share(),
            "baseline_spread": base.spread()}


def cleaner(c: Group, base: Group) -> str:
    """``cleaner``, ``equal`` or ``not_cleaner``: a smaller share of the training margin lost on held-out pairs
    (or no inflation on either side) and a held-out margin spread no larger; equal numbers are not cleaner."""
    m = margins(c, base)
    if all(math.isclose(m[k], m[f"baseline_{k}"], rel_tol=1e-9) or m[k] == m[f"baseline_{k}"]
           for k in ("gap_share", "spread")):
        return "equal"
    gap = m["gap_share"] < m["baseline_gap_share"] or max(m["gap_share"], m["baseline_gap_share"]) <= NO_INFLATION
    return "cleaner" if gap and m["spread"] <= m["baseline_spread"] else "not_cleaner"
