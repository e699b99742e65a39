"""``preftune generate``: K completions per prompt from a model (and adapter), optionally judged and turned into
best-vs-worst pairs.

    preftune generate --model M [--adapter A] --prompts heldout.jsonl --num-samples 4 --max-new-tokens 64 \
        --temperature 0.8 --top-p 0.95 --seed 0 --output samples.jsonl \
        [--judge python:preftune.tinyworld:judge [--judge SPEC ...] --pairs pairs.jsonl --min-gap 0.1]
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Callable

from ..core.config import Config
from ..core.errors import InputError
from .options import Command


def _arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="folder or hub id (AutoModelForCausalLM)")
    p.add_argument("--tokenizer", help="defaults to --model")
    p.add_argument("--adapter", help="a peft adapter folder (e.g. runs/x/adapter)")
    p.add_argument("--prompts", required=True, help="any data file preftune reads; its `prompt` field is used")
    p.add_argument("--prompts-split", default="train", help="split for .json dicts and datasets sources")
    p.add_argument("--apply-chat-template", action="store_true", help="wrap string prompts as a user turn")
    p.add_argument("--num-samples", type=int, default=4, help="completions per prompt (K)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=8, help="prompts per batch (decode rows = this x K)")
    p.add_argument("--output", required=True, help="samples JSONL, one row per prompt")
    p.add_argument("--judge", action="append", help="reward-model:PATH | python:module:function | "
                   "openai:MODEL@BASE_URL | MODULE:KIND:ARGS; repeat for several (the first ranks --pairs)")
    p.add_argument("--cache-dir", help="judge caches (default $PREFTUNE_CACHE or ~/.cache/preftune)")
    p.add_argument("--pairs", help="also write best-vs-worst prompt/chosen/rejected pairs here (needs --judge)")
    p.add_argument("--min-gap", type=float, default=0.0, help="drop prompts whose best-worst score gap is below")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--device", default="auto")
    p.add_argument("--engine", default="transformers", help="transformers (default) | vllm (GPU, if installed)")


def progress_printer(total: int, label: str = "generate") -> tuple[Callable[[int, int], None], Callable[[], None]]:
    """A tqdm bar on a terminal (stderr); plain lines on stdout (about every 10%) in CI or without a terminal."""
    if sys.stderr.isatty() and not os.environ.get("CI"):
        from tqdm.auto import tqdm

        bar = tqdm(total=total, desc=label, unit="prompt", file=sys.stderr)

        def update(done: int, _total: int) -> None:
            bar.update(done - bar.n)

        return update, bar.close
    step = max(1, total // 10)
    last = [0]

    def line(done: int, _total: int) -> None:
        if done - last[0] >= step or done == _total:
            last[0] = done
            print(f"[{label}] {done}/{_total} prompts", flush=True)  # a log line, like training's: stdout

    return line, lambda: None


def _run(args: argparse.Namespace) -> int:
    """``preftune generate``: validate everything, generate, judge, then write every output at once."""
    from ..generation.judges import parse_judges
    from ..generation.pairs import make_pairs

    cfg = _checked_config(args)
    judges = parse_judges(args.judge or [], cfg)  # a bad spec fails before the model loads
    rows = _sample(args, cfg)
    for judge in judges:  # every judge scores the same samples; the first one's scores make the pairs
        for r, scores in zip(rows, judge.score_groups([r["prompt"] for r in rows], [r["completions"] for r in rows])):
            r.setdefault("judges", {})[judge.spec] = scores
            r.setdefault("scores", scores)
    pairs, stats = make_pairs(rows, min_gap=args.min_gap) if args.pairs else (None, None)
    _write(args, rows, pairs, stats)  # every check passed and every judge answered: only now write
    return 0


def _checked_config(args: argparse.Namespace) -> Config:
    """Every check on the flags that needs no model: sampling values, what pairs need, the device and engine."""
    from ..generation.sampler import check_engine, check_sampling

    check_sampling(args.num_samples, args.max_new_tokens, args.temperature, args.top_p, args.batch_size)
    if args.min_gap < 0 or not math.isfinite(args.min_gap):
        raise InputError(f"invalid value {args.min_gap!r}", field="min_gap")
    if args.pairs and not args.judge:
        raise InputError("--pairs needs a --judge to rank completions", field="pairs")
    if args.pairs and args.num_samples < 2:
        raise InputError("--pairs needs --num-samples of at least 2", field="pairs")
    cfg = Config(model=args.model, tokenizer=args.tokenizer, dtype=args.dtype, device=args.device,
                 cache_dir=args.cache_dir)
    cfg.check_device()
    check_engine(args.engine, cfg.resolved_device())
    return cfg


def _sample(args: argparse.Namespace, cfg: Config) -> list[dict]:
    """K completions per prompt, through vLLM or transformers (with progress lines)."""
    from ..data.rows import load_prompts
    from ..data.tokenize import encode_prompts
    from ..generation.sampler import check_context, generate, generate_vllm
    from ..modeling.model import load_adapter, load_model, load_tokenizer

    rows = load_prompts(args.prompts, args.prompts_split)
    tok = load_tokenizer(cfg)
    ids = encode_prompts(rows, tok, apply_chat_template=args.apply_chat_template)
    kw = dict(num_samples=args.num_samples, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
              top_p=args.top_p, seed=args.seed)
    if args.engine == "vllm":
        from transformers import AutoConfig

        check_context(AutoConfig.from_pretrained(args.model), rows, ids, args.max_new_tokens)
        return generate_vllm(args.model, tok, rows, ids, adapter=args.adapter, dtype=args.dtype, **kw)
    model = load_model(cfg)
    check_context(model, rows, ids, args.max_new_tokens)
    if args.adapter:
        model = load_adapter(model, args.adapter)
    update, close = progress_printer(len(rows))
    try:
        return generate(model, tok, rows, batch_size=args.batch_size, progress=update, prompt_ids=ids, **kw)
    finally:
        close()


def _write(args: argparse.Namespace, rows: list[dict], pairs: list[dict] | None, stats: dict | None) -> None:
    """The samples (with their scores when judged), and the pairs with their stats, each file atomically."""
    from ..core.files import atomic_write_json, write_jsonl

    write_jsonl(args.output, [{"id": r["id"], "prompt": r["prompt"], "completions": r["completions"],
                               **({"scores": r["scores"]} if "scores" in r else {}),
                               **({"judges": r["judges"]} if len(r.get("judges", ())) > 1 else {}),
                               "finish_reasons": r["finish_reasons"]} for r in rows])
    print(f"generate: {sum(len(r['completions']) for r in rows)} completions for {len(rows)} prompts -> {args.output}")
    if pairs is not None and stats is not None:
        write_jsonl(args.pairs, pairs)
        atomic_write_json(f"{args.pairs}.stats.json", stats)
        d = stats["dropped"]
        print(f"pairs: {stats['pairs']} of {stats['prompts']} prompts -> {args.pairs} (dropped: {d['identical']} "
              f"with identical completions, {d['gap']} with a score gap below {args.min_gap} or none)")


GENERATE = Command("generate", "sample K completions per prompt; optionally judge them and write pairs", _arguments,
                   _run, computes=True)
