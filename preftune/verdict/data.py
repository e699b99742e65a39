"""What the data audit (audit.json) means for a verdict and for the report: the reasons decide draws from it
(held-out prompts that leak from training, a cell whose moves follow the data's length prior) and the report's
data section (counts, findings, the length-bias plot, escaped examples of each finding).

    reasons = data_reasons(MatrixDir(Path("matrix")), decision_cells)   # [] for a folder without audit.json
    md, html = data_section(read_audit(Path("matrix")))
"""

from __future__ import annotations

from typing import Any

from ..core.intervals import wilson_interval
from ..core.layout import Audit, CellResult, MatrixDir, read_audit
from ..evaluation import yardsticks
from ..evaluation.runlog import load
from .markup import esc, findings_html, md_esc
from .matrix_page import shown
from .plots import length_ratio_plot
from .reasons import Reason, render

PRIOR = 0.6          # a cell whose moves follow the length rule this often (and significantly) learned the prior
MIN_PAIRS = 10       # held-out pairs of unequal length needed to say so
NOT_NUMBERS = ("code", "severity", "examples", "histogram")


def data_reasons(matrix: MatrixDir, cells: list[CellResult]) -> list[Reason]:
    """``heldout_leak`` when held-out prompts also appear in training, and ``length_learned`` for each finished cell
    whose held-out moves follow the training data's length prior."""
    audit = read_audit(matrix.path)
    if audit is None:
        return []
    out = leak_reasons(audit)
    bias = audit.find("length_bias")
    if bias and bias.get("teaches"):
        for c in cells:
            r = length_learned(c.name, load(matrix.cell(c.name).path).pairs or [], bias) if c.finished else None
            out += [r] if r else []
    return out


def leak_reasons(audit: Audit | None) -> list[Reason]:
    """``heldout_leak`` when the audit found held-out prompts in training (a matrix's, or iterate's prompts)."""
    leak = audit.find("heldout_leak") if audit else None
    if not leak or not leak["exact"] + leak["near"]:
        return []
    return [Reason("heldout_leak", {k: v for k, v in leak.items() if k not in NOT_NUMBERS})]


def length_learned(cell: str, pairs: list[dict], bias: dict[str, Any]) -> Reason | None:
    """Whether training moved ``cell`` toward the completion the length rule picks (shorter or longer), on held-out
    pairs of unequal length: the sign of the reference-relative margin is the direction training moved a pair."""
    moved = next(f"{y.name}_margin" for y in yardsticks.logprob_yardsticks() if y.needs_reference)
    rows = [p for p in pairs if isinstance(p.get(moved), (int, float)) and p[moved] != 0
            and p.get("chosen_tokens") != p.get("rejected_tokens")]
    if len(rows) < MIN_PAIRS:
        return None
    picks = [(p["chosen_tokens"] < p["rejected_tokens"]) == (bias["rule"] == "shorter") for p in rows]  # rule: chosen
    follows = sum((p[moved] > 0) == pick for p, pick in zip(rows, picks))
    lo, hi = wilson_interval(follows, len(rows))
    if follows / len(rows) < PRIOR or lo <= 0.5:
        return None
    return Reason("length_learned", {"cell": cell, "rule": bias["rule"], "teaches": bias["teaches"],
                                     "pairs": len(rows), "follows": follows / len(rows), "ci": [lo, hi],
                                     "labels_follow": sum(picks) / len(rows), "rule_accuracy": bias["rule_accuracy"]})


def data_section(audit: Audit) -> tuple[list[str], str]:
    """(Markdown lines, HTML) of the report's data section."""
    c = audit.counts
    counts = (f"{c.get('rows', 0)} training rows, {c.get('pairs', 0)} pairs, {c.get('prompts', 0)} distinct prompts, "
              f"{c.get('bad_rows', 0)} bad rows; {c.get('heldout_pairs', 0)} held-out pairs, "
              f"{c.get('heldout_prompts', 0)} held-out prompts")
    items = [(f.get("severity", "info"), f["code"], render(f)) for f in audit.findings]
    md = ["## Data", "", md_esc(counts), ""] + [f"- **{s}** {code}: {md_esc(t)}" for s, code, t in items] + [""]
    bias = audit.find("length_bias")
    plot = length_ratio_plot(bias["histogram"]) if bias and bias.get("histogram") else ""
    cards = "".join(_examples(f) for f in audit.findings if f.get("examples"))
    html = (f"<h2>Data</h2><p class='meta'>{esc(counts)}</p>{findings_html(items)}"
            + (f"<div class='grid'><div class='card'>{plot}</div></div>" if plot else "")
            + (f"<h3>Examples of each finding</h3><div class='grid' id='data-examples'>{cards}</div>" if cards else ""))
    return md, html


def _examples(f: dict[str, Any]) -> str:
    """Cards for a finding's examples, every text escaped and its invisible characters shown."""
    out = []
    for ex in f["examples"]:
        texts = "".join(f"<b>{esc(k)}</b><pre>{shown(str(ex[k]))}</pre>" for k in ("prompt", "chosen", "rejected",
                                                                                  "why") if k in ex)
        out.append(f"<div class='card' style='flex:1 1 30%'><h3>{esc(f['code'])}: {esc(' / '.join(ex['ids']))}</h3>"
                   f"{texts}</div>")
    return "".join(out)
