"""Command line: ``preftune train | eval | ablate | review | decide | report | demo | world | generate | plan | export | objectives``.

Bad input is one line on stderr and exit code 2; a diverged run exits 1; no tracebacks for either.

    preftune train --model M --data train.jsonl --eval-data heldout.jsonl --objective simpo --output runs/s
    preftune ablate --config base.yaml --grid objective=dpo,simpo --grid lora_rank=16,8 --output matrix
    preftune decide matrix && preftune report matrix
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from dataclasses import MISSING
from typing import Any

from . import config as config_mod
from .config import Config
from .errors import InputError, TrainingDiverged, did_you_mean
from .files import check_writable_dir


class _Parser(argparse.ArgumentParser):
    """argparse, but an unknown or bad flag is one line with a suggestion and exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        hint = ""
        if "unrecognized arguments:" in message:
            bad = message.split(":", 1)[1].split()[0].split("=")[0]
            hint = did_you_mean(bad, self._all_flags(), quote="")
        print(f"{self.prog}: error: {message}{hint}", file=sys.stderr)
        sys.exit(2)

    def _all_flags(self) -> list[str]:
        flags = [f for a in self._actions for f in a.option_strings]
        for a in self._actions:
            if isinstance(a, argparse._SubParsersAction):  # every command's flags
                flags += [f for sub in a.choices.values() for f in sub._all_flags()]
        return flags


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


# Config fields `preftune eval` ignores (it trains nothing): its --help lists only the flags it uses.
EVAL_SKIP = ("lora_rank", "lora_alpha", "lora_dropout", "lora_target_modules", "eval_fraction", "split_seed",
             "max_train_pairs", "lr", "batch_size", "grad_accum", "max_steps", "epochs", "scheduler", "warmup_ratio",
             "weight_decay", "max_grad_norm", "seed", "eval_every", "log_every", "save_every", "resume", "report_to",
             "group_by_length", "gradient_checkpointing")


# iterate sets these itself (its --judge and --gen-eval-prompts, each round's data and resume).
ITERATE_SKIP = ("judge", "gen_eval_prompts", "gen_max_new_tokens", "gen_temperature", "data", "data_split",
                "eval_fraction", "resume", "init_adapter")


def _add_config_flags(p: argparse.ArgumentParser, skip: tuple[str, ...] = ()) -> None:
    """One flag per Config field (``lora_rank`` -> ``--lora-rank``), grouped and helped as config.py declares
    them (``config.field_docs``); only flags given on the line count. The objective group adds the shorthands."""
    groups: dict[str, argparse._ArgumentGroup] = {}
    for name, (group, text) in config_mod.field_docs().items():
        if name in skip or name == "objectives":
            continue
        g = groups.get(group) or groups.setdefault(group, p.add_argument_group(group))
        f = config_mod.FIELDS[name]
        default = f.default if f.default is not MISSING else f.default_factory()  # type: ignore[misc]
        kind = {"action": argparse.BooleanOptionalAction} if isinstance(default, bool) else {"metavar": name.upper()}
        shown = ",".join(default) if isinstance(default, list) else default
        g.add_argument(_flag(name), default=argparse.SUPPRESS, help=f"{text} (default {shown})", **kind)
        if name == "objective":
            for short in config_mod.SHORTHANDS:
                g.add_argument(_flag(short), default=argparse.SUPPRESS, metavar=short.upper(),
                               help=f"sets objectives.<objective>.{short} (see `preftune objectives`)")


def _config_from(args: argparse.Namespace, *, skip: tuple[str, ...] = ()) -> Config:
    keys = set(config_mod.FIELDS) | set(config_mod.SHORTHANDS)
    given = {k: v for k, v in vars(args).items() if k in keys and k not in skip}
    if getattr(args, "config", None):
        return config_mod.from_file(args.config, **given)
    return config_mod.build({}, given)


