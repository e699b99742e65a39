"""Diagnostics of one training run: did the held-out side learn, or did only the training margin inflate?

    preftune review runs/x                      # a preftune run folder (metrics.jsonl, eval_pairs.jsonl)
    preftune review out/trainer_state.json      # TRL: its log_history
    preftune review logs.jsonl                  # one JSON object per logged step

``review(path)`` returns a ``Review``; each ``Finding`` has a code, a severity (info | warn | error) and one
sentence with the numbers behind it. The logs are read by :mod:`runlog`.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..core.files import atomic_write_json, clean_json
from ..core.layout import REVIEW, Audit, matrix_of, read_audit
from ..data.audit import length_bias as length_rule
from . import stats
from .runlog import Log, load
from .yardsticks import logprob_yardsticks

CHANCE_TOL = 0.02            # held-out accuracy <= 0.5 + this is "at chance" (logs without yardsticks)
Z95 = 1.96                   # two-sided 95% normal quantile
MARGIN_EPS = 0.01            # a training margin this small moves the DPO loss by < 0.005 nats (log 2 - m/2)
RHO_MIN = 0.5                # rank correlation of margin and length difference that counts as "length-driven"
UNSTABLE = ("nonfinite", "divergence", "at_chance", "not_learned")
NUMERIC = ("nonfinite", "divergence")
SEVERITIES = ("info", "warn", "error")  # mildest first: --fail-on LEVEL fails on LEVEL and everything after it


@dataclass
class Finding:
    code: str
    severity: str                 # info | warn | error
    sentence: str
    data: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return clean_json(asdict(self))


@dataclass
class Review:
    source: str
    kind: str
    findings: list[Finding]

    @property
    def unstable(self) -> bool:
        """NaN/inf, a diverging loss, or held-out accuracy at or below chance."""
        return any(f.code in UNSTABLE for f in self.findings)

    def at_least(self, severity: str) -> list[Finding]:
        """The findings of ``severity`` (info | warn | error) or worse; none for "never" (``--fail-on``)."""
        if severity == "never":
            return []
        floor = SEVERITIES.index(severity)
        return [f for f in self.findings if SEVERITIES.index(f.severity) >= floor]

    def to_dict(self) -> dict[str, Any]:
        return {"source": self.source, "kind": self.kind, "unstable": self.unstable,
                "findings": [f.to_dict() for f in self.findings]}


def review(path: str | Path) -> Review:
    """Load a run folder, a TRL ``trainer_state.json`` or a JSONL log and diagnose it.

        r = review("runs/x")                # preftune review runs/x
        print([f.sentence for f in r.findings])
    """
    log = load(path)
    return Review(log.source, log.kind, diagnose(log, audit_of(path)))


def audit_of(path: str | Path) -> Audit | None:
    """The data audit behind a run folder: its own audit.json, or its matrix's (a matrix audits once)."""
    path = Path(path)
    if not path.is_dir():
        return None
    matrix = matrix_of(path)
    return read_audit(path) or (read_audit(matrix.path) if matrix else None)


def write_review(review: Review, out_dir: str | Path | None = None) -> Path | None:
    """Write ``review.json`` into ``out_dir`` (atomically) and return its path.

    With no ``out_dir`` it goes into the reviewed run folder; for a TRL or JSONL log nothing is written (None).
    """
    if out_dir is None and review.kind != "run":
        return None
    path = Path(review.source if out_dir is None else out_dir) / REVIEW
    atomic_write_json(path, review.to_dict())
    return path


def diagnose(log: Log, audit: Audit | None = None) -> list[Finding]:
    """All findings for a loaded log (and its data audit); a single info finding 'healthy' when nothing warns."""
    findings = (_instability(log) + _overoptimization(log) + _margin_gap(log) + _displacement(log)
                + _noise(log) + _length_bias(log) + _behaviour(log) + _leak(audit))
    if not any(f.severity != "info" for f in findings):
        findings.insert(0, _healthy(log))
    return findings


def margin_gap(log: Log) -> tuple[float, float, float] | None:
    """(training margin, held-out margin, gap): mean ``rewards/margins`` over the last 10% of training lines,
    the last ``eval_rewards/margins``, and the first minus the second."""
    _, train = log.series("rewards/margins")
    _, held = log.series("eval_rewards/margins")
    if not train or not held:
        return None
    t = statistics.fmean(stats.tail(train))
    return t, held[-1], t - held[-1]


