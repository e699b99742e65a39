"""The verdict over ``preftune iterate``'s rounds: did the last round beat the first, and should iterating go on?

    preftune decide iter/         # writes iter/decision.json: continue | stop

Rounds are compared with the same paired tests as matrix cells (comparisons.py); which yardsticks, and when it
is ``continue`` or ``stop`` (the reason codes): docs/rounds.md, What `decide iter/` says.
"""

from __future__ import annotations

from ..core.errors import InputError
from ..core.layout import CellEntry, Decision, RoundsDir, read_audit
from ..evaluation import yardsticks
from .comparisons import BEHAVIOUR, Group, Stats, load_cell, short
from .data import leak_reasons
from .reasons import Reason, render, render_summary
from .robust import against_reference, between


def decide_rounds(rounds: RoundsDir, *, alpha: float = 0.05, n_boot: int = 10000) -> Decision:
    """Compare the finished rounds (the last with the one before, and with the first); the Decision."""
    same_ref = rounds.read_meta()["settings"]["reference"] == "initial"
    finished = [r for r in rounds.rounds() if r.finished()]
    if not finished:
        raise InputError("no finished round", path=str(rounds.path))
    loaded = [load_cell(CellEntry(r.name, {}, "finished"), r) for r in finished]
    for (cell, _), r in zip(loaded, finished):
        cell.round = r.number
    st = Stats(loaded, alpha, n_boot, by=("round",))  # a matrix's statistics, over rounds
    sticks = [BEHAVIOUR] + [y.name for y in yardsticks.logprob_yardsticks() if same_ref or not y.needs_reference]
    data = leak_reasons(read_audit(rounds.path))  # held-out prompts among the prompts the rounds trained on
    reasons: list[Reason] = list(data)
    first, last = st.groups[0], st.groups[-1]
    beats, basis = False, Reason("single_round", {"round": last.name})
    if last is not first:
        up, fell, refused = _gain(st, sticks, last, first, reasons)
        beats, prev = bool(up) and fell is None, st.groups[-2]
        if prev is not first:
            up, fell, refused = _gain(st, sticks, last, prev, reasons)
        basis = _basis(last, prev, up, fell, beats, reasons) if up or not refused else Reason(
            "round_judge_dependent", {"round": last.name, "previous": prev.name, "last_beats_first": beats,
                                      "disagreeing": refused.data["disagreeing"], "judges": refused.data["judges"]})
    reasons += [r for r in [against_reference(st, last)] if r]
    if data:
        basis = Reason(basis.code, {**basis.data, "data": [r.to_dict() for r in data]})
    best = max(st.groups, key=lambda g: (g.gen("win_rate") or 0.0, g.accuracy))
    return Decision(verdict="continue" if basis.code == "round_gain" else "stop", summary=render_summary(basis),
                    basis=basis.to_dict(), reasons=[r.to_dict() for r in reasons],
                    explanation=[render(r) for r in reasons], comparisons=list(st.comparisons.values()),
                    cells=st.cells, last_beats_first=beats, best_round=best.name)


def _gain(st: Stats, sticks: list[str], a: Group,
          b: Group, reasons: list[Reason]) -> tuple[list[dict], dict | None, Reason | None]:
    """(significant gains of ``a`` over ``b``, the behaviour comparison when it falls while only log-prob
    yardsticks rose, the judge_dependent reason when a behaviour gain was left out because the judges disagree
    on it); the round_comparison reason (and with several judges, judge_robust/judge_dependent) go to ``reasons``."""
    cmps = [c for c in (st.compare(a, b, y) for y in sticks) if c]
    up = [c for c in cmps if c["diff"] > 0 and c["mcnemar_p"] < st.alpha]
    down = [c for c in cmps if c["diff"] < 0 and c["mcnemar_p"] < st.alpha]
    reasons.append(Reason("round_comparison", {"a": a.name, "b": b.name, "gains": [short(c) for c in up],
                                               "losses": [short(c) for c in down],
                                               "compared": [c["yardstick"] for c in cmps]}))
    split = between(st, a, b)
    reasons += [split] if split else []
    refused = split if split and split.code == "judge_dependent" and any(c["yardstick"] == BEHAVIOUR for c in up) \
        else None
    up = [c for c in up if not (refused and c["yardstick"] == BEHAVIOUR)]  # never act on it
    fell = next((c for c in cmps if c["yardstick"] == BEHAVIOUR and c["diff"] < 0), None)
    return up, fell if up else None, refused


def _basis(last: Group, prev: Group, up: list[dict], fell: dict | None, beats: bool,
           reasons: list[Reason]) -> Reason:
    """The reason that decides: a gain over the round before that is neither only length nor only log-probs."""
    if fell:
        reasons.append(Reason("round_pairs_only", {"round": last.name, "yardsticks": [c["yardstick"] for c in up],
                                                   **short(fell)}))
    raw = (last.gen("win_rate"), prev.gen("win_rate"))
    lc = (last.gen("lc_win_rate"), prev.gen("lc_win_rate"))
    length_only = (None not in raw + lc and raw[0] - raw[1] > 0 and lc[0] - lc[1] < (raw[0] - raw[1]) / 2
                   and all(c["yardstick"] == BEHAVIOUR for c in up))
    if length_only:
        reasons.append(Reason("round_length_only", {"round": last.name, "win_rate_a": raw[0], "win_rate_b": raw[1],
                                                    "lc_win_rate_a": lc[0], "lc_win_rate_b": lc[1]}))
    return Reason("round_gain" if up and not (length_only or fell) else "round_no_gain",
                  {"round": last.name, "previous": prev.name, "last_beats_first": beats, "length_only": length_only,
                   "pairs_only": fell is not None, "yardsticks": [c["yardstick"] for c in up]})
