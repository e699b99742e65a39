"""Verdict reasons as data, and the one renderer that turns them into sentences.

The rules in preftune/decide.py return ``Reason(code, data)`` records with the numbers behind each step;
``decision.json`` stores them under ``reasons`` (and the sentences under ``explanation``). Tests assert codes
and numbers; only this module writes English. A number that can't be computed is never printed as None or
nan: its reason carries a code that says why (``power_unknown: ceiling``), and the sentence says that.

    preftune decide matrix/       # prints the summary and one sentence per reason
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Reason:
    code: str
    data: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"code": self.code, **self.data}


def _n(x: Any, scale: float = 1, unit: str = "") -> str:
    """A number to 3 significant digits; "n/a" for what could not be computed (never None or nan)."""
    return "n/a" if not isinstance(x, (int, float)) or not math.isfinite(x) else f"{x * scale:.3g}{unit}"


def _p(x: float) -> str:
    return f"{x:.2g}" if x < 0.01 else f"{x:.2f}"


def _cmp(d: dict) -> str:
    return (f"accuracy {_n(d['acc_a'])} vs {_n(d['acc_b'])} on {d['n']} pairs ({d['yardstick']} yardstick, "
            f"p={_p(d['mcnemar_p'])})")


def _margins(d: dict) -> str:
    return (f"train-held-out gap {_n(d['gap'])} ({_n(d['gap_share'], 100, '%')} of its training margin) vs "
            f"{_n(d['baseline_gap'])} ({_n(d['baseline_gap_share'], 100, '%')}), held-out margin std/|mean| "
            f"{_n(d['spread'])} vs {_n(d['baseline_spread'])}")


_PROBLEMS = {"nonfinite": "non-finite values (NaN/inf)", "divergence": "a diverging loss",
             "not_learned": "no yardstick rose above its step-0 accuracy",
             "at_chance": "held-out accuracy at or below chance"}


def _problems(codes: list[str]) -> str:
    return ", ".join(_PROBLEMS.get(c, c) for c in codes) or "no finding"


def _by(yardstick: str) -> str:
    """Whose scores an accuracy counts: each objective's own reward (not comparable across objectives, docs/
    decisions.md) or a common yardstick."""
    return "each on its own reward" if yardstick == "own" else f"on the {yardstick} yardstick"


def _gate_numbers(d: dict) -> str:
    """A gate check's evidence: the mean difference and its lower bound, or the share and its Wilson bound."""
    if d["rule"] == "not_worse":
        return (f"mean score difference {d['mean_diff']:+.3f} (candidate - replaced) on {d['n']} prompts, "
                f"lower {100 * (1 - d['alpha']):.0f}% bound {d['lower']:+.3f} against a margin of -{_n(d['margin'])}")
    side = "lower" if d["rule"] == "at_least" else "upper"
    # "scored >= 0.5", not "pass": under at_most the counted answers are the unwanted ones (refusals)
    return (f"{d['passing']} of {d['n']} prompts scored >= 0.5 by the judge ({_n(d['share'])}), Wilson {side} "
            f"{100 * (1 - d['alpha']):.0f}% bound {_n(d['bound'])} against {'at least' if side == 'lower' else 'at most'} "
            f"{_n(d['threshold'])}")


def _favours(d: dict) -> str:
    """Said only when it is true: a challenger's trouble favours the baseline when the baseline learned."""
    if d.get("favours") is None and "baseline_state" in d:
        return f": no switch, and the baseline {'learned nothing' if d['baseline_state'] == 'not_learned' else 'diverged'} too"
    return ": favours the baseline" if d.get("favours") else ": no switch"


