"""The report of a real tiny matrix, read the way a person reads it: in headless Chromium.

The held-out data carries hostile text (markup, a 100 kB completion, right-to-left and zero-width characters);
the browser must show it as text and run nothing. Also: the objective x rank grid and the example pairs,
whose text is read back from the data file by id.

    .venv/bin/pytest -q tests/test_report_real.py
    PREFTUNE_UPDATE_SCREENSHOT=1 .venv/bin/pytest -q tests/test_report_real.py   # also rewrites docs/report.png
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from test_report import expected_svgs, hostile_matrix

from preftune.core.config import Config
from preftune.core.layout import write_decision
from preftune.evaluation import stats
from preftune.training.matrix import run_matrix
from preftune.verdict.decide import decide
from preftune.verdict.matrix_page import pair_texts
from preftune.verdict.report import write_report

SCRIPT = "<script>window.__pwned = 1</script>"
SVG_BREAK = "</svg></pre><img src=x onerror=\"window.__pwned = 2\">"
RTL = "\u202e\u05e9\u05dc\u05d5\u05dd"    # RIGHT-TO-LEFT OVERRIDE, then Hebrew letters
ZERO_WIDTH = "\u200b\u200d\ufeff"         # zero-width space, joiner, BOM
LONG = ("9 8 7 6 5 4 3 2 1 0 " * 5000)[:100_000]
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"]
INSTALL = "apt-get update && apt-get install -y chromium   (as root; `make test` does it when run as root)"
SCREENSHOT = Path(__file__).resolve().parents[1] / "docs" / "report.png"


def hostile_eval(world, path: Path, n: int = 24) -> Path:
    """The tiny world's first ``n`` held-out pairs with hostile text in every prompt and completion."""
    rows = [json.loads(line) for line in world.eval_path.read_text().splitlines()[:n]]
    for r in rows:
        r["prompt"] = f"{r['prompt']} {SCRIPT}{RTL}{ZERO_WIDTH}"
        r["chosen"] = f"{r['chosen']} {SVG_BREAK}{ZERO_WIDTH}"
        r["rejected"] = f"{r['rejected']} {RTL} {LONG}"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def real(tiny_world, tmp_path_factory) -> tuple[Path, dict]:
    """A real 2x2 matrix (DPO/SimPO x r=16/8, 4 steps on 16 pairs), decided, with its report written."""
    root = tmp_path_factory.mktemp("real_report")
    cfg = Config(model=str(tiny_world.model_dir), data=str(tiny_world.train_path),
                 eval_data=str(hostile_eval(tiny_world, root / "heldout.jsonl")), lr=3e-3, batch_size=4,
                 max_steps=4, eval_every=2, save_every=0, warmup_ratio=0.0, max_train_pairs=16, max_length=64,
                 max_prompt_length=32, output=str(root / "m"), cache_dir=str(root / "cache"), quiet=True,
                 objectives={"simpo": {"beta": 2.0, "gamma_beta_ratio": 0.5}})
    assert run_matrix(cfg, {"objective": ["dpo", "simpo"], "lora_rank": [16, 8]}) == {"finished": 4, "failed": 0}
    decision = decide(root / "m", n_boot=500)
    write_decision(root / "m", decision)
    write_report(root / "m")
    return root / "m", decision


def summaries(root: Path) -> dict[str, dict]:
    return {p.name: json.loads((p / "summary.json").read_text()) for p in (root / "cells").iterdir()}


# --- example pairs and the grid, from the files ---------------------------------------------------------

def test_example_pairs_resolve_to_the_data_file(real):
    root, _ = real
    cell = root / "cells" / "objective=dpo,lora_rank=16"
    texts = pair_texts(cell)
    ids = [json.loads(line)["id"] for line in (cell / "eval_pairs.jsonl").read_text().splitlines()]
    assert len(ids) == 24 and set(ids) <= set(texts)
    first = json.loads((root.parent / "heldout.jsonl").read_text().splitlines()[0])
    assert ids[0] == "heldout.jsonl:1" and texts[ids[0]] == {k: first[k] for k in ("prompt", "chosen", "rejected")}
    page = (root / "report.html").read_text()
    assert "Example held-out pairs" in page and "heldout.jsonl:1 · margin" in page
    # moved data: the section is left out, the report still writes
    moved = root.parent / "moved.jsonl"
    shutil.move(root.parent / "heldout.jsonl", moved)
    try:
        assert pair_texts(cell) == {}
        write_report(root)
        assert "Example held-out pairs" not in (root / "report.html").read_text()
    finally:
        shutil.move(moved, root.parent / "heldout.jsonl")
        write_report(root)


