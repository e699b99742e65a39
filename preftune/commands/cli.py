"""The ``preftune`` command: one table of commands, each with its flags next to its code (one module per group).

Bad input is one line on stderr and exit code 2; a diverged run exits 1; Ctrl-C exits 130, SIGTERM 143; no
tracebacks. Every code is in docs/runs.md ("Exit codes").

    preftune train --model M --data train.jsonl --eval-data heldout.jsonl --objective simpo --output runs/s
    preftune ablate --config base.yaml --grid objective=dpo,simpo --grid lora_rank=16,8 --output matrix
    preftune decide matrix && preftune report matrix
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from typing import Any

from ..core.cpus import choose_wait_policy
from ..core.errors import InputError, TrainingDiverged, did_you_mean
from . import audit, export, generate, iterate, matrix, pipeline, plan, run, verdict, world
from .options import Command, speaks

COMMANDS: tuple[Command, ...] = (
    run.TRAIN, run.EVAL, audit.AUDIT, matrix.ABLATE, verdict.REVIEW, verdict.DECIDE, verdict.REPORT, pipeline.PIPELINE,
    world.DEMO, world.WORLD, generate.GENERATE, iterate.ITERATE, plan.PLAN, export.EXPORT, world.OBJECTIVES)
COMMANDS_BY_NAME = {c.name: c for c in COMMANDS}
EXAMPLE = """example:
  preftune ablate --model M --data train.jsonl --eval-data heldout.jsonl --output matrix   # DPO/SimPO x r16/r8
  preftune decide matrix                        # which objective and rank won, how sure, and why
  preftune report matrix                        # matrix/report.html to show your lead"""


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line with exit code 2, and an unknown one gets a suggestion from the
    flags of the command being parsed, or is named as another command's flag."""

    def parse_args(self, args: list[str] | None = None, namespace: Any = None) -> argparse.Namespace:  # type: ignore[override]
        ns, extra = self.parse_known_args(args, namespace)
        if extra:
            self.error(f"unrecognized arguments: {' '.join(extra)}{self._hint(ns, extra[0].split('=')[0])}")
        return ns

    def _hint(self, ns: argparse.Namespace, bad: str) -> str:
        commands = next(a.choices for a in self._actions if isinstance(a, argparse._SubParsersAction))
        mine = [f for a in commands[ns.command]._actions for f in a.option_strings]
        owners = [name for name, sub in commands.items() if bad in (f for a in sub._actions for f in a.option_strings)]
        if owners:
            return f" ({bad} is a flag of preftune {' / '.join(owners)}, not of preftune {ns.command})"
        return did_you_mean(bad, mine, quote="")

    def error(self, message: str) -> None:  # type: ignore[override]
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        sys.exit(2)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="preftune", description="Preference optimization that decides: train DPO/SimPO/ORPO/... "
                "with LoRA, compare them on held-out pairs, and say which objective and rank won.",
                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EXAMPLE)
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser, metavar="COMMAND",
                           title="commands (preftune COMMAND --help for its flags)")
    for c in COMMANDS:
        c.add_arguments(sub.add_parser(c.name, help=c.help))
        sub.choices[c.name].set_defaults(handler=c.run)
    return p


class Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler, ``kill``, torchrun stopping its workers), handled like Ctrl-C: every ``finally`` and
    lock release runs, and the same "continue" line is printed."""


def _terminate(signum: int, frame: object) -> None:
    raise Terminated


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _terminate)
    wait = choose_wait_policy() if COMMANDS_BY_NAME[args.command].computes else None  # before torch loads
    if wait and wait.policy and speaks():
        print(f"preftune: other processes keep {wait.busy:.1f} of {wait.cpus} CPUs busy: threads sleep while they "
              f"wait (OMP_WAIT_POLICY={wait.policy}; set OMP_WAIT_POLICY=active to keep them spinning)",
              file=sys.stderr, flush=True)
    try:
        return args.handler(args)
    except InputError as e:
        if speaks():  # under torchrun every rank hits the same error: say it once
            print(f"preftune: error: {e}", file=sys.stderr)
        return 2
    except TrainingDiverged as e:
        print(f"preftune: training diverged: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as e:
        how = "re-run the same command" if args.command == "ablate" else "continue with --resume"
        print(f"preftune: interrupted; {how}", file=sys.stderr)
        return 143 if isinstance(e, Terminated) else 130
    except BrokenPipeError:  # `preftune ... | head`: the reader left; no traceback (Python's documented recipe)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except OSError as e:  # a full disk, a folder made read-only mid-run: one line naming the path, no traceback
        where = f"{e.filename}: " if e.filename else ""
        print(f"preftune: error: {where}{e.strerror or e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