def _n(x: float) -> str:
    return f"{x:.3g}"


def _ends(xs: list[float]) -> tuple[float, float]:
    """Means of the first and the last 10% of ``xs`` (at least one value each)."""
    return statistics.fmean(stats.head(xs)), statistics.fmean(stats.tail(xs))


def _change(steps: list[float], ys: list[float]) -> float:
    """Fitted change of ``ys`` over the span of ``steps`` (least squares), robust to one noisy eval."""
    xs = steps if len(set(steps)) > 1 else list(range(len(ys)))
    return stats.slope(xs, ys) * (max(xs) - min(xs))


def _instability(log: Log) -> list[Finding]:
    out = []
    bad: dict[str, float] = {}
    for line in log.train + log.eval:
        for key, value in line.items():
            if isinstance(value, float) and not math.isfinite(value):
                bad.setdefault(key, line["step"])
    bad_pairs = sum(1 for p in log.pairs or [] if not math.isfinite(p["margin"]))
    if bad or bad_pairs:
        keys = ", ".join(f"{k} (from step {_n(s)})" for k, s in bad.items())
        where = keys + (f"; {bad_pairs} held-out pair margins" if bad_pairs else "")
        out.append(Finding("nonfinite", "error", f"non-finite values (NaN/inf): {where}: training is unstable",
                           {"keys": bad, "nonfinite_pairs": bad_pairs}))
    _, loss = log.series("loss")
    if len(loss) >= 4:
        early, late = _ends(loss)
        if late > max(2 * early, early + 0.5):
            out.append(Finding("divergence", "error",
                               f"loss diverged: {_n(early)} over the first 10% of {len(loss)} logged steps -> "
                               f"{_n(late)} over the last 10%", {"early": early, "late": late}))
    gains = learning(log)
    if gains:
        if not any(g["learned"] for g in gains.values()):
            parts = "; ".join(f"{y} {_n(g['step0'])} -> {_n(g['final'])} (95% CI from {_n(g['ci'][0])})"
                              for y, g in gains.items())
            out.append(Finding("not_learned", "error",
                               f"no yardstick's held-out accuracy rose significantly above its step-0 value ({parts}): "
                               f"training taught no held-out preference", {"yardsticks": gains}))
        return out
    final = log.final_accuracy()  # a log without yardsticks (TRL): its own reward against chance
    if final and final[0] <= 0.5 + CHANCE_TOL:
        acc, n = final
        lo, hi = stats.wilson_interval(round(acc * n), n)
        ci = f" (95% CI {_n(lo)}-{_n(hi)}, {n} pairs)" if n else ""
        out.append(Finding("at_chance", "error",
                           f"held-out accuracy {_n(acc)}{ci} is at or below chance (0.5): no held-out "
                           f"preference was learned", {"accuracy": acc, "pairs": n}))
    return out


def learning(log: Log) -> dict[str, dict[str, Any]]:
    """Per yardstick: held-out accuracy at step 0 and at the end, the end's 95% Wilson interval, and whether the
    interval lies above the step-0 value ("learned"). Judged on the objective-free yardsticks relative to step
    0, never on the run's own reward: a SimPO reward ranks pairs well before any training. Empty when the log has
    no step-0 yardstick accuracies (a TRL log)."""
    first = next((r for r in log.eval if r["step"] == 0), None)
    out: dict[str, dict[str, Any]] = {}
    for y in (s.name for s in logprob_yardsticks()):
        key = f"eval_{y}/accuracy"
        if first is None or key not in first:
            continue
        rows = [p for p in log.pairs or [] if isinstance(p.get(f"{y}_margin"), (int, float))]
        if rows:
            margins = [p[f"{y}_margin"] for p in rows]
            n, k = len(rows), sum(m > 0 for m in margins) + 0.5 * sum(m == 0 for m in margins)
        else:
            last = next((r for r in reversed(log.eval) if key in r), None)
            n = int(last.get("eval_pairs", 0)) if last else 0
            if not n or last["step"] == 0:
                continue
            k = last[key] * n
        lo, hi = stats.wilson_interval(k, n)
        out[y] = {"step0": first[key], "final": k / n, "pairs": n, "ci": [lo, hi], "learned": lo > first[key]}
    return out


