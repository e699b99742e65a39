"""Reference-relative objectives built on the margin Δ between the two log-ratios (the DPO family): they take
every modifier (modifiers.py), the f-divergence through Δ. aot and aot_unpaired sort the batch instead, and take
only ld_alpha (TRL refuses WPO and f-divergences for them).

    loss = g(Δ),  Δ = f(ρc) − f(ρr),  ρ = π − ref      (notation: registry.py)
    preftune train --objective exo_pair ...            # `preftune objectives` lists them all
"""

from __future__ import annotations

import math
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor

from .registry import (
    BETA,
    EPS,
    Output,
    Param,
    SeqLogps,
    delta,
    logratios,
    objective,
    per_token,
    ref_output,
    scores,
)

# a Δ-based objective: reference-relative, and takes every modifier
_delta_based = partial(objective, needs_reference=True, family="reference-relative",
                       modifiers=("ld_alpha", "use_weighting", "f_divergence_type"))
SMOOTHING = Param(0.0, lambda v: 0 <= v < 0.5, "in [0, 0.5)", "label smoothing ε (0 = none)")


def _smoothed(z: Tensor, eps: float) -> Tensor:
    """−(1−ε)·log σ(z) − ε·log σ(−z): the sigmoid loss with label smoothing ε (cDPO, dpo_norm, AOT)."""
    return -(1 - eps) * F.logsigmoid(z) - eps * F.logsigmoid(-z)


@_delta_based("dpo", params={"beta": BETA}, trl_loss_type="sigmoid",
              summary="DPO (Rafailov 2023): -log σ(β·Δ), reference-relative sigmoid loss")
def dpo(lp: SeqLogps, *, beta: float) -> Output:
    """DPO, Rafailov et al. 2023, "Direct Preference Optimization", Eq. 7 (TRL ``loss_type="sigmoid"``).

    loss = −log σ(β·Δ),  Δ = (πc − refc) − (πr − refr);  rewards β·(π − ref).  (The name predates TRL's.)

    β: KL strength, typical 0.01–0.5 (default 0.1); larger β keeps the policy closer to the reference.
    """
    return ref_output(-F.logsigmoid(beta * delta(lp)), beta, lp)


@_delta_based("cdpo", params={"beta": BETA, "label_smoothing": EPS},
              summary="conservative DPO (Mitchell 2023): DPO with label smoothing ε")
def cdpo(lp: SeqLogps, *, beta: float, label_smoothing: float) -> Output:
    """Conservative DPO, Mitchell 2023, "A note on DPO with noisy preferences": DPO with label smoothing ε.

    loss = −(1−ε)·log σ(β·Δ) − ε·log σ(−β·Δ);  rewards β·(π − ref).  ε = 0 is DPO.

    β as DPO (typical 0.01–0.5, default 0.1). ε = ``label_smoothing``: assumed probability that a label is flipped,
    in [0, 0.5), typical 0.05–0.2 (default 0.1). The loss is minimised at a finite margin βΔ = log((1−ε)/ε).
    (TRL 1.16's ``sigmoid`` ignores ``label_smoothing``; cDPO is no longer a TRL loss type.)
    """
    return ref_output(_smoothed(beta * delta(lp), label_smoothing), beta, lp)