def _not_significant(d: dict) -> str:
    parts = [f"{d['a']} vs {d['b']}: not significantly different ({_cmp(d)})"]
    if d["margins"] == "cleaner":
        parts.append(f"its margins are cleaner ({_margins(d)})")
    elif d["margins"] == "equal":
        parts.append("their margins are equal")
    if d.get("power_unknown") == "ceiling":
        parts.append(f"the baseline is too close to 100% for a {d['meaningful'] * 100:.0f}-point difference to exist")
    elif d.get("power_unknown") == "zero_variance":
        parts.append("the two never disagree on a pair, so no number of pairs would separate them")
    elif not d["powered"]:
        parts.append(f"{d['n']} pairs cannot detect a {d['meaningful'] * 100:.0f}-point difference "
                     f"(needs {d['pairs_to_detect']})")
    text = ", ".join(parts) + (f"; the observed difference {d['diff']:+.3f} would need about {d['pairs_needed']} "
                               "held-out pairs to reach significance" if d["pairs_needed"]
                               else "; the two rank the held-out pairs identically on balance")
    if d["seeds"] < 2:
        return text + "; run >= 3 seeds per cell to see the seed-to-seed spread"
    if d.get("seeds_needed"):
        return text + f"; with seed std {_n(d['seed_sd'])}, about {d['seeds_needed']} seeds per cell would " \
                      f"separate the means"
    return text + "; the seed means are identical or do not vary"


_WAYS = {"better": "significantly better", "worse": "significantly worse", "not_significant": "no significant "
         "difference"}


def _judge(r: dict) -> str:
    """One judge's numbers: a cell against the reference (win rate), or against another cell (per prompt)."""
    if "win_rate" in r:
        return (f"{r['judge']}: win rate {_n(r['win_rate'])}, {r['wins']} prompts won and {r['losses']} lost of "
                f"{r['n']} (p={_p(r['mcnemar_p'])})")
    need = f", about {r['prompts_needed']} prompts would detect it" if r.get("prompts_needed") else ""
    return (f"{r['judge']}: {_n(r['acc_a'])} vs {_n(r['acc_b'])}, {r['a_only']} prompts favour the first and "
            f"{r['b_only']} the second (p={_p(r['mcnemar_p'])}{need})")


def _judges(d: dict) -> str:
    against = "the reference" if d["against"] == "reference" else d["against"]
    if d["code"] == "judge_robust":
        return f"what {d['cell']} writes against {against}: every judge finds {_WAYS[d['direction']]}"
    first, odd = d["judges"][0], [r for r in d["judges"] if r["judge"] in d["disagreeing"]]
    return (f"what {d['cell']} writes against {against} depends on the judge: {first['judge']} finds "
            f"{_WAYS[first['direction']]}, but " + ", ".join(f"{r['judge']} finds {_WAYS[r['direction']]}"
                                                            for r in odd))


def _judge_reason(d: dict) -> str:
    numbers = f" ({'; '.join(_judge(r) for r in d['judges'])})"
    if "mcnemar_p" in d:  # it blocked a switch that the held-out pairs support
        return f"{d['cell']} is better (p={_p(d['mcnemar_p'])}) but no switch: {_judges(d)}{numbers}"
    return _judges(d) + numbers


def _seed_spread(d: dict) -> str:
    lead = (f"{d['cell']} is better (p={_p(d['mcnemar_p'])}) but no switch" if d["diff"] > 0 else
            f"{d['b']} is better than {d['a']} (p={_p(d['mcnemar_p'])}) but that does not settle it")
    seeds = (f"about {d['seeds_needed']} seeds per cell would settle it" if d["seeds_needed"] else
             "no number of seeds would separate them")
    return (f"{lead}: on the {d['yardstick']} yardstick the seed means differ by {d['seed_diff']:+.3f}, within "
            f"the seed-to-seed spread (std {_n(d['seed_sd_a'])} over {d['seeds_a']} seeds vs {_n(d['seed_sd_b'])} "
            f"over {d['seeds_b']}; accuracies {', '.join(_n(x) for x in d['seed_accuracies_a'])} vs "
            f"{', '.join(_n(x) for x in d['seed_accuracies_b'])}): {seeds}")


def _behaviour(d: dict) -> str:
    text = (f"what they write: {d['a']} wins {_n(d['win_rate_a'])} (length-controlled {_n(d['lc_win_rate_a'])}) "
            f"against the reference vs {_n(d['win_rate_b'])} ({_n(d['lc_win_rate_b'])}) for {d['b']}; per prompt, "
            f"{d['a_only']} prompts favour the first, {d['b_only']} the second (p={_p(d['mcnemar_p'])}, {d['n']} "
            f"prompts); generated length {_n(d['policy_len_a'])} vs {_n(d['policy_len_b'])} tokens")
    if "prompts_needed" not in d:
        return text
    return text + (f"; about {d['prompts_needed']} prompts would detect the observed difference "
                   f"{d['diff']:+.3f}" if d["prompts_needed"] else "; the two win equally often on balance")


