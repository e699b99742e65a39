"""Iterative (on-policy) preference optimization: rounds of generate, judge, pair, train, evaluate.

    preftune iterate --config run.yaml --model M --prompts prompts.jsonl --eval-data heldout.jsonl \\
        --judge SPEC --rounds 3 --num-samples 4 --objective dpo --output iter/

Each round samples, judges, pairs, trains (continuing the previous round) and evaluates against the *original*
reference (the starting model), so rounds compare; docs/rounds.md has the layout and the two ``--reference``
modes. Every stage is skipped when its output exists, generation is written in seeded chunks, and training
resumes from its checkpoint, so a re-run after ``kill -9`` at any stage ends with the same files as an
uninterrupted run.
"""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

from ..core.config import Config
from ..core.errors import InputError
from ..core.files import append_jsonl, atomic_write_json, read_jsonl, write_jsonl
from ..core.layout import RoundDir, RoundsDir, RunSummary, write_audit
from ..generation.pairs import PAIR_RULES, make_pairs

REFERENCES = ("initial", "round")
CHUNK = 8  # prompts generated per checkpointed chunk, each with its own seed


def iterate(base: Config, *, prompts: str, judge_spec: str | list[str], rounds: int, num_samples: int = 4,
            temperature: float = 1.0, top_p: float = 1.0, max_new_tokens: int = 64, pair_rule: str = "max_min",
            min_gap: float = 0.0, reference: str = "initial", gen_eval_prompts: int = 64,
            prompts_split: str = "train") -> dict[str, Any]:
    """Run (or finish) every round into ``base.output``; returns iter/summary.json's dict. Several judges
    (``judge_spec`` a list): the first scores the samples into pairs, every one judges the behaviour."""
    from ..data.audit import audit_prompts, headline
    from ..data.rows import Example, RowPolicy, load_prompts
    from ..evaluation.behaviour import run_gen_eval
    from ..generation.judges import parse_judges
    from ..generation.pairs import score_rows
    from ..modeling.model import load_adapter, load_model, load_tokenizer
    from .loop import train
    from .prepare import prepare_data

    settings = {"rounds": rounds, "num_samples": num_samples, "temperature": temperature, "top_p": top_p,
                "max_new_tokens": max_new_tokens, "pair_rule": pair_rule, "min_gap": min_gap, "reference": reference,
                "gen_eval_prompts": gen_eval_prompts, "judge": judge_spec, "prompts": prompts}
    _check(base, settings)
    rows = load_prompts(prompts, prompts_split, RowPolicy.of(base))
    judges = parse_judges([judge_spec] if isinstance(judge_spec, str) else judge_spec, base)
    audit = audit_prompts([Example(r.id, r.prompt, "", "") for r in rows], str(base.eval_data), base.eval_split,
                          base.columns) if base.audit else None
    out = RoundsDir(Path(base.output))
    out.path.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out.meta, {"settings": settings, "base_model": base.model})
    if audit is not None:  # the prompts against the held-out pairs, once; each round's train audits its own pairs
        write_audit(out.path, audit)
        if not base.quiet and any(f["severity"] == "warn" for f in audit.findings):
            print(f"preftune: warning: audit: {headline(audit)} (details in {out.audit})", file=sys.stderr)
    tok = load_tokenizer(base)
    original = None   # the starting model, loaded once: every round's behaviour reference
    summary: list[dict] = []
    for r in range(1, rounds + 1):
        folder = out.round(r)
        prev = out.round(r - 1) if r > 1 else None
        start = str(_start_model(prev, folder)) if prev and reference == "round" else base.model
        init = str(prev.adapter) if prev and reference == "initial" else None if prev else base.init_adapter
        # 1. samples from the current policy, in seeded chunks appended as they finish
        if not folder.samples.exists():
            done = _generate(replace(base, model=start), tok, init, rows, folder, r, settings)
            score_rows(done, judges[0])  # a judge error is one line; the partial samples stay for the re-run
            write_jsonl(folder.samples, done)
            folder.samples_partial.unlink(missing_ok=True)
        # 2. pairs
        if not folder.pairs.exists():
            pairs, stats = make_pairs(read_jsonl(folder.samples), rule=pair_rule, min_gap=min_gap, seed=base.seed + r)
            if not pairs:
                raise InputError(f"round {r} produced no pairs: judge {judges[0].spec}, min_gap {min_gap}, "
                                 f"{stats['prompts']} prompts, dropped {stats['dropped']}", path=str(folder.samples),
                                 field="judge")
            atomic_write_json(folder.pair_stats, stats)
            write_jsonl(folder.pairs, pairs)
        # 3. train the objective on them, continuing the previous round
        cfg = replace(base, model=start, data=str(folder.pairs), output=str(folder.path), resume=True,
                      init_adapter=init, gen_eval_prompts=0, judge=None, eval_fraction=0.0)
        result = train(cfg)
        # 4. behaviour against the original reference, so rounds compare
        if result.gen_eval is None:
            if original is None:
                original = load_model(base)
            policy = load_adapter(load_model(cfg), str(folder.adapter))
            gen = replace(cfg, gen_eval_prompts=gen_eval_prompts, gen_max_new_tokens=max_new_tokens, gen_temperature=0.0)
            result.gen_eval = run_gen_eval(gen, policy, tok, prepare_data(cfg, tok).eval, folder.path, judges,
                                           reference_model=original)
            folder.write_summary(result)
        summary.append(_round_line(r, folder, result))
        atomic_write_json(out.summary, {"settings": settings, "rounds": summary})
    return {"settings": settings, "rounds": summary}


