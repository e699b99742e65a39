"""The data audit's checks that need a model or a judge (the model-free ones are data/audit.py): the reference's
own ranking of the held-out pairs at step 0 on every yardstick, how much of the labels a pure length rule
explains, a label-noise estimate, and a judge's agreement with the labels. Each is a finding with its numbers.

    preftune audit train.jsonl --eval-data heldout.jsonl --model M --judge python:preftune.tinyworld:judge

Each code's definition: docs/data.md, The audit. The label-noise estimate flags about a quarter of random labels
and few of clean ones; read it as a rough upper view of how many labels fight what the model already believes.
"""

from __future__ import annotations

import random
import statistics
from collections.abc import Sequence
from typing import Any

import torch

from ..core.config import Config
from ..core.intervals import wilson_interval
from ..core.objectives import SeqLogps, mean_logps
from ..data.audit import length_bias
from ..data.rows import Example, as_text
from ..data.tokenize import Pair
from ..generation.judges.base import Judge
from ..modeling.logprobs import score_pairs
from . import yardsticks
from .behaviour import win_rate


def sample(items: Sequence, n: int, seed: int) -> list:
    """Up to ``n`` items, a seeded random sample (in their original order) when there are more."""
    if len(items) <= n:
        return list(items)
    return [items[i] for i in sorted(random.Random(seed).sample(range(len(items)), n))]


def _logps(model: torch.nn.Module, pairs: Sequence[Pair], cfg: Config, pad_id: int) -> SeqLogps:
    """The reference's log-probs of ``pairs``, as SeqLogps whose reference is the model itself (step 0)."""
    logps, counts, _ = score_pairs(model, pairs, pad_id=pad_id, batch_size=cfg.eval_batch_size,
                                   share_prompt=cfg.share_prompt, chunk=cfg.logit_chunk)  # (N, 2), (N, 2)
    return SeqLogps.of(logps, counts, ref=logps)


def _accuracy(margin: torch.Tensor) -> dict[str, Any]:
    """Share ranked right (a tie one half) and its 95% Wilson interval."""
    k = float((margin > 0).sum() + 0.5 * (margin == 0).sum())
    return {"accuracy": k / len(margin), "ci": list(wilson_interval(k, len(margin)))}


def model_findings(model: torch.nn.Module, train: Sequence[Pair], held: Sequence[Pair], cfg: Config,
                   pad_id: int) -> list[dict[str, Any]]:
    """``reference_ranking`` (held-out), ``length_rule`` and ``label_noise`` (training pairs)."""
    out = []
    if held:
        lp = _logps(model, held, cfg, pad_id)
        # a reference-relative yardstick ties every pair at step 0
        ranks = [{"yardstick": y.name, **_accuracy(y.margin(lp))} for y in yardsticks.logprob_yardsticks()]
        out.append({"code": "reference_ranking", "severity": "info", "pairs": len(held), "yardsticks": ranks})
    if train:
        lp = _logps(model, train, cfg, pad_id)
        mc, mr = mean_logps(lp)
        margin = mc - mr                                                     # (N,) nats per token
        cl, rl = lp.chosen_tokens, lp.rejected_tokens
        shorter, longer = int((cl < rl).sum()), int((cl > rl).sum())
        rule = length_bias(shorter, longer, len(train) - shorter - longer, unit="tokens")
        says_chosen = cl < rl if rule["rule"] == "shorter" else cl > rl      # the rule picks chosen
        decided = cl != rl
        agree = ((margin > 0) == says_chosen)[decided].float().mean() if decided.any() else torch.tensor(float("nan"))
        out.append({**rule, "code": "length_rule", "severity": "warn" if rule["teaches"] else "info",
                    "reference_agrees": float(agree)})
        cut = statistics.median(margin.abs().tolist())
        k = int((margin < -cut).sum())
        lo, hi = wilson_interval(k, len(train))
        out.append({"code": "label_noise", "severity": "warn" if lo > 0.25 else "info", "pairs": len(train),
                    "against": k / len(train), "ci": [lo, hi], "threshold": cut})
    return [{**f, "examples": []} for f in out]


def judge_agreement(judge: Judge, examples: Sequence[Example]) -> dict[str, Any]:
    """``judge_agreement``: how often the judge prefers chosen over rejected (a tie one half), with its interval."""
    prefs, _, _ = judge.prefer([ex.prompt for ex in examples], [as_text(ex.chosen) for ex in examples],
                               [as_text(ex.rejected) for ex in examples])
    w = win_rate(prefs)
    return {"code": "judge_agreement", "severity": "warn" if w["win_rate_ci"][1] < 0.7 else "info",
            "judge": judge.spec, "pairs": w["n"], "agreement": w["win_rate"], "ci": w["win_rate_ci"],
            "ties": w["ties"],
            "examples": [{"ids": [ex.id], "preference": p} for ex, p in zip(examples, prefs) if p < 0.5][:3]}
