"""A matrix's report page, in Markdown and HTML: the verdict, the objective x rank grid, why, every cell, the
behaviour of what the cells write, the paired comparisons, example pairs (their text read back from the run's
data file, invisible characters shown as markers) and the verdict rules.

    matrix_html(read_decision(Path("matrix")), logs, "matrix")     # report.py writes it (preftune report matrix/)
"""

from __future__ import annotations

import unicodedata
from pathlib import Path

from ..core.config import load_yaml
from ..core.errors import InputError
from ..core.layout import CellResult, Decision, RunDir
from ..data.rows import as_text, load_examples
from ..evaluation import stats, yardsticks
from ..evaluation.runlog import Log
from .comparisons import COMMON
from .judges_page import judges_section
from .markup import VERDICT_COLORS, esc, findings_html, html_table, lc, lens, md_esc, md_table, num, win
from .plots import interval_plot, length_bars, length_hist, lengths, margin_plot, scatter
from .reasons import render
from .rules import ROBUSTNESS_RULES, RULES


def _ci(c: CellResult) -> str:
    if c.accuracy is None:
        return "–"
    return f"{num(c.accuracy, '.3f')} [{num(c.ci[0], '.3f')}, {num(c.ci[1], '.3f')}]"


def _pick(d: Decision) -> str:
    return "not decided yet: stay with" if d.verdict == "not_decisive" else "recommended"


def _cell_numbers(c: CellResult) -> list[str]:
    return [_ci(c), *(num(getattr(c, k)) for k in ("pairs", "margin", "margin_gap", "margin_std"))]


COMPARISON_HEAD = ("a", "b", "yardstick", "acc a", "acc b", "diff [95% CI]", "McNemar p", "only a", "only b",
                   "pairs needed")
BEHAVIOUR_HEAD = ("cell", "win rate [95% CI]", "ties", "LC win rate ± 95%", "generated length policy / reference")


def _comparison_row(c: dict) -> list[str]:
    return [c["a"], c["b"], c["yardstick"], num(c["acc_a"], ".3f"), num(c["acc_b"], ".3f"),
            f"{num(c['diff'], '+.3f')} [{num(c['ci'][0], '+.3f')}, {num(c['ci'][1], '+.3f')}]",
            num(c["mcnemar_p"], ".2g"), str(c["a_only"]), str(c["b_only"]), num(c["pairs_needed"], "d")]


def _behaviour_row(c: CellResult) -> list[str]:
    g = c.gen_eval
    return [c.name, win(g), num(g["tie_rate"], ".2f"), lc(g), lens(g)]


def matrix_md(d: Decision, logs: dict[str, Log], title: str, data: list[str] | None = None) -> str:
    out = [f"# preftune report: {md_esc(title)}", "", f"**{md_esc(d.summary)}**", "",
           f"verdict `{d.verdict}` · {_pick(d)} {md_esc(d.objective)}, rank {md_esc(d.lora_rank)} · baseline "
           f"{md_esc(d.baseline['objective'])}, rank {md_esc(d.baseline['lora_rank'])} · plots in report.html", ""]
    out += _grid_md(d, logs)
    out += ["## Why", ""] + [f"- {md_esc(render(r))}" for r in d.reasons]
    out += ["", *data][:-1] if data else []  # the data audit's section (verdict/data.py), when there is one
    out += ["", "## Cells", ""] + md_table(
        ("cell", "status", "accuracy [95% CI]", "pairs", "held-out margin", "margin gap", "margin std", "findings"),
        [[c.name, c.status, *_cell_numbers(c),
          "; ".join(f"**{f['code']}**: {f['sentence']}" for f in c.findings or [] if f["severity"] != "info")
          or ("ok" if c.finished else c.error or "")] for c in d.cells])
    gens = [c for c in d.cells if c.gen_eval]
    if gens:
        out += ["", "## Behaviour", "", "What each cell's policy writes, judged against the reference's generation on "
                "the same held-out prompts.", ""] + md_table(BEHAVIOUR_HEAD, [_behaviour_row(c) for c in gens])
    out += judges_section(logs)[0]
    out += ["", "## Comparisons", ""] + md_table(COMPARISON_HEAD, [_comparison_row(c) for c in d.comparisons])
    out += ["", "## Verdict rules", ""] + [f"{i}. {r}" for i, r in enumerate(rules(d), 1)]
    return "\n".join(out) + "\n"


