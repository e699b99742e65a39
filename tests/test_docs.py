"""Docs that drift from the code fail the build: every relative link in README.md and docs/*.md resolves (a
``#anchor`` to a heading, GitHub-style), every ``preftune ...`` command line in their code blocks parses with
the real argument parser, and docs/objectives.md is what the objective registry generates.

    pytest tests/test_docs.py
"""

from __future__ import annotations

import io
import re
import shlex
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

from preftune.commands.cli import build_parser, main
from preftune.commands.world import objectives_markdown

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^\s*(```|~~~)")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
LINK = re.compile(r"\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")  # [text](target) and ![alt](target)
SEPARATORS = {"&&", "||", ";", "|"}
COMMAND = re.compile(r"(\S*/)?preftune")
LAUNCHER = re.compile(r"(\S*/)?(python3?(\.\d+)?|torchrun|accelerate)")  # what runs `-m preftune`
ENV = re.compile(r"[A-Z_][A-Z0-9_]*=\S*")  # VAR=value before a command


def _split(page: Path) -> tuple[list[tuple[int, str]], list[list[str]]]:
    """((line number, line) outside code blocks, code blocks) of a Markdown page."""
    prose: list[tuple[int, str]] = []
    blocks: list[list[str]] = []
    block: list[str] | None = None
    for number, line in enumerate(page.read_text(encoding="utf-8").splitlines(), 1):
        if FENCE.match(line):
            if block is None:
                block = []
            else:
                blocks.append(block)
                block = None
        elif block is None:
            prose.append((number, line))
        else:
            block.append(line)
    return prose, blocks


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: link text kept, markup and punctuation dropped, spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading).replace("`", "").replace("**", "")
    return re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    seen: dict[str, int] = {}
    for _, line in _split(page)[0]:
        m = HEADING.match(line)
        if m:
            slug = _slug(m.group(2))
            n = seen.get(slug, 0)
            seen[slug] = n + 1
            if n:
                seen[f"{slug}-{n}"] = 1  # GitHub numbers repeated headings
    return set(seen)


def test_every_relative_link_resolves():
    broken, checked = [], 0
    for page in PAGES:
        for number, line in _split(page)[0]:
            for target in LINK.findall(re.sub(r"`[^`]*`", "", line)):  # a link inside `code` is not a link
                if re.match(r"[a-z]+:", target):  # http:, https:, mailto:
                    continue
                checked += 1
                path, _, anchor = target.partition("#")
                dest = (page.parent / path).resolve() if path else page
                where = f"{page.relative_to(ROOT)}:{number}: ({target})"
                if not dest.exists():
                    broken.append(f"{where}: no file {dest.relative_to(ROOT) if dest.is_relative_to(ROOT) else dest}")
                elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
                    broken.append(f"{where}: no heading with anchor #{anchor} in {dest.relative_to(ROOT)}")
    assert checked > 30, f"only {checked} links found: is the link pattern still right?"
    assert not broken, "\n".join(broken)


def _command_lines(block: list[str]) -> list[str]:
    """A code block's lines with ``\\`` continuations joined."""
    lines, pending = [], ""
    for line in block:
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
        else:
            lines.append(pending + line)
            pending = ""
    return [*lines, pending] if pending else lines


def _preftune_argv(line: str) -> list[list[str]]:
    """The preftune argument lists on one shell line: ``preftune ...`` (also ``.venv/bin/preftune``) and
    ``python -m preftune ...`` / ``torchrun ... -m preftune ...``; ``# comments``, redirections and literal
    ``...`` dropped."""
    words = [w for w in line.split() if not ENV.fullmatch(w)]
    if not words or not (COMMAND.fullmatch(words[0]) or LAUNCHER.fullmatch(words[0])):
        return []
    segments, segment = [], []
    tokens = iter(shlex.split(line, comments=True))
    for token in tokens:
        if re.fullmatch(r"\d*[<>]{1,2}", token):  # `> file`: the redirection and its target
            next(tokens, None)
        elif token in SEPARATORS:
            segments.append(segment)
            segment = []
        elif token != "...":
            segment.append(token)
    found = []
    for seg in [*segments, segment]:
        while seg and ENV.fullmatch(seg[0]):
            seg = seg[1:]
        if seg and COMMAND.fullmatch(seg[0]):
            found.append(seg[1:])
        elif "-m" in seg[:-1] and seg[seg.index("-m") + 1] == "preftune":
            found.append(seg[seg.index("-m") + 2:])
    return found


def test_every_command_line_shown_parses():
    parser = build_parser()
    bad, checked = [], 0
    for page in PAGES:
        for block in _split(page)[1]:
            for line in _command_lines(block):
                for argv in _preftune_argv(line):
                    checked += 1
                    err = io.StringIO()
                    try:
                        with redirect_stderr(err), redirect_stdout(io.StringIO()):
                            parser.parse_args(argv)
                    except SystemExit as e:
                        if e.code:  # --help exits 0
                            bad.append(f"{page.relative_to(ROOT)}: preftune {shlex.join(argv)}\n    "
                                       f"{err.getvalue().strip()}")
    assert checked > 30, f"only {checked} command lines found: is the extraction still right?"
    assert not bad, "\n".join(bad)


def test_readme_starts_with_the_two_commands():
    first = _split(ROOT / "README.md")[1][0]
    assert [line.split("#")[0].strip() for line in first] == ["make demo", "make test"]


def test_objectives_page_is_generated_from_the_registry(capsys):
    page = (ROOT / "docs" / "objectives.md").read_text(encoding="utf-8")
    assert page == objectives_markdown(), \
        "docs/objectives.md is stale; regenerate it: preftune objectives --markdown > docs/objectives.md"
    assert main(["objectives", "--markdown"]) == 0
    assert capsys.readouterr().out == page


def _tree(page: Path, heading: str) -> set[str]:
    """The paths listed, one per line, in the code block under ``heading``."""
    text = page.read_text(encoding="utf-8")
    block = text[text.index(heading):].split("```")[1]
    return {line.split()[0] for line in block.splitlines() if line.strip()}


def test_file_trees_list_every_file_and_nothing_gone():
    import subprocess

    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    package = {f for f in tracked if f.startswith("preftune/") and f.endswith(".py")}
    tests = {f for f in tracked if f.startswith(("tests/", "bench/"))}
    readme = _tree(ROOT / "README.md", "## Project layout")
    dev = _tree(ROOT / "docs" / "development.md", "## Test and benchmark files")
    assert package <= readme, f"add to README.md's Project layout: {sorted(package - readme)}"
    assert tests <= dev, f"add to docs/development.md's file list: {sorted(tests - dev)}"
    gone = {p for p in readme | dev if not (ROOT / p).exists()}
    assert not gone, f"listed but gone: {sorted(gone)}"
