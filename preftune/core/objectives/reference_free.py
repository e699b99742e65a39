"""Reference-free objectives: no reference model; rewards from the policy's own (length-normalized) log-probs
(SimPO, CPO-SimPO, AlphaPO, ORPO). SFT is here too, as the likelihood baseline.

    preftune train --objective cpo_simpo ...
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .registry import (
    Output,
    Param,
    SeqLogps,
    log1mexp,
    mean_logps,
    objective,
)

SIMPO = {"beta": Param(2.0, lambda v: v > 0, "> 0", "reward scale β on mean token log-probs (typical 2-10)"),
         "gamma_beta_ratio": Param(0.5, lambda v: v >= 0, ">= 0", "target margin as γ/β (typical 0.3-0.8)"),
         "gamma": Param(None, lambda v: v >= 0, ">= 0", "target margin γ, absolute (default ratio·β)")}
GAMMA = (("gamma", "gamma_beta_ratio"),)


def _simpo(lp: SeqLogps, rc: Tensor, rr: Tensor, beta: float, gamma_beta_ratio: float, gamma: float | None) -> Output:
    """−log σ(β·(rc − rr) − γ), rewards β·r: SimPO's form on any per-token reward r."""
    gamma = gamma_beta_ratio * beta if gamma is None else gamma
    return Output(-F.logsigmoid(beta * (rc - rr) - gamma), (beta * rc).detach(), (beta * rr).detach())


@objective("simpo", needs_reference=False, family="reference-free", exclusive=GAMMA, params=SIMPO,
           summary="SimPO (Meng 2024): reference-free, -log σ(β·(mc - mr) - γ), length-normalized")
def simpo(lp: SeqLogps, *, beta: float, gamma_beta_ratio: float = 0.0, gamma: float | None = None) -> Output:
    """SimPO, Meng, Xia & Chen 2024, "SimPO: Simple Preference Optimization with a Reference-Free Reward", Eq. 6.

    loss = −log σ(β·πc/|c| − β·πr/|r| − γ);  rewards β·π/|π| (β times the mean token log-prob).

    ``gamma`` is ABSOLUTE, in reward units. The paper's tables (and its code) report the ratio γ/β
    (``gamma_beta_ratio``, typical 0.3–0.8, default 0.5); without ``gamma``, γ = ratio·β. Give one of them. β typical
    2–10 (default 2.0): an order of magnitude above DPO's because the rewards are per-token averages.
    No NLL term: TRL's CPOTrainer with ``loss_type="simpo"`` keeps ``cpo_alpha=1.0`` by default and so silently
    adds the chosen NLL (only ``loss_type="alphapo"`` sets it to 0); that is ``cpo_simpo`` here, or add it
    explicitly with ``nll_weight``.
    """
    return _simpo(lp, *mean_logps(lp), beta, gamma_beta_ratio, gamma)


@objective("cpo_simpo", needs_reference=False, family="reference-free", exclusive=GAMMA,
           params={**SIMPO, "cpo_alpha": Param(1.0, lambda v: v >= 0, ">= 0", "weight of the chosen NLL (TRL: 1)")},
           summary="CPO-SimPO (Xu 2024): SimPO plus cpo_alpha x the chosen NLL, TRL CPOTrainer's simpo default")
def cpo_simpo(lp: SeqLogps, *, beta: float, cpo_alpha: float, gamma_beta_ratio: float = 0.0,
              gamma: float | None = None) -> Output:
    """CPO-SimPO: SimPO (Meng et al. 2024, Eq. 6) plus CPO's behaviour-cloning term (Xu et al. 2024, "Contrastive
    Preference Optimization", Eq. 6), as TRL's CPOTrainer runs ``loss_type="simpo"`` with ``cpo_alpha`` (1.0).

    loss = −log σ(β·mc − β·mr − γ) + cpo_alpha·(−mc);  rewards β·m.  Extras: ``nll_loss`` (= −mc, as TRL logs it).

    β, γ as ``simpo``; ``cpo_alpha`` 1.0 as TRL (0 is SimPO). TRL's NLL averages over every chosen token of the
    batch, this one per pair (the same when chosen completions are equally long).
    """
    mc, mr = mean_logps(lp)
    out = _simpo(lp, mc, mr, beta, gamma_beta_ratio, gamma)
    return Output(out.loss - cpo_alpha * mc, out.chosen_rewards, out.rejected_rewards, {"nll_loss": (-mc).detach()})


@objective("alphapo", needs_reference=False, family="reference-free", exclusive=GAMMA,
           params={**SIMPO, "alpha": Param(0.25, help="reward shape α: r = (1 - p^-α)/α (0 = SimPO's log p)")},
           summary="AlphaPO (Gupta 2025): SimPO with the reward reshaped by α")
def alphapo(lp: SeqLogps, *, beta: float, alpha: float, gamma_beta_ratio: float = 0.0,
            gamma: float | None = None) -> Output:
    """AlphaPO, Gupta et al. 2025, "AlphaPO — Reward shape matters for LLM alignment", Eq. 7 (TRL CPOTrainer
    ``loss_type="alphapo"``: SimPO's loss with ``alpha`` and ``cpo_alpha=0``).

    r = (1 − p^(−α))/α with p = exp(π/|π|) (α → 0 gives SimPO's log p);  loss = −log σ(β·(rc − rr) − γ);
    rewards β·r.

    β, γ as ``simpo``. α shapes the reward: α > 0 saturates it for likely completions, curbing likelihood
    displacement; default 0.25, inside the range the paper sweeps (TRL's default 0 is plain SimPO).
    """
    mc, mr = mean_logps(lp)
    shape = (lambda m: m) if alpha == 0 else (lambda m: (1 - torch.exp(-alpha * m)) / alpha)
    return _simpo(lp, shape(mc), shape(mr), beta, gamma_beta_ratio, gamma)


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


@objective("sft", needs_reference=False, family="likelihood", modifiers=("use_weighting",), trl_loss_type="sft",
           summary="SFT: mean token NLL of the chosen completion only")
def sft(lp: SeqLogps) -> Output:
    """Supervised fine-tuning on the chosen completion: loss = −πc/|c| (mean token NLL, per example).

    No hyperparameters; rewards are the mean token log-probs π/|π| (β-free). Rejected completions are ignored
    by the loss. (TRL's DPO ``loss_type="sft"`` averages over all chosen tokens of the batch instead: the same
    when chosen completions are equally long.) In a mixture (MPO: ``0.8*dpo + 0.2*bco_pair + 1*sft``) it takes
    WPO's weight, and is left as it is by ld_alpha and the f-divergence, as in TRL.
    """
    mc, mr = mean_logps(lp)
    return Output(-mc, mc.detach(), mr.detach(), {"nll_loss": (-mc).detach()})
