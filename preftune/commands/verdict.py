"""``preftune decide``, ``report`` and ``review``: the verdict over a matrix or rounds folder, the report to show
your lead, and one run's diagnostics.

    preftune decide matrix && preftune report matrix
    preftune review runs/x                 # exit 1 on an [error] finding; --fail-on warn|never
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ..core.errors import InputError
from .options import Command


def _decide_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("matrix", metavar="FOLDER", help="a matrix folder (ablate) or a rounds folder (iterate)")
    p.add_argument("--alpha", type=float, default=0.05, help="significance level")
    p.add_argument("--baseline", metavar="objective=dpo,lora_rank=16", help="the cell to compare against")
    p.add_argument("--fallback", action="store_true", help="when the verdict is fallback_orpo, run ORPO cells")


def _parse_baseline(text: str | None) -> dict[str, Any] | None:
    if not text:
        return None
    out: dict[str, Any] = {}
    for part in text.split(","):
        key, sep, value = part.partition("=")
        if not sep or key not in ("objective", "lora_rank"):
            raise InputError(f"expected objective=NAME,lora_rank=R, got {text!r}", field="baseline")
        out[key] = int(value) if key == "lora_rank" else value
    return out


def _decide(args: argparse.Namespace) -> int:
    from ..core.files import check_writable_dir
    from ..core.layout import write_decision
    from ..verdict.decide import decide

    d = decide(args.matrix, alpha=args.alpha, baseline=_parse_baseline(args.baseline))
    check_writable_dir(args.matrix)
    write_decision(Path(args.matrix), d)
    print(f"verdict: {d.verdict} " + (f"(last round beats the first: {d.last_beats_first}; best {d.best_round})"
                                      if d.rounds else f"-> {d.objective} r={d.lora_rank}"))
    print(d.summary)
    for reason in d.explanation:
        print(f"  - {reason}")
    if args.fallback and d.verdict == "fallback_orpo":
        from ..training.matrix import run_fallback

        run_fallback(args.matrix)
    return 0


def _report_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("matrix", metavar="FOLDER", help="a matrix, rounds or run folder")


def _report(args: argparse.Namespace) -> int:
    from ..core.files import check_writable_dir
    from ..verdict.report import write_any

    folder = Path(args.matrix)
    if not folder.is_dir():
        raise InputError("not a folder: give a matrix folder or a run folder" if folder.exists()
                         else "no such folder", path=str(folder))
    check_writable_dir(folder)
    md, html = write_any(folder)
    print(f"report: {html}\n        {md}")
    return 0


def _review_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", help="a run folder, a TRL trainer_state.json, or a JSONL log")
    p.add_argument("--output", help="where review.json goes (default: the run folder, if it is one)")
    p.add_argument("--fail-on", choices=("error", "warn", "never"), default="error",
                   help="exit 1 when a finding of this severity or worse is printed (default: error; "
                        "warn is stricter, never always exits 0); bad input stays exit 2")


def _review(args: argparse.Namespace) -> int:
    from ..core.files import check_writable_dir
    from ..evaluation.review import review, write_review

    rev = review(args.run)
    if args.output:
        check_writable_dir(args.output, field="output")
    path = write_review(rev, args.output or None)
    for f in rev.findings:
        print(f"[{f.severity}] {f.sentence}")
    if path:
        print(f"review: {path}")
    failing = rev.at_least(args.fail_on)
    if failing:  # a CI job's red light: the run is unusable (error) or, with --fail-on warn, doubtful
        print(f"review: {len(failing)} finding(s) at or above {args.fail_on} ({', '.join(f.code for f in failing)}): "
              "exit 1 (--fail-on never to only print them)")
        return 1
    return 0


DECIDE = Command("decide", "statistics and the verdict over a matrix folder", _decide_arguments, _decide)
REPORT = Command("report", "write report.md and a self-contained report.html (matrix or run folder)",
                 _report_arguments, _report)
REVIEW = Command("review", "diagnose one run folder, TRL trainer_state.json or JSONL log", _review_arguments, _review)
