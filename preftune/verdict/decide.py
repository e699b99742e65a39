"""``decide``: the verdict over a matrix folder (switch / keep / not_decisive / fallback_orpo, rules.py) or a
rounds folder (continue / stop, rounds.py), with its reasons as data. The one place that tells the two apart.

    d = decide("matrix/")                  # preftune decide matrix/ (the CLI also writes decision.json)
    print(d.verdict, d.objective, d.lora_rank, d.summary)

Statistics in comparisons.py, rules (Reason records, no prose) in rules.py and rounds.py, sentences in reasons.py.
"""

from __future__ import annotations

from pathlib import Path

from ..core.errors import InputError
from ..core.layout import (
    DECISION,
    MANIFEST,
    MATRIX,
    ROUNDS,
    Decision,
    MatrixDir,
    PipelineDir,
    RoundsDir,
    folder_kind,
    read_decision,
)
from .comparisons import Stats
from .data import data_reasons
from .rounds import decide_rounds
from .rules import decide_matrix


def decide(folder: str | Path, *, alpha: float = 0.05, baseline: dict | None = None,
           n_boot: int = 10000) -> Decision:
    """Compare the folder's finished cells (or rounds) on their shared held-out pairs; the Decision.

    ``baseline`` ({"objective": ..., "lora_rank": ...}, matrices only): the cell to compare against (default the
    grid's first objective and rank).
    """
    kind = folder_kind(Path(folder))
    if kind == "rounds":
        return decide_rounds(RoundsDir(folder), alpha=alpha, n_boot=n_boot)
    if kind != "matrix":
        raise InputError(_not_decidable(Path(folder), kind), path=str(folder))
    st = Stats.of_matrix(MatrixDir(folder), alpha, n_boot)
    return decide_matrix(st, st.baseline(baseline), data_reasons(MatrixDir(folder), st.cells))


def _not_decidable(folder: Path, kind: str) -> str:
    if not folder.is_dir():
        return "no such folder"
    if kind == "pipeline":
        return f"a pipeline folder: its matrix is {PipelineDir(folder).matrix}"
    if kind == "run":
        return ("a run folder: decide compares the cells of a matrix (ablate) or the rounds of iterate; "
                "`preftune review` diagnoses one run")
    return f"not a matrix (ablate), rounds (iterate) or pipeline folder: no {MATRIX}, {ROUNDS} or {MANIFEST}"


def decision_of(folder: str | Path) -> Decision:
    """The folder's decision.json, or its decision with default settings when it has not been decided."""
    return read_decision(Path(folder)) if (Path(folder) / DECISION).is_file() else decide(folder)