# Group.state (comparisons.py) in words: the two troubles that make a cell unusable.
_STATES = {"diverged": "diverged", "not_learned": "learned nothing on the held-out pairs"}

# A significant lift that failed one switch condition: (the clause, its numbers; None: said with the cell's own).
NO_SWITCH: dict[str, tuple[str, Callable[[dict], str] | None]] = {
    "not_significant_adjusted": ("its p is not below alpha", lambda d: f"p is not below alpha/{d['challengers']} = "
                                 f"{_p(d['level'])}, {d['challengers']} challengers tested"),
    **{f"challenger_{state}": (f"it {words}", None) for state, words in _STATES.items()},
    "not_above_chance": ("it is not above chance", lambda d: f"its accuracy interval on the {d['yardstick']} "
                         f"yardstick starts at {_n(d['ci_low'])}"),
    "margins_not_cleaner": ("its margins are not cleaner", _margins),
    "margins_equal": ("its margins are equal, not cleaner", _margins),
    "worse_other_yardstick": ("it is significantly worse on the other yardstick", lambda d: ", ".join(
        f"{w['yardstick']} {w['diff']:+.3f}, p={_p(w['mcnemar_p'])}" for w in d["worse"])),
}

TEMPLATES: dict[str, Callable[[dict], str]] = {
    "cell_not_finished": lambda d: f"cell {d['cell']} {d['status']}" + (f": {d['error']}" if d["error"] else "")
    + "; reported, not compared",
    "all_at_chance": lambda d: "every preference-objective cell learned nothing on the held-out pairs and none "
    "diverged: " + "; ".join(f"{c['cell']} {_n(c['accuracy'])} (95% CI {_n(c['ci'][0])}-{_n(c['ci'][1])}: "
                             f"{_problems(c['problems'])})" for c in d["cells"])
    + ". No objective learned a held-out preference, so switching objective (ORPO included) would not help: "
      "check that chosen/rejected labels are meaningful (not random or flipped), or train longer",
    "all_unstable": lambda d: "no preference-objective cell is usable, and some diverged: "
    + "; ".join(f"{c['cell']} ({_problems(c['problems'])})" for c in d["cells"])
    + "".join(f"; {c['cell']} failed: {c['error']}" for c in d["failed"]),
    "family_not_tried": lambda d: f"no {d['family']} objective was in the matrix; it was not tried",
    "fallback_unstable": lambda d: f"the {d['objective']} cells diverged or learned nothing too: "
    + "; ".join(f"{c['cell']} ({_problems(c['problems'])})" for c in d["cells"]),
    "fallback_not_run": lambda d: f"{d['objective']} was not in the matrix: run it to confirm it trains stably",
    "baseline_missing": lambda d: f"the baseline cell ({d['objective']}, rank {d['lora_rank']}) did not finish: "
    "nothing to compare against",
    "single_objective": lambda d: f"no other objective finished beside {d['objective']}: the objective cannot be "
    "judged (only the rank)",
    "stand_in": lambda d: f"{d['objective']} has no finished cell at rank {d['lora_rank']}; its best cell "
    f"{d['cell']} stands in (objective and rank are confounded there)",
    "no_shared_pairs": lambda d: f"{d['a']} shares no held-out pair ids with {d['b']}: not compared",
    "comparison": lambda d: f"{d['a']} vs {d['b']} on {d['n']} held-out pairs: accuracy {_n(d['acc_a'])} vs "
    f"{_n(d['acc_b'])} {_by(d['yardstick'])} (diff {d['diff']:+.3f}, 95% CI {d['ci'][0]:+.3f} to {d['ci'][1]:+.3f}), {d['a_only']} pairs "
    f"only the first gets right, {d['b_only']} only the second, McNemar p={_p(d['mcnemar_p'])}"
    + "".join(f"; {y['yardstick']} yardstick {y['diff']:+.3f} (p={_p(y['mcnemar_p'])})" for y in d["yardsticks"]),
    "own_reward_only": lambda d: f"no switch to {d['cell']}: {d['objective']} ranks more held-out pairs correctly "
    f"on its own reward ({_n(d['own']['acc_a'])} vs {_n(d['own']['acc_b'])}, p={_p(d['own']['mcnemar_p'])}) but "
    f"not on a common yardstick (best: {d['best']['yardstick']} {d['best']['diff']:+.3f}, adjusted "
    f"p={_p(d['best']['mcnemar_p'])}): the lift comes from how its own reward scores pairs, not from a policy "
    f"that ranks them better",
    **{code: (lambda d, why=why, numbers=numbers: f"{d['cell']} is better (p={_p(d['mcnemar_p'])}) but no switch: "
              f"{why} ({numbers(d)})") for code, (why, numbers) in NO_SWITCH.items() if numbers},
    **{f"challenger_{state}": lambda d, w=words: f"{d['cell']} {w} ({_problems(d['problems'])})" + _favours(d)
       for state, words in _STATES.items()},
    "switch_rule_met": lambda d: f"switch: {d['cell']} ranks {d['a_only'] - d['b_only']} more pairs correctly on "
    f"the {d['yardstick']} yardstick, adjusted p={_p(d['mcnemar_p'])} < {_p(d['level'])} (alpha {d['alpha']} over "
    f"{d['challengers']} challenger(s)), accuracy interval {_n(d['ci_low'])}-{_n(d['ci_high'])} above chance, "
    f"cleaner margins: {_margins(d)}",
    "direct_vs_baseline": lambda d: f"{d['a']} vs the baseline {d['b']} directly: {_cmp(d)}",
    **{f"baseline_{state}": lambda d, w=words: f"the baseline {d['cell']} {w} ({_problems(d['problems'])}): not a "
       "position to keep" for state, words in _STATES.items()},
    "check_passed": lambda d: f"gate check {d['check']} passes under {d['judge']}: {_gate_numbers(d)}",
    "check_failed": lambda d: f"gate check {d['check']} fails under {d['judge']}: {_gate_numbers(d)}, short by "
    f"{_n(d['shortfall'])}" + (f"; about {d['prompts_needed']} prompts at this rate would settle it"
                               if d.get("prompts_needed") else ""),
    "check_judge_dependent": lambda d: f"gate check {d['check']} depends on the judge: it passes under "
    f"{', '.join(d['passing'])} and fails under {', '.join(d['failing'])}; it counts as failed",
    "ship": lambda d: f"ship: every gate check passes ({', '.join(d['checks']) or 'no checks'})",
    "hold": lambda d: f"hold: {', '.join(d['failed'])} failed; nothing is exported",
    "learned_elsewhere": lambda d: f"{d['cell']} did learn ({d['yardstick']} {_n(d['step0'])} -> {_n(d['final'])}, "
    f"95% interval from {_n(d['ci_low'])}) but the verdict rests on other cells: to test it, decide with "
    f"--baseline objective={d['objective']},lora_rank={d['lora_rank']} (or run the other objectives at rank "
    f"{d['lora_rank']} with more seeds)",
    "baseline_not_above_chance": lambda d: f"the baseline {d['cell']}'s held-out accuracy {_n(d['accuracy'])} has a "
    f"95% interval {_n(d['ci'][0])}-{_n(d['ci'][1])} that includes chance: no evidence it learned the preference, "
    "nothing to keep",
    "baseline_better": lambda d: f"{d['b']} is significantly better than {d['a']} (p={_p(d['mcnemar_p'])}): "
    "favours the baseline",
    "no_difference": lambda d: f"{d['a']} is not significantly different (p={_p(d['mcnemar_p'])}), its margins "
    f"are not cleaner, and {d['n']} pairs were enough to detect a {d['meaningful'] * 100:.0f}-point difference "
    f"(needs {d['pairs_to_detect']}): favours the baseline",
    "not_significant": _not_significant,
    "behaviour_comparison": _behaviour,
    "judge_robust": _judge_reason,
    "judge_dependent": _judge_reason,
    "within_seed_spread": _seed_spread,
    "pairs_behaviour_disagree": lambda d: f"{d['cell']}: pairs and behaviour disagree: "
    + ("it ranks more held-out pairs correctly" if d["pairs"]["diff"] > 0 else "it ranks fewer held-out pairs "
       "correctly") + f" ({d['pairs']['yardstick']} {d['pairs']['diff']:+.3f}, p={_p(d['pairs']['mcnemar_p'])}) but "
    + ("wins less often" if d["behaviour"]["diff"] < 0 else "wins more often")
    + f" against the reference ({d['behaviour']['diff']:+.3f}, p={_p(d['behaviour']['mcnemar_p'])})",
    "lc_erases_win": lambda d: f"{d['cell']}'s behaviour win is mostly length: win rate {_n(d['win_rate_a'])} vs "
    f"{_n(d['win_rate_b'])}, but length-controlled {_n(d['lc_win_rate_a'])} vs {_n(d['lc_win_rate_b'])}",
    "win_with_length_shift": lambda d: f"{d['cell']} wins with answers {abs(d['len_change']):.0%} "
    f"{'longer' if d['len_change'] > 0 else 'shorter'} ({_n(d['policy_len_a'])} vs {_n(d['policy_len_b'])} tokens): "
    "check for length exploitation",
    "round_comparison": lambda d: f"{d['a']} vs {d['b']} on the same held-out pairs and prompts ("
    f"{', '.join(d['compared'])}): " + ("; ".join(
        f"{'better' if c['diff'] > 0 else 'worse'} on {c['yardstick']} ({c['acc_a']:.3f} vs {c['acc_b']:.3f}, "
        f"p={_p(c['mcnemar_p'])})" for c in d["gains"] + d["losses"]) or "no significant difference"),
    "round_length_only": lambda d: f"{d['round']}'s behaviour gain is length: win rate {_n(d['win_rate_a'])} vs "
    f"{_n(d['win_rate_b'])}, length-controlled {_n(d['lc_win_rate_a'])} vs {_n(d['lc_win_rate_b'])}",
    "round_pairs_only": lambda d: f"{d['round']} gained on {', '.join(d['yardsticks'])} but wins less often against "
    f"the original reference than {d['b']} ({_n(d['acc_a'])} vs {_n(d['acc_b'])} per prompt, p={_p(d['mcnemar_p'])}): "
    "its held-out log-probs moved, what it writes did not improve",
    "lower_rank_equivalent": lambda d: f"rank {d['lora_rank']} is not significantly different from rank "
    f"{d['best_rank']} for {d['objective']} (accuracy {_n(d['acc_a'])} vs {_n(d['acc_b'])}, p={_p(d['mcnemar_p'])}"
    f"; training margin {_n(d['train_margin'])} vs {_n(d['best_train_margin'])}): prefer the lower rank "
    f"{d['lora_rank']}",
    "best_rank": lambda d: f"rank {d['lora_rank']} is the best rank for {d['objective']} (held-out accuracy "
    f"{_n(d['accuracy'])}), " + ("lower ranks are significantly worse" if d["lower_ranks_worse"]
                                 else "also the lowest"),
}


