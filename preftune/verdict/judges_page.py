"""The report's judges section, for folders judged by several judges (or by a pairwise judge that asked both
orders): how each two judges agree, each judge's win rate per cell, and each pairwise judge's position bias.

    md_lines, html = judges_section(logs)   # {cell or round name: its Log}; ([], "") with a single judge

Agreement pools every cell's prompts (each judgement of a cell's generation against the reference is one
prompt); agreement and position bias are defined in docs/behaviour.md, Several judges.
"""

from __future__ import annotations

import itertools

from ..evaluation import stats
from ..evaluation.behaviour import win_rate
from ..evaluation.runlog import Log
from .markup import esc, html_table, md_table, num, win

AGREEMENT = ("Each two judges on the same prompts (every cell's, pooled): the share of prompts on which they give "
             "the same outcome (win, tie or loss) and Cohen's kappa [95% bootstrap interval over prompts].")
POSITION = ("Pairwise judges that ask both orders: the share of comparisons whose answer flipped when the two "
            "responses swapped places (their position bias; such a disagreement counts as a tie).")


def _verdicts(log: Log) -> dict[str, list[dict]]:
    """{judge spec: its per-prompt verdicts} of one cell's gen_eval.jsonl rows (one judge: the rows' own keys)."""
    rows, spec = log.generations or [], (log.gen_eval or {}).get("judge", "judge")
    if rows and all(isinstance(r.get("judges"), dict) for r in rows):
        return {s: [r["judges"][s] for r in rows] for s in rows[0]["judges"]}
    return {spec: rows} if rows else {}


def judges_section(logs: dict[str, Log]) -> tuple[list[str], str]:
    """(Markdown lines, HTML) of the judges section; empty where every cell has one judge that sees no order."""
    cells = {name: v for name, log in logs.items() if (v := _verdicts(log))}
    specs = list(dict.fromkeys(s for v in cells.values() for s in v))
    flips = {s: [f for v in cells.values() for x in v.get(s, []) if (f := x.get("position_flip")) is not None]
             for s in specs}
    if len(specs) < 2 and not any(flips.values()):
        return [], ""
    md, html = ["", "## Judges", ""], "<h2>Judges</h2>"
    if len(specs) > 1:
        pooled = {s: [x["preference"] for v in cells.values() if all(t in v for t in specs) for x in v[s]]
                  for s in specs}
        pairs = {(a, b): stats.agreement(pooled[a], pooled[b]) for a, b in itertools.combinations(specs, 2)}

        def cell(a: str, b: str) -> str:
            g = pairs.get((a, b)) or pairs.get((b, a))
            return "–" if g is None else (f"agree {num(g['agree'], '.2f')} · κ {num(g['kappa'], '.2f')} "
                                          f"[{num(g['kappa_ci'][0], '.2f')}, {num(g['kappa_ci'][1], '.2f')}]")

        table = [[a] + [cell(a, b) for b in specs] for a in specs]
        rates = [[name] + [win(win_rate([x["preference"] for x in v[s]])) if s in v else "–" for s in specs]
                 for name, v in cells.items()]
        md += [AGREEMENT, ""] + md_table(["judge", *specs], table) + ["", "Win rate against the reference [95% CI], "
                                                                       "per judge:", ""] + md_table(["cell", *specs],
                                                                                                   rates)
        html += (f"<p class='meta'>{esc(AGREEMENT)}</p>" + html_table(["judge", *specs], table, 1)
                 + "<h3>Win rate against the reference [95% CI], per judge</h3>"
                 + html_table(["cell", *specs], rates, 1))
    biased = [[s, num(sum(f) / len(f), ".2f"), f"{sum(f)} / {len(f)}"] for s, f in flips.items() if f]
    if biased:
        head = ["judge", "position bias", "flipped / compared"]
        md += ["", POSITION, ""] + md_table(head, biased)
        html += f"<h3>Position bias</h3><p class='meta'>{esc(POSITION)}</p>" + html_table(head, biased, 1)
    return md, html

