"""The production loop as one resumable command: SFT -> preference matrix -> decide -> gate -> ship (-> rounds).

    preftune pipeline recipe.yaml --output loop/

Each stage writes a normal preftune folder inside the output, so every other command works on it; the folders,
pipeline.json and how a re-run resumes: docs/pipeline.md, The stages and their folders.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..core.errors import InputError
from ..core.files import FolderLock, check_writable_dir, json_digest
from ..core.layout import PipelineDir, Stage
from ..data.rows import is_file_source, load_prompts
from ..generation.judges import parse_judge
from ..modeling.folder import check_model_folder
from .recipe import STAGES, Recipe
from .stages import decide_stage, gate_stage, iterate_stage, matrix_stage, sft_stage, ship_stage

StageRun = Callable[[Recipe, PipelineDir], tuple[str, str | None]]  # -> (status, verdict)
RUNS: dict[str, StageRun] = {"sft": sft_stage, "matrix": matrix_stage, "decide": decide_stage, "gate": gate_stage,
                             "ship": ship_stage, "iterate": iterate_stage}


def run_pipeline(recipe: Recipe, output: str | Path, *, quiet: bool = False) -> dict[str, Stage]:
    """Run (or finish) every stage of ``recipe`` into ``output``; returns each stage's state."""
    out = PipelineDir(Path(output))
    check_writable_dir(out.path, field="output")
    _preflight(recipe)  # everything that can reject the recipe, before anything is written
    wanted = [s for s in STAGES if _wanted(recipe, s)]
    with FolderLock(out.path):
        stages = _stages(out, recipe, wanted)
        for name in wanted:
            stage = stages[name]
            if stage.status in ("done", "held", "skipped"):
                _say(quiet, f"{name}: {stage.status}" + (f" ({stage.verdict})" if stage.verdict else "") + ", as before")
                continue
            _say(quiet, f"{name}: started")
            stage.status, stage.error = "running", None
            out.write_manifest(_identity(recipe), stages)
            try:
                stage.status, stage.verdict = RUNS[name](recipe, out)
            except InputError as e:  # a judge that fails, bad data: this stage fails, the earlier ones stay
                stage.status, stage.error = "failed", str(e)
                out.write_manifest(_identity(recipe), stages)
                raise
            out.write_manifest(_identity(recipe), stages)
            _say(quiet, f"{name}: {stage.status}" + (f" ({stage.verdict})" if stage.verdict else ""))
    return stages


def _wanted(recipe: Recipe, stage: str) -> bool:
    return {"sft": recipe.sft is not None, "gate": bool(recipe.checks),
            "iterate": recipe.iterate is not None}.get(stage, True)


def _identity(recipe: Recipe) -> dict[str, Any]:
    return {"path": recipe.path, "sha256": json_digest(recipe.raw)}


def _stages(out: PipelineDir, recipe: Recipe, wanted: list[str]) -> dict[str, Stage]:
    """The manifest's stages, or fresh ones; a folder made by another recipe is refused, not mixed."""
    if not out.manifest.exists():
        if out.path.exists() and any(p.name != ".lock" for p in out.path.iterdir()):
            raise InputError("output folder is not empty and holds no pipeline: choose another --output",
                             path=str(out.path))
        return {s: Stage(s) for s in wanted}
    made_by, stages = out.read_manifest()
    if made_by["sha256"] != _identity(recipe)["sha256"]:
        raise InputError("this folder was made by another recipe (or the recipe changed): use another --output",
                         path=str(out.path))
    return {s: stages.get(s, Stage(s)) for s in wanted}


def _preflight(recipe: Recipe) -> None:
    """The model folder and data files exist; every gate check's prompts load and its judges parse. All before a
    stage writes anything: a typo in a path must not leave a folder that the fixed recipe is then refused."""
    for stage, run in (("sft", recipe.sft), ("matrix", recipe.matrix)):
        if run is None:
            continue
        if run.model != "from-sft":
            check_model_folder(run.model)
        for key in ("data", "eval_data"):
            value = getattr(run, key)
            if value and is_file_source(value) and not Path(value).is_file():
                raise InputError(f"no such file: {value}", path=recipe.path, field=f"{stage}.{key}")
    for i, check in enumerate(recipe.checks):
        load_prompts(check.prompts)
        for spec in check.judges:
            try:
                parse_judge(spec, recipe.matrix)
            except InputError as e:  # say where in the recipe: the judge's own error names only itself
                raise InputError(e.message, path=recipe.path, field=f"gate.checks[{i}].judge") from None


def _say(quiet: bool, text: str) -> None:
    if not quiet:
        print(f"[pipeline] {text}", file=sys.stderr, flush=True)
