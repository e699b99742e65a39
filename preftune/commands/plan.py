"""``preftune plan``: will it fit? Memory and compute per objective x rank, from the model config alone (and the
data's lengths, with --data).

    preftune plan --model M --objective dpo,simpo --lora-rank 16,8 --gpu-memory 24GiB --dtype auto
    preftune plan --config run.yaml --device cpu --data pairs.jsonl --json
"""

from __future__ import annotations

import argparse
import json
import re
from dataclasses import asdict

from ..core.config import DEFAULT_GRID, FIELDS, Config
from ..core.errors import InputError
from ..training.plan import GIB, MIB, Plan, PlanCell, plan
from .options import Command, add_config_flags, config_from

# The Config fields a plan reads; the rest (lr, ...) don't change what a step holds. objective and lora_rank are
# the grid, given as comma lists below. The data fields: with --data, the lengths are the data's (read as train
# reads it).
USED = ("model", "trust_remote_code", "dtype", "lora_target_modules", "max_length", "max_prompt_length",
        "batch_size", "grad_accum", "logit_chunk", "reference_tokens", "eval_batch_size", "eval_fp32",
        "gradient_checkpointing", "tokenizer", "data", "data_split", "eval_data", "eval_split", "eval_fraction",
        "split_seed", "columns", "bad_rows", "max_bad_rows", "apply_chat_template", "chat_template",
        "max_train_pairs", "seed")
SKIP = tuple(name for name in FIELDS if name not in USED)


