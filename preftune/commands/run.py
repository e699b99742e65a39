"""``preftune train`` and ``preftune eval``: one run, and a model (with an optional adapter) scored alone.

    preftune train --model M --data train.jsonl --eval-data heldout.jsonl --objective simpo --output runs/s
    preftune eval --model M --adapter runs/s/adapter --eval-data heldout.jsonl --output runs/s-eval
"""

from __future__ import annotations

import argparse

from .options import Command, add_config_flags, config_from, speaks

# Config fields `preftune eval` ignores (it trains nothing): its --help lists only the flags it uses.
EVAL_SKIP = ("lora_rank", "lora_alpha", "lora_dropout", "lora_target_modules", "eval_fraction", "split_seed",
             "max_train_pairs", "lr", "batch_size", "grad_accum", "max_steps", "epochs", "scheduler", "warmup_ratio",
             "weight_decay", "max_grad_norm", "seed", "eval_every", "log_every", "save_every", "resume", "report_to",
             "group_by_length", "gradient_checkpointing", "ref_sync_steps", "ref_sync_alpha")


def _train(args: argparse.Namespace) -> int:
    cfg = config_from(args)  # before the heavy imports: a bad config is one line at once
    from ..training.loop import train

    summary = train(cfg)
    before = (summary.step0_eval or {}).get("eval_accuracy", float("nan"))
    after = (summary.final_eval or {}).get("eval_accuracy", float("nan"))
    if speaks():  # torchrun: rank 0 speaks for the run
        print(f"{cfg.objective} r={cfg.lora_rank}: held-out accuracy {before:.3f} -> {after:.3f}; "
              f"results in {cfg.output}")
    return 0


def _eval_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--adapter", help="a peft adapter folder (e.g. runs/x/adapter)")
    add_config_flags(p, skip=EVAL_SKIP)


def _eval(args: argparse.Namespace) -> int:
    cfg = config_from(args)
    from ..core.progress import phase
    from ..evaluation.heldout import evaluate_model

    with phase("scoring held-out pairs (reference, then model)", quiet=cfg.quiet):  # a bar in a terminal
        m = evaluate_model(cfg, adapter=args.adapter)
    if speaks():  # torchrun: the ranks split the pairs, rank 0 reports
        print(f"held-out accuracy {m['eval_accuracy']:.3f} on {m['eval_pairs']} pairs "
              f"(refrel {m['eval_refrel/accuracy']:.3f}, lennorm {m['eval_lennorm/accuracy']:.3f}); results in {cfg.output}")
    return 0


TRAIN = Command("train", "train one run", add_config_flags, _train, computes=True)
EVAL = Command("eval", "held-out evaluation of a model (and adapter) alone", _eval_arguments, _eval, computes=True)