def render(reason: Reason | dict) -> str:
    """One sentence for a reason (a Reason or its ``to_dict()`` form)."""
    d = reason.to_dict() if isinstance(reason, Reason) else reason
    return TEMPLATES[d["code"]](d)


def render_summary(basis: Reason | dict) -> str:
    """The verdict's one-line summary from the reason that decided it, and what behaviour says beside it."""
    d = basis.to_dict() if isinstance(basis, Reason) else basis
    return SUMMARIES[d["code"]](d) + "".join(f" {head}" + "; ".join(render(n) for n in d[key]) + "."
                                             for key, head in _BESIDE if d.get(key))


_BESIDE = (("behaviour", "Behaviour: "), ("data", "Data: "), ("elsewhere", "Meanwhile "))


def _first(d: dict) -> str:
    return f"the last round {'beats' if d['last_beats_first'] else 'does not beat'} the first"


def _undecided(d: dict) -> str:
    if not d["baseline_learned"]:
        why = f"the baseline {d['baseline']} shows no reliable held-out learning"
    elif d["blocked"]:
        why = "; ".join(_blocked(b) for b in d["blocked"])
    else:
        why = f"the held-out evidence does not separate {d['baseline']} from {', '.join(d['others'])}"
    settle = f"; about {d['pairs_needed']} held-out pairs (or more seeds) would settle it" if d["pairs_needed"] else ""
    return f"Not decisive: {why}{settle}."


