"""``preftune audit``: the data checks train runs before it starts, on their own, with more when a model or a
judge is given.

    preftune audit train.jsonl --eval-data heldout.jsonl --output audit.json
    preftune audit train.jsonl --eval-data heldout.jsonl --model M --judge python:preftune.tinyworld:judge
"""

from __future__ import annotations

import argparse
import math
from dataclasses import replace
from pathlib import Path
from typing import Any

from .options import Command, add_config_flags, config_from

# The Config fields the audit reads; every other flag of train would be ignored, so it is not offered.
USED = ("model", "tokenizer", "trust_remote_code", "dtype", "device", "data_split", "eval_data", "eval_split",
        "eval_fraction", "split_seed", "columns", "max_length", "max_prompt_length", "apply_chat_template",
        "chat_template", "judge", "eval_batch_size", "cache_dir", "seed", "share_prompt", "logit_chunk")


def _arguments(p: argparse.ArgumentParser) -> None:
    from ..core.config import FIELDS

    p.add_argument("data", metavar="DATA", help="training pairs: any data file or source train reads")
    p.add_argument("--output", dest="audit_file", metavar="FILE",
                   help="write the findings here as audit.json (docs/formats.md)")
    p.add_argument("--sample", type=int, default=256, metavar="N",
                   help="training pairs scored by --model and judged by --judge (default 256)")
    p.add_argument("--fail-on", choices=("warn", "never"), default="never",
                   help="exit 1 when a finding at or above this severity is printed, for a CI job "
                        "(default never: the preflight in train only reports; review's --fail-on works the same way)")
    add_config_flags(p, skip=tuple(f for f in FIELDS if f not in USED))


def _run(args: argparse.Namespace) -> int:
    cfg = replace(config_from(args), data=args.data)
    from ..core.errors import InputError
    from ..core.files import atomic_write_json, check_writable_dir
    from ..data.audit import audit_source, headline
    from ..data.rows import RowPolicy
    from ..verdict.reasons import render

    if args.sample < 1:
        raise InputError(f"{args.sample}: must be at least 1", field="sample")
    if args.audit_file:
        check_writable_dir(str(Path(args.audit_file).absolute().parent), field="output")
    audit = audit_source(cfg.data, cfg.eval_data, RowPolicy.of(cfg), split=cfg.data_split, eval_split=cfg.eval_split,
                         eval_fraction=cfg.eval_fraction, split_seed=cfg.split_seed)
    if cfg.model or cfg.judge:
        audit.findings += _heavy(cfg, args.sample)
        audit.sources.update(model=cfg.model or None, judge=cfg.judge)
    print(f"audit of {cfg.data}: {headline(audit)}")
    for f in audit.findings:
        print(f"[{f['severity']}] {f['code']}: {render(f)}")
    if args.audit_file:
        atomic_write_json(args.audit_file, audit.to_dict())
        print(f"audit: {args.audit_file}")
    failing = [f["code"] for f in audit.findings if f["severity"] != "info"] if args.fail_on == "warn" else []
    if failing:
        print(f"audit: {len(failing)} finding(s) at or above warn ({', '.join(failing)}): exit 1")
    return 1 if failing else 0


def _heavy(cfg: Any, n: int) -> list[dict]:
    """The checks that need a tokenizer, a model or a judge, on the training pairs (a sample of ``n``) and the
    held-out pairs; unpaired rows get only the judge's and truncation's."""
    from ..data.audit import truncation
    from ..data.rows import RowPolicy, read_examples
    from ..data.split import heldout_pairs, split_by_prompt
    from ..data.tokenize import encode_examples, truncate
    from ..evaluation.audit import judge_agreement, model_findings, sample

    everything = RowPolicy(cfg.columns, "skip", math.inf)  # the audit counts bad rows; it never stops at one
    train = read_examples(cfg.data, cfg.data_split, everything).examples
    if cfg.eval_data:
        held = read_examples(cfg.eval_data, cfg.eval_split, everything).examples
    else:
        train, held = split_by_prompt(train, cfg.eval_fraction, cfg.split_seed)
    paired = train[0].label is None
    out = []
    if cfg.judge and paired:
        from ..generation.judges import parse_judge

        out.append(judge_agreement(parse_judge(cfg.judge, cfg), sample(train, n, cfg.seed)))
    if not cfg.model:
        return out
    from ..modeling.model import load_model, load_tokenizer
    from ..training.prepare import max_length

    tok = load_tokenizer(cfg)
    held = heldout_pairs(held, cfg.eval_data or cfg.data) if held else []
    kw = dict(apply_chat_template=cfg.apply_chat_template)
    encoded, held_encoded = encode_examples(train, tok, **kw), encode_examples(held, tok, **kw)
    length = max_length(cfg, tok, encoded)
    cut = dict(max_length=length, max_prompt_length=cfg.prompt_length(length))
    pairs, stats = truncate(train, encoded, **cut)
    held_pairs, held_stats = truncate(held, held_encoded, **cut) if held else ([], None)
    out.insert(0, {**truncation({"train": stats, **({"eval": held_stats} if held_stats else {})}, length,
                                cfg.max_prompt_length), "examples": []})
    if paired:
        out += model_findings(load_model(cfg), sample(pairs, n, cfg.seed), held_pairs, cfg, tok.pad_token_id)
    return out


AUDIT = Command("audit", "check a preference dataset before training: duplicates, contradictions, leaks, length bias "
                "(with --model and --judge: label noise, the judge's agreement)", _arguments, _run,
                computes=True)
