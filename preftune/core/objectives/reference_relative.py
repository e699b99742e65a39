"""Reference-relative objectives: judged against a frozen reference model (the DPO family).

    loss = f(Δ),  Δ = (πc − refc) − (πr − refr)      (notation: registry.py)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .registry import (
    BETA,
    EPS,
    Output,
    SeqLogps,
    delta,
    logratios,
    objective,
    ref_output,
)


@objective("dpo", needs_reference=True, family="reference-relative", params={"beta": BETA},
           summary="DPO (Rafailov 2023): -log σ(β·Δ), reference-relative sigmoid loss")
def dpo(lp: SeqLogps, *, beta: float) -> Output:
    """DPO, Rafailov et al. 2023, "Direct Preference Optimization", Eq. 7 (TRL ``loss_type="sigmoid"``).

    loss = −log σ(β·Δ),  Δ = (πc − refc) − (πr − refr);  rewards β·(π − ref).

    β: KL strength, typical 0.01–0.5 (default 0.1); larger β keeps the policy closer to the reference.
    """
    return ref_output(-F.logsigmoid(beta * delta(lp)), beta, lp)


@objective("cdpo", needs_reference=True, family="reference-relative",
           params={"beta": BETA, "label_smoothing": EPS},
           summary="conservative DPO (Mitchell 2023): DPO with label smoothing ε")
def cdpo(lp: SeqLogps, *, beta: float, label_smoothing: float) -> Output:
    """Conservative DPO, Mitchell 2023, "A note on DPO with noisy preferences": DPO with label smoothing ε.

    loss = −(1−ε)·log σ(β·Δ) − ε·log σ(−β·Δ);  rewards β·(π − ref).  ε = 0 is DPO.

    β as DPO (typical 0.01–0.5, default 0.1). ε = ``label_smoothing``: assumed probability that a label is flipped,
    in [0, 0.5), typical 0.05–0.2 (default 0.1). The loss is minimised at a finite margin βΔ = log((1−ε)/ε).
    (TRL 1.16's ``sigmoid`` ignores ``label_smoothing``; cDPO is no longer a TRL loss type.)
    """
    z = beta * delta(lp)
    return ref_output(-(1 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z), beta, lp)


@objective("robust", needs_reference=True, family="reference-relative",
           params={"beta": BETA, "label_smoothing": EPS},
           summary="robust DPO (Chowdhury 2024): unbiased under label-flip rate ε")
def robust(lp: SeqLogps, *, beta: float, label_smoothing: float) -> Output:
    """Robust DPO, Chowdhury et al. 2024, "Provably Robust DPO" (TRL ``loss_type="robust"``).

    loss = (−(1−ε)·log σ(β·Δ) + ε·log σ(−β·Δ)) / (1 − 2ε);  rewards β·(π − ref).  ε = 0 is DPO.

    An unbiased estimate of the clean DPO loss when labels flip with probability ε. Unlike cDPO it is unbounded
    below (for ε > 0 it keeps rewarding larger margins). β as DPO (default 0.1); ε = ``label_smoothing`` in
    [0, 0.5), default 0.1 as the paper recommends.
    """
    z = beta * delta(lp)
    eps = label_smoothing
    return ref_output((-(1 - eps) * F.logsigmoid(z) + eps * F.logsigmoid(-z)) / (1 - 2 * eps), beta, lp)


@objective("ipo", needs_reference=True, family="reference-relative", params={"beta": BETA},
           summary="IPO (Azar 2023): squared loss to margin 1/(2β), length-normalized log-ratios")
def ipo(lp: SeqLogps, *, beta: float) -> Output:
    """IPO, Azar et al. 2023, "A General Theoretical Paradigm to Understand Learning from Human Preferences", Eq. 17.

    loss = ((πc − refc)/|c| − (πr − refr)/|r| − 1/(2β))²;  rewards β·(π − ref), summed (as TRL).

    As TRL's ``ipo``, the log-ratios are divided by completion token counts (TRL confirmed this with the authors);
    β is the paper's τ, typical 0.01–1 (default 0.1). The target length-normalized margin is 1/(2β).
    """
    c, r = logratios(lp)
    delta = c / lp.chosen_tokens.clamp(min=1) - r / lp.rejected_tokens.clamp(min=1)
    return ref_output((delta - 1 / (2 * beta)) ** 2, beta, lp)


@objective("hinge", needs_reference=True, family="reference-relative", params={"beta": BETA},
           summary="SLiC hinge (Zhao 2023): relu(1 - β·Δ)")
def hinge(lp: SeqLogps, *, beta: float) -> Output:
    """SLiC-HF hinge loss, Zhao et al. 2023, on reference-relative log-ratios (TRL ``loss_type="hinge"``).

    loss = max(0, 1 − β·Δ);  rewards β·(π − ref).

    1/β is the margin Δ must reach before a pair stops contributing; typical β 0.01–0.5 (default 0.1).
    """
    return ref_output(torch.relu(1 - beta * delta(lp)), beta, lp)