def _overoptimization(log: Log) -> list[Finding]:
    _, train = log.series("rewards/margins")
    steps, acc = log.accuracy_series()
    msteps, held = log.series("eval_rewards/margins")
    if len(train) < 4 or max(len(acc), len(held)) < 2:
        return []
    early, late = _ends(train)
    rise = late - early
    flat, xs, ys = ("accuracy", steps, acc) if len(acc) >= 2 else ("margin", msteps, held)
    moved = _change(xs, ys)
    if rise <= 0.1 or moved > (0.01 if flat == "accuracy" else 0.25 * rise):
        return []
    first, last, n = ys[0], ys[-1], len(ys)
    gap = margin_gap(log)
    gap_txt = f"; train-held-out margin gap {_n(gap[2])}" if gap else ""
    return [Finding("overoptimization", "warn",
                    f"training margin rose {_n(early)} -> {_n(late)} while held-out {flat} moved {_n(first)} -> "
                    f"{_n(last)} (fitted change {moved:+.3g}) over {n} evals{gap_txt}: inflation, not learning",
                    {"train_margin_early": early, "train_margin_late": late, f"heldout_{flat}_first": first,
                     f"heldout_{flat}_last": last, f"heldout_{flat}_change": moved, "evals": n,
                     "margin_gap": gap[2] if gap else None})]


def margin_floor(train: list[float]) -> float:
    """The size below which the training margin (mean of the last 10% of ``rewards/margins``) is
    indistinguishable from zero: the larger of 1.96 standard errors of that mean (its 95% half-width) and
    MARGIN_EPS. No share of a margin under it is printed."""
    tail = list(stats.tail(train))
    se = statistics.stdev(tail) / math.sqrt(len(tail)) if len(tail) >= 2 else 0.0
    return max(Z95 * se, MARGIN_EPS)


def _margin_gap(log: Log) -> list[Finding]:
    gap = margin_gap(log)
    if gap is None:
        return []
    train, held, diff = gap
    floor = margin_floor(log.series("rewards/margins")[1])
    share = diff / train if train > floor else None  # a share of a margin that may be 0 is any number at all
    if share is not None:
        tail = f" ({share:.0%} of the training margin does not carry over)"
    elif abs(train) <= floor:
        tail = f" (the training margin is within its noise floor {_n(floor)}: no share of it is given)"
    else:
        tail = " (the training margin is negative: no share of it is given)"
    return [Finding("margin_gap", "warn" if share is not None and diff >= 0.2 and share >= 0.5 else "info",
                    f"training margin {_n(train)} (last 10% of steps) vs held-out margin {_n(held)}: gap "
                    f"{_n(diff)}{tail}", {"train_margin": train, "heldout_margin": held, "gap": diff,
                                          "gap_share": share, "noise_floor": floor})]


def _falling(xs: list[float]) -> tuple[float, float] | None:
    """(early, late) when ``xs`` fell by more than max(0.5, 2%) nats from its first to its last 10%."""
    if len(xs) < 2:
        return None
    early, late = _ends(xs)
    return (early, late) if late - early < -max(0.5, 0.02 * abs(early)) else None


def _displacement(log: Log) -> list[Finding]:
    _, train = log.series("rewards/margins")
    _, held = log.series("eval_rewards/margins")
    if len(train) >= 4 and _ends(train)[1] - _ends(train)[0] > 0.1:
        what = "the training margin rose {} -> {}".format(*map(_n, _ends(train)))
    elif len(held) >= 2 and held[-1] - held[0] > 0.1:
        what = f"the held-out margin rose {_n(held[0])} -> {_n(held[-1])}"
    else:
        return []
    tr = _falling(log.series("logps/chosen")[1])
    ev = _falling(log.series("eval_logps/chosen")[1])
    if not (tr or ev):
        return []
    parts = [f"{_n(v[0])} -> {_n(v[1])} {where}" for v, where in ((tr, "on training"), (ev, "held-out")) if v]
    return [Finding("likelihood_displacement", "warn",
                    f"chosen log-prob fell {' and '.join(parts)} while {what}: likelihood displacement "
                    f"(the margin grows by pushing both responses down)",
                    {"train_chosen_logps": list(tr) if tr else None,
                     "heldout_chosen_logps": list(ev) if ev else None})]