def test_grid_matches_summaries_with_wilson_intervals(real):
    root, decision = real
    page, md = (root / "report.html").read_text(), (root / "report.md").read_text()
    assert page.index("id='matrix-grid'") < page.index("<h2>Why</h2>")
    assert md.index("## The matrix") < md.index("## Why")
    for name, s in summaries(root).items():
        final, n = s["final_eval"], s["final_eval"]["eval_pairs"]
        texts = []
        for ys in ("refrel", "lennorm"):
            acc = final[f"eval_{ys}/accuracy"]
            lo, hi = stats.wilson_interval(acc * n, n)
            texts.append(f"{ys} {acc:.3f} [{lo:.3f}, {hi:.3f}]")
        square = page.split(f"data-objective='{s['objective']}' data-rank='{s['lora_rank']}'>")[1].split("</td>")[0]
        assert all(f"{t.split(' ', 1)[0]} <b>{t.split(' ', 1)[1]}</b>" in square for t in texts), (name, square)
        row = next(line for line in md.splitlines() if line.startswith(f"| {s['objective']} |"))
        assert " / ".join(texts) in row
    rec = f"data-objective='{decision.objective}' data-rank='{decision.lora_rank}'"
    assert page.count("<td class='rec'") == 1 and f"<td class='rec' {rec}>" in page


# --- in the browser -------------------------------------------------------------------------------------

def chromium() -> str:
    """Debian's Chromium; `make test` installs it. Missing: the test fails with the command to run."""
    found = shutil.which("chromium") or ("/usr/bin/chromium" if os.path.exists("/usr/bin/chromium") else None)
    if not found:
        pytest.fail(f"chromium is not installed; run: {INSTALL}", pytrace=False)
    return found


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    from playwright.sync_api import sync_playwright

    path = chromium()
    with sync_playwright() as p:
        context = p.chromium.launch_persistent_context(
            str(tmp_path_factory.mktemp("profile")), executable_path=path, headless=True, args=FLAGS,
            viewport={"width": 1200, "height": 1000}, device_scale_factor=1, java_script_enabled=True)
        yield context
        context.close()


def open_page(browser, html: Path):
    """Open a report; record dialogs, console messages and every request the page makes."""
    page = browser.new_page()
    seen: dict[str, list] = {"dialogs": [], "requests": [], "console": []}
    page.on("dialog", lambda d: (seen["dialogs"].append(d.message), d.dismiss()))
    page.on("request", lambda r: seen["requests"].append(r.url))
    page.on("console", lambda m: seen["console"].append(m.text))
    page.goto(html.resolve().as_uri())
    return page, seen


PROBE = """() => ({
  pwned: window.__pwned === undefined ? null : window.__pwned,
  scripts: document.querySelectorAll('script').length,
  imgs: document.querySelectorAll('img').length,
  svgs: [...document.querySelectorAll('svg')].map(s => { const r = s.getBoundingClientRect();
                                                         return [r.width, r.height]; }),
  overflow: document.documentElement.scrollWidth - window.innerWidth,
  title: document.title,
})"""


def test_real_report_in_chromium(real, browser, tmp_path):
    root, decision = real
    page, seen = open_page(browser, root / "report.html")
    verdict = page.locator("#verdict")
    assert verdict.is_visible() and verdict.inner_text() == decision.summary
    box = verdict.bounding_box()
    assert box is not None and box["y"] < 200 and box["height"] > 10   # at the top, not pushed off-screen
    probe = page.evaluate(PROBE)
    assert probe["svgs"] and len(probe["svgs"]) == expected_svgs(4) + 1  # + the data section's length histogram
    assert all(w > 0 and h > 0 for w, h in probe["svgs"]), probe["svgs"]
    assert (probe["pwned"], probe["scripts"], probe["imgs"], seen["dialogs"]) == (None, 0, 0, [])
    assert probe["overflow"] <= 0                                      # a 100 kB line wraps, no sideways scroll
    assert probe["title"] == f"preftune: {root.name}"
    assert seen["requests"] == [(root / "report.html").resolve().as_uri()]  # nothing fetched

    grid = page.locator("#matrix-grid")
    assert grid.is_visible() and grid.locator("td.rec").count() == 1
    examples = page.locator("#examples")
    assert examples.is_visible()
    text = examples.inner_text()
    assert SCRIPT in text and "</svg></pre><img src=x" in text          # markup shown as text
    for marker in ("U+202E", "U+200B", "U+200D", "U+FEFF"):              # invisible characters made visible
        assert marker in text
    assert "\u202e" not in text and "\u200b" not in text and "\u05e9\u05dc\u05d5\u05dd" in text
    cards = examples.locator(".card")
    assert cards.count() >= 1
    assert all(" more characters" in cards.nth(i).inner_text() for i in range(cards.count()))  # 100 kB cut
    assert max(cards.nth(i).bounding_box()["height"] for i in range(cards.count())) < 2000
    assert (root / "report.html").stat().st_size < 300_000

    shot = tmp_path / "report.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20_000
    if os.environ.get("PREFTUNE_UPDATE_SCREENSHOT") == "1":
        page.set_viewport_size({"width": 1000, "height": 760})
        page.screenshot(path=str(SCREENSHOT))
        assert SCREENSHOT.stat().st_size < 200_000
    page.close()