@_delta_based("robust", params={"beta": BETA, "label_smoothing": EPS}, trl_loss_type="robust",
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


@_delta_based("ipo", params={"beta": BETA}, trl_loss_type="ipo",
              summary="IPO (Azar 2023): squared loss to margin 1/(2β), length-normalized log-ratios")
def ipo(lp: SeqLogps, *, beta: float) -> Output:
    """IPO, Azar et al. 2023, "A General Theoretical Paradigm to Understand Learning from Human Preferences", Eq. 17.

    loss = ((πc − refc)/|c| − (πr − refr)/|r| − 1/(2β))²;  rewards β·(π − ref), summed (as TRL).

    As TRL's ``ipo``, the log-ratios are divided by completion token counts (TRL confirmed this with the authors);
    β is the paper's τ, typical 0.01–1 (default 0.1). The target length-normalized margin is 1/(2β).
    """
    c, r = per_token(lp, *scores(lp))
    return ref_output((c - r - 1 / (2 * beta)) ** 2, beta, lp)


@_delta_based("hinge", params={"beta": BETA}, trl_loss_type="hinge",
              summary="SLiC hinge (Zhao 2023): relu(1 - β·Δ)")
def hinge(lp: SeqLogps, *, beta: float) -> Output:
    """SLiC-HF hinge loss, Zhao et al. 2023, on reference-relative log-ratios (TRL ``loss_type="hinge"``).

    loss = max(0, 1 − β·Δ);  rewards β·(π − ref).

    1/β is the margin Δ must reach before a pair stops contributing; typical β 0.01–0.5 (default 0.1).
    """
    return ref_output(torch.relu(1 - beta * delta(lp)), beta, lp)


@_delta_based("sigmoid_norm", params={"beta": BETA}, trl_loss_type="sigmoid_norm",
              summary="length-normalized DPO with the reference (TRL sigmoid_norm)")
def sigmoid_norm(lp: SeqLogps, *, beta: float) -> Output:
    """Length-normalized DPO that keeps the reference, TRL ``loss_type="sigmoid_norm"`` (TRL PR #5406; the
    normalization of SimPO, Meng et al. 2024, Eq. 4, applied to DPO's log-ratios).

    loss = −log σ(β·(f(ρc)/|c| − f(ρr)/|r|));  rewards β·(π − ref), summed (as TRL).

    β as TRL's default, 0.1; the per-token margin is an order of magnitude smaller than DPO's summed one, so
    useful values run higher (open-instruct's ``dpo_norm`` uses 5).
    """
    c, r = per_token(lp, *scores(lp))
    return ref_output(-F.logsigmoid(beta * (c - r)), beta, lp)


@_delta_based("dpo_norm", summary="open-instruct's length-normalized DPO (Tulu 3, β = 5)",
              params={"beta": Param(5.0, lambda v: v > 0, "> 0", "β on per-token log-ratios (Tulu 3: 5)"),
                      "label_smoothing": SMOOTHING})
def dpo_norm(lp: SeqLogps, *, beta: float, label_smoothing: float) -> Output:
    """Length-normalized DPO as open-instruct trains Tulu 3 (``--loss_type dpo_norm``, ``open_instruct/dpo_utils.py``;
    Lambert et al. 2024, "Tülu 3", §5: β = 5, lr 5e-7 for the 8B model).

    z = f(ρc)/|c| − f(ρr)/|r|  (the policy's and the reference's mean token log-probs);
    loss = −(1−ε)·log σ(β·z) − ε·log σ(−β·z);  rewards β·(π − ref)/|y|, per token (as open-instruct).

    The loss is TRL's ``sigmoid_norm`` with open-instruct's defaults (β = 5, ε = ``label_smoothing`` = 0); the
    rewards differ: per token here, summed in TRL.
    """
    c, r = per_token(lp, *scores(lp))
    rc, rr = per_token(lp, *logratios(lp))
    return Output(_smoothed(beta * (c - r), label_smoothing), (beta * rc).detach(), (beta * rr).detach())


@_delta_based("exo_pair", trl_loss_type="exo_pair",
              params={"beta": BETA, "label_smoothing": Param(1e-3, lambda v: 0 < v < 0.5, "in (0, 0.5)",
                                                             "ε of the target distribution (paper: 1e-3)")},
              summary="EXO (Ji 2024): reverse KL to a smoothed target over the pair")
def exo_pair(lp: SeqLogps, *, beta: float, label_smoothing: float) -> Output:
    """EXO-pref, Ji et al. 2024, "Towards Efficient Exact Optimization of Language Model Alignment", Eq. 16 with
    K = 2 (TRL ``loss_type="exo_pair"``): KL(q ‖ p) with q = softmax over the pair of β·ρ, p = (1−ε, ε).

    loss = σ(βΔ)·(log σ(βΔ) − log(1−ε)) + σ(−βΔ)·(log σ(−βΔ) − log ε);  rewards β·(π − ref).

    ε = ``label_smoothing`` must be > 0 (the paper and TRL recommend 1e-3); β as DPO (default 0.1).
    """
    z = beta * delta(lp)
    loss = torch.sigmoid(z) * (F.logsigmoid(z) - math.log1p(-label_smoothing)) + \
        torch.sigmoid(-z) * (F.logsigmoid(-z) - math.log(label_smoothing))
    return ref_output(loss, beta, lp)


@_delta_based("discopop", trl_loss_type="discopop",
              params={"beta": BETA, "discopop_tau": Param(0.05, lambda v: v > 0, "> 0",
                                                          "temperature τ of the mixing (paper: 0.05)")},
              summary="DiscoPOP (Lu 2024): log-ratio modulated mix of logistic and exponential losses")
def discopop(lp: SeqLogps, *, beta: float, discopop_tau: float) -> Output:
    """DiscoPOP ("LRML"), Chris Lu et al. 2024, "Discovering Preference Optimization Algorithms with and for Large
    Language Models", Eq. 5 (TRL ``loss_type="discopop"``).

    z = β·Δ,  m = σ(z/τ);  loss = (1 − m)·(−log σ(z)) + m·e^(−z);  rewards β·(π − ref).

    τ = ``discopop_tau``, 0.05 as the paper recommends; β as TRL's default, 0.1 (the paper trains with 0.05).
    """
    z = beta * delta(lp)
    m = torch.sigmoid(z / discopop_tau)
    return ref_output(-F.logsigmoid(z) * (1 - m) + torch.exp(-z) * m, beta, lp)


@_delta_based("aot", modifiers=("ld_alpha",), trl_loss_type="aot",
              params={"beta": BETA, "label_smoothing": SMOOTHING},
              summary="AOT (Melnyk 2024): distributional alignment by sorting the batch's paired margins")
def aot(lp: SeqLogps, *, beta: float, label_smoothing: float) -> Output:
    """AOT (paired), Melnyk et al. 2024, "Distributional Preference Alignment of LLMs via Optimal Transport",
    Eq. 9 (TRL ``loss_type="aot"``): first-order stochastic dominance of the policy's margins over the
    reference's, by matching their sorted values within the micro-batch.

    d = sort(πc − πr) − sort(refc − refr) over the batch;  loss = −(1−ε)·log σ(β·d) − ε·log σ(−β·d)
    (one entry per sorted position, not per pair);  rewards β·(π − ref) per pair.

    β as DPO (0.1); ε = ``label_smoothing``, 0 as TRL. Needs micro-batches of several pairs to mean anything.
    """
    d = torch.sort(lp.chosen - lp.rejected, dim=0)[0] - torch.sort(lp.ref_chosen - lp.ref_rejected, dim=0)[0]
    return ref_output(_smoothed(beta * d, label_smoothing), beta, lp)


@_delta_based("aot_unpaired", modifiers=("ld_alpha",), trl_loss_type="aot_unpaired",
              params={"beta": BETA, "label_smoothing": SMOOTHING},
              summary="AOT unpaired (Melnyk 2024): sorted chosen vs sorted rejected log-ratios")
def aot_unpaired(lp: SeqLogps, *, beta: float, label_smoothing: float) -> Output:
    """AOT (unpaired), Melnyk et al. 2024, Eq. 8 (TRL ``loss_type="aot_unpaired"``, formerly ``aot_pair``): the
    chosen log-ratios' distribution dominates the rejected ones', matched by sorting each within the batch.

    d = sort(ρc) − sort(ρr);  loss = −(1−ε)·log σ(β·d) − ε·log σ(−β·d);  rewards β·(π − ref) per pair.

    Trains on pairs like the others (the pairing is ignored, not required). β 0.1, ε 0 as TRL.
    """
    c, r = logratios(lp)
    d = torch.sort(c, dim=0)[0] - torch.sort(r, dim=0)[0]
    return ref_output(_smoothed(beta * d, label_smoothing), beta, lp)