def _noise(log: Log) -> list[Finding]:
    _, held = log.series("eval_rewards/margins")
    last = held[-3:]
    across_evals = statistics.stdev(last) if len(last) >= 2 else None
    if log.pairs:
        margins = [p["margin"] for p in log.pairs if math.isfinite(p["margin"])]
        across_pairs = statistics.stdev(margins) if len(margins) >= 2 else None
    else:
        across_pairs = next((r["eval_margin_std"] for r in reversed(log.eval) if "eval_margin_std" in r), None)
    final = log.final_accuracy()
    parts, data, severity = [], {"std_last_evals": across_evals, "std_pairs": across_pairs}, "info"
    if across_evals is not None:
        parts.append(f"held-out margin std {_n(across_evals)} across the last {len(last)} evals")
    if across_pairs is not None:
        parts.append(f"{_n(across_pairs)} across pairs")
    if final and final[1]:
        acc, n = final
        lo, hi = stats.wilson_interval(round(acc * n), n)
        data.update(pairs=n, accuracy=acc, ci=[lo, hi])
        parts.append(f"{n} held-out pairs give accuracy {_n(acc)} a 95% interval {_n(lo)}-{_n(hi)} "
                     f"(width {_n(hi - lo)})")
        if hi - lo > 0.2:
            severity = "warn"
            parts.append(f"too few to separate runs closer than about {_n((hi - lo) / 2)} in accuracy")
    if not parts:
        return []
    return [Finding("heldout_noise", severity, "; ".join(parts), data)]


def _length_bias(log: Log) -> list[Finding]:
    """Whether length predicts the label (a "prefer the shorter/longer" rule right at least 60% of the time with
    its 95% Wilson interval above 50%, the data audit's rule) or the margin (Spearman rho >= 0.5 and
    significant). Robust: shares and ranks, not a mean of ratios that a few long responses carry."""
    rows = [p for p in log.pairs or [] if isinstance(p.get("chosen_tokens"), (int, float))
            and isinstance(p.get("rejected_tokens"), (int, float))]
    if len(rows) < 5:
        return []
    chosen, rejected = [p["chosen_tokens"] for p in rows], [p["rejected_tokens"] for p in rows]
    n = len(rows)
    shorter, longer = sum(c < r for c, r in zip(chosen, rejected)), sum(c > r for c, r in zip(chosen, rejected))
    rule = length_rule(shorter, longer, n - shorter - longer, unit="tokens")
    ratio = stats.length_bias(chosen, rejected)["median_len_ratio"]
    diffs = [c - r for c, r in zip(chosen, rejected)]
    margins = [p["margin"] for p in rows]
    rho = (stats.spearman(diffs, margins) if all(math.isfinite(m) for m in margins)
           and len(set(diffs)) > 1 and len(set(margins)) > 1 else None)
    by = (["label"] if rule["teaches"] else []) + (
        ["margin"] if rho is not None and abs(rho) >= RHO_MIN and abs(rho) * math.sqrt(n - 1) >= Z95 else [])
    lo, hi = rule["ci"]
    sentence = (f"chosen is shorter in {rule['chosen_shorter']:.0%}, longer in {rule['chosen_longer']:.0%}, "
                f"equal in {rule['equal']:.0%} of {n} held-out pairs, median length ratio chosen/rejected "
                f"{_n(ratio)}; 'prefer the {rule['rule']}' is right in {rule['rule_accuracy']:.0%} (95% CI "
                f"{lo:.0%}-{hi:.0%})" + (f"; held-out margin vs length difference rho = {rho:.2f}" if rho is not None
                                         else ""))
    if by:
        sentence += (f": length predicts the {' and the '.join(by)}, a length-normalized reward (SimPO) "
                     "is indicated")
    shares = {k: rule[k] for k in ("pairs", "chosen_shorter", "chosen_longer", "equal")}
    verdict = {k: rule[k] for k in ("rule", "rule_accuracy", "ci", "teaches")}
    return [Finding("length_bias", "warn" if by else "info", sentence,
                    {**shares, "median_length_ratio": ratio, **verdict, "margin_length_rho": rho, "by": by})]