# The verdict's summary, per deciding reason code.
SUMMARIES: dict[str, Callable[[dict], str]] = {
    "switch": lambda d: f"Switch from {d['from']} to {d['to']} (rank {d['lora_rank']}): it ranks "
    f"{d['a_only'] - d['b_only']} more of {d['n']} held-out pairs correctly on the {d['yardstick']} yardstick "
    f"(McNemar p={_p(d['mcnemar_p'])}, adjusted) with cleaner margins.",
    "keep": lambda d: f"Keep {d['objective']} (rank {d['lora_rank']}): on {d['pairs']} held-out pairs every other "
    f"objective was significantly worse, diverged, learned nothing, or was no different where a {d['meaningful'] * 100:.0f}-point "
    "difference would have shown.",
    "fallback": lambda d: f"Fall back to {d['objective'].upper()} (rank {d['lora_rank']}): every preference-objective "
    f"cell diverged or learned nothing, and one diverged; it reached held-out accuracy {_n(d['accuracy'])}.",
    "fallback_not_run": lambda d: f"Fall back to {d['objective'].upper()}: every preference-objective cell diverged or "
    "learned nothing, and one diverged.",
    "fallback_unstable": lambda d: "Not decisive: every cell, the fallback included, diverged or learned nothing; "
    "check the data (are labels meaningful?) and the learning rate.",
    "all_at_chance": lambda d: "Not decisive: no objective learned a held-out preference (no cell rose above its "
    "step-0 accuracy and none diverged); check the labels or train longer.",
    "round_gain": lambda d: f"Continue iterating: {d['round']} gained significantly over {d['previous']} on "
    f"{', '.join(d['yardsticks'])}; {_first(d)}.",
    "round_no_gain": lambda d: f"Stop iterating: {d['round']} brought " + (
        "only length" if d["length_only"] else "a gain on held-out pairs while what it writes got worse"
        if d.get("pairs_only") else "no significant gain") + f" over {d['previous']}; {_first(d)}.",
    "single_round": lambda d: f"Stop: only {d['round']} finished, nothing to compare it with.",
    "round_judge_dependent": lambda d: f"Stop iterating: {d['round']}'s only gain over {d['previous']} is in what "
    f"it writes, and the judges disagree on it ({', '.join(d['disagreeing'])} against {d['judges'][0]['judge']}); "
    f"{_first(d)}.",
    "baseline_missing": lambda d: "Not decisive: the baseline cell did not finish.",
    "single_objective": lambda d: f"Not decisive: only {d['objective']} finished, so the objective was not tested; "
    f"rank {d['lora_rank']} is recommended.",
    "not_decisive": _undecided,
}


