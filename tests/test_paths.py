"""Path arguments that point at the wrong kind of thing: one line on stderr naming the path, exit code 2, nothing
written (a file given as --output is left untouched).

    .venv/bin/pytest -q tests/test_paths.py
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from test_review import healthy_lines, pairs, write_run

from preftune.commands.cli import main
from preftune.core.errors import InputError
from preftune.core.files import check_writable_dir

# (command line with {W} = tiny world, {T} = the test folder, and the path the message must name)
CASES = {
    "train --output FILE": ("train {run} --output {T}/afile", "{T}/afile"),
    "train --output FILE/sub": ("train {run} --output {T}/afile/sub", "{T}/afile/sub"),
    "train --cache-dir FILE": ("train {run} --output {T}/o --cache-dir {T}/afile", "{T}/afile"),
    "train --data FOLDER": ("train --model {W}/model --data {T}/adir --eval-data {W}/eval.jsonl --output {T}/o",
                            "{T}/adir"),
    "train --eval-data MISSING": ("train --model {W}/model --data {W}/train.jsonl --eval-data {T}/missing.jsonl "
                                  "--output {T}/o", "{T}/missing.jsonl"),
    "eval --output FILE": ("eval --model {W}/model --eval-data {W}/eval.jsonl --output {T}/afile", "{T}/afile"),
    "eval --output FILE/sub": ("eval --model {W}/model --eval-data {W}/eval.jsonl --output {T}/afile/x",
                               "{T}/afile/x"),
    "eval --cache-dir FILE": ("eval --model {W}/model --eval-data {W}/eval.jsonl --output {T}/o "
                              "--cache-dir {T}/afile", "{T}/afile"),
    "eval --eval-data MISSING": ("eval --model {W}/model --eval-data {T}/missing.jsonl --output {T}/o",
                                 "{T}/missing.jsonl"),
    "eval --eval-data FOLDER": ("eval --model {W}/model --eval-data {T}/adir --output {T}/o", "{T}/adir"),
    "ablate --output FILE": ("ablate {run} --output {T}/afile", "{T}/afile"),
    "ablate --output FILE/sub": ("ablate {run} --output {T}/afile/m", "{T}/afile/m"),
    "ablate --cache-dir FILE": ("ablate {run} --output {T}/m --cache-dir {T}/afile", "{T}/afile"),
    "ablate --data FOLDER": ("ablate --model {W}/model --data {T}/adir --eval-data {W}/eval.jsonl --output {T}/m",
                             "{T}/adir"),
    "report FILE": ("report {T}/afile", "{T}/afile"),
    "report MISSING": ("report {T}/missing", "{T}/missing"),
    "review --output FILE": ("review {T}/run --output {T}/afile", "{T}/afile"),
    "review --output FILE/sub": ("review {T}/run --output {T}/afile/r", "{T}/afile/r"),
    "review MISSING": ("review {T}/missing", "{T}/missing"),
    "decide FILE": ("decide {T}/afile", "{T}/afile"),
    "decide MISSING": ("decide {T}/missing", "{T}/missing"),
    "audit MISSING": ("audit {T}/missing.jsonl", "{T}/missing.jsonl"),
    "audit --eval-data FOLDER": ("audit {W}/train.jsonl --eval-data {T}/adir", "{T}/adir"),
    "audit --output FILE/sub": ("audit {W}/train.jsonl --output {T}/afile/audit.json", "{T}/afile"),
}


def snapshot(root: Path) -> dict[str, bytes | None]:
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None) for p in sorted(root.rglob("*"))}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_path_is_one_line_exit_2_nothing_written(case, tiny_world, tmp_path, capsys):
    (tmp_path / "afile").write_text("keep me\n")
    (tmp_path / "adir").mkdir()
    write_run(tmp_path / "run", healthy_lines(), pairs([i % 4 != 0 for i in range(40)]))
    line, named = CASES[case]
    w = str(tiny_world.model_dir.parent)
    run = (f"--model {w}/model --data {w}/train.jsonl --eval-data {w}/eval.jsonl --max-steps 1 --quiet "
           f"--cache-dir {tmp_path}/cache")
    argv = line.format(run=run, W=w, T=tmp_path).split()
    before = snapshot(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("preftune: error: ") and "Traceback" not in err
    assert named.format(T=tmp_path) in err, err
    assert snapshot(tmp_path) == before  # nothing written, afile untouched


def test_check_writable_dir(tmp_path, monkeypatch):
    (tmp_path / "f").write_text("x")
    check_writable_dir(tmp_path / "new" / "deeper")  # may be created: fine
    with pytest.raises(InputError, match=r"/f: field 'output': is a file, not a folder"):
        check_writable_dir(tmp_path / "f", field="output")
    with pytest.raises(InputError, match=rf"/f/a/b: cannot create a folder here: {tmp_path}/f is a file"):
        check_writable_dir(tmp_path / "f" / "a" / "b")
    # root ignores permission bits, so an unwritable folder is simulated
    monkeypatch.setattr(os, "access", lambda path, mode: Path(path) != tmp_path)
    with pytest.raises(InputError, match=rf"/x: cannot write here: {tmp_path} is not writable by this user"):
        check_writable_dir(tmp_path / "x")
