"""The pipeline's report page: each stage with its state and verdict, the gate table with every check's
numbers and intervals under every judge, and links to each stage's own report. Also the shipped model card's
evidence sections.

    preftune report loop/        # loop/report.md, loop/report.html for a `preftune pipeline` folder
"""

from __future__ import annotations

from typing import Any

from ..core.layout import GATE_RECORD, REPORT_HTML, PipelineDir, Stage
from .gate import table_cells
from .markup import VERDICT_COLORS, esc, html_table, md_esc, md_table, num

STAGE_HEAD = ("stage", "state", "verdict", "folder")
GATE_HEAD = ("check", "rule", "judge", "result", "evidence", "interval bound", "prompts to settle")


def pipeline_page(out: PipelineDir, stages: dict[str, Stage]) -> tuple[str, str]:
    """(Markdown, HTML body) of a pipeline folder whose manifest lists ``stages``."""
    gate = out.read_gate() if (out.gate / GATE_RECORD).exists() else None
    rows = [[s.name, s.status, s.verdict or s.error or "", _folder(out, s.name)] for s in stages.values()]
    checks = _gate_rows(gate)
    title = f"preftune pipeline: {out.path.name}"
    headline = f"Gate: {gate['verdict']}. " + gate["explanation"][-1] if gate else "No gate has run yet."
    md = [f"# {md_esc(title)}", "", f"**{md_esc(headline)}**", "", "## Stages", ""] + md_table(STAGE_HEAD, rows)
    if checks:
        md += ["", "## Gate", ""] + md_table(GATE_HEAD, checks) + [""] + [f"- {md_esc(t)}" for t in gate["explanation"]]
    color = VERDICT_COLORS["keep" if gate and gate["verdict"] == "ship" else "not_decisive"]
    links = "".join(f"<li><a href='{esc(_folder(out, s.name))}/{REPORT_HTML}'>{esc(s.name)}</a></li>"
                    for s in stages.values() if (out.path / _folder(out, s.name) / REPORT_HTML).exists())
    body = (f"<h1>{esc(title)}</h1><p class='verdict' id='verdict' style='--c:{color}'>{esc(headline)}</p>"
            "<h2>Stages</h2>" + html_table(STAGE_HEAD, rows, 4)
            + (f"<h2>Gate</h2>{html_table(GATE_HEAD, checks, 4)}<ol>"
               + "".join(f"<li>{esc(t)}</li>" for t in gate["explanation"]) + "</ol>" if checks else "")
            + (f"<h2>Each stage's own report</h2><ul>{links}</ul>" if links else ""))
    return "\n".join(md) + "\n", body


def _folder(out: PipelineDir, stage: str) -> str:
    return getattr(out, {"iterate": "rounds", "decide": "matrix"}.get(stage, stage)).name


def _gate_rows(gate: dict[str, Any] | None) -> list[list[str]]:
    return [[c["check"], c["rule"], judge, "pass" if r["code"] == "check_passed" else "FAIL",
             *table_cells(c["rule"], r), num(r.get("prompts_needed"), "d")]
            for c in (gate or {}).get("checks", []) for judge, r in c["judges"].items()]


def evidence_card(evidence: dict[str, Any] | None) -> str:
    """The model card's evidence sections: where the model came from, the matrix verdict, the gate table."""
    if not evidence:
        return ""
    lines = ["", "## Provenance", "", f"The pipeline's base model, as its recipe names it: `{evidence.get('base_model')}`."]
    sft = evidence.get("sft")
    if sft:
        lines.append(f"SFT first: {sft['objective']}, rank {sft['lora_rank']}, {sft['steps']} steps.")
    data = evidence.get("data")
    if data:
        lines += ["", "## Data audit", "", f"Audit of the matrix's data: {md_esc(data['headline'])}."]
    m = evidence["matrix"]
    lines += ["", "## Why this cell", "", f"Matrix verdict **{m['verdict']}** -> {m['objective']} r={m['lora_rank']} "
              f"(cell `{evidence['candidate']}`). {m['summary']}"]
    gate = evidence.get("gate")
    if gate:
        lines += ["", f"## Gate: {gate['verdict']}", "", "| check | rule | judge | result | evidence | bound |",
                  "|---|---|---|---|---|---|"]
        lines += [f"| {md_esc(check)} | {rule} | `{judge}` | {result} | {evidence} | {bound} |"
                  for check, rule, judge, result, evidence, bound, _ in _gate_rows(gate)]
        lines += [""] + [f"- {md_esc(t)}" for t in gate["explanation"]]
    return "\n".join(lines) + "\n"
