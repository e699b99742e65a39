"""The report's building blocks: escaping (Markdown and HTML), number formats, tables, the page and its CSS.

    page("preftune: m", esc(title) + html_table(("a", "p"), [["dpo", num(0.04, ".2g")]], 1))
"""

from __future__ import annotations

import html
import math
import re
from collections.abc import Sequence
from typing import Any

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
 background:#f9fafb;padding:4px 6px;border-radius:4px;unicode-bidi:isolate}
.cc{font-size:10px;color:#b91c1c;border:1px solid #fca5a5;border-radius:3px;padding:0 2px;margin:0 1px}
table.m2{width:auto}table.m2 td,table.m2 th{padding:6px 14px;border:1px solid #e5e7eb}
table.m2 td.rec{background:#eff6ff;outline:2px solid #2563eb;outline-offset:-2px}.ys{white-space:nowrap}
"""


def esc(text: Any) -> str:
    return html.escape(str(text))


def md_esc(text: Any) -> str:  # a lone * (a mixture: 0.8*dpo+1*sft) is escaped, ** (bold) kept
    return re.sub(r"(?<!\*)\*(?!\*)", r"\\*", html.escape(str(text)).replace("|", "\\|").replace("\n", " "))


def num(x: Any, fmt: str = ".3g") -> str:
    return "–" if not isinstance(x, (int, float)) or not math.isfinite(x) else format(x, fmt)


def md_table(head: Sequence[str], rows: list[list[str]]) -> list[str]:
    return (["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
            + ["| " + " | ".join(md_esc(x) for x in row) + " |" for row in rows])


def html_table(head: Sequence[str], rows: list[list[str]], text_cols: int = 0) -> str:
    """Escaped cells: the first ``text_cols`` columns as text, the rest as right-aligned numbers."""
    return ("<table><tr>" + "".join(f"<th>{esc(h)}</th>" for h in head) + "</tr>" + "".join(
        "<tr>" + "".join(f"<td>{esc(x)}</td>" for x in row[:text_cols])
        + "".join(f"<td class='num'>{esc(x)}</td>" for x in row[text_cols:]) + "</tr>" for row in rows) + "</table>")


def page(title: str, body: str) -> str:
    return (f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>{esc(title)}</title>"
            f"<meta name='viewport' content='width=device-width,initial-scale=1'><style>{CSS}</style></head>"
            f"<body>{body}</body></html>\n")


def findings_html(items: list[tuple[str, str, str]]) -> str:
    return "<ul class='f'>" + "".join(f"<li class='{esc(s)}'><b>{esc(c)}</b>: {esc(t)}</li>" for s, c, t in items) + \
        "</ul>"


def win(g: dict) -> str:
    return f"{num(g['win_rate'], '.3f')} [{num(g['win_rate_ci'][0], '.3f')}, {num(g['win_rate_ci'][1], '.3f')}]"


def lc(g: dict) -> str:
    return f"{num(g['lc_win_rate'], '.3f')} ± {num(1.96 * g['lc_win_rate_se'], '.3f')}"


def lens(g: dict) -> str:
    return f"{num(g['policy_len'])} / {num(g['reference_len'])}"
