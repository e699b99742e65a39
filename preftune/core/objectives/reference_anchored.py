"""Reference-relative objectives that score each side's log-ratio on its own, anchoring chosen and rejected to
the reference separately instead of only their difference Δ (NCA, BCO, SPPO, APO). They take ld_alpha and
use_weighting; TRL gives them no f-divergence form (it only cancels in the chosen − rejected difference).

    ρc, ρr = πc − refc, πr − refr      (notation: registry.py)
    preftune train --objective apo_zero ...
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .registry import BETA, Output, SeqLogps, logratios, objective, ref_output

TAKES = ("ld_alpha", "use_weighting")


@objective("nca_pair", needs_reference=True, family="reference-relative", params={"beta": BETA}, modifiers=TAKES,
           trl_loss_type="nca_pair", summary="NCA (Chen 2024): absolute likelihood of each side, noise-contrastive")
def nca_pair(lp: SeqLogps, *, beta: float) -> Output:
    """NCA, Chen et al. 2024, "Noise Contrastive Alignment of Language Models with Explicit Rewards", Eq. 12 for a
    pair (TRL ``loss_type="nca_pair"``).

    loss = −log σ(β·ρc) − ½·log σ(−β·ρc) − ½·log σ(−β·ρr);  rewards β·ρ.

    Unlike DPO it pushes the chosen log-ratio up in absolute terms, so chosen likelihood does not fall with
    rejected's. β as DPO (TRL default 0.1).
    """
    c, r = logratios(lp)
    return ref_output(-F.logsigmoid(beta * c) - 0.5 * F.logsigmoid(-beta * c) - 0.5 * F.logsigmoid(-beta * r),
                      beta, lp)


@objective("bco_pair", needs_reference=True, family="reference-relative", params={"beta": BETA}, modifiers=TAKES,
           trl_loss_type="bco_pair", summary="BCO (Jung 2024), paired: chosen classified up, rejected down")
def bco_pair(lp: SeqLogps, *, beta: float) -> Output:
    """Binary classifier optimization, Jung et al. 2024, "Binary Classifier Optimization for Large Language Model
    Alignment", Eq. 6 on pairs, as TRL's DPOTrainer ``loss_type="bco_pair"`` (without BCOTrainer's running reward
    shift δ). MPO mixes it: ``0.8*dpo + 0.2*bco_pair + 1*sft``.

    loss = −log σ(β·ρc) − log σ(−β·ρr);  rewards β·ρ.  β as DPO (default 0.1).
    """
    c, r = logratios(lp)
    return ref_output(-F.logsigmoid(beta * c) - F.logsigmoid(-beta * r), beta, lp)


@objective("sppo_hard", needs_reference=True, family="reference-relative", params={"beta": BETA}, modifiers=TAKES,
           trl_loss_type="sppo_hard", summary="SPPO (Wu 2024), hard labels: squared distance of each log-ratio to ±1/(2β)")
def sppo_hard(lp: SeqLogps, *, beta: float) -> Output:
    """Self-play preference optimization, Wu et al. 2024, "Self-Play Preference Optimization for Language Model
    Alignment", Eq. 4.7 with hard win probabilities (P = 1 for chosen, 0 for rejected), as TRL's
    ``loss_type="sppo_hard"``.

    loss = (ρc − 1/(2β))² + (ρr + 1/(2β))²;  rewards β·ρ.

    β is the paper's η⁻¹ (TRL's ``beta``, default 0.1): each log-ratio is pulled to ±1/(2β) = ±5 by default.
    """
    c, r = logratios(lp)
    return ref_output((c - 0.5 / beta) ** 2 + (r + 0.5 / beta) ** 2, beta, lp)


@objective("apo_zero", needs_reference=True, family="reference-relative", params={"beta": BETA}, modifiers=TAKES,
           trl_loss_type="apo_zero", summary="APO-zero (D'Oosterlinck 2024): chosen up, rejected down, anchored")
def apo_zero(lp: SeqLogps, *, beta: float) -> Output:
    """Anchored preference optimization, zero variant, D'Oosterlinck et al. 2024, "Anchored Preference
    Optimization and Contrastive Revisions", Eq. 7 (TRL ``loss_type="apo_zero"``). For data whose chosen
    completions are better than what the model writes now.

    loss = (1 − σ(β·ρc)) + σ(β·ρr);  rewards β·ρ.  β as DPO (default 0.1).
    """
    c, r = logratios(lp)
    return ref_output(1 - torch.sigmoid(beta * c) + torch.sigmoid(beta * r), beta, lp)


@objective("apo_down", needs_reference=True, family="reference-relative", params={"beta": BETA}, modifiers=TAKES,
           trl_loss_type="apo_down", summary="APO-down (D'Oosterlinck 2024): both down, rejected more")
def apo_down(lp: SeqLogps, *, beta: float) -> Output:
    """Anchored preference optimization, down variant, D'Oosterlinck et al. 2024, Eq. 8 (TRL
    ``loss_type="apo_down"``). For data whose chosen completions are worse than what the model writes now.

    loss = σ(β·ρc) + (1 − σ(β·(ρc − ρr)));  rewards β·ρ.  β as DPO (default 0.1).
    """
    c, r = logratios(lp)
    return ref_output(torch.sigmoid(beta * c) + 1 - torch.sigmoid(beta * (c - r)), beta, lp)
