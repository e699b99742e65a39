"""The house stays in shape: small units, one module owning the on-disk layout, no branching on a registry
entry's name outside its registry, imports that only go down the pipeline's stages.

    pytest tests/test_house.py
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "preftune"
MAX_FUNCTION, MAX_CLASS, MAX_MODULE = 80, 200, 500
# The stages, bottom up: a module may import its own stage and those below it, never one above.
STAGES = ("core", "data", "modeling", "generation", "evaluation", "training", "verdict", "pipeline", "commands")


def _modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def test_units_are_small():
    too_big = []
    for path in _modules():
        text = path.read_text(encoding="utf-8")
        if len(text.splitlines()) > MAX_MODULE:
            too_big.append(f"{path.relative_to(PACKAGE)}: {len(text.splitlines())} lines")
        for node in ast.walk(ast.parse(text)):
            size = getattr(node, "end_lineno", 0) - getattr(node, "lineno", 0) + 1
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and size > MAX_FUNCTION:
                too_big.append(f"{path.relative_to(PACKAGE)}:{node.lineno} {node.name}() {size} lines")
            if isinstance(node, ast.ClassDef) and size > MAX_CLASS:
                too_big.append(f"{path.relative_to(PACKAGE)}:{node.lineno} class {node.name} {size} lines")
    assert not too_big, "\n".join(too_big)


FILE_NAMES = ("summary.json", "decision.json", "matrix.json", "iterate.json", "metrics.jsonl", "eval_pairs.jsonl",
              "gen_eval.jsonl", "config.yaml", "base_config.yaml", "review.json", "pairs.stats.json")


def test_only_the_layout_module_spells_file_names():
    found = []
    for path in _modules():
        if path.name == "layout.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Constant) and node.value in FILE_NAMES:
                found.append(f"{path.relative_to(PACKAGE)}:{node.lineno} {node.value!r}")
    assert not found, "\n".join(found)


def test_no_branching_on_a_registry_entry_name_outside_its_registry():
    from preftune.core import objectives
    from preftune.generation import judges

    names = set(objectives.REGISTRY) | set(judges.KINDS)
    alternatives = "|".join(sorted(names))
    pattern = re.compile(rf"""(==|!=)\s*["']({alternatives})["']|\bin\s*\(\s*["']({alternatives})["']""")
    found = []
    for path in _modules():
        rel = path.relative_to(PACKAGE).as_posix()
        if rel.startswith(("core/objectives/", "generation/judge")):
            continue
        for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if pattern.search(line):
                found.append(f"{rel}:{i} {line.strip()}")
    assert not found, "\n".join(found)


def test_imports_only_go_down_the_stages():
    up = []
    for path in _modules():
        rel = path.relative_to(PACKAGE)
        if len(rel.parts) < 2 or rel.parts[0] not in STAGES:
            continue
        own = STAGES.index(rel.parts[0])
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.level >= 2 and node.module:
                stage = node.module.split(".")[0]
                if stage in STAGES and STAGES.index(stage) > own:
                    up.append(f"{rel}:{node.lineno} imports {node.module} ({stage} is above {rel.parts[0]})")
    assert not up, "\n".join(up)


def test_every_package_says_what_it_holds():
    for init in PACKAGE.glob("*/__init__.py"):
        doc = ast.get_docstring(ast.parse(init.read_text(encoding="utf-8")))
        assert doc and len(doc.splitlines()) == 1, f"{init.relative_to(PACKAGE)}: one line saying what it holds"


def test_the_command_line_answers_before_importing_torch():
    """`preftune --help` and a bad config answer in a fraction of a second: torch loads only where it is used."""
    import subprocess
    import sys

    code = "import sys, preftune.commands.cli as c; c.build_parser(); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
