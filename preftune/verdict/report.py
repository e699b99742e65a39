"""A report a person wants to read: report.md and one self-contained report.html (inline CSS and SVG).

    preftune report matrix/       # matrix/report.md, matrix/report.html (uses decision.json, else decides)
    preftune report runs/x        # one run: runs/x/report.md, runs/x/report.html (write_run_report)

The HTML needs no network: no scripts, no external files; the plots are SVG drawn here by hand. Every string
read from a file (cell names, dataset text, error messages) is HTML-escaped.
"""

from __future__ import annotations

import html
import json
import math
import unicodedata
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ..core.errors import InputError
from ..core.files import atomic_write_text
from ..data.rows import as_text, load_examples
from ..evaluation import stats, yardsticks
from ..evaluation.review import Log, diagnose, load
from .decide import RULES, decide
from .reasons import render

TRAIN_COLOR, HELD_COLOR = "#2563eb", "#dc2626"
VERDICT_COLORS = {"switch": "#1d4ed8", "keep": "#15803d", "not_decisive": "#b45309", "fallback_orpo": "#7e22ce"}
CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;color:#1f2937;max-width:1180px;
 margin:24px auto;padding:0 16px}
h1{font-size:22px;margin:0 0 8px}h2{font-size:17px;margin:28px 0 8px;border-bottom:1px solid #e5e7eb;
 padding-bottom:4px}
