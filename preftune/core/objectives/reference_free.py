"""Reference-free objectives: no reference model; rewards from the policy's own (length-normalized) log-probs.
SFT is here too, as the likelihood baseline.
"""

from __future__ import annotations

import torch.nn.functional as F

from .registry import (
    Output,
    Param,
    SeqLogps,
    log1mexp,
    mean_logps,
    objective,
)


@objective("simpo", needs_reference=False, family="reference-free", exclusive=(("gamma", "gamma_beta_ratio"),),
           params={"beta": Param(2.0, lambda v: v > 0, "> 0", "reward scale β on mean token log-probs (typical 2-10)"),
                   "gamma_beta_ratio": Param(0.5, lambda v: v >= 0, ">= 0", "target margin as γ/β (typical 0.3-0.8)"),
                   "gamma": Param(None, lambda v: v >= 0, ">= 0", "target margin γ, absolute (default ratio·β)")},
           summary="SimPO (Meng 2024): reference-free, -log σ(β·(mc - mr) - γ), length-normalized")
def simpo(lp: SeqLogps, *, beta: float, gamma_beta_ratio: float = 0.0, gamma: float | None = None) -> Output:
    """SimPO, Meng, Xia & Chen 2024, "SimPO: Simple Preference Optimization with a Reference-Free Reward", Eq. 6.

    loss = −log σ(β·πc/|c| − β·πr/|r| − γ);  rewards β·π/|π| (β times the mean token log-prob).

    ``gamma`` is ABSOLUTE, in reward units. The paper's tables (and its code) report the ratio γ/β
    (``gamma_beta_ratio``, typical 0.3–0.8, default 0.5); without ``gamma``, γ = ratio·β. Give one of them. β typical
    2–10 (default 2.0): an order of magnitude above DPO's because the rewards are per-token averages.
    No NLL term: TRL's CPOTrainer with ``loss_type="simpo"`` keeps ``cpo_alpha=1.0`` by default and so silently
    adds the chosen NLL (only ``loss_type="alphapo"`` sets it to 0); add it here explicitly with ``nll_weight``.
    """
    gamma = gamma_beta_ratio * beta if gamma is None else gamma
    mc, mr = mean_logps(lp)
    loss = -F.logsigmoid(beta * (mc - mr) - gamma)
    return Output(loss, (beta * mc).detach(), (beta * mr).detach())


@objective("orpo", needs_reference=False, family="reference-free", fallback=True,
           params={"beta": Param(0.1, lambda v: v > 0, "> 0", "weight λ of the odds-ratio term")},
           summary="ORPO (Hong 2024): NLL(chosen) - λ·log σ(log odds ratio), reference-free")
def orpo(lp: SeqLogps, *, beta: float) -> Output:
    """ORPO, Hong, Lee & Thorne 2024, "ORPO: Monolithic Preference Optimization without Reference Model", Eq. 6–7.

    loss = −πc/|c| − λ·log σ(log odds),  log odds = log(pc/(1−pc)) − log(pr/(1−pr)),  p = exp(π/|π|);
    rewards β·π/|π| (as TRL).  log(1 − p) uses :func:`log1mexp`.

    λ is called ``beta`` as in TRL's ORPOConfig; paper and TRL default 0.1, typical 0.05–1.
    Extras: ``nll_loss``, ``log_odds_ratio`` (= log σ(log odds)), ``log_odds_chosen`` (= log odds).
    """
    mc, mr = mean_logps(lp)
    log_odds = (mc - mr) - (log1mexp(mc) - log1mexp(mr))
    ratio = F.logsigmoid(log_odds)
    loss = -mc - beta * ratio
    return Output(loss, (beta * mc).detach(), (beta * mr).detach(),
                  {"nll_loss": (-mc).detach(), "log_odds_ratio": ratio.detach(), "log_odds_chosen": log_odds.detach()})


@objective("sft", needs_reference=False, family="likelihood",
           summary="SFT: mean token NLL of the chosen completion only")
def sft(lp: SeqLogps) -> Output:
    """Supervised fine-tuning on the chosen completion: loss = −πc/|c| (mean token NLL, per example).

    No hyperparameters; rewards are the mean token log-probs π/|π| (β-free). Rejected completions are ignored
    by the loss. (TRL's DPO ``loss_type="sft"`` averages over all chosen tokens of the batch instead.)
    """
    mc, mr = mean_logps(lp)
    return Output(-mc, mc.detach(), mr.detach(), {"nll_loss": (-mc).detach()})
