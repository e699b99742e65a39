"""Objectives that train on unpaired rows (prompt, completion, thumbs up or down): KTO.
"""

from __future__ import annotations

import math

import torch

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


@objective("kto", needs_reference=True, family="reference-relative", data="unpaired", min_batch_size=2,
           advice=_kto_balance,
           params={"beta": BETA,
                   "desirable_weight": Param(1.0, lambda v: v > 0, "> 0", "weight λD of desirable rows"),
                   "undesirable_weight": Param(1.0, lambda v: v > 0, "> 0", "weight λU of undesirable rows")},
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
    reward = (beta * c).detach()
    nan = torch.full_like(reward, math.nan)
    return Output(loss, torch.where(good, reward, nan), torch.where(good, nan, reward),
                  {"kl": z.expand_as(reward), "logps/chosen": torch.where(good, lp.chosen.detach(), nan),
                   "logps/rejected": torch.where(good, nan, lp.chosen.detach())})
