"""Held-out evaluation: TRL-named metrics, two common yardsticks, and one row per pair.

Every run is also scored under every objective-free yardstick (yardsticks.py; docs/decisions.md, Two common
yardsticks), so runs of different objectives can be compared on the same held-out pairs.

    preftune eval --model M --adapter runs/x/adapter --eval-data heldout.jsonl --output runs/x-eval
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from ..core import objectives
from ..core.config import Config, dump_yaml
from ..core.errors import InputError
from ..core.files import atomic_write_json, atomic_write_text, check_writable_dir, write_jsonl
from ..core.layout import EVAL_METRICS, RunDir
from ..core.runtime import Runtime, current, init
from ..data.rows import RowPolicy, load_examples
from ..data.tokenize import tokenize_examples
from ..modeling.logprobs import score_pairs, with_shared_cuts
from ..modeling.model import fingerprint, load_adapter, load_model, load_tokenizer
from ..modeling.precision import Arithmetic, arithmetic, resolve_dtype
from ..modeling.reference import reference_logps
from . import yardsticks


def summarize(logps: Tensor, out: objectives.Output, loss: Tensor, prefix: str = "") -> dict:
    """TRL's metric names, averaged over pairs. logps: (B, 2) with chosen in column 0.

    A NaN reward or extra means "not this row's kind" (KTO rows are desirable or undesirable) and is left out of
    its mean; the margin is then mean chosen reward − mean rejected reward, as TRL's KTOTrainer logs it, and the
    accuracy only exists over rows that have both. An objective's extras override the default of the same name.
    """
    def mean(v: Tensor) -> Tensor | None:  # None: no row of this kind in the batch, so no metric (as TRL)
        return None if v.isnan().all() else v.nanmean()

    both = ~(out.chosen_rewards.isnan() | out.rejected_rewards.isnan())                      # (B,)
    c, r = mean(out.chosen_rewards), mean(out.rejected_rewards)
    m = {
        "loss": loss.mean(), "rewards/chosen": c, "rewards/rejected": r,
        "rewards/margins": c - r if c is not None and r is not None else None,
        "rewards/accuracies": (out.chosen_rewards[both] > out.rejected_rewards[both]).float().mean()
        if both.any() else None,
        "logps/chosen": logps[:, 0].mean(), "logps/rejected": logps[:, 1].mean(),
        **{k: mean(v) for k, v in out.extras.items()},
    }
    return {prefix + k: float(v) for k, v in m.items() if v is not None}


def _accuracy(margin: Tensor) -> float:
    """Share of pairs ranked right; a tie (e.g. every DPO margin at step 0) counts one half, i.e. chance."""
    return float(((margin > 0).float() + 0.5 * (margin == 0).float()).mean())


def heldout(logps: Tensor, counts: Tensor, ref: Tensor, objective: str, params: dict, ids: Sequence[str],
            more: dict[str, Tensor] | None = None) -> tuple[dict, list[dict]]:
    """Metrics (``eval_`` keys) and per-pair rows from already computed log-probs. All inputs (N, 2), ``more``
    the extra sums the objective needs (``shared``, ``ref_shared``, ``sumsq``)."""
    lp = objectives.SeqLogps.of(logps, counts, ref, more=more)
    out = objectives.compute(objective, lp, params)
    margin = out.chosen_rewards - out.rejected_rewards                      # (N,)
    sticks = {y.name: y.margin(lp) for y in yardsticks.logprob_yardsticks()}  # name -> (N,)
    metrics = summarize(logps, out, out.loss, prefix="eval_")
    metrics["eval_accuracy"] = _accuracy(margin)
    for name, m in sticks.items():
        metrics.update({f"eval_{name}/accuracy": _accuracy(m), f"eval_{name}/margin": float(m.mean())})
    metrics.update({"eval_margin_std": float(margin.std()) if len(margin) > 1 else 0.0,
                    "eval_length/chosen": float(counts[:, 0].mean()), "eval_length/rejected": float(counts[:, 1].mean()),
                    "eval_pairs": len(ids)})
    rows = [{
        "id": ids[i],
        "chosen_logps": float(logps[i, 0]), "rejected_logps": float(logps[i, 1]),
        "chosen_tokens": int(counts[i, 0]), "rejected_tokens": int(counts[i, 1]),
        "ref_chosen_logps": float(ref[i, 0]), "ref_rejected_logps": float(ref[i, 1]),
        "chosen_reward": float(out.chosen_rewards[i]), "rejected_reward": float(out.rejected_rewards[i]),
        "margin": float(margin[i]), "correct": bool(margin[i] > 0),
        **{f"{name}_margin": float(m[i]) for name, m in sticks.items()},
    } for i in range(len(ids))]
    return metrics, rows


def evaluate(model: torch.nn.Module, pairs: Sequence, ref: Tensor, objective: str, params: dict, *,
             arith: Arithmetic, pad_id: int, batch_size: int = 16, share_prompt: bool = True, chunk: int = 1024,
             rt: Runtime | None = None) -> tuple[dict, list[dict], int]:
    """Score ``pairs`` with the current policy. Returns (eval metrics, per-pair rows, tokens processed).

    ``arith`` (``model.arithmetic(cfg, dtype, held_out=True)``): how to compute (bf16 autocast, fp32 upcast).
    What the objective needs beyond the sums is scored too: the shared parts (LD-DPO) as cut pairs after the
    whole ones (``with_shared_cuts``; ``ref`` then has those rows too, from the reference pass), the rest
    (WPO's ``sumsq``) from the same forward.

    Under torchrun each rank scores its contiguous shard (``rt.shard``: no pair twice, none padded in) and
    the shards are gathered in order, so every rank returns the same metrics and rows over all pairs.
    """
    rt = rt or current()
    needs = objectives.needs(objective, params)
    scored = with_shared_cuts(pairs, needs)
    lo, hi = rt.shard(len(scored))
    with arith.applied(model):
        logps, counts, processed, *extra = score_pairs(
            model, scored[lo:hi], pad_id=pad_id, batch_size=batch_size, share_prompt=share_prompt, chunk=chunk,
            autocast_bf16=arith.autocast_bf16, needs=sorted(needs - {"shared"}))
    more = (extra or [{}])[0]
    if rt.distributed:
        parts = rt.gather((logps, counts, processed, more))
        logps, counts = (torch.cat([p[j] for p in parts]) for j in (0, 1))                      # (N, 2) each
        processed = sum(p[2] for p in parts)
        more = {k: torch.cat([p[3][k] for p in parts]) for k in more}
    n = len(pairs)
    if "shared" in needs:  # rows n.. are the pairs cut to their shared part: the shared sums
        more = {**more, "shared": logps[n:], "ref_shared": ref[n:]}
    more = {k: v[:n] for k, v in more.items()}
    metrics, rows = heldout(logps[:n], counts[:n], ref[:n], objective, params, [p.id for p in pairs], more)
    return metrics, rows, processed


def evaluate_model(cfg: Config, adapter: str | None = None) -> dict:
    """``preftune eval``: score a model (plus an optional peft adapter) on held-out pairs, write to cfg.output.

    The reference is the base model (the adapter disabled), so both yardsticks are available. With
    ``gen_eval_prompts`` and a ``judge``, the adapter's generations are judged against the base model's too
    (``metrics["gen_eval"]``, ``gen_eval.jsonl``), as at the end of a run.
    Writes ``config.yaml``, ``metrics.json`` and ``eval_pairs.jsonl``; returns the metrics.
    """
    from .behaviour import check_gen_eval, run_gen_eval

    source = cfg.eval_data or cfg.data
    if not source:
        raise InputError("no held-out data given (--eval-data FILE)", field="eval_data")
    cfg.validate()
    check_writable_dir(cfg.output, field="output")
    cache_dir = cfg.resolved_cache_dir()
    check_writable_dir(cache_dir, field="cache_dir")
    judge = check_gen_eval(cfg)  # a bad judge spec fails here, before anything is loaded or written
    tok = load_tokenizer(cfg)
    examples = load_examples(source, cfg.eval_split if cfg.eval_data else cfg.data_split, RowPolicy.of(cfg))
    pairs, _ = tokenize_examples(examples, tok, max_length=cfg.max_length, max_prompt_length=cfg.prompt_length(),
                                 apply_chat_template=cfg.apply_chat_template, source=source)
    dtype = resolve_dtype(cfg)
    model = load_adapter(load_model(cfg), adapter) if adapter else load_model(cfg)
    fast = dict(share_prompt=cfg.share_prompt, chunk=cfg.logit_chunk, arith=arithmetic(cfg, dtype, held_out=True))
    rt = init()  # under torchrun the pairs are split across ranks; rank 0 writes
    ref, _ = reference_logps(model, with_shared_cuts(pairs, objectives.needs(cfg.objective, cfg.objective_params())),
                             fingerprint=fingerprint(cfg.model, cache_dir), cache_dir=cache_dir,
                             pad_id=tok.pad_token_id, batch_size=cfg.eval_batch_size, rt=rt, **fast)
    metrics, rows, _ = evaluate(model, pairs, ref, cfg.objective, cfg.objective_params(), pad_id=tok.pad_token_id,
                                batch_size=cfg.eval_batch_size, rt=rt, **fast)
    if not rt.is_main:
        return metrics
    out = RunDir(Path(cfg.output))
    if judge is not None:  # what the adapter writes, against what the base model writes
        metrics["gen_eval"] = run_gen_eval(cfg, model, tok, pairs, out.path, judge)
    atomic_write_text(out.config, dump_yaml(cfg))
    atomic_write_json(out.file(EVAL_METRICS), metrics)
    write_jsonl(out.eval_pairs, rows)
    return metrics