def _check(base: Config, s: dict) -> None:
    if s["rounds"] < 1:
        raise InputError(f"{s['rounds']}: must be at least 1", field="rounds")
    if s["num_samples"] < 2:
        raise InputError(f"{s['num_samples']}: pairs need at least 2 samples per prompt", field="num_samples")
    for key, allowed in (("pair_rule", PAIR_RULES), ("reference", REFERENCES)):
        if s[key] not in allowed:
            raise InputError(f"{s[key]!r} is not one of {', '.join(allowed)}", field=key)
    if not base.eval_data:
        raise InputError("iterate needs fixed held-out pairs (--eval-data FILE) so that rounds compare",
                         field="eval_data")
    if base.lora_rank == 0:
        raise InputError("iterate continues a LoRA adapter round after round: use --lora-rank > 0", field="lora_rank")
    from ..core import objectives

    if objectives.get(base.objective).data != "paired":
        raise InputError(f"'{base.objective}' trains on unpaired rows; iterate makes pairs", field="objective")
    base.validate()  # the whole config before any round writes anything (data is the round's pairs.jsonl)


def _start_model(prev: RoundDir, folder: RoundDir) -> Path:
    """``--reference round``: the previous round's adapter merged into its own start, once."""
    from .export import export

    if not (folder.start / "config.json").exists():  # config.json: transformers' own file in a model folder
        export(prev.path, folder.start, merge=True)
    return folder.start


def _generate(cfg: Config, tok: Any, adapter: str | None, rows: list, folder: RoundDir, r: int, s: dict) -> list[dict]:
    """K samples per prompt from the round's policy; chunk c is seeded by (seed, round, c) and appended when
    done, so a re-run continues at the first missing chunk and draws the same samples."""
    from ..generation.sampler import generate
    from ..modeling.model import load_adapter, load_model

    partial = folder.samples_partial
    folder.path.mkdir(parents=True, exist_ok=True)
    done = read_jsonl(partial) if partial.exists() else []
    done = done[:len(done) - len(done) % CHUNK] if len(done) < len(rows) else done  # only whole chunks count
    write_jsonl(partial, done)
    if len(done) < len(rows):
        model = load_model(cfg)
        if adapter:
            model = load_adapter(model, adapter)
        for c in range(len(done) // CHUNK, -(-len(rows) // CHUNK)):
            chunk = rows[c * CHUNK:(c + 1) * CHUNK]
            for row in generate(model, tok, chunk, num_samples=s["num_samples"], max_new_tokens=s["max_new_tokens"],
                                temperature=s["temperature"], top_p=s["top_p"], seed=(cfg.seed * 1000 + r) * 1000 + c,
                                batch_size=cfg.eval_batch_size, apply_chat_template=cfg.apply_chat_template):
                append_jsonl(partial, row)
                done.append(row)
    return done


def _round_line(r: int, folder: RoundDir, result: RunSummary) -> dict:
    made = read_jsonl(folder.pairs)
    meta = json.loads(folder.pair_stats.read_text())
    final, g = result.final_eval or {}, result.gen_eval or {}
    return {"round": r, "folder": folder.name, "pairs": meta["pairs"], "dropped": meta["dropped"],
            **{f"{s}_score": sum(p[f"{s}_score"] for p in made) / len(made) for s in ("chosen", "rejected")},
            **{k: final.get(k) for k in ("eval_accuracy", "eval_refrel/accuracy", "eval_lennorm/accuracy")},
            **{k: g[k] for k in ("win_rate", "win_rate_ci", "lc_win_rate", "lc_win_rate_se")},
            "policy_len": g["policy"]["mean_len"],
            "reference_len": g["reference"]["mean_len"]}
