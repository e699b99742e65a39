"""A report a person wants to read: report.md and one self-contained report.html (inline CSS and SVG).

    preftune report matrix/       # matrix/report.md, matrix/report.html (uses decision.json, else decides)
    preftune report iter/         # a rounds folder (preftune iterate): one row per round, and its verdict
    preftune report runs/x        # one run: runs/x/report.md, runs/x/report.html (write_run_report)

The HTML needs no network: no scripts, no external files; the plots are SVG drawn here by hand (plots.py). Every
string read from a file (cell names, dataset text, error messages) is HTML-escaped.
"""

from __future__ import annotations

from pathlib import Path

from ..core.files import atomic_write_text
from ..core.layout import (
    REPORT_HTML,
    REPORT_MD,
    Decision,
    MatrixDir,
    PipelineDir,
    RoundsDir,
    folder_kind,
    read_audit,
)
from ..evaluation.review import audit_of, diagnose
from ..evaluation.runlog import load
from .data import data_section
from .decide import decision_of
from .judges_page import judges_section
from .markup import VERDICT_COLORS, esc, findings_html, html_table, lc, lens, md_esc, md_table, num, page, win
from .matrix_page import matrix_html, matrix_md
from .pipeline_page import pipeline_page
from .plots import length_bars, margin_plot, scatter


def write_any(folder: str | Path) -> tuple[Path, Path]:
    """The report a folder calls for: a pipeline's stages and gate, a matrix's or a rounds folder's verdict, or
    one run's findings."""
    root = Path(folder)
    return write_report(root) if folder_kind(root) in ("pipeline", "matrix", "rounds") else write_run_report(root)


def write_report(folder: str | Path) -> tuple[Path, Path]:
    """Write report.md and report.html into a matrix or rounds folder (its decision.json, else decided now);
    return their paths.

        md, page = write_report("matrix/")      # preftune report matrix/
    """
    root = Path(folder)
    if folder_kind(root) == "pipeline":
        out = PipelineDir(root)
        stages = out.read_manifest()[1]
        for stage, sub in (("sft", out.sft), ("iterate", out.rounds)):  # the matrix's: written by decide
            if stage in stages and stages[stage].status == "done" and not (sub / REPORT_HTML).exists():
                write_any(sub)
        return _write(root, *pipeline_page(out, stages))
    d = decision_of(root)
    if d.rounds:
        return _write(root, *_rounds_page(RoundsDir(root), d))
    logs = {c.name: load(MatrixDir(root).cell(c.name).path) for c in d.cells if c.finished}
    audit = read_audit(root)
    md, html = data_section(audit) if audit else ([], "")
    return _write(root, matrix_md(d, logs, root.name, md), matrix_html(d, logs, root.name, html))


def write_run_report(run_dir: str | Path) -> tuple[Path, Path]:
    """Write report.md and report.html for one run folder: its review findings and plots.

        md, page = write_run_report("runs/x")   # preftune report runs/x
    """
    root = Path(run_dir)
    log = load(root)
    audit = audit_of(root)
    items = [(f.severity, f.code, f.sentence) for f in diagnose(log, audit)]
    data_md, data_html = data_section(audit) if audit else ([], "")
    md = f"# preftune run report: {md_esc(root.name)}\n\n" + "".join(
        f"- **{s}** {c}: {md_esc(t)}\n" for s, c, t in items) + "".join(f"\n{line}" for line in data_md)
    body = (f"<h1>preftune run report: {esc(root.name)}</h1><h2>Findings</h2>{findings_html(items)}"
            f"<h2>Plots</h2><div class='grid'>{margin_plot(log, 'training vs held-out margin')}"
            + (scatter(log, "margin vs length difference") + length_bars(log) if log.pairs else "")
            + "</div>" + data_html)
    return _write(root, md, body)


def _write(root: Path, md: str, body: str) -> tuple[Path, Path]:
    paths = root / REPORT_MD, root / REPORT_HTML
    atomic_write_text(paths[0], md)
    atomic_write_text(paths[1], page(f"preftune: {root.name}", body))
    return paths


def _rounds_page(rounds: RoundsDir, d: Decision) -> tuple[str, str]:
    """(Markdown, HTML body) for ``preftune iterate``'s folder: one row per round, and the rounds' verdict."""
    name = rounds.path.name
    head = ["round", "pairs (dropped)", "judge: chosen / rejected", "held-out accuracy", "win rate [95% CI]",
            "LC win rate ± 95%", "generated length policy / reference"]
    rows = [[f"{r['round']}", f"{r['pairs']} ({sum(r['dropped'].values())})",
             f"{num(r['chosen_score'])} / {num(r['rejected_score'])}", num(r["eval_accuracy"], ".3f"),
             win(r), lc(r), lens(r)] for r in rounds.read_lines()]
    judges_md, judges_html = judges_section({r.name: load(r.path) for r in rounds.rounds() if r.finished()})
    md = "\n".join([f"# preftune iterate: {md_esc(name)}", "", f"**{md_esc(d.summary)}**", ""]
                   + md_table(head, rows) + judges_md + ["", "## Why", ""] + [f"- {md_esc(t)}" for t in d.explanation]) \
        + "\n"
    color = VERDICT_COLORS["switch" if d.verdict == "continue" else "not_decisive"]
    body = (f"<h1>preftune iterate: {esc(name)}</h1><p class='verdict' id='verdict' style='--c:{color}'>"
            f"{esc(d.summary)}</p><p class='meta'>Win rates are against the original reference, on the same held-out"
            " prompts every round, so rounds compare.</p>" + html_table(head, rows) + judges_html + "<h2>Why</h2><ol>"
            + "".join(f"<li>{esc(t)}</li>" for t in d.explanation) + "</ol>")
    return md, body
