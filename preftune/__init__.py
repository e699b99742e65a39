"""preftune: preference optimization that decides.

Train every objective TRL, CPO/KTO and open-instruct offer (DPO, IPO, APO, NCA, BCO, SimPO, ORPO, KTO, ...),
weighted mixtures of them, or your own, with LoRA in one engine, measure each on held-out pairs while it trains,
and say which objective and which adapter rank won, how sure that is, and why. The public functions, with an
example of each: docs/api.md.

    >>> summary = preftune.train(preftune.Config(model=M, data="train.jsonl", eval_data="heldout.jsonl"))
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .core.config import Config, from_file
from .core.errors import InputError, TrainingDiverged
from .core.layout import Decision, RunSummary, write_decision

__all__ = ["Config", "from_file", "train", "evaluate", "ablate", "decide", "report", "review", "run_pipeline", "plan", "Plan",
           "PlanCell", "objective", "judge_kind", "ObjectiveOutput", "SeqLogps", "InputError", "TrainingDiverged"]
__version__ = "0.1.0"
_LAZY = {"objective": "core.objectives", "ObjectiveOutput": "core.objectives", "SeqLogps": "core.objectives",
         "plan": "training.plan", "Plan": "training.plan", "PlanCell": "training.plan",
         "judge_kind": "generation.judges", "review": "evaluation.review"}


def __getattr__(name: str) -> Any:
    """Names whose modules import torch load on first use, so `preftune --help` and a bad config answer at once."""
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'preftune' has no attribute {name!r}")


def train(config: Config) -> RunSummary:
    """Train one run; returns its summary (summary.json, docs/formats.md)."""
    from .training.loop import train as _train

    return _train(config)


def evaluate(config: Config, adapter: str | None = None) -> dict[str, Any]:
    """``preftune eval``: score a model (and an optional peft adapter) on held-out pairs; returns the metrics."""
    from .evaluation.heldout import evaluate_model

    return evaluate_model(config, adapter=adapter)


def ablate(config: Config, grid: dict[str, list[Any]] | None = None, parallel: int = 1, *, backend: str = "local",
           address: str | None = None, cpus_per_cell: float = 1, gpus_per_cell: float = 0) -> dict[str, int]:
    """Run the objective x rank matrix (default dpo,simpo x 16,8) into ``config.output``.

    ``backend="ray"`` runs each cell as a Ray task (``address``: a cluster to join; default a local instance).
    """
    from .core.config import DEFAULT_GRID
    from .training.matrix import RayOptions, run_matrix

    ray = RayOptions(address=address, cpus_per_cell=cpus_per_cell, gpus_per_cell=gpus_per_cell)
    return run_matrix(config, grid or dict(DEFAULT_GRID), parallel=parallel, backend=backend, ray=ray)


def decide(folder: str, **kw: Any) -> Decision:
    """Statistics and the verdict over a matrix folder (or ``preftune iterate``'s rounds); writes decision.json.

    ``kw``: ``alpha``, ``baseline`` ({"objective": ..., "lora_rank": ...}), ``n_boot``.
    """
    from .verdict.decide import decide as _decide

    decision = _decide(folder, **kw)
    write_decision(Path(folder), decision)
    return decision


def report(matrix_dir: str) -> tuple[Any, Any]:
    """Write report.md and report.html for a matrix folder (decided if needed), an iterate folder or a run."""
    from .verdict.report import write_any

    return write_any(matrix_dir)


def run_pipeline(recipe: str, output: str, *, quiet: bool = False) -> dict[str, Any]:
    """``preftune pipeline RECIPE --output DIR``: SFT -> matrix -> decide -> gate -> ship (docs/pipeline.md), or
    finish an interrupted one; returns each stage's state (status, verdict) by name."""
    from .pipeline.recipe import load_recipe
    from .pipeline.run import run_pipeline as _run

    return _run(load_recipe(recipe), output, quiet=quiet)
