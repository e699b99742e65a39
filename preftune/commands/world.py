"""``preftune demo``, ``world`` and ``objectives``: the main job on the built-in tiny world, the world alone, and the
objective registry.

    preftune demo --output demo_out
    preftune world runs/world --variant chosen_shorter
    preftune objectives
"""

from __future__ import annotations

import argparse

from .options import Command


def _demo_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--output", default="demo_out")
    p.add_argument("--quick", action="store_true", help="a smaller, faster demo")


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(args.output, quick=args.quick)
    return 0


def _world_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("output")
    p.add_argument("--variant", default="default", choices=["default", "chosen_shorter", "flipped"])
    p.add_argument("--n-train", type=int, default=256)
    p.add_argument("--n-eval", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--hidden", type=int, default=64, help="model width (the demo uses 128)")
    p.add_argument("--layers", type=int, default=2, help="decoder layers (the demo uses 4)")


def _world(args: argparse.Namespace) -> int:
    from ..tinyworld import build_world

    w = build_world(args.output, variant=args.variant, n_train=args.n_train, n_eval=args.n_eval, seed=args.seed,
                    hidden=args.hidden, layers=args.layers)
    print(f"model: {w.model_dir}\ntrain: {w.train_path}\nheld-out: {w.eval_path}")
    return 0


def _objectives(args: argparse.Namespace) -> int:
    from ..core.objectives import REGISTRY

    for o in REGISTRY.values():
        ref = "needs a reference" if o.needs_reference else "no reference"
        role = ", the fallback" if o.fallback else ""
        print(f"{o.name:8s} {o.family}{role}, {ref}: {o.summary}")
        for key, p in o.params.items():
            default = "derived" if p.default is None else p.default
            print(f"    {key:18s} default {default!s:8s} {p.rule:12s} {p.help}")
    return 0


DEMO = Command("demo", "the main job on the built-in tiny world: SFT, 2x2 matrix, verdict, report", _demo_arguments,
               _demo)
WORLD = Command("world", "build the built-in tiny model, tokenizer and preference task", _world_arguments, _world)
OBJECTIVES = Command("objectives", "list objectives, their hyperparameters and defaults", lambda p: None, _objectives)