.verdict{font-size:18px;font-weight:600;padding:12px 16px;border-left:6px solid var(--c);background:#f9fafb}
.meta{color:#6b7280;margin:6px 0 0}.tag{display:inline-block;padding:0 6px;border-radius:4px;font-size:12px;
 background:#e5e7eb;margin-left:4px}
table{border-collapse:collapse;width:100%;font-size:13px}th,td{border-bottom:1px solid #e5e7eb;padding:5px 6px;
 text-align:left;vertical-align:top}th{background:#f3f4f6}td.num{text-align:right;font-variant-numeric:tabular-nums;
 white-space:nowrap}
tr.rec{background:#eff6ff}.warn{color:#b45309}.error{color:#b91c1c}.info{color:#6b7280}
ul.f{margin:0;padding-left:16px}.grid{display:flex;flex-wrap:wrap;gap:12px}.card{border:1px solid #e5e7eb;
 border-radius:6px;padding:8px}.card h3{font-size:13px;margin:0 0 4px;word-break:break-all}
svg text{font:11px system-ui,sans-serif;fill:#374151}pre{white-space:pre-wrap;overflow-wrap:anywhere;margin:2px 0;
 background:#f9fafb;padding:4px 6px;border-radius:4px;unicode-bidi:isolate;max-height:16em;overflow-y:auto}
.cc{font-size:10px;color:#b91c1c;border:1px solid #fca5a5;border-radius:3px;padding:0 2px;margin:0 1px}
table.m2{width:auto}table.m2 td,table.m2 th{padding:6px 14px;border:1px solid #e5e7eb}
table.m2 td.rec{background:#eff6ff;outline:2px solid #2563eb;outline-offset:-2px}.ys{white-space:nowrap}
"""


def write_report(matrix_dir: str | Path) -> tuple[Path, Path]:
    """Write report.md and report.html into the matrix folder; return their paths.

        md, page = write_report("matrix/")      # preftune report matrix/
    """
    root = Path(matrix_dir)
    path = root / "decision.json"
    try:
        decision = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else decide(root)
    except json.JSONDecodeError as e:
        raise InputError(f"not valid JSON ({e.msg}); rerun preftune decide", path=str(path), line=e.lineno) from None
    logs = {c["name"]: load(root / "cells" / c["name"]) for c in decision["cells"] if c["status"] == "finished"}
    return _write(root, _matrix_md(decision, logs, root.name), _matrix_html(decision, logs, root.name))


def write_run_report(run_dir: str | Path) -> tuple[Path, Path]:
    """Write report.md and report.html for one run folder: its review findings and plots.

        md, page = write_run_report("runs/x")   # preftune report runs/x
    """
    root = Path(run_dir)
    log = load(root)
    items = [(f.severity, f.code, f.sentence) for f in diagnose(log)]
    md = f"# preftune run report: {_md(root.name)}\n\n" + "".join(
        f"- **{s}** {c}: {_md(t)}\n" for s, c, t in items)
    body = (f"<h1>preftune run report: {_e(root.name)}</h1><h2>Findings</h2>{_findings_html(items)}"
            f"<h2>Plots</h2><div class='grid'>{_margin_plot(log, 'training vs held-out margin')}"
            + (_scatter(log, "margin vs length difference") + _length_bars(log) if log.pairs else "")
            + "</div>")
    return _write(root, md, body)


def _write(root: Path, md: str, body: str) -> tuple[Path, Path]:
    paths = root / "report.md", root / "report.html"
    atomic_write_text(paths[0], md)
    atomic_write_text(paths[1], _page(f"preftune: {root.name}", body))
    return paths


# --- markdown ------------------------------------------------------------------------------------------------

def _md(text: Any) -> str:
    return html.escape(str(text)).replace("|", "\\|").replace("\n", " ")


def _num(x: Any, fmt: str = ".3g") -> str:
    return "–" if not isinstance(x, (int, float)) or not math.isfinite(x) else format(x, fmt)


def _ci(c: dict) -> str:
    if c.get("accuracy") is None:
        return "–"
    return f"{_num(c['accuracy'], '.3f')} [{_num(c['ci'][0], '.3f')}, {_num(c['ci'][1], '.3f')}]"


def _pick(d: dict) -> str:
    return "until settled, stay with" if d["verdict"] == "not_decisive" else "recommended"


def _md_table(head: Sequence[str], rows: list[list[str]]) -> list[str]:
    return (["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
            + ["| " + " | ".join(_md(x) for x in row) + " |" for row in rows])


def _html_table(head: Sequence[str], rows: list[list[str]], text_cols: int = 0) -> str:
    """Escaped cells: the first ``text_cols`` columns as text, the rest as right-aligned numbers."""
    return ("<table><tr>" + "".join(f"<th>{_e(h)}</th>" for h in head) + "</tr>" + "".join(
        "<tr>" + "".join(f"<td>{_e(x)}</td>" for x in row[:text_cols])
        + "".join(f"<td class='num'>{_e(x)}</td>" for x in row[text_cols:]) + "</tr>" for row in rows) + "</table>")


def _cell_numbers(c: dict) -> list[str]:
    return [_ci(c), *(_num(c.get(k)) for k in ("pairs", "margin", "margin_gap", "margin_std"))]


COMPARISON_HEAD = ("a", "b", "yardstick", "acc a", "acc b", "diff [95% CI]", "McNemar p", "only a", "only b",
                   "pairs needed")
BEHAVIOUR_HEAD = ("cell", "win rate [95% CI]", "ties", "LC win rate ± 95%", "generated length policy / reference")


def _comparison_row(c: dict) -> list[str]:
    return [c["a"], c["b"], c["yardstick"], _num(c["acc_a"], ".3f"), _num(c["acc_b"], ".3f"),
            f"{_num(c['diff'], '+.3f')} [{_num(c['ci'][0], '+.3f')}, {_num(c['ci'][1], '+.3f')}]",
            _num(c["mcnemar_p"], ".2g"), str(c["a_only"]), str(c["b_only"]), _num(c["pairs_needed"], "d")]


def _behaviour_row(c: dict) -> list[str]:
    g = c["gen_eval"]
    return [c["name"], _win(g), _num(g["tie_rate"], ".2f"), _lc(g), _lens(g)]


def _matrix_md(d: dict, logs: dict[str, Log], title: str) -> str:
    out = [f"# preftune report: {_md(title)}", "", f"**{_md(d.get('summary', d['verdict']))}**", "",
           f"verdict `{d['verdict']}` · {_pick(d)} {_md(d['objective'])}, rank {_md(d['lora_rank'])} · baseline "
           f"{_md(d['baseline']['objective'])}, rank {_md(d['baseline']['lora_rank'])} · plots in report.html", ""]
    out += _grid_md(d, logs)
    out += ["## Why", ""] + [f"- {_md(render(r))}" for r in d["reasons"]]
    out += ["", "## Cells", ""] + _md_table(
        ("cell", "status", "accuracy [95% CI]", "pairs", "held-out margin", "margin gap", "margin std", "findings"),
        [[c["name"], c["status"], *_cell_numbers(c),
          "; ".join(f"**{f['code']}**: {f['sentence']}" for f in c.get("findings") or [] if f["severity"] != "info")
          or ("ok" if c["status"] == "finished" else c.get("error") or "")] for c in d["cells"]])
    gens = [c for c in d["cells"] if c.get("gen_eval")]
    if gens:
        out += ["", "## Behaviour", "", "What each cell's policy writes, judged against the reference's generation on "
                "the same held-out prompts.", ""] + _md_table(BEHAVIOUR_HEAD, [_behaviour_row(c) for c in gens])
    out += ["", "## Comparisons", ""] + _md_table(COMPARISON_HEAD, [_comparison_row(c) for c in d["comparisons"]])
    out += ["", "## Verdict rules", ""] + [f"{i}. {r}" for i, r in enumerate(RULES, 1)]
    return "\n".join(out) + "\n"


# --- HTML ----------------------------------------------------------------------------------------------------

def _e(text: Any) -> str:
    return html.escape(str(text))


def _page(title: str, body: str) -> str:
    return (f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>{_e(title)}</title>"
            f"<meta name='viewport' content='width=device-width,initial-scale=1'><style>{CSS}</style></head>"
            f"<body>{body}</body></html>\n")


def _findings_html(items: list[tuple[str, str, str]]) -> str:
    return "<ul class='f'>" + "".join(f"<li class='{_e(s)}'><b>{_e(c)}</b>: {_e(t)}</li>" for s, c, t in items) + \
        "</ul>"


def _matrix_html(d: dict, logs: dict[str, Log], title: str) -> str:
    base = d["baseline"]
    rec = (d["objective"], d["lora_rank"]) if d["verdict"] != "not_decisive" else None
    color = VERDICT_COLORS.get(d["verdict"], "#374151")
    parts = [f"<h1>preftune report: {_e(title)}</h1>",
             f"<p class='verdict' id='verdict' style='--c:{color}'>{_e(d.get('summary', d['verdict']))}</p>",
             f"<p class='meta'>verdict <b>{_e(d['verdict'])}</b> · {_pick(d)} {_e(d['objective'])}, rank "
             f"{_e(d['lora_rank'])} · baseline {_e(base['objective'])}, rank {_e(base['lora_rank'])}</p>",
             _grid_html(d, logs),
             "<h2>Why</h2><ol>" + "".join(f"<li>{_e(render(r))}</li>" for r in d["reasons"]) + "</ol>"]
    rows = []
    for c in d["cells"]:
        is_rec = (c["objective"], c["lora_rank"]) == rec
        tags = ("<span class='tag'>recommended</span>" if is_rec else "") + \
               ("<span class='tag'>baseline</span>" if (c["objective"], c["lora_rank"]) ==
                (base["objective"], base["lora_rank"]) else "")
        items = [(f["severity"], f["code"], f["sentence"]) for f in c.get("findings") or []]
        flags, info = [t for t in items if t[0] != "info"], [t for t in items if t[0] == "info"]
        found = (_findings_html(flags) if flags else "") + \
            (f"<details><summary class='info'>{len(info)} info</summary>{_findings_html(info)}</details>" if info
             else "") + (f"<span class='error'>{_e(c['error'])}</span>" if c.get("error") else "")
        rows.append(f"<tr class='{'rec' if is_rec else ''}'><td>{_e(c['name'])}{tags}</td><td>{_e(c['status'])}</td>"
                    + "".join(f"<td class='num'>{x}</td>" for x in _cell_numbers(c)) + f"<td>{found}</td></tr>")
    parts.append("<h2>Cells</h2><table><tr><th>cell</th><th>status</th><th>held-out accuracy [95% CI]</th>"
                 "<th>pairs</th><th>held-out margin</th><th>train − held-out gap</th><th>margin std</th>"
                 "<th>findings</th></tr>" + "".join(rows) + "</table>")
    finished = [c for c in d["cells"] if c["name"] in logs]
    parts.append("<h2>Held-out accuracy</h2>" + _interval_plot(
        [(c["name"], c["accuracy"], c["ci"][0], c["ci"][1], (c["objective"], c["lora_rank"]) == rec)
         for c in finished]))
    parts.append("<h2>Training vs held-out margin</h2><div class='grid'>" + "".join(
        f"<div class='card'><h3>{_e(c['name'])}</h3>{_margin_plot(logs[c['name']], c['name'])}</div>"
        for c in finished) + "</div>")
    with_len = [c for c in finished if _lengths(logs[c["name"]])]
    if with_len:
        parts.append("<h2>Length</h2><p class='meta'>Held-out completion lengths (tokens), and each cell's "
                     "held-out margin against chosen − rejected length: a slope means the reward follows length."
                     "</p><div class='grid'>" + _length_bars(logs[with_len[0]["name"]]) + "".join(
                         f"<div class='card'><h3>{_e(c['name'])}</h3>{_scatter(logs[c['name']], c['name'])}</div>"
                         for c in with_len) + "</div>")
    parts.append(_behaviour_html(d, logs))
    if d["comparisons"]:
        sticks = "".join(f"; {_e(y.name)}: {_e(y.help)}" for y in yardsticks.REGISTRY.values())
        parts.append(f"<h2>Paired comparisons</h2><p class='meta'>Same held-out pairs, joined by id. own: the run's "
                     f"reward{sticks}.</p>" + _html_table(COMPARISON_HEAD, [_comparison_row(c) for c in d["comparisons"]], 3))
    parts.append(_examples(d, logs))
    parts.append("<h2>Verdict rules</h2><ol>" + "".join(f"<li>{_e(r)}</li>" for r in RULES) + "</ol>")
    return "".join(parts)


# --- the objective x rank grid -------------------------------------------------------------------------------

GRID_YARDSTICKS = ("refrel", "lennorm")  # the objective-free yardsticks every cell is scored on (evaluate.py)


def yardstick_text(pairs: list[dict], key: str) -> str:
    """"accuracy [95% Wilson low, high]" of one yardstick over a cell's eval_pairs.jsonl rows, "–" without it.

    A tie counts one half, as in evaluate.py, so the accuracy equals summary.json's ``eval_<yardstick>/accuracy``.
    """
    values = [p.get(key) for p in pairs]
    if not values or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        return "–"
    k = sum(1.0 if v > 0 else 0.5 if v == 0 else 0.0 for v in values)
    lo, hi = stats.wilson_interval(k, len(values))
    return f"{k / len(values):.3f} [{lo:.3f}, {hi:.3f}]"


def grid(d: dict, logs: dict[str, Log]) -> tuple[list[int], dict[str, dict[int, list[tuple[str, str, dict]]]]]:
    """(ranks, {objective: {rank: [(seed label, status, {yardstick: accuracy text})]}}): objectives x ranks.

    A seed grid puts several cells in one square; each is then labelled "seed <s>: ".
    """
    ranks = sorted({c["lora_rank"] for c in d["cells"] if isinstance(c.get("lora_rank"), int)}, reverse=True)
    rows = {c["objective"]: {r: [] for r in ranks} for c in d["cells"] if c.get("objective") is not None}
    for c in d["cells"]:
        if c.get("objective") is not None and isinstance(c.get("lora_rank"), int):
            rows[c["objective"]][c["lora_rank"]].append(c)

    def entry(c: dict, seeded: bool) -> tuple[str, str, dict]:
        pairs = (logs[c["name"]].pairs or []) if c["name"] in logs else []
        return (f"seed {c['seed']}: " if seeded and c.get("seed") is not None else "", c["status"],
                {y: yardstick_text(pairs, f"{y}_margin") for y in GRID_YARDSTICKS})

    return ranks, {o: {r: [entry(c, len(cs) > 1) for c in cs] for r, cs in sq.items()} for o, sq in rows.items()}


def _grid_html(d: dict, logs: dict[str, Log]) -> str:
    ranks, rows = grid(d, logs)
    if not ranks or not rows:
        return ""
    head = "<tr><th>objective \\ LoRA rank</th>" + "".join(f"<th>r={_e(r)}</th>" for r in ranks) + "</tr>"
    trs = []
    for o, squares in rows.items():
        tds = []
        for r, entries in squares.items():
            lines = [f"<div>{_e(seed)}" + ("".join(f"<div class='ys'>{y} <b>{t}</b></div>" for y, t in acc.items())
                                           if status == "finished" else f"<span class='error'>{_e(status)}</span>")
                     + "</div>" for seed, status, acc in entries]
            rec = (o, r) == (d["objective"], d["lora_rank"])
            mark, cls = (f"<span class='tag'>{_e(_pick(d))}</span>", " class='rec'") if rec else ("", "")
            tds.append(f"<td{cls} data-objective='{_e(o)}' data-rank='{_e(r)}'>{mark}{''.join(lines) or '–'}</td>")
        trs.append(f"<tr><th>{_e(o)}</th>{''.join(tds)}</tr>")
    return ("<h2>The matrix</h2><p class='meta'>Held-out accuracy [95% Wilson interval] on the two yardsticks "
            "every objective is scored on: refrel (reference-relative log-ratio margin &gt; 0) and lennorm "
            "(length-normalized log-prob margin &gt; 0).</p>"
            f"<table class='m2' id='matrix-grid'>{head}{''.join(trs)}</table>")


def _grid_md(d: dict, logs: dict[str, Log]) -> list[str]:
    ranks, rows = grid(d, logs)
    if not ranks or not rows:
        return []
    out = ["## The matrix", "", "Held-out accuracy [95% Wilson interval], refrel / lennorm yardsticks.", ""]
    out += _md_table(["objective \\ rank"] + [f"r={r}" for r in ranks], [])
    for o, squares in rows.items():
        cells = []
        for r, entries in squares.items():
            parts = [seed + (" / ".join(f"{y} {t}" for y, t in acc.items()) if status == "finished" else _md(status))
                     for seed, status, acc in entries]
            mark = f"**{_pick(d)}** " if (o, r) == (d["objective"], d["lora_rank"]) else ""
            cells.append(mark + ("<br>".join(parts) or "–"))
        out.append(f"| {_md(o)} | " + " | ".join(cells) + " |")
    return out + [""]


# --- example pairs -------------------------------------------------------------------------------------------

TEXT_KEYS = ("prompt", "chosen", "rejected")
EXAMPLE_CHARS = 600  # per text field: a 100 kB completion must not turn the report into a 100 kB scroll


def pair_texts(run_dir: str | Path) -> dict[str, dict[str, str]]:
    """{pair id: {prompt, chosen, rejected}} for a run's held-out pairs, read back from its data file.

    eval_pairs.jsonl keeps only ids (``<file name>:<line>``, assigned by data.load_examples), so the text is
    looked up in the file the run's config.yaml names: ``eval_data``, or ``data`` when the held-out pairs were
    split off it. A file that moved, changed format or is a hub dataset gives no text (the section is left
    out), never an error: the report must not fail over an illustration.

        texts = pair_texts("matrix/cells/objective=dpo,lora_rank=16")
    """
    import yaml

    try:
        cfg = yaml.safe_load((Path(run_dir) / "config.yaml").read_text(encoding="utf-8"))
        if not isinstance(cfg, dict):
            return {}
        key, split = ("eval_data", "eval_split") if cfg.get("eval_data") else ("data", "data_split")
        source = cfg.get(key)
        if not isinstance(source, str) or not source or not Path(source).exists():  # local files only: no hub
            return {}
        examples = load_examples(source, str(cfg.get(split) or "train"))
    except (OSError, ValueError, yaml.YAMLError, InputError):
        return {}
    return {ex.id: {k: as_text(getattr(ex, k)) for k in TEXT_KEYS} for ex in examples}


def _shown(text: str, limit: int = EXAMPLE_CHARS) -> str:
    """Escaped text with invisible and direction-changing characters (zero-width, RLO, ...) shown as markers,
    so a reader sees exactly what the model saw and nothing reorders or hides the rest of the page."""
    more = len(text) - limit
    out = []
    for ch in text[:limit]:
        cat = unicodedata.category(ch)
        if (cat == "Cf" or cat == "Cc" and ch not in "\n\t") or ch in "\u2028\u2029":
            out.append(f"<span class='cc' title='{unicodedata.name(ch, 'control character')}'>U+{ord(ch):04X}</span>")
        else:
            out.append(html.escape(ch))
    tail = f"<span class='info'> … {more:,} more characters</span>" if more > 0 else ""
    return "".join(out) + tail


def _examples(d: dict, logs: dict[str, Log]) -> str:
    """Held-out pairs with text on which the recommended and the baseline cell disagree (else the first few)."""
    def pick(at: dict) -> Log | None:  # the first finished cell with at's objective and rank
        return next((logs[c["name"]] for c in d["cells"] if c["name"] in logs
                     and (c["objective"], c["lora_rank"]) == (at["objective"], at["lora_rank"])), None)

    rec, base = pick(d), pick(d["baseline"])
    main = rec or base
    if main is None or not main.pairs:
        return ""
    pairs, base = main.pairs, None if base is main else base  # one cell is both: nothing to compare it with
    if not all(isinstance(pairs[0].get(k), str) for k in TEXT_KEYS):  # a preftune run: ids only
        texts = pair_texts(main.source)
        pairs = [{**p, **texts[str(p["id"])]} for p in pairs if str(p["id"]) in texts]
        if not pairs:
            return ""
    other = {p["id"]: p for p in (base.pairs if base else [])}
    split = [[p for p in pairs if p["id"] in other and bool(p["correct"]) == side
              and bool(other[p["id"]]["correct"]) != side] for side in (True, False)]
    labelled = [(p, "only the recommended cell is right") for p in split[0][:2]] + \
               [(p, "only the baseline is right") for p in split[1][:2]]
    labelled = labelled or [(p, "") for p in pairs[:3]]
    cards = []
    for p, label in labelled:
        margins = f"margin {_num(p['margin'])}" + (f", baseline {_num(other[p['id']]['margin'])}"
                                                    if p["id"] in other else "")
        cards.append(f"<div class='card' style='flex:1 1 45%'><h3>{_e(p['id'])} · {margins}</h3>"
                     + (f"<p class='meta'>{label}</p>" if label else "")
                     + "".join(f"<b>{k}</b><pre>{_shown(str(p[k]))}</pre>" for k in TEXT_KEYS) + "</div>")
    return f"<h2>Example held-out pairs</h2><div class='grid' id='examples'>{''.join(cards)}</div>"


# --- SVG plots -----------------------------------------------------------------------------------------------

def _ticks(lo: float, hi: float, n: int = 4) -> list[float]:
    if hi <= lo:
        return [lo]
    raw = (hi - lo) / n
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    return [i * step for i in range(math.ceil(lo / step - 1e-9), math.floor(hi / step + 1e-9) + 1)]


def _span(values: Sequence[float], pad: float = 0.05) -> tuple[float, float]:
    lo, hi = min(values), max(values)
    if hi == lo:
        return lo - 1, hi + 1
    return lo - pad * (hi - lo), hi + pad * (hi - lo)


def _axes(w: int, h: int, xr: tuple[float, float], yr: tuple[float, float], title: str, xlabel: str,
          ylabel: str, xticks: bool = True) -> tuple[list[str], Callable[[float], float], Callable[[float], float]]:
    """SVG opening, frame, ticks and labels; and the data-to-pixel maps."""
    left, right, top, bottom = 46, 10, 22, 34
    sx = lambda v: left + (v - xr[0]) / (xr[1] - xr[0]) * (w - left - right)  # noqa: E731
    sy = lambda v: h - bottom - (v - yr[0]) / (yr[1] - yr[0]) * (h - top - bottom)  # noqa: E731
    out = [f"<svg width='{w}' height='{h}' viewBox='0 0 {w} {h}' role='img' aria-label='{_e(title)}'>",
           f"<title>{_e(title)}</title>",
           f"<rect x='{left}' y='{top}' width='{w - left - right}' height='{h - top - bottom}' fill='#fff' "
           f"stroke='#d1d5db'/>"]
    for t in _ticks(*xr) if xticks else []:
        out.append(f"<line x1='{sx(t):.1f}' x2='{sx(t):.1f}' y1='{top}' y2='{h - bottom}' stroke='#f3f4f6'/>"
                   f"<text x='{sx(t):.1f}' y='{h - bottom + 13}' text-anchor='middle'>{_num(t)}</text>")
    for t in _ticks(*yr):
        out.append(f"<line x1='{left}' x2='{w - right}' y1='{sy(t):.1f}' y2='{sy(t):.1f}' stroke='#f3f4f6'/>"
                   f"<text x='{left - 4}' y='{sy(t) + 4:.1f}' text-anchor='end'>{_num(t)}</text>")
    out.append(f"<text x='{(left + w - right) / 2}' y='{h - 4}' text-anchor='middle'>{_e(xlabel)}</text>"
               f"<text x='12' y='{(top + h - bottom) / 2}' text-anchor='middle' "
               f"transform='rotate(-90 12 {(top + h - bottom) / 2})'>{_e(ylabel)}</text>")
    return out, sx, sy


def _legend(items: list[tuple[str, str]], x: int, y: int = 14) -> str:
    out = []
    for label, color in items:
        out.append(f"<rect x='{x}' y='{y - 8}' width='10' height='10' fill='{color}'/>"
                   f"<text x='{x + 14}' y='{y + 1}'>{_e(label)}</text>")
        x += 14 + 7 * len(label) + 12
    return "".join(out)


def _margin_plot(log: Log, title: str, w: int = 360, h: int = 210) -> str:
    """Training margin per logged step and held-out margin per eval, against the step."""
    ts, tm = log.series("rewards/margins")
    es, em = log.series("eval_rewards/margins")
    if not tm and not em:
        return "<p class='meta'>no margins logged</p>"
    xr = _span(ts + es, 0.02)
    out, sx, sy = _axes(w, h, xr, _span(tm + em + [0.0]), f"margins: {title}", "step", "reward margin")
    out.append(f"<line x1='{sx(xr[0]):.1f}' x2='{sx(xr[1]):.1f}' y1='{sy(0):.1f}' y2='{sy(0):.1f}' "
               f"stroke='#9ca3af' stroke-dasharray='3 3'/>")
    pts = lambda xs, ys: " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in zip(xs, ys))  # noqa: E731
    if tm:
        out.append(f"<polyline points='{pts(ts, tm)}' fill='none' stroke='{TRAIN_COLOR}' stroke-width='1.2' "
                   f"stroke-opacity='0.8'/>")
    if em:
        out.append(f"<polyline points='{pts(es, em)}' fill='none' stroke='{HELD_COLOR}' stroke-width='2'/>"
                   + "".join(f"<circle cx='{sx(x):.1f}' cy='{sy(y):.1f}' r='3' fill='{HELD_COLOR}'/>"
                             for x, y in zip(es, em)))
    out.append(_legend([("training", TRAIN_COLOR), ("held-out", HELD_COLOR)], 50))
    return "".join(out) + "</svg>"


def _lengths(log: Log) -> list[tuple[float, float, float]]:
    """(chosen tokens, rejected tokens, margin) of the held-out pairs that have all three, finite."""
    rows = [(p.get("chosen_tokens"), p.get("rejected_tokens"), p.get("margin")) for p in log.pairs or []]
    return [tuple(map(float, r)) for r in rows
            if all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in r)]


def _scatter(log: Log, title: str, w: int = 300, h: int = 210) -> str:
    rows = _lengths(log)
    if not rows:
        return ""
    xs, ys = [c - r for c, r, _ in rows], [m for _, _, m in rows]
    out, sx, sy = _axes(w, h, _span(xs + [0.0]), _span(ys + [0.0]), f"margin vs length: {title}",
                        "chosen − rejected tokens", "held-out margin")
    out.append(f"<line x1='{sx(0):.1f}' x2='{sx(0):.1f}' y1='22' y2='{h - 34}' stroke='#9ca3af' "
               f"stroke-dasharray='3 3'/><line x1='46' x2='{w - 10}' y1='{sy(0):.1f}' y2='{sy(0):.1f}' "
               f"stroke='#9ca3af' stroke-dasharray='3 3'/>")
    out += [f"<circle cx='{sx(x):.1f}' cy='{sy(y):.1f}' r='2.5' fill='{HELD_COLOR}' fill-opacity='0.45'/>"
            for x, y in zip(xs, ys)]
    out.append(f"<text x='50' y='14'>r = {stats.pearson(xs, ys):.2f}, {len(rows)} pairs</text>")
    return "".join(out) + "</svg>"


def _length_bars(log: Log, w: int = 260, h: int = 210) -> str:
    rows = _lengths(log)
    if not rows:
        return ""
    bias = stats.length_bias([r[0] for r in rows], [r[1] for r in rows])
    chosen, rejected, shorter, longer = (bias[k] for k in ("mean_chosen_len", "mean_rejected_len", "chosen_shorter",
                                                           "chosen_longer"))
    out, _, sy = _axes(w, h, (0, 2), (0, max(chosen, rejected) * 1.15), "mean held-out lengths", "",
                       "mean tokens", xticks=False)
    for i, (label, value, color) in enumerate((("chosen", chosen, TRAIN_COLOR), ("rejected", rejected, HELD_COLOR))):
        x, bw = 46 + (w - 56) * (0.15 + 0.5 * i), (w - 56) * 0.3
        out.append(f"<rect x='{x:.1f}' y='{sy(value):.1f}' width='{bw:.1f}' height='{sy(0) - sy(value):.1f}' "
                   f"fill='{color}' fill-opacity='0.8'/><text x='{x + bw / 2:.1f}' y='{sy(value) - 4:.1f}' "
                   f"text-anchor='middle'>{value:.1f}</text><text x='{x + bw / 2:.1f}' y='{h - 21}' "
                   f"text-anchor='middle'>{label}</text>")
    out.append(f"<text x='50' y='14'>chosen shorter {shorter:.0%}, longer {longer:.0%}</text>")
    return "<div class='card'>" + "".join(out) + "</svg></div>"


def _win(g: dict) -> str:
    return f"{_num(g['win_rate'], '.3f')} [{_num(g['win_rate_ci'][0], '.3f')}, {_num(g['win_rate_ci'][1], '.3f')}]"


def _lc(g: dict) -> str:
    return f"{_num(g['lc_win_rate'], '.3f')} ± {_num(1.96 * g['lc_win_rate_se'], '.3f')}"


def _lens(g: dict) -> str:
    return f"{_num(g['policy_len'])} / {_num(g['reference_len'])}"


def _behaviour_html(d: dict, logs: dict[str, Log]) -> str:
    """Win rate and LC win rate per cell, generated lengths against the reference, prompts side by side."""
    cells = [c for c in d["cells"] if c.get("gen_eval") and logs.get(c["name"]) and logs[c["name"]].generations]
    if not cells:
        return ""
    hists = "".join(f"<div class='card'><h3>{_e(c['name'])}</h3>{_length_hist(logs[c['name']].generations)}</div>"
                    for c in cells)
    first = logs[cells[0]["name"]].generations[:3]
    by_cell = {c["name"]: {r["id"]: r for r in logs[c["name"]].generations} for c in cells}
    examples = "".join(
        f"<div class='card' style='flex:1 1 100%'><h3>{_e(r['id'])}</h3><b>prompt</b><pre>{_e(str(r['prompt'])[:400])}"
        f"</pre><b>reference</b><pre>{_e(r['reference'][:400])}</pre>"
        + "".join(f"<b>{_e(name)}</b> <span class='meta'>preference {_num(rows_[r['id']]['preference'])}</span>"
                  f"<pre>{_e(rows_[r['id']]['policy'][:400])}</pre>"
                  for name, rows_ in by_cell.items() if r["id"] in rows_) + "</div>"
        for r in first)
    return ("<h2>Behaviour</h2><p class='meta'>What each cell's policy writes, judged against the reference's "
            "generation on the same held-out prompts (1 win, ½ tie, 0 loss). LC: AlpacaEval's length-controlled "
            "win rate, the win rate at equal length; a raw win far above LC is length, not quality.</p>"
            + _html_table(BEHAVIOUR_HEAD[:-1] + (BEHAVIOUR_HEAD[-1] + " (tokens)",), [_behaviour_row(c) for c in cells], 1)
            + f"<h3>Generated lengths</h3><div class='grid'>{hists}</div>"
            f"<h3>Held-out prompts, side by side</h3><div class='grid'>{examples}</div>")


def _length_hist(rows: list[dict], w: int = 300, h: int = 170, bins: int = 10) -> str:
    """Histogram of generated token counts: the policy's bars over the reference's outline."""
    pol, ref = [r["policy_tokens"] for r in rows], [r["reference_tokens"] for r in rows]
    lo, hi = min(pol + ref), max(pol + ref) + 1
    width = max(1, math.ceil((hi - lo) / bins))
    count = lambda xs: [sum(lo + i * width <= x < lo + (i + 1) * width for x in xs) for i in range(bins)]  # noqa: E731
    cp, cr = count(pol), count(ref)
    out, sx, sy = _axes(w, h, (lo, lo + bins * width), (0, max(cp + cr) * 1.15), "generated lengths", "tokens",
                        "prompts")
    for i, (a, b) in enumerate(zip(cp, cr)):
        x0, x1 = sx(lo + i * width), sx(lo + (i + 1) * width)
        out.append(f"<rect x='{x0:.1f}' y='{sy(a):.1f}' width='{x1 - x0 - 1:.1f}' height='{sy(0) - sy(a):.1f}' "
                   f"fill='{TRAIN_COLOR}' fill-opacity='0.6'/><rect x='{x0:.1f}' y='{sy(b):.1f}' "
                   f"width='{x1 - x0 - 1:.1f}' height='{sy(0) - sy(b):.1f}' fill='none' stroke='{HELD_COLOR}'/>")
    out.append(_legend([("policy", TRAIN_COLOR), ("reference", HELD_COLOR)], 50))
    return "".join(out) + "</svg>"


def _interval_plot(rows: list[tuple[str, float, float, float, bool]]) -> str:
    """Held-out accuracy per cell, 95% Wilson interval as a bar, chance as a dashed line."""
    if not rows:
        return "<p class='meta'>no finished cells</p>"
    label_w, w, row_h = 12 + 6.5 * min(48, max(len(r[0]) for r in rows)), 900, 24
    h = 40 + row_h * len(rows)
    lo = min(0.4, math.floor(min(r[2] for r in rows) * 10) / 10)
    sx = lambda v: label_w + (v - lo) / (1 - lo) * (w - label_w - 170)  # noqa: E731  (170 px for the numbers)
    out = [f"<svg width='{w}' height='{h}' viewBox='0 0 {w} {h}' role='img' aria-label='held-out accuracy'>"
           "<title>held-out accuracy with 95% intervals</title>"]
    for t in _ticks(lo, 1.0, 6):
        out.append(f"<line x1='{sx(t):.1f}' x2='{sx(t):.1f}' y1='8' y2='{h - 22}' stroke='#f3f4f6'/>"
                   f"<text x='{sx(t):.1f}' y='{h - 8}' text-anchor='middle'>{_num(t)}</text>")
    out.append(f"<line x1='{sx(0.5):.1f}' x2='{sx(0.5):.1f}' y1='8' y2='{h - 22}' stroke='#9ca3af' "
               f"stroke-dasharray='4 3'/><text x='{sx(0.5) + 3:.1f}' y='18'>chance</text>")
    for i, (name, acc, a, b, rec) in enumerate(rows):
        y = 22 + i * row_h
        color = TRAIN_COLOR if rec else "#4b5563"
        clipped = name if len(name) <= 48 else name[:47] + "…"
        out.append(f"<text x='{label_w - 8}' y='{y + 4}' text-anchor='end'>{_e(clipped)}</text>"
                   f"<line x1='{sx(a):.1f}' x2='{sx(b):.1f}' y1='{y}' y2='{y}' stroke='{color}' stroke-width='3'/>"
                   f"<circle cx='{sx(acc):.1f}' cy='{y}' r='5' fill='{color}'/>"
                   f"<text x='{sx(1) + 14:.1f}' y='{y + 4}'>{acc:.3f} [{a:.3f}, {b:.3f}]</text>")
    return "".join(out) + "</svg>"


def write_iterate_report(iter_dir: str | Path) -> tuple[Path, Path]:
    """report.md and report.html for ``preftune iterate``'s folder: one row per round, and the rounds' verdict.

        md, page = write_iterate_report("iter/")      # preftune report iter/
    """
    from .decide import decide_rounds

    root = Path(iter_dir)
    d = decide_rounds(root)
    rounds = json.loads((root / "summary.json").read_text())["rounds"]
    head = ["round", "pairs (dropped)", "judge: chosen / rejected", "held-out accuracy", "win rate [95% CI]",
            "LC win rate ± 95%", "generated length policy / reference"]
    rows = [[f"{r['round']}", f"{r['pairs']} ({sum(r['dropped'].values())})",
             f"{_num(r['chosen_score'])} / {_num(r['rejected_score'])}", _num(r["eval_accuracy"], ".3f"),
             _win(r), _lc(r), _lens(r)] for r in rounds]
    md = "\n".join([f"# preftune iterate: {_md(root.name)}", "", f"**{_md(d['summary'])}**", ""]
                    + _md_table(head, rows) + ["", "## Why", ""] + [f"- {_md(t)}" for t in d["explanation"]]) + "\n"
    color = VERDICT_COLORS["switch" if d["verdict"] == "continue" else "not_decisive"]
    body = (f"<h1>preftune iterate: {_e(root.name)}</h1><p class='verdict' id='verdict' style='--c:{color}'>"
            f"{_e(d['summary'])}</p><p class='meta'>Win rates are against the original reference, on the same held-out"
            " prompts every round, so rounds compare.</p>" + _html_table(head, rows) + "<h2>Why</h2><ol>" + "".join(f"<li>{_e(t)}</li>" for t in d["explanation"]) + "</ol>")
    return _write(root, md, body)


def write_any(folder: str | Path) -> tuple[Path, Path]:
    """The report a folder calls for: an iterate folder's rounds, a matrix's verdict, or one run's findings."""
    root = Path(folder)
    if (root / "iterate.json").exists():
        return write_iterate_report(root)
    return write_report(root) if (root / "matrix.json").exists() else write_run_report(root)