def test_hostile_names_and_errors_in_chromium(browser, tmp_path):
    """Cell names, error messages and dataset text carrying payloads (a synthetic matrix) stay text too."""
    root = hostile_matrix(tmp_path / "m")
    decision = decide(root, n_boot=200)
    write_decision(root, decision)
    write_report(root)
    page, seen = open_page(browser, root / "report.html")
    probe = page.evaluate("() => [document.body.getAttribute('data-pwned'), "
                          "document.querySelectorAll('script, img').length, document.body.innerText]")
    assert probe[:2] == [None, 0] and seen["dialogs"] == []
    assert "crashed <script>document.body.setAttribute('data-pwned','1')</script> & <b>bold</b>" in probe[2]
    assert page.locator("#verdict").inner_text() == decision.summary
    page.close()


def test_pair_texts_from_a_split_data_file_and_conversations(tiny_world, tmp_path):
    """Held-out pairs split off --data resolve to that file; message lists come back as role: content lines."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(f"data: {tiny_world.train_path}\neval_data: null\ndata_split: train\n")
    texts = pair_texts(run)
    row = json.loads(tiny_world.train_path.read_text().splitlines()[2])
    assert len(texts) == 256 and texts["train.jsonl:3"] == {k: row[k] for k in ("prompt", "chosen", "rejected")}
    conv = tmp_path / "conv.json"
    user = {"role": "user", "content": "Hi"}
    conv.write_text(json.dumps([{"chosen": [user, {"role": "assistant", "content": "Hello!"}],
                                 "rejected": [user, {"role": "assistant", "content": "Go away."}]}]))
    (run / "config.yaml").write_text(f"data: {tmp_path / 'x.jsonl'}\neval_data: {conv}\neval_split: test\n")
    assert pair_texts(run) == {"conv.json:0": {"prompt": "user: Hi", "chosen": "assistant: Hello!",
                                               "rejected": "assistant: Go away."}}


OVERLAPS = """() => {
  const box = el => el.getBoundingClientRect();
  const hit = (a, b) => a.left < b.right && b.left < a.right && a.top < b.bottom && b.top < a.bottom;
  const acc = [...document.querySelectorAll("svg[aria-label='held-out accuracy']")][0];
  const chance = [...acc.querySelectorAll('text')].find(t => t.textContent === 'chance');
  const bars = [...acc.querySelectorAll("line[stroke-width='3'], circle")];
  const out = {chance_hits_bar: bars.some(b => hit(box(chance), box(b))), label_hits_tick: false};
  for (const svg of document.querySelectorAll("svg[aria-label^='margins:']")) {
    const label = [...svg.querySelectorAll('text')].find(t => t.getAttribute('transform'));
    const ticks = [...svg.querySelectorAll("text[text-anchor='end']")];
    if (ticks.some(t => hit(box(label), box(t)))) out.label_hits_tick = true;
  }
  return out;
}"""


def test_labels_do_not_overlap_and_long_prompts_show_their_end(real, browser, tmp_path):
    """Issue 24 item 20: the "chance" label clears the interval bars, the rotated "reward margin" label clears
    the tick labels, the grid says plainly what a not-decisive verdict means, and a long prompt shows its end."""
    root, decision = real
    page, _ = open_page(browser, root / "report.html")
    assert page.evaluate(OVERLAPS) == {"chance_hits_bar": False, "label_hits_tick": False}
    assert "until settled" not in page.content()
    page.close()
    from preftune.verdict.matrix_page import shown

    prompt = "Human: " + "earlier turn. " * 300 + "Human: the LAST question?\n\nAssistant:"
    text = shown(prompt, 600, end=True)
    assert "the LAST question?" in text and text.startswith("Human: earlier") and " characters … " in text