def _blocked(d: dict) -> str:
    """A significant lift that failed a switch condition, as a clause of the summary."""
    if d["code"] == "own_reward_only":
        return render(d).split(": ", 1)[1]
    if d["code"] == "within_seed_spread":
        return (f"{d['objective']} differs from the baseline by {d['seed_diff']:+.3f} on the {d['yardstick']} "
                "yardstick, within the seed-to-seed spread" + (f" (about {d['seeds_needed']} seeds per cell would "
                                                                "settle it)" if d["seeds_needed"] else ""))
    if d["code"] == "judge_dependent":
        return (f"{d['objective']} ranks more held-out pairs correctly on the {d['yardstick']} yardstick "
                f"(p={_p(d['mcnemar_p'])}) but the judges disagree on what it writes ({', '.join(d['disagreeing'])} "
                f"against {d['judges'][0]['judge']})")
    return (f"{d['objective']} ranks more held-out pairs correctly on the {d['yardstick']} yardstick "
            f"(p={_p(d['mcnemar_p'])}) but {NO_SWITCH[d['code']][0]}")


# --- the data audit (data/audit.py, evaluation/audit.py): its findings, and the reasons decide draws from them ---

def _pct(x: float) -> str:
    return f"{x:.0%}" if isinstance(x, (int, float)) and math.isfinite(x) else "n/a"


def _rule(d: dict) -> str:
    return (f"chosen is shorter in {_pct(d['chosen_shorter'])}, longer in {_pct(d['chosen_longer'])}, equal in "
            f"{_pct(d['equal'])} of {d['pairs']} pairs ({d['unit']}); the rule 'prefer the {d['rule']}' gets "
            f"{_pct(d['rule_accuracy'])} of the labels right (95% CI {_pct(d['ci'][0])}-{_pct(d['ci'][1])})"
            + (f": training will also teach a {d['teaches']} prior" if d["teaches"] else ": no length prior to learn"))