def parse_size(text: str, field: str = "gpu_memory") -> int:
    """``24GiB``, ``24GB``, ``800MiB``, ``1.5TiB`` or a byte count -> bytes."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmgt]?i?b?)?\s*", text.lower())
    if not m:
        raise InputError(f"{text!r} is not a size like 24GiB or 800MB", field=field)
    unit = m.group(2) or ""
    power = " kmgt".index(unit[0]) if unit and unit[0] in "kmgt" else 0
    base = 1024 if "i" in unit or unit in ("k", "m", "g", "t") else 1000
    return int(float(m.group(1)) * base ** power)


def _ints(text: str, field: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise InputError(f"{text!r} is not a comma-separated list of integers", field=field) from None


def _arguments(p: argparse.ArgumentParser) -> None:
    add_config_flags(p, SKIP)
    g = p.add_argument_group("plan")
    g.add_argument("--objective", help=f"comma-separated objectives (default {','.join(DEFAULT_GRID['objective'])})")
    g.add_argument("--lora-rank", help="comma-separated ranks; 0 = full fine-tuning "
                   f"(default {','.join(map(str, DEFAULT_GRID['lora_rank']))})")
    g.add_argument("--prompt-length", type=int, help="prompt tokens to plan for (default: max-prompt-length)")
    g.add_argument("--completion-length", type=int,
                   help="tokens per completion (default: max-length - prompt length)")
    g.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda with --gpu-memory, else cpu")
    g.add_argument("--gpu-memory", help="GPU memory budget, e.g. 24GiB")
    g.add_argument("--memory", help="memory budget for --device cpu (default: this machine's RAM)")
    g.add_argument("--native-bf16", choices=["yes", "no"],
                   help="whether the device planned for runs bf16 natively, which decides --dtype auto as train "
                   "decides it (default: probed on this machine; a GPU that isn't here is taken as Ampere or "
                   "later: yes)")
    g.add_argument("--reference-cached", action="store_true",
                   help="the training set's reference log-probs are already in the cache (no extra forward)")
    g.add_argument("--baseline-mb", type=float,
                   help="CPU: the interpreter + import RSS in MiB instead of measuring it in a subprocess")
    g.add_argument("--json", action="store_true", help='print {"cells": [...]} instead of the table')


def _run(args: argparse.Namespace) -> int:
    cfg = config_from(args, skip=SKIP)
    grid = dict(DEFAULT_GRID)
    if args.objective is not None:
        grid["objective"] = [o.strip() for o in args.objective.split(",") if o.strip()]
    if args.lora_rank is not None:
        grid["lora_rank"] = _ints(args.lora_rank, "lora_rank")
    size = args.gpu_memory or args.memory
    budget = parse_size(size, "gpu_memory" if args.gpu_memory else "memory") if size else None
    baseline = None if args.baseline_mb is None else (int(args.baseline_mb * MIB),) * 2
    # --device, else a --config file's device, else where the budget points
    device = args.device or (cfg.device.split(":")[0] if cfg.device != "auto" else None) or \
        ("cuda" if args.gpu_memory else "cpu")
    p = plan(cfg, grid, device=device, budget=budget, prompt_tokens=args.prompt_length,
             completion_tokens=args.completion_length, reference_cached=args.reference_cached, baseline=baseline,
             native_bf16=None if args.native_bf16 is None else args.native_bf16 == "yes")
    if args.json:
        print(json.dumps(asdict(p), indent=1))
        return 0
    source = "given" if size else "this machine's RAM"
    print(f"{p.model.path}: {p.model.params / 1e6:.1f}M parameters, {p.model.layers} layers, hidden "
          f"{p.model.hidden}, vocab {p.model.vocab}; {p.device}, budget {_fmt(p.budget_bytes)} "
          f"({source})")
    print(f"per pair: one row of {p.prompt_tokens} + 2 x {p.completion_tokens} = "
          f"{p.prompt_tokens + 2 * p.completion_tokens} tokens ({LENGTHS[p.lengths]})")
    print(f"batch {cfg.batch_size} x accumulation {cfg.grad_accum}; {_dtype(p)}"
          + ("; gradient checkpointing" if cfg.gradient_checkpointing else ""))
    if p.device == "cpu":
        how = "given" if baseline is not None else "measured in a fresh interpreter"
        print(f"CPU: peak RSS of the process, incl. {_fmt(p.cells[0].baseline_bytes)} interpreter + imports "
              f"({how}; {_fmt(p.cells[0].import_peak_bytes)} at their peak)")
    cheapest = min(c.compute.forwards_per_pair for c in p.cells)
    for c in p.cells:
        _print_cell(c, p, cfg, cheapest)
    return 0


LENGTHS = {"caps": "every pair at the truncation caps; --data plans for your data's lengths",
           "data": "the longest row of --data after truncation: the batch that peaks",
           "given": "--prompt-length and --completion-length"}


def _print_cell(c: PlanCell, p: Plan, cfg: Config, cheapest: float) -> None:
    ref = c.reference
    at = f"{cfg.reference_tokens} tokens" if cfg.reference_tokens else f"{max(32, cfg.eval_batch_size)} pairs"
    ref_txt = ("none (reference-free)" if not ref.needed else
               f"cached on disk ({ref.cache_disk_bytes_per_pair} B per pair)" if ref.kind == "cache" else
               f"extra no-grad forward ({_fmt(ref.forward_bytes)} at {at}); then cached, "
               f"{ref.cache_disk_bytes_per_pair} B per pair on disk")
    print(f"\n{c.objective} r={c.lora_rank}: peak {_fmt(c.peak_bytes)} -> " + ("fits" if c.fits else "does NOT fit"))
    print(f"  frozen weights        {_fmt(c.frozen_weights_bytes)}")
    print(f"  trainable + Adam      {_fmt(c.trainable_state_bytes)} ({c.trainable_params:,} params)")
    print(f"  activations           {_fmt(c.activations_bytes)}")
    print(f"  LM head chunks        {_fmt(c.lm_head_bytes)}")
    if p.device == "cpu":
        print(f"  heap slack (glibc)    {_fmt(c.allocator_slack_bytes)}")
    else:
        print(f"  layer temporaries     {_fmt(c.temporaries_bytes)}")
    upcast = cfg.eval_fp32 and c.dtype != "float32"
    print(f"  held-out pass         {_fmt(c.eval_pass_bytes)}" + (" (fp32 upcast)" if upcast else ""))
    print(f"  reference             {ref_txt}")
    print(f"  compute per pair      {c.compute.forwards_per_pair:.0f} forwards ({c.compute.forwards_per_pair / cheapest:.2f}x "
          f"the cheapest cell; {c.compute.flops_per_pair / 1e9:.2f} GFLOP)")
    for f in c.fixes:  # those that fit come first (plan.fixes)
        verdict = "fits" if f.fits else f"does NOT fit ({_fmt(f.peak_bytes - p.budget_bytes)} over)"
        print(f"  fix: {f.fix} ({f.flags}): {_fmt(f.peak_bytes)}, {verdict}")
    if c.fixes and not any(f.fits for f in c.fixes):
        print("  no listed fix makes it fit")


def _dtype(p: Plan) -> str:
    """The dtype every cell trains in, and how ``auto`` was decided for the device planned for."""
    dtype = p.cells[0].dtype
    if p.dtype_requested != "auto":
        return dtype
    native = "native bf16" if p.native_bf16 else "no native bf16"
    return f"{dtype} (--dtype auto on {p.device} with {native}, as train decides it)"


def _fmt(n: float) -> str:
    return f"{n / GIB:.2f} GiB" if n >= GIB else f"{n / MIB:.0f} MiB"


PLAN = Command("plan", "will it fit? memory and compute per objective x rank, from the config alone", _arguments,
               _run)