def matrix_html(d: Decision, logs: dict[str, Log], title: str, data: str = "") -> str:
    rec = (d.objective, d.lora_rank) if d.verdict != "not_decisive" else None
    color = VERDICT_COLORS.get(d.verdict, "#374151")
    parts = [f"<h1>preftune report: {esc(title)}</h1>",
             f"<p class='verdict' id='verdict' style='--c:{color}'>{esc(d.summary)}</p>",
             f"<p class='meta'>verdict <b>{esc(d.verdict)}</b> · {_pick(d)} {esc(d.objective)}, rank "
             f"{esc(d.lora_rank)} · baseline {esc(d.baseline['objective'])}, rank {esc(d.baseline['lora_rank'])}</p>",
             _grid_html(d, logs),
             "<h2>Why</h2><ol>" + "".join(f"<li>{esc(render(r))}</li>" for r in d.reasons) + "</ol>", data,
             _cells_html(d, rec)]
    finished = [c for c in d.cells if c.name in logs]
    parts.append("<h2>Held-out accuracy</h2>" + interval_plot(
        [(c.name, c.accuracy, c.ci[0], c.ci[1], (c.objective, c.lora_rank) == rec) for c in finished]))
    parts.append("<h2>Training vs held-out margin</h2><div class='grid'>" + "".join(
        f"<div class='card'><h3>{esc(c.name)}</h3>{margin_plot(logs[c.name], c.name)}</div>"
        for c in finished) + "</div>")
    with_len = [c for c in finished if lengths(logs[c.name])]
    if with_len:
        parts.append("<h2>Length</h2><p class='meta'>Held-out completion lengths (tokens), and each cell's "
                     "held-out margin against chosen − rejected length: a slope means the reward follows length."
                     "</p><div class='grid'>" + length_bars(logs[with_len[0].name]) + "".join(
                         f"<div class='card'><h3>{esc(c.name)}</h3>{scatter(logs[c.name], c.name)}</div>"
                         for c in with_len) + "</div>")
    parts.append(_behaviour_html(d, logs) + judges_section(logs)[1])
    if d.comparisons:
        sticks = "".join(f"; {esc(y.name)}: {esc(y.help)}" for y in yardsticks.REGISTRY.values())
        parts.append(f"<h2>Paired comparisons</h2><p class='meta'>Same held-out pairs, joined by id. own: the run's "
                     f"reward{sticks}.</p>" + html_table(COMPARISON_HEAD, [_comparison_row(c) for c in d.comparisons], 3))
    parts.append(example_pairs(d, logs))
    parts.append("<h2>Verdict rules</h2><ol>" + "".join(f"<li>{esc(r)}</li>" for r in rules(d)) + "</ol>")
    return "".join(parts)


def rules(d: Decision) -> tuple[str, ...]:
    """The verdict rules, with the robustness rules where they can apply (several seeds or judges)."""
    several = d.groups or any(c.gen_eval and "judges" in c.gen_eval for c in d.cells)
    return RULES + (ROBUSTNESS_RULES if several else ())


def _cells_html(d: Decision, rec: tuple | None) -> str:
    """The cells table: status, held-out numbers, findings (info folded away), the recommended row marked."""
    base = (d.baseline["objective"], d.baseline["lora_rank"])
    rows = []
    for c in d.cells:
        is_rec = (c.objective, c.lora_rank) == rec
        tags = ("<span class='tag'>recommended</span>" if is_rec else "") + \
               ("<span class='tag'>baseline</span>" if (c.objective, c.lora_rank) == base else "")
        items = [(f["severity"], f["code"], f["sentence"]) for f in c.findings or []]
        flags, info = [t for t in items if t[0] != "info"], [t for t in items if t[0] == "info"]
        found = (findings_html(flags) if flags else "") + \
            (f"<details><summary class='info'>{len(info)} info</summary>{findings_html(info)}</details>" if info
             else "") + (f"<span class='error'>{esc(c.error)}</span>" if c.error else "")
        rows.append(f"<tr class='{'rec' if is_rec else ''}'><td>{esc(c.name)}{tags}</td><td>{esc(c.status)}</td>"
                    + "".join(f"<td class='num'>{x}</td>" for x in _cell_numbers(c)) + f"<td>{found}</td></tr>")
    return ("<h2>Cells</h2><table><tr><th>cell</th><th>status</th><th>held-out accuracy [95% CI]</th>"
            "<th>pairs</th><th>held-out margin</th><th>train − held-out gap</th><th>margin std</th>"
            "<th>findings</th></tr>" + "".join(rows) + "</table>")


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