LENGTH_GAP = 0.1        # raw win rate minus LC win rate beyond which a win is mostly length
LENGTH_MOVE = 0.2       # generated length more than 20% off the reference's
REPEAT_RISE = 0.1       # repeated-3-gram share up by 10 points over the reference's
HIT_MAX_RISE = 0.25     # share of completions cut at max_new_tokens up by 25 points


def _behaviour(log: Log) -> list[Finding]:
    """What the policy writes, against the reference's generations on the same prompts (gen_eval)."""
    g = log.gen_eval
    if not g:
        return []
    out = []
    raw, lc, ratio = g["win_rate"], g["lc_win_rate"], g.get("len_ratio")
    if lc is not None and ratio is not None and raw - lc >= LENGTH_GAP and abs(ratio - 1) >= LENGTH_MOVE:
        out.append(Finding("length_exploitation", "warn",
                           f"win rate {_n(raw)} against the reference but length-controlled {_n(lc)}, with "
                           f"generations {abs(ratio - 1):.0%} {'longer' if ratio > 1 else 'shorter'} than the "
                           f"reference's: length, not quality, moved the win rate by {raw - lc:+.2f}",
                           {"win_rate": raw, "lc_win_rate": lc, "len_ratio": ratio}))
    pol, ref = g["policy"], g["reference"]
    rep = pol["repeated_3gram_share"] - ref["repeated_3gram_share"]
    hit = pol["hit_max_share"] - ref["hit_max_share"]
    if rep >= REPEAT_RISE or hit >= HIT_MAX_RISE:
        out.append(Finding("degenerate_generations", "warn",
                           f"repeated 3-grams {_n(ref['repeated_3gram_share'])} -> {_n(pol['repeated_3gram_share'])}, "
                           f"completions cut at max_new_tokens {_n(ref['hit_max_share'])} -> {_n(pol['hit_max_share'])}"
                           f" (reference -> policy): spiky, repetitive answers", {"repeat_rise": rep, "hit_max_rise": hit}))
    out.append(Finding("behaviour", "info",
                       f"win rate {_n(raw)} (95% CI {_n(g['win_rate_ci'][0])}-{_n(g['win_rate_ci'][1])}, ties "
                       f"{_n(g['tie_rate'])}) against the reference on {g['prompts']} prompts, length-controlled "
                       f"{_n(lc)}; generated length {_n(pol['mean_len'])} vs {_n(ref['mean_len'])} tokens",
                       {k: g[k] for k in ("win_rate", "win_rate_ci", "tie_rate", "lc_win_rate", "prompts")}))
    return out


def _leak(audit: Audit | None) -> list[Finding]:
    """Held-out prompts that also appear in training (the data audit): the held-out accuracy is inflated."""
    leak = audit.find("heldout_leak") if audit else None
    if not leak or not leak["exact"] + leak["near"]:
        return []
    n = leak["exact"] + leak["near"]
    return [Finding("heldout_leak", "warn",
                    f"{n} of {leak['heldout_prompts']} held-out prompts ({leak['exact']} exactly, {leak['near']} "
                    f"nearly) also appear in training, {leak['leaked_pairs']} of {leak['heldout_pairs']} held-out "
                    "pairs: the held-out accuracy is inflated by prompts seen in training (audit.json)",
                    {k: leak[k] for k in ("heldout_prompts", "exact", "near", "share", "heldout_pairs",
                                          "leaked_pairs")})]


def _healthy(log: Log) -> Finding:
    _, train = log.series("rewards/margins")
    _, acc = log.accuracy_series()
    parts = []
    if len(train) >= 2:
        parts.append(f"training margin {_n(train[0])} -> {_n(train[-1])}")
    if acc:
        parts.append(f"held-out accuracy {_n(acc[0])} -> {_n(acc[-1])} over {len(acc)} evals")
    return Finding("healthy", "info", "no warning signs" + (f": {', '.join(parts)}" if parts else ""), {})