EXAMPLE = """example:
  preftune ablate --model M --data train.jsonl --eval-data heldout.jsonl --output matrix   # DPO/SimPO x r16/r8
  preftune decide matrix                        # which objective and rank won, how sure, and why
  preftune report matrix                        # matrix/report.html to show your lead"""


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="preftune", description="Preference optimization that decides: train DPO/SimPO/ORPO/... "
                "with LoRA, compare them on held-out pairs, and say which objective and rank won.",
                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EXAMPLE)
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser, metavar="COMMAND",
                           title="commands (preftune COMMAND --help for its flags)")

    t = sub.add_parser("train", help="train one run")
    t.add_argument("--config", help="YAML file whose keys mirror these flags; flags override it")
    _add_config_flags(t)

    e = sub.add_parser("eval", help="held-out evaluation of a model (and adapter) alone")
    e.add_argument("--config", help="YAML file whose keys mirror these flags; flags override it")
    e.add_argument("--adapter", help="a peft adapter folder (e.g. runs/x/adapter)")
    _add_config_flags(e, skip=EVAL_SKIP)

    a = sub.add_parser("ablate", help="run an objective x rank (x seed x ...) matrix")
    a.add_argument("--config", help="base config (YAML); may hold `objectives:` per-objective overrides")
    a.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2",
                   help="a factor and its values (repeatable); default objective=dpo,simpo and lora_rank=16,8")
    a.add_argument("--parallel", type=int, default=1, help="cells run at once on this machine")
    a.add_argument("--backend", choices=["local", "ray"], default="local",
                   help="local: this machine (serial or --parallel); ray: each cell a Ray task")
    a.add_argument("--address", help="Ray cluster to join (host:port or auto); default: a local instance")
    a.add_argument("--cpus-per-cell", type=float, default=1, help="Ray: CPUs each cell reserves (default 1)")
    a.add_argument("--gpus-per-cell", type=float, default=0, help="Ray: GPUs each cell reserves (default 0)")
    _add_config_flags(a)

    r = sub.add_parser("review", help="diagnose one run folder, TRL trainer_state.json or JSONL log")
    r.add_argument("run")
    r.add_argument("--output", help="where review.json goes (default: the run folder, if it is one)")

    d = sub.add_parser("decide", help="statistics and the verdict over a matrix folder")
    d.add_argument("matrix")
    d.add_argument("--alpha", type=float, default=0.05, help="significance level")
    d.add_argument("--baseline", metavar="objective=dpo,lora_rank=16", help="the cell to compare against")
    d.add_argument("--fallback", action="store_true", help="when the verdict is fallback_orpo, run ORPO cells")

    rp = sub.add_parser("report", help="write report.md and a self-contained report.html (matrix or run folder)")
    rp.add_argument("matrix", metavar="FOLDER")

    dm = sub.add_parser("demo", help="the main job on the built-in tiny world: SFT, 2x2 matrix, verdict, report")
    dm.add_argument("--output", default="demo_out")
    dm.add_argument("--quick", action="store_true", help="a smaller, faster demo")

    w = sub.add_parser("world", help="build the built-in tiny model, tokenizer and preference task")
    w.add_argument("output")
    w.add_argument("--variant", default="default", choices=["default", "chosen_shorter", "flipped"])
    w.add_argument("--n-train", type=int, default=256)
    w.add_argument("--n-eval", type=int, default=64)
    w.add_argument("--seed", type=int, default=0)
    w.add_argument("--hidden", type=int, default=64, help="model width (the demo uses 128)")
    w.add_argument("--layers", type=int, default=2, help="decoder layers (the demo uses 4)")

    from . import export, generate, iterate, plan  # each declares its own flags

    generate.add_arguments(sub.add_parser("generate", help="sample K completions per prompt; optionally judge "
                                          "them and write pairs"))
    it = sub.add_parser("iterate", help="on-policy rounds: generate, judge, pair, train, evaluate; decide says "
                        "whether a round helped")
    it.add_argument("--config", help="YAML file whose keys mirror these flags; flags override it")
    iterate.add_arguments(it)
    _add_config_flags(it, skip=ITERATE_SKIP)
    plan.add_arguments(sub.add_parser("plan", help="will it fit? memory and compute per objective x rank, from "
                                      "the config alone"))
    export.add_arguments(sub.add_parser("export", help="a run's adapter, or the model with it merged, plus a "
                                        "model card"))

    sub.add_parser("objectives", help="list objectives, their hyperparameters and defaults")
    return p


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


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return _dispatch(args)
    except InputError as e:
        if os.environ.get("RANK", "0") == "0":  # under torchrun every rank hits the same error: say it once
            print(f"preftune: error: {e}", file=sys.stderr)
        return 2
    except TrainingDiverged as e:
        print(f"preftune: training diverged: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        how = "re-run the same command" if args.command == "ablate" else "continue with --resume"
        print(f"preftune: interrupted; {how}", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `preftune ... | head`: the reader left; no traceback (Python's documented recipe)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


def _dispatch(args: argparse.Namespace) -> int:
    cmd = args.command
    if cmd == "train":
        from .train import train

        cfg = _config_from(args)
        summary = train(cfg)
        before = (summary.get("step0_eval") or {}).get("eval_accuracy", float("nan"))
        after = (summary.get("final_eval") or {}).get("eval_accuracy", float("nan"))
        if os.environ.get("RANK", "0") == "0":  # torchrun: rank 0 speaks for the run
            print(f"{cfg.objective} r={cfg.lora_rank}: held-out accuracy {before:.3f} -> {after:.3f}; "
                  f"results in {cfg.output}")
        return 0
    if cmd == "eval":
        from .evaluate import evaluate_model
        from .progress import phase

        cfg = _config_from(args)
        with phase("scoring held-out pairs (reference, then model)", quiet=cfg.quiet):  # a bar in a terminal
            metrics = evaluate_model(cfg, adapter=args.adapter)
        if os.environ.get("RANK", "0") == "0":  # torchrun: the ranks split the pairs, rank 0 reports
            print(f"held-out accuracy {metrics['eval_accuracy']:.3f} on {metrics['eval_pairs']} pairs "
                  f"(refrel {metrics['eval_refrel/accuracy']:.3f}, lennorm {metrics['eval_lennorm/accuracy']:.3f})")
        return 0
    if cmd == "ablate":
        from .ablate import RayOptions, parse_grid, run_matrix

        cfg = _config_from(args)
        grid = parse_grid(args.grid)
        ray = RayOptions(address=args.address, cpus_per_cell=args.cpus_per_cell, gpus_per_cell=args.gpus_per_cell)
        result = run_matrix(cfg, grid, parallel=args.parallel, backend=args.backend, ray=ray)
        print(f"matrix: {result['finished']} finished, {result['failed']} failed -> {cfg.output}")
        return 0 if result["failed"] == 0 else 1
    if cmd == "review":
        from .review import review, write_review

        rev = review(args.run)
        if args.output:
            check_writable_dir(args.output, field="output")
        path = write_review(rev, args.output or None)
        for f in rev.findings:
            print(f"[{f.severity}] {f.sentence}")
        if path:
            print(f"review: {path}")
        return 0
    if cmd == "decide":
        from pathlib import Path

        from .decide import decide, decide_rounds, write_decision

        rounds = (Path(args.matrix) / "iterate.json").exists()
        decision = decide_rounds(args.matrix, alpha=args.alpha) if rounds else \
            decide(args.matrix, alpha=args.alpha, baseline=_parse_baseline(args.baseline))
        check_writable_dir(args.matrix)
        write_decision(args.matrix, decision)
        print(f"verdict: {decision['verdict']} " + (f"(last round beats the first: {decision['last_beats_first']}; "
              f"best {decision['best_round']})" if rounds else f"-> {decision['objective']} r={decision['lora_rank']}"))
        print(decision["summary"])
        for reason in decision["explanation"]:
            print(f"  - {reason}")
        if args.fallback and decision["verdict"] == "fallback_orpo":
            from .ablate import run_fallback

            run_fallback(args.matrix)
        return 0
    if cmd == "report":
        from pathlib import Path

        from .report import write_any

        folder = Path(args.matrix)
        if not folder.is_dir():
            raise InputError("not a folder: give a matrix folder or a run folder" if folder.exists()
                             else "no such folder", path=str(folder))
        check_writable_dir(folder)
        md, html = write_any(folder)
        print(f"report: {html}\n        {md}")
        return 0
    if cmd == "demo":
        from .demo import run_demo

        run_demo(args.output, quick=args.quick)
        return 0
    if cmd == "world":
        from .tinyworld import build_world

        w = build_world(args.output, variant=args.variant, n_train=args.n_train, n_eval=args.n_eval, seed=args.seed,
                        hidden=args.hidden, layers=args.layers)
        print(f"model: {w.model_dir}\ntrain: {w.train_path}\nheld-out: {w.eval_path}")
        return 0
    if cmd in ("generate", "plan", "export"):  # each module runs its own command
        return importlib.import_module(f".{cmd}", __package__).main(args)
    if cmd == "iterate":
        from .iterate import iterate

        cfg = _config_from(args, skip=ITERATE_SKIP)
        result = iterate(cfg, prompts=args.prompts, judge=args.judge, rounds=args.rounds,
                         num_samples=args.num_samples, temperature=args.temperature, top_p=args.top_p,
                         max_new_tokens=args.max_new_tokens, pair_rule=args.pair_rule, min_gap=args.min_gap,
                         reference=args.reference, gen_eval_prompts=args.gen_eval_prompts,
                         prompts_split=args.prompts_split)
        for r in result["rounds"]:
            print(f"round {r['round']}: {r['pairs']} pairs (judge {r['chosen_score']:.3g} vs {r['rejected_score']:.3g}); "
                  f"held-out accuracy {r['eval_accuracy']:.3f}; win rate {r['win_rate']:.3f} (LC {r['lc_win_rate']:.3f}) "
                  f"against the original reference")
        print(f"rounds in {cfg.output}; preftune decide {cfg.output} says whether they helped")
        return 0
    if cmd == "objectives":
        from .objectives import REGISTRY

        for o in REGISTRY.values():
            ref = "needs a reference" if o.needs_reference else "no reference"
            role = ", the fallback" if o.fallback else ""
            print(f"{o.name:8s} {o.family}{role}, {ref}: {o.summary}")
            for key, p in o.params.items():
                default = "derived" if p.default is None else p.default
                print(f"    {key:18s} default {default!s:8s} {p.rule:12s} {p.help}")
        return 0
    raise AssertionError(cmd)


if __name__ == "__main__":
    sys.exit(main())