def grid(d: Decision, logs: dict[str, Log]) -> tuple[list[int], dict[str, dict[int, list[tuple[str, str, dict]]]]]:
    """(ranks, {objective: {rank: [(seed label, status, {yardstick: accuracy text})]}}): objectives x ranks.

    A seed grid puts several cells in one square; each is then labelled "seed <s>: ".
    """
    ranks = sorted({c.lora_rank for c in d.cells if isinstance(c.lora_rank, int)}, reverse=True)
    rows = {c.objective: {r: [] for r in ranks} for c in d.cells if c.objective is not None}
    for c in d.cells:
        if c.objective is not None and isinstance(c.lora_rank, int):
            rows[c.objective][c.lora_rank].append(c)

    def entry(c: CellResult, seeded: bool) -> tuple[str, str, dict]:
        pairs = (logs[c.name].pairs or []) if c.name in logs else []
        return (f"seed {c.seed}: " if seeded and c.seed is not None else "", c.status,
                {y: yardstick_text(pairs, f"{y}_margin") for y in COMMON})  # the yardsticks every cell is scored on

    return ranks, {o: {r: [entry(c, len(cs) > 1) for c in cs] for r, cs in sq.items()} for o, sq in rows.items()}


def _grid_html(d: Decision, logs: dict[str, Log]) -> str:
    ranks, rows = grid(d, logs)
    if not ranks or not rows:
        return ""
    head = "<tr><th>objective \\ LoRA rank</th>" + "".join(f"<th>r={esc(r)}</th>" for r in ranks) + "</tr>"
    trs = []
    for o, squares in rows.items():
        tds = []
        for r, entries in squares.items():
            lines = [f"<div>{esc(seed)}" + ("".join(f"<div class='ys'>{y} <b>{t}</b></div>" for y, t in acc.items())
                                           if status == "finished" else f"<span class='error'>{esc(status)}</span>")
                     + "</div>" for seed, status, acc in entries]
            rec = (o, r) == (d.objective, d.lora_rank)
            mark, cls = (f"<span class='tag'>{esc(_pick(d))}</span>", " class='rec'") if rec else ("", "")
            tds.append(f"<td{cls} data-objective='{esc(o)}' data-rank='{esc(r)}'>{mark}{''.join(lines) or '–'}</td>")
        trs.append(f"<tr><th>{esc(o)}</th>{''.join(tds)}</tr>")
    return ("<h2>The matrix</h2><p class='meta'>Held-out accuracy [95% Wilson interval] on the two yardsticks "
            "every objective is scored on: refrel (reference-relative log-ratio margin &gt; 0) and lennorm "
            "(length-normalized log-prob margin &gt; 0).</p>"
            f"<table class='m2' id='matrix-grid'>{head}{''.join(trs)}</table>")


def _grid_md(d: Decision, logs: dict[str, Log]) -> list[str]:
    ranks, rows = grid(d, logs)
    if not ranks or not rows:
        return []
    out = ["## The matrix", "", "Held-out accuracy [95% Wilson interval], refrel / lennorm yardsticks.", ""]
    out += md_table(["objective \\ rank"] + [f"r={r}" for r in ranks], [])
    for o, squares in rows.items():
        cells = []
        for r, entries in squares.items():
            parts = [seed + (" / ".join(f"{y} {t}" for y, t in acc.items()) if status == "finished" else md_esc(status))
                     for seed, status, acc in entries]
            mark = f"**{_pick(d)}** " if (o, r) == (d.objective, d.lora_rank) else ""
            cells.append(mark + ("<br>".join(parts) or "–"))
        out.append(f"| {md_esc(o)} | " + " | ".join(cells) + " |")
    return out + [""]


