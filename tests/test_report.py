"""report: report.md + one self-contained report.html, escaped (the browser test: test_report_real.py)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from test_decide import cell, split, write_matrix
from test_review import healthy_lines, pairs, write_run

from preftune.core.errors import InputError
from preftune.core.layout import Decision, write_decision
from preftune.verdict.decide import decide
from preftune.verdict.report import write_report, write_run_report

PAYLOAD = "<script>document.body.setAttribute('data-pwned','1')</script>"


def hostile_matrix(root: Path) -> Path:
    """A switch matrix whose names, errors and dataset text carry HTML/script payloads."""
    dpo, simpo = split(300, 160, 10, 70)
    lengths = {"chosen_tokens": [6 + i % 4 for i in range(300)], "rejected_tokens": [10] * 300}
    cells = [cell("dpo", 16, dpo, train_top=3.0, held=0.3, text=True, **lengths),
             cell("simpo", 16, simpo, train_top=1.0, held=0.9, text=True, **lengths),
             cell("dpo", 4, dpo, text=True, **lengths),
             cell("orpo", 16, dpo, status="failed", error=f"crashed {PAYLOAD} & <b>bold</b>")]
    cells[2]["name"] = "dpo <script>document.body.setAttribute('data-pwned','2')"  # no '/': it is a folder
    cells[3]["name"] = f"orpo{PAYLOAD}"
    for row in cells[1]["rows"]:
        row["prompt"] = f"sort {PAYLOAD} <img src=x onerror=alert(1)>"
    return write_matrix(root, cells, {"objective": ["dpo", "simpo", "orpo"], "lora_rank": [16, 4]})


def expected_svgs(finished: int, with_lengths: bool = True) -> int:
    """Accuracy intervals + a margin plot per finished cell (+ length bars + a scatter per cell)."""
    return 1 + finished + (1 + finished if with_lengths else 0)


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> tuple[Path, Decision]:
    root = hostile_matrix(tmp_path_factory.mktemp("report") / "m")
    decision = decide(root, n_boot=500)
    write_decision(root, decision)
    write_report(root)
    return root, decision


def test_report_files_are_self_contained_and_escaped(report):
    root, decision = report
    page = (root / "report.html").read_text()
    assert decision.verdict == "switch"
    assert decision.summary in page and page.index(decision.summary) < page.index("<table")
    assert page.count("<svg") == expected_svgs(3)
    assert "<script" not in page.lower() and "<img" not in page.lower()
    assert "&lt;script&gt;document.body.setAttribute(&#x27;data-pwned&#x27;,&#x27;1&#x27;)" in page
    assert "&lt;b&gt;bold&lt;/b&gt;" in page and "Example held-out pairs" in page
    assert not re.search(r"<[^<>]*\s(src|href)\s*=|https?://|@import|url\(", page)  # nothing to fetch
    md = (root / "report.md").read_text()
    assert md.startswith("# preftune report: m\n") and f"**{decision.summary}**" in md
    assert "| objective=dpo,lora_rank=16 | finished | 0.567 [" in md and "&lt;script&gt;" in md
    assert "<script" not in md


def test_report_decides_when_no_decision_json(tmp_path):
    dpo, simpo = split(60, 30, 3, 8)
    root = write_matrix(tmp_path / "m", [cell("dpo", 8, dpo), cell("simpo", 8, simpo)])
    md, page = write_report(root)
    assert not (root / "decision.json").exists()
    text = page.read_text()
    assert "Not decisive" in text and "Example held-out pairs" not in text  # no text in these pairs
    assert text.count("<svg") == expected_svgs(2) and md.read_text().count(" | finished | ") == 2
    (root / "decision.json").write_text("{")
    with pytest.raises(InputError, match="decision.json:1: not valid JSON"):
        write_report(root)


def test_run_report(tmp_path):
    run = write_run(tmp_path / "run", healthy_lines(), pairs([i % 4 != 0 for i in range(400)]))
    md, page = write_run_report(run)
    assert page.read_text().count("<svg") == 3 and "healthy" in md.read_text()


def test_behaviour_section(tmp_path):
    from test_decide import cell, split, with_generations, write_matrix

    from preftune.verdict.report import write_report

    same = split(100, 60, 0, 0)[0]
    root = write_matrix(tmp_path / "m", [cell("dpo", 8, same), cell("simpo", 8, same)])
    with_generations(root, "objective=dpo,lora_rank=8", [1.0, 0.0] * 20, [20] * 40, [20] * 40)
    with_generations(root, "objective=simpo,lora_rank=8", [1.0] * 30 + [0.5] * 10, [30] * 40, [20] * 40)
    md, page = write_report(root)
    text, html = md.read_text(), page.read_text()
    assert "## Behaviour" in text and "| objective=simpo,lora_rank=8 | 0.875 [" in text
    assert "<h2>Behaviour</h2>" in html and html.count("generated lengths") >= 2  # one histogram per cell
    assert "<b>reference</b>" in html and "<pre>p0</pre>" in html  # prompt and completions side by side
    rows = (root / "cells" / "objective=simpo,lora_rank=8" / "gen_eval.jsonl").read_text().replace(
        '"policy": "w0', '"policy": "<script>alert(1)</script> w0')
    (root / "cells" / "objective=simpo,lora_rank=8" / "gen_eval.jsonl").write_text(rows)
    html = write_report(root)[1].read_text()
    assert "<script>alert(1)" not in html and "&lt;script&gt;alert(1)&lt;/script&gt; w0" in html
