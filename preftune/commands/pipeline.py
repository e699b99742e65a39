"""``preftune pipeline``: SFT -> preference matrix -> decide -> safety and regression gate -> ship (-> rounds).

    preftune pipeline recipe.yaml --output loop/      # re-run the same line to continue after an interruption
"""

from __future__ import annotations

import argparse

from .options import Command


def _arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe", help="the recipe: stages and their settings (YAML; docs/pipeline.md)")
    p.add_argument("--output", required=True, help="the pipeline folder (one folder per stage inside)")
    p.add_argument("--quiet", action="store_true", help="no stage lines")


def _run(args: argparse.Namespace) -> int:
    from ..pipeline.recipe import load_recipe

    recipe = load_recipe(args.recipe)  # before the heavy imports: a bad recipe is one line at once
    from ..pipeline.run import run_pipeline
    from ..verdict.report import write_report

    stages = run_pipeline(recipe, args.output, quiet=args.quiet)
    md, html = write_report(args.output)
    gate = stages.get("gate")
    print(f"pipeline: {', '.join(f'{s.name} {s.verdict or s.status}' for s in stages.values())}")
    if gate is not None and gate.verdict == "hold":  # why, on the console too: which check, by how much
        from ..core.layout import PipelineDir

        for line in PipelineDir(args.output).read_gate()["explanation"]:
            print(f"  - {line}")
    print(f"report: {html}")
    return 0 if gate is None or gate.verdict == "ship" else 3


PIPELINE = Command("pipeline", "the production loop: SFT, matrix, decide, gate, ship; resumable", _arguments, _run, computes=True)