def _behaviour_html(d: Decision, logs: dict[str, Log]) -> str:
    """Win rate and LC win rate per cell, generated lengths against the reference, prompts side by side."""
    cells = [c for c in d.cells if c.gen_eval and logs.get(c.name) and logs[c.name].generations]
    if not cells:
        return ""
    hists = "".join(f"<div class='card'><h3>{esc(c.name)}</h3>{length_hist(logs[c.name].generations)}</div>"
                    for c in cells)
    first = logs[cells[0].name].generations[:3]
    by_cell = {c.name: {r["id"]: r for r in logs[c.name].generations} for c in cells}
    examples = "".join(
        f"<div class='card' style='flex:1 1 100%'><h3>{esc(r['id'])}</h3><b>prompt</b><pre>{shown(as_text(r['prompt']), 400, end=True)}"
        f"</pre><b>reference</b><pre>{shown(r['reference'], 400)}</pre>"
        + "".join(f"<b>{esc(name)}</b> <span class='meta'>preference {num(rows_[r['id']]['preference'])}</span>"
                  f"<pre>{shown(rows_[r['id']]['policy'], 400)}</pre>"
                  for name, rows_ in by_cell.items() if r["id"] in rows_) + "</div>"
        for r in first)
    return ("<h2>Behaviour</h2><p class='meta'>What each cell's policy writes, judged against the reference's "
            "generation on the same held-out prompts (1 win, ½ tie, 0 loss). LC: AlpacaEval's length-controlled "
            "win rate, the win rate at equal length; a raw win far above LC is length, not quality.</p>"
            + html_table(BEHAVIOUR_HEAD[:-1] + (BEHAVIOUR_HEAD[-1] + " (tokens)",), [_behaviour_row(c) for c in cells], 1)
            + f"<h3>Generated lengths</h3><div class='grid'>{hists}</div>"
            f"<h3>Held-out prompts, side by side</h3><div class='grid'>{examples}</div>")


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
    try:
        cfg = load_yaml(RunDir(Path(run_dir)).config)
        key, split = ("eval_data", "eval_split") if cfg.get("eval_data") else ("data", "data_split")
        source = cfg.get(key)
        if not isinstance(source, str) or not source or not Path(source).exists():  # local files only: no hub
            return {}
        examples = load_examples(source, str(cfg.get(split) or "train"))
    except (OSError, ValueError, InputError):
        return {}
    return {ex.id: {k: as_text(getattr(ex, k)) for k in TEXT_KEYS} for ex in examples}


def shown(text: str, limit: int = EXAMPLE_CHARS, *, end: bool = False) -> str:
    """Escaped text with invisible and direction-changing characters (zero-width, RLO, ...) shown as markers,
    so a reader sees exactly what the model saw and nothing reorders or hides the rest of the page. Past
    ``limit`` characters the middle is cut (``end``: a prompt keeps its end, the last turn, which matters most)
    or the tail is."""
    more = len(text) - limit
    if more <= 0:
        return _marked(text)
    if end:
        head = limit // 4
        return (_marked(text[:head]) + f"<span class='info'> … {more:,} characters … </span>"
                + _marked(text[len(text) - (limit - head):]))
    return _marked(text[:limit]) + f"<span class='info'> … {more:,} more characters</span>"


def _marked(text: str) -> str:
    return "".join(f"<span class='cc' title='{unicodedata.name(ch, 'control character')}'>U+{ord(ch):04X}"
                   "</span>" if _invisible(ch) else esc(ch) for ch in text)


def _invisible(ch: str) -> bool:
    cat = unicodedata.category(ch)
    return cat == "Cf" or (cat == "Cc" and ch not in "\n\t") or ch in "\u2028\u2029"


def example_pairs(d: Decision, logs: dict[str, Log]) -> str:
    """Held-out pairs with text on which the recommended and the baseline cell disagree (else the first few)."""
    def pick(at: tuple) -> Log | None:  # the first finished cell with this objective and rank
        return next((logs[c.name] for c in d.cells if c.name in logs and (c.objective, c.lora_rank) == at), None)

    rec, base = pick((d.objective, d.lora_rank)), pick((d.baseline["objective"], d.baseline["lora_rank"]))
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
        margins = f"margin {num(p['margin'])}" + (f", baseline {num(other[p['id']]['margin'])}"
                                                    if p["id"] in other else "")
        cards.append(f"<div class='card' style='flex:1 1 45%'><h3>{esc(p['id'])} · {margins}</h3>"
                     + (f"<p class='meta'>{label}</p>" if label else "")
                     + "".join(f"<b>{k}</b><pre>{shown(str(p[k]), end=k == 'prompt')}</pre>" for k in TEXT_KEYS)
                     + "</div>")
    return f"<h2>Example held-out pairs</h2><div class='grid' id='examples'>{''.join(cards)}</div>"
