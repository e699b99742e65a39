"""Preference objectives as pure functions of per-sequence log-prob sums, one registry, no ``if`` chain.

Every objective maps a :class:`SeqLogps` batch (summed completion log-probs under the policy, completion token
counts and, where needed, the reference model's summed log-probs) to an :class:`Output`: a per-example loss and
TRL's per-example rewards. Notation used in the docstrings, per pair::

    πc, πr     summed completion log-probs of chosen / rejected under the policy
    refc, refr the same under the frozen reference
    |c|, |r|   completion token counts
    Δ          (πc − refc) − (πr − refr)                       reference-relative margin
    mc, mr     πc/|c|, πr/|r|                                   mean token log-probs
    σ          the logistic function

    compute("simpo", lp, resolve_params("simpo", {"beta": 2.0, "gamma_beta_ratio": 0.5}))
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from .errors import InputError


@dataclass(frozen=True)
class SeqLogps:
    """One batch of pairs; every field is a (B,) float tensor."""

    chosen: Tensor
    rejected: Tensor
    chosen_tokens: Tensor
    rejected_tokens: Tensor
    ref_chosen: Tensor | None = None
    ref_rejected: Tensor | None = None


@dataclass
class Output:
    """Per-example loss (differentiable) and detached per-example rewards and extras, all (B,)."""

    loss: Tensor
    chosen_rewards: Tensor
    rejected_rewards: Tensor
    extras: dict[str, Tensor] = field(default_factory=dict)


@dataclass(frozen=True)
class Objective:
    name: str
    fn: Callable[..., Output]
    needs_reference: bool
    defaults: dict[str, float]
    summary: str


REGISTRY: dict[str, Objective] = {}


def _register(name: str, *, needs_reference: bool, defaults: dict[str, float],
              summary: str) -> Callable[[Callable[..., Output]], Callable[..., Output]]:
    def add(fn: Callable[..., Output]) -> Callable[..., Output]:
        REGISTRY[name] = Objective(name, fn, needs_reference, defaults, summary)
        return fn
    return add


# --- shared pieces -------------------------------------------------------------------------------------------

def _logratios(lp: SeqLogps) -> tuple[Tensor, Tensor]:
    """(πc − refc, πr − refr)."""
    return lp.chosen - lp.ref_chosen, lp.rejected - lp.ref_rejected


def _mean_logps(lp: SeqLogps) -> tuple[Tensor, Tensor]:
    """(πc/|c|, πr/|r|), counts clamped to at least 1 as TRL does."""
    return lp.chosen / lp.chosen_tokens.clamp(min=1), lp.rejected / lp.rejected_tokens.clamp(min=1)


def nll(lp: SeqLogps) -> Tensor:
    """Mean token NLL of the chosen completion, per example: −πc/|c|."""
    return -_mean_logps(lp)[0]


def log1mexp(x: Tensor) -> Tensor:
    """log(1 − eˣ) for x ≤ 0, stable everywhere (Mächler 2012): log(−expm1 x) above −ln 2, log1p(−eˣ) below.

    x is clamped to ≤ −machine-epsilon first, so x = 0 (probability 1) gives a large finite value instead of
    −inf, and neither ``torch.where`` branch can put a NaN into the gradient.
    """
    x = x.clamp(max=-torch.finfo(x.dtype).eps)
    return torch.where(x > -math.log(2), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def _ref_output(loss: Tensor, beta: float, lp: SeqLogps) -> Output:
    """DPO-family rewards (TRL): β·(π − ref), summed over the completion."""
    c, r = _logratios(lp)
    return Output(loss, (beta * c).detach(), (beta * r).detach())


# --- objectives ----------------------------------------------------------------------------------------------

@_register("dpo", needs_reference=True, defaults={"beta": 0.1},
           summary="DPO (Rafailov 2023): -log σ(β·Δ), reference-relative sigmoid loss")
def dpo(lp: SeqLogps, *, beta: float) -> Output:
    """DPO, Rafailov et al. 2023, "Direct Preference Optimization", Eq. 7 (TRL ``loss_type="sigmoid"``).

    loss = −log σ(β·Δ),  Δ = (πc − refc) − (πr − refr);  rewards β·(π − ref).

    β: KL strength, typical 0.01–0.5 (default 0.1); larger β keeps the policy closer to the reference.
    """
    c, r = _logratios(lp)
    return _ref_output(-F.logsigmoid(beta * (c - r)), beta, lp)


@_register("cdpo", needs_reference=True, defaults={"beta": 0.1, "label_smoothing": 0.1},
           summary="conservative DPO (Mitchell 2023): DPO with label smoothing ε")
def cdpo(lp: SeqLogps, *, beta: float, label_smoothing: float) -> Output:
    """Conservative DPO, Mitchell 2023, "A note on DPO with noisy preferences": DPO with label smoothing ε.

    loss = −(1−ε)·log σ(β·Δ) − ε·log σ(−β·Δ);  rewards β·(π − ref).  ε = 0 is DPO.

    β as DPO (typical 0.01–0.5, default 0.1). ε = ``label_smoothing``: assumed probability that a label is flipped,
    in [0, 0.5), typical 0.05–0.2 (default 0.1). The loss is minimised at a finite margin βΔ = log((1−ε)/ε).
    (TRL 1.16's ``sigmoid`` ignores ``label_smoothing``; cDPO is no longer a TRL loss type.)
    """
    c, r = _logratios(lp)
    z = beta * (c - r)
    return _ref_output(-(1 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z), beta, lp)


@_register("robust", needs_reference=True, defaults={"beta": 0.1, "label_smoothing": 0.1},
           summary="robust DPO (Chowdhury 2024): unbiased under label-flip rate ε")
def robust(lp: SeqLogps, *, beta: float, label_smoothing: float) -> Output:
    """Robust DPO, Chowdhury et al. 2024, "Provably Robust DPO" (TRL ``loss_type="robust"``).

    loss = (−(1−ε)·log σ(β·Δ) + ε·log σ(−β·Δ)) / (1 − 2ε);  rewards β·(π − ref).  ε = 0 is DPO.

    An unbiased estimate of the clean DPO loss when labels flip with probability ε. Unlike cDPO it is unbounded
    below (for ε > 0 it keeps rewarding larger margins). β as DPO (default 0.1); ε = ``label_smoothing`` in
    [0, 0.5), default 0.1 as the paper recommends.
    """
    c, r = _logratios(lp)
    z = beta * (c - r)
    eps = label_smoothing
    return _ref_output((-(1 - eps) * F.logsigmoid(z) + eps * F.logsigmoid(-z)) / (1 - 2 * eps), beta, lp)


@_register("ipo", needs_reference=True, defaults={"beta": 0.1},
           summary="IPO (Azar 2023): squared loss to margin 1/(2β), length-normalized log-ratios")
def ipo(lp: SeqLogps, *, beta: float) -> Output:
    """IPO, Azar et al. 2023, "A General Theoretical Paradigm to Understand Learning from Human Preferences", Eq. 17.

    loss = ((πc − refc)/|c| − (πr − refr)/|r| − 1/(2β))²;  rewards β·(π − ref), summed (as TRL).

    As TRL's ``ipo``, the log-ratios are divided by completion token counts (TRL confirmed this with the authors);
    β is the paper's τ, typical 0.01–1 (default 0.1). The target length-normalized margin is 1/(2β).
    """
    c, r = _logratios(lp)
    delta = c / lp.chosen_tokens.clamp(min=1) - r / lp.rejected_tokens.clamp(min=1)
    return _ref_output((delta - 1 / (2 * beta)) ** 2, beta, lp)


@_register("hinge", needs_reference=True, defaults={"beta": 0.1},
           summary="SLiC hinge (Zhao 2023): relu(1 - β·Δ)")
def hinge(lp: SeqLogps, *, beta: float) -> Output:
    """SLiC-HF hinge loss, Zhao et al. 2023, on reference-relative log-ratios (TRL ``loss_type="hinge"``).

    loss = max(0, 1 − β·Δ);  rewards β·(π − ref).

    1/β is the margin Δ must reach before a pair stops contributing; typical β 0.01–0.5 (default 0.1).
    """
    c, r = _logratios(lp)
    return _ref_output(torch.relu(1 - beta * (c - r)), beta, lp)


@_register("simpo", needs_reference=False, defaults={"beta": 2.0, "gamma_beta_ratio": 0.5},
           summary="SimPO (Meng 2024): reference-free, -log σ(β·(mc - mr) - γ), length-normalized")
def simpo(lp: SeqLogps, *, beta: float, gamma: float) -> Output:
    """SimPO, Meng, Xia & Chen 2024, "SimPO: Simple Preference Optimization with a Reference-Free Reward", Eq. 6.

    loss = −log σ(β·πc/|c| − β·πr/|r| − γ);  rewards β·π/|π| (β times the mean token log-prob).

    ``gamma`` here is ABSOLUTE, in reward units. The paper's tables (and its code) report the ratio γ/β
    (``gamma_beta_ratio``, typical 0.3–0.8, default 0.5); :func:`resolve_params` converts γ = ratio·β. β typical
    2–10 (default 2.0): an order of magnitude above DPO's because the rewards are per-token averages.
    No NLL term: TRL's CPOTrainer with ``loss_type="simpo"`` keeps ``cpo_alpha=1.0`` by default and so silently
    adds the chosen NLL (only ``loss_type="alphapo"`` sets it to 0); add it here explicitly with ``nll_weight``.
    """
    mc, mr = _mean_logps(lp)
    loss = -F.logsigmoid(beta * (mc - mr) - gamma)
    return Output(loss, (beta * mc).detach(), (beta * mr).detach())


@_register("orpo", needs_reference=False, defaults={"beta": 0.1},
           summary="ORPO (Hong 2024): NLL(chosen) - λ·log σ(log odds ratio), reference-free")
def orpo(lp: SeqLogps, *, beta: float) -> Output:
    """ORPO, Hong, Lee & Thorne 2024, "ORPO: Monolithic Preference Optimization without Reference Model", Eq. 6–7.

    loss = −πc/|c| − λ·log σ(log odds),  log odds = log(pc/(1−pc)) − log(pr/(1−pr)),  p = exp(π/|π|);
    rewards β·π/|π| (as TRL).  log(1 − p) uses :func:`log1mexp`.

    λ is called ``beta`` as in TRL's ORPOConfig; paper and TRL default 0.1, typical 0.05–1.
    Extras: ``nll_loss``, ``log_odds_ratio`` (= log σ(log odds)), ``log_odds_chosen`` (= log odds).
    """
    mc, mr = _mean_logps(lp)
    log_odds = (mc - mr) - (log1mexp(mc) - log1mexp(mr))
    ratio = F.logsigmoid(log_odds)
    loss = -mc - beta * ratio
    return Output(loss, (beta * mc).detach(), (beta * mr).detach(),
                  {"nll_loss": (-mc).detach(), "log_odds_ratio": ratio.detach(), "log_odds_chosen": log_odds.detach()})


@_register("sft", needs_reference=False, defaults={},
           summary="SFT: mean token NLL of the chosen completion only")
def sft(lp: SeqLogps) -> Output:
    """Supervised fine-tuning on the chosen completion: loss = −πc/|c| (mean token NLL, per example).

    No hyperparameters; rewards are the mean token log-probs π/|π| (β-free). Rejected completions are ignored
    by the loss. (TRL's DPO ``loss_type="sft"`` averages over all chosen tokens of the batch instead.)
    """
    mc, mr = _mean_logps(lp)
    return Output(-mc, mc.detach(), mr.detach(), {"nll_loss": (-mc).detach()})


# --- lookup, parameters, the one entry point -----------------------------------------------------------------

def get(name: str) -> Objective:
    """The registered objective called ``name``; InputError with a close match and the choices otherwise."""
    if name in REGISTRY:
        return REGISTRY[name]
    close = difflib.get_close_matches(name, list(REGISTRY), n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    raise InputError(f"unknown objective '{name}'{hint}; choose from {', '.join(REGISTRY)}", field="objective")


def resolve_params(name: str, given: dict) -> dict:
    """Hyperparameters for ``compute``: only those ``name`` takes plus ``nll_weight``, ``None`` -> default.

    SimPO takes its margin as ``gamma`` (absolute) or ``gamma_beta_ratio`` (γ/β, the paper's form), not both, and
    always gets back absolute ``gamma`` = ratio·β. InputError names the field of a value that makes no sense.
    """
    obj = get(name)
    out = {k: float(d if given.get(k) is None else given[k]) for k, d in obj.defaults.items()}
    if name == "simpo":
        gamma, ratio = given.get("gamma"), given.get("gamma_beta_ratio")
        if gamma is not None and ratio is not None:
            raise InputError("give SimPO's margin as gamma OR gamma_beta_ratio, not both", field="gamma")
        ratio = out.pop("gamma_beta_ratio")
        out["gamma"] = float(gamma) if gamma is not None else ratio * out["beta"]
    out["nll_weight"] = float(given.get("nll_weight") or 0.0)
    checks = {"beta": lambda v: v > 0, "label_smoothing": lambda v: 0 <= v < 0.5,
              "gamma": lambda v: v >= 0, "nll_weight": lambda v: v >= 0}
    for key, value in out.items():
        if not (math.isfinite(value) and checks[key](value)):
            raise InputError(f"invalid value {value!r} for objective '{name}'", field=key)
    return out


def compute(name: str, lp: SeqLogps, params: dict) -> Output:
    """Run objective ``name`` with ``params`` (from :func:`resolve_params`), adding RPO-style NLL if asked.

    loss = objective loss + nll_weight·(−πc/|c|); with nll_weight > 0, ``extras["nll_loss"]`` = −πc/|c|.
    """
    obj = get(name)
    kwargs = dict(params)
    weight = kwargs.pop("nll_weight", 0.0)
    if obj.needs_reference and (lp.ref_chosen is None or lp.ref_rejected is None):
        raise ValueError(f"objective '{name}' needs reference log-probs")
    out = obj.fn(lp, **kwargs)
    if weight > 0:
        extra = nll(lp)
        out.loss = out.loss + weight * extra
        out.extras["nll_loss"] = extra.detach()
    return out
