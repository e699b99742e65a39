"""Objectives that train on unpaired rows (prompt, completion, thumbs up or down): KTO and unpaired APO-zero.

    preftune train --objective apo_zero_unpaired --data thumbs.jsonl ...
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .registry import (
    BETA,
    Output,
    Param,
    SeqLogps,
    logratios,
    objective,
    ref_output,
)


def _kto_balance(counts: dict[str, int], params: dict[str, float]) -> list[str]:
    """TRL's advice: λD·nD / (λU·nU) in [1, 1.33] (the KTO paper's recommended range)."""
    nd, nu = max(counts["desirable"], 1), max(counts["undesirable"], 1)
    ratio = params["desirable_weight"] * nd / (params["undesirable_weight"] * nu)
    if 1 <= ratio <= 1.33:
        return []
    return [f"KTO: desirable_weight x {nd} desirable / (undesirable_weight x {nu} undesirable) = {ratio:.2f}, "
            f"outside [1, 1.33]: set desirable_weight in [{nu * params['undesirable_weight'] / nd:.2f}, "
            f"{1.33 * nu * params['undesirable_weight'] / nd:.2f}] (Ethayarajh et al. 2024, as TRL advises)"]


WEIGHTS = {"beta": BETA, "desirable_weight": Param(1.0, lambda v: v > 0, "> 0", "weight λD of desirable rows"),
           "undesirable_weight": Param(1.0, lambda v: v > 0, "> 0", "weight λU of undesirable rows")}


@objective("kto", needs_reference=True, family="reference-relative", data="unpaired", min_batch_size=2,
           advice=_kto_balance, params=WEIGHTS,
           summary="KTO (Ethayarajh 2024): unpaired thumbs up/down against a batch KL reference point")
def kto(lp: SeqLogps, *, beta: float, desirable_weight: float, undesirable_weight: float) -> Output:
    """KTO, Ethayarajh et al. 2024, "KTO: Model Alignment as Prospect Theoretic Optimization", Eq. 7 (TRL 1.16's
    KTOTrainer, ``loss_type="kto"``), on unpaired rows (prompt, completion, label).

    r = π(y|x) − ref(y|x);  z = max(0, mean over the micro-batch of π(y'|x) − ref(y'|x)), detached, where y' is
    another row's completion (the KL completion, in ``rejected``) and the mean is averaged over processes;
    loss = λD·(1 − σ(β·(r − z))) for desirable rows,  λU·(1 − σ(β·(z − r))) for undesirable rows;
    rewards β·r (TRL logs them per label: ``rewards/chosen`` over desirable rows, ``rewards/rejected`` over
    undesirable ones; NaN marks the other label here). Extras: ``kl`` (= z), ``logps/chosen``, ``logps/rejected``.

    β as DPO (default 0.1). λD, λU: ``desirable_weight``, ``undesirable_weight`` (default 1), chosen so that
    λD·nD / (λU·nU) lies in [1, 1.33]. On held-out *pairs* (label None) the chosen side is the desirable row and
    the rejected side the undesirable one, z = 0 (pairs carry no mismatched completions), and the loss is their
    mean; the margin β·(rc − rr) then ranks pairs like DPO's reward.
    """
    c, r = logratios(lp)
    if lp.label is None:  # held-out pairs
        loss = (desirable_weight * (1 - torch.sigmoid(beta * c)) + undesirable_weight * (1 - torch.sigmoid(-beta * r))) / 2
        return ref_output(loss, beta, lp)
    z = r.mean().detach()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(z)  # TRL: gathered across processes and averaged
        z = z / torch.distributed.get_world_size()
    z = z.clamp(min=0)
    good = lp.label.bool()
    loss = torch.where(good, desirable_weight * (1 - torch.sigmoid(beta * (c - z))),
                       undesirable_weight * (1 - torch.sigmoid(beta * (z - c))))
    return _by_label(lp, loss, (beta * c).detach(), z.expand_as(c))


def _by_label(lp: SeqLogps, loss: Tensor, reward: Tensor, kl: Tensor) -> Output:
    """TRL's per-label metrics: rewards and log-probs of desirable rows as chosen, undesirable as rejected (NaN
    marks the other label), and the KL reference point."""
    good = lp.label.bool()
    nan = torch.full_like(reward, math.nan)
    return Output(loss, torch.where(good, reward, nan), torch.where(good, nan, reward),
                  {"kl": kl.detach(), "logps/chosen": torch.where(good, lp.chosen.detach(), nan),
                   "logps/rejected": torch.where(good, nan, lp.chosen.detach())})


@objective("apo_zero_unpaired", needs_reference=True, family="reference-relative", data="unpaired",
           advice=_kto_balance, params=WEIGHTS,
           summary="APO-zero unpaired (D'Oosterlinck 2024): thumbs up pushed up, down pushed down, no KL point")
def apo_zero_unpaired(lp: SeqLogps, *, beta: float, desirable_weight: float, undesirable_weight: float) -> Output:
    """Anchored preference optimization, zero variant, on unpaired rows: D'Oosterlinck et al. 2024, "Anchored
    Preference Optimization and Contrastive Revisions", Eq. 7 split by label (TRL 1.16's KTOTrainer,
    ``loss_type="apo_zero_unpaired"``).

    r = π(y|x) − ref(y|x);  loss = λD·(1 − σ(β·r)) for desirable rows,  λU·σ(β·r) for undesirable rows;
    rewards β·r per label as ``kto``; extra ``kl`` = 0 (no reference point: TRL computes no KL for it, so any
    micro-batch size works). On held-out pairs: the mean of the chosen side's desirable loss and the rejected
    side's undesirable one. β, λD, λU as ``kto``.
    """
    c, r = logratios(lp)
    if lp.label is None:  # held-out pairs
        loss = (desirable_weight * (1 - torch.sigmoid(beta * c)) + undesirable_weight * torch.sigmoid(beta * r)) / 2
        return ref_output(loss, beta, lp)
    good = lp.label.bool()
    loss = torch.where(good, desirable_weight * (1 - torch.sigmoid(beta * c)), undesirable_weight * torch.sigmoid(beta * c))
    return _by_label(lp, loss, (beta * c).detach(), torch.zeros_like(c))