def _cut(d: dict) -> str:
    splits = "; ".join(f"{name} {s['truncated']} of {s['rows']} pairs truncated, {s['dropped']} dropped"
                       for name, s in d["splits"].items())
    whole = f"; --max-length {d['whole_at']} keeps 95% of training pairs whole" if d.get("whole_at") else ""
    return f"at --max-length {d['max_length']}: {splits}{whole}"


AUDIT: dict[str, Callable[[dict], str]] = {
    "bad_rows": lambda d: (f"{d['bad']} of {d['rows']} rows are bad (" + ", ".join(
        f"{k.replace('_', ' ')}: {n}" for k, n in d["kinds"].items()) + "): training stops at the first one unless "
        "--bad-rows skip") if d["bad"] else f"no bad rows in {d['rows']}",
    "duplicate_pairs": lambda d: f"{d['rows']} rows repeat an earlier pair exactly "
    f"({_pct(d['rows'] / max(1, d['pairs']))} of {d['pairs']} pairs): each copy counts again in training"
    if d["rows"] else "no row repeats an earlier pair",
    "near_duplicate_prompts": lambda d: f"{d['prompts']} prompts differ from another only in case, punctuation or "
    f"spacing ({d['groups']} groups among {d['distinct_prompts']} distinct prompts)" if d["prompts"] else
    f"no two of the {d['distinct_prompts']} distinct prompts differ only in case, punctuation or spacing",
    "contradictions": lambda d: f"{d['rows']} rows label a pair the opposite way of an earlier row (same prompt, "
    "chosen and rejected swapped): training pulls both ways" if d["rows"] else "no pair is labelled both ways",
    "chosen_equals_rejected": lambda d: f"{d['rows']} rows have chosen equal to rejected once whitespace is ignored: "
    "nothing to prefer but whitespace" if d["rows"] else "no pair has chosen equal to rejected",
    "same_answers": lambda d: f"{d['rows']} pairs repeat the chosen and rejected of a pair under another prompt: they "
    "differ only in the prompt" if d["rows"] else "no two pairs differ only in the prompt",
    "heldout_leak": lambda d: (f"{d['exact'] + d['near']} of {d['heldout_prompts']} held-out prompts "
                               f"({_pct(d['share'])}; {d['exact']} exactly, {d['near']} nearly) also appear in "
                               f"training, {d['leaked_pairs']} of {d['heldout_pairs']} held-out pairs: held-out "
                               "accuracy is inflated by prompts seen in training")
    if d["exact"] + d["near"] else "no held-out prompt appears in training, exactly or nearly",
    "length_bias": _rule,
    "length_rule": lambda d: _rule(d) + f"; the reference alone agrees with the rule on {_pct(d['reference_agrees'])} "
    "of the pairs it decides",
    "truncation": _cut,
    "reference_ranking": lambda d: f"before training, the reference ranks the {d['pairs']} held-out pairs: "
    + "; ".join(f"{y['yardstick']} {_n(y['accuracy'])} (95% CI {_n(y['ci'][0])}-{_n(y['ci'][1])})"
                for y in d["yardsticks"])
    + " (a reference-relative yardstick ties every pair at step 0)",
    "label_noise": lambda d: f"the reference ranks {_pct(d['against'])} of {d['pairs']} training pairs strongly "
    f"against their label (95% CI {_pct(d['ci'][0])}-{_pct(d['ci'][1])}; length-normalized margin below "
    f"-{_n(d['threshold'])} nats per token): a label-noise estimate",
    "judge_agreement": lambda d: f"judge {d['judge']} agrees with the labels on {_pct(d['agreement'])} of {d['pairs']} "
    f"sampled pairs (95% CI {_pct(d['ci'][0])}-{_pct(d['ci'][1])}, {d['ties']} ties)",
    "length_learned": lambda d: f"{d['cell']} learned the data's {d['teaches']} prior: on {d['pairs']} held-out pairs "
    f"of unequal length, training moved it toward the {d['rule']} completion in {_pct(d['follows'])} (95% CI "
    f"{_pct(d['ci'][0])}-{_pct(d['ci'][1])}); the held-out labels pick that one in {_pct(d['labels_follow'])}, the "
    f"training labels in {_pct(d['rule_accuracy'])}",
}
TEMPLATES.update(AUDIT)
