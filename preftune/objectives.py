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

Each objective declares itself (``@objective``): its loss, whether it needs a reference, its family, its
hyperparameter schema. Nothing outside this registry branches on an objective's name.
"""

from __future__ import annotations

import importlib
import math
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from .errors import InputError, did_you_mean


@dataclass(frozen=True)
class SeqLogps:
    """One batch of pairs; every field is a (B,) tensor.

    For an unpaired objective (``data="unpaired"``, KTO) each row is one completion with its ``label`` (True =
    desirable): ``chosen`` is the completion and ``rejected`` the mismatched KL completion (another row's
    completion under this row's prompt). Held-out evaluation always hands pairs, with ``label`` None.
    """

    chosen: Tensor
    rejected: Tensor
    chosen_tokens: Tensor
    rejected_tokens: Tensor
    ref_chosen: Tensor | None = None
    ref_rejected: Tensor | None = None
    label: Tensor | None = None


@dataclass
class Output:
    """Per-example loss (differentiable) and detached per-example rewards and extras, all (B,)."""

    loss: Tensor
    chosen_rewards: Tensor
    rejected_rewards: Tensor
    extras: dict[str, Tensor] = field(default_factory=dict)


@dataclass(frozen=True)
class Param:
    """One hyperparameter: its default, the rule a value must satisfy, and one line of help.

    ``default`` None means "derived" (the objective computes it from the others, e.g. SimPO's absolute γ).
    """

    default: float | None
    check: Callable[[float], bool] = lambda v: True
    rule: str = "any number"
    help: str = ""


@dataclass(frozen=True)
class Objective:
    """A registry entry: everything the engine, the matrix, ``decide`` and ``report`` need to know.

    family: ``reference-relative`` (judged against a frozen reference), ``reference-free``, or ``likelihood``
    (SFT-like, not a preference objective). ``fallback``: the objective ``decide`` recommends when every judged
    objective is numerically unstable (ORPO). ``exclusive``: groups of parameters of which a run may give one.
    ``data``: ``paired`` (prompt/chosen/rejected rows) or ``unpaired`` (prompt/completion/label rows; paired data
    is unpaired for it). ``min_batch_size``: the smallest micro-batch it can train on. ``advice``: warnings about
    the training data, from its counts (``{"desirable": n, "undesirable": n}``) and the hyperparameters.
    """

    name: str
    fn: Callable[..., Output]
    needs_reference: bool
    family: str
    params: dict[str, Param]
    summary: str
    fallback: bool = False
    exclusive: tuple[tuple[str, ...], ...] = ()
    data: str = "paired"
    min_batch_size: int = 1
    advice: Callable[[dict[str, int], dict[str, float]], list[str]] | None = None

    @property
    def spec(self) -> str:
        """The name that finds it again in a fresh process: ``module:name`` for an objective registered outside
        preftune (so a --parallel child or a saved config.yaml imports its module), else the name."""
        module = self.fn.__module__
        return self.name if module == __name__ else f"{module}:{self.name}"

    @property
    def judged(self) -> bool:
        """Whether ``decide`` judges this objective's stability for the fallback rule (preference objectives
        other than the fallback itself)."""
        return self.family in PREFERENCE_FAMILIES and not self.fallback


FAMILIES = ("reference-relative", "reference-free", "likelihood")
DATA_KINDS = ("paired", "unpaired")
PREFERENCE_FAMILIES = ("reference-relative", "reference-free")
REGISTRY: dict[str, Objective] = {}
ObjectiveOutput = Output  # the public name (``preftune.ObjectiveOutput``)


def objective(name: str, *, needs_reference: bool, family: str, params: dict[str, float | Param] | None = None,
              summary: str = "", fallback: bool = False, exclusive: tuple[tuple[str, ...], ...] = (),
              data: str = "paired", min_batch_size: int = 1,
              advice: Callable[[dict[str, int], dict[str, float]], list[str]] | None = None,
              ) -> Callable[[Callable[..., Output]], Callable[..., Output]]:
    """Register an objective; public as ``preftune.objective``. ``params`` maps each hyperparameter to its
    default (a number) or a :class:`Param`. The function gets a :class:`SeqLogps` and the hyperparameters as
    keywords, and returns an :class:`Output` (``preftune.ObjectiveOutput``)::

        @preftune.objective("slic", needs_reference=False, family="reference-free", params={"beta": 1.0})
        def slic(lp, beta): ...

    Then ``preftune train --objective mymodule:slic`` imports ``mymodule`` and runs it.
    """
    for what, value, allowed in (("family", family, FAMILIES), ("data", data, DATA_KINDS)):
        if value not in allowed:
            raise ValueError(f"{what} must be one of {', '.join(allowed)}, got {value!r}")
    schema = {k: v if isinstance(v, Param) else Param(float(v)) for k, v in (params or {}).items()}

    def add(fn: Callable[..., Output]) -> Callable[..., Output]:
        doc = (fn.__doc__ or "").strip().splitlines()
        REGISTRY[name] = Objective(name, fn, needs_reference, family, schema, summary or (doc[0] if doc else name),
                                   fallback, exclusive, data, min_batch_size, advice)
        return fn
    return add


_beta = Param(0.1, lambda v: v > 0, "> 0", "preference strength β (KL strength for reference-relative losses)")
_eps = Param(0.1, lambda v: 0 <= v < 0.5, "in [0, 0.5)", "assumed label-flip probability ε")


# --- shared pieces -------------------------------------------------------------------------------------------

def logratios(lp: SeqLogps) -> tuple[Tensor, Tensor]:
    """(πc − refc, πr − refr)."""
    return lp.chosen - lp.ref_chosen, lp.rejected - lp.ref_rejected


def delta(lp: SeqLogps) -> Tensor:
    """Δ = (πc − refc) − (πr − refr), the reference-relative margin."""
    c, r = logratios(lp)
    return c - r


def mean_logps(lp: SeqLogps) -> tuple[Tensor, Tensor]:
    """(πc/|c|, πr/|r|), counts clamped to at least 1 as TRL does."""
    return lp.chosen / lp.chosen_tokens.clamp(min=1), lp.rejected / lp.rejected_tokens.clamp(min=1)


def log1mexp(x: Tensor) -> Tensor:
    """log(1 − eˣ) for x ≤ 0, stable everywhere (Mächler 2012): log(−expm1 x) above −ln 2, log1p(−eˣ) below.

    x is clamped to ≤ −machine-epsilon first, so x = 0 (probability 1) gives a large finite value instead of
    −inf, and neither ``torch.where`` branch can put a NaN into the gradient.
    """
    x = x.clamp(max=-torch.finfo(x.dtype).eps)
    return torch.where(x > -math.log(2), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def _ref_output(loss: Tensor, beta: float, lp: SeqLogps) -> Output:
    """DPO-family rewards (TRL): β·(π − ref), summed over the completion."""
    c, r = logratios(lp)
    return Output(loss, (beta * c).detach(), (beta * r).detach())


# --- objectives ----------------------------------------------------------------------------------------------

@objective("dpo", needs_reference=True, family="reference-relative", params={"beta": _beta},
           summary="DPO (Rafailov 2023): -log σ(β·Δ), reference-relative sigmoid loss")
def dpo(lp: SeqLogps, *, beta: float) -> Output:
    """DPO, Rafailov et al. 2023, "Direct Preference Optimization", Eq. 7 (TRL ``loss_type="sigmoid"``).

    loss = −log σ(β·Δ),  Δ = (πc − refc) − (πr − refr);  rewards β·(π − ref).

    β: KL strength, typical 0.01–0.5 (default 0.1); larger β keeps the policy closer to the reference.
    """
    return _ref_output(-F.logsigmoid(beta * delta(lp)), beta, lp)


@objective("cdpo", needs_reference=True, family="reference-relative",
           params={"beta": _beta, "label_smoothing": _eps},
           summary="conservative DPO (Mitchell 2023): DPO with label smoothing ε")
def cdpo(lp: SeqLogps, *, beta: float, label_smoothing: float) -> Output:
    """Conservative DPO, Mitchell 2023, "A note on DPO with noisy preferences": DPO with label smoothing ε.

    loss = −(1−ε)·log σ(β·Δ) − ε·log σ(−β·Δ);  rewards β·(π − ref).  ε = 0 is DPO.

    β as DPO (typical 0.01–0.5, default 0.1). ε = ``label_smoothing``: assumed probability that a label is flipped,
    in [0, 0.5), typical 0.05–0.2 (default 0.1). The loss is minimised at a finite margin βΔ = log((1−ε)/ε).
    (TRL 1.16's ``sigmoid`` ignores ``label_smoothing``; cDPO is no longer a TRL loss type.)
    """
    z = beta * delta(lp)
    return _ref_output(-(1 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z), beta, lp)


@objective("robust", needs_reference=True, family="reference-relative",
           params={"beta": _beta, "label_smoothing": _eps},
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
    return _ref_output((-(1 - eps) * F.logsigmoid(z) + eps * F.logsigmoid(-z)) / (1 - 2 * eps), beta, lp)


@objective("ipo", needs_reference=True, family="reference-relative", params={"beta": _beta},
           summary="IPO (Azar 2023): squared loss to margin 1/(2β), length-normalized log-ratios")
def ipo(lp: SeqLogps, *, beta: float) -> Output:
    """IPO, Azar et al. 2023, "A General Theoretical Paradigm to Understand Learning from Human Preferences", Eq. 17.

    loss = ((πc − refc)/|c| − (πr − refr)/|r| − 1/(2β))²;  rewards β·(π − ref), summed (as TRL).

    As TRL's ``ipo``, the log-ratios are divided by completion token counts (TRL confirmed this with the authors);
    β is the paper's τ, typical 0.01–1 (default 0.1). The target length-normalized margin is 1/(2β).
    """
    c, r = logratios(lp)
    delta = c / lp.chosen_tokens.clamp(min=1) - r / lp.rejected_tokens.clamp(min=1)
    return _ref_output((delta - 1 / (2 * beta)) ** 2, beta, lp)


@objective("hinge", needs_reference=True, family="reference-relative", params={"beta": _beta},
           summary="SLiC hinge (Zhao 2023): relu(1 - β·Δ)")
def hinge(lp: SeqLogps, *, beta: float) -> Output:
    """SLiC-HF hinge loss, Zhao et al. 2023, on reference-relative log-ratios (TRL ``loss_type="hinge"``).

    loss = max(0, 1 − β·Δ);  rewards β·(π − ref).

    1/β is the margin Δ must reach before a pair stops contributing; typical β 0.01–0.5 (default 0.1).
    """
    return _ref_output(torch.relu(1 - beta * delta(lp)), beta, lp)


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
           params={"beta": _beta,
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
        return _ref_output(loss, beta, lp)
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


# --- lookup, parameters, the one entry point -----------------------------------------------------------------

def get(name: str) -> Objective:
    """The objective ``name``, or ``module:name`` (imports ``module`` from the working directory or PYTHONPATH,
    which registers it). InputError with a close match and the choices otherwise."""
    if name in REGISTRY:
        return REGISTRY[name]
    module, sep, short = name.rpartition(":")
    if sep:
        if not module or not short:
            raise InputError(f"expected MODULE:NAME, got '{name}'", field="objective")
        if os.getcwd() not in sys.path and "" not in sys.path:
            sys.path.insert(0, os.getcwd())  # the console script's sys.path[0] is its bin folder, not the cwd
        try:
            importlib.import_module(module)
        except Exception as e:  # a user's module can raise anything while importing
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise InputError(f"cannot import objective module '{module}': {type(e).__name__}: {first}",
                             field="objective") from None
        if short in REGISTRY:
            return REGISTRY[short]
        raise InputError(f"module '{module}' registers no objective '{short}' (use @preftune.objective)",
                         field="objective")
    raise InputError(f"unknown objective '{name}'{did_you_mean(name, list(REGISTRY))}; choose from "
                     f"{', '.join(REGISTRY)}", field="objective")


def fallback() -> str:
    """The name of the objective ``decide`` falls back to (declared ``fallback=True``: ORPO)."""
    return next(o.name for o in REGISTRY.values() if o.fallback)


def resolve_params(name: str, given: dict[str, Any], *, where: str = "") -> dict[str, float]:
    """The hyperparameters objective ``name`` runs with: its schema's defaults, overridden by ``given``
    (None = default), checked in one place, plus ``nll_weight``. Derived parameters (default None) appear
    only when given. InputError names the field (``objectives.<name>.<key>``) and suggests a close name.

        resolve_params("simpo", {"beta": 2.5})   # {"beta": 2.5, "gamma_beta_ratio": 0.5, "nll_weight": 0.0}
    """
    obj = get(name)
    given = dict(given)
    weight = given.pop("nll_weight", None)
    out: dict[str, float] = {}
    for key in given:
        if key not in obj.params:
            raise InputError(f"'{obj.name}' has no hyperparameter '{key}'{did_you_mean(key, list(obj.params))}; "
                             f"it takes: {', '.join(obj.params) or 'none'}", path=where or None,
                             field=f"objectives.{obj.name}.{key}")
    unused: set[str] = set()  # the defaulted members of a group one of whose members was given
    for group in obj.exclusive:
        both = [k for k in group if given.get(k) is not None]
        if len(both) > 1:
            raise InputError(f"give {' OR '.join(group)}, not both", path=where or None,
                             field=f"objectives.{obj.name}.{both[0]}")
        unused |= set(group) - set(both) if both else set()
    for key, p in obj.params.items():
        value = given.get(key)
        if value is None:
            if p.default is None or key in unused:
                continue
            value = p.default
        out[key] = _number(value, p, obj.name, key, where)
    out["nll_weight"] = _number(weight or 0.0, Param(0.0, lambda v: v >= 0, ">= 0"), obj.name, "nll_weight", where)
    return out


def _number(value: Any, p: Param, name: str, key: str, where: str) -> float:
    try:
        if isinstance(value, bool):
            raise ValueError
        x = float(value)
    except (TypeError, ValueError):
        raise InputError(f"{value!r} is not a number", path=where or None, field=f"objectives.{name}.{key}") from None
    if not (math.isfinite(x) and p.check(x)):
        raise InputError(f"invalid value {value!r} for '{name}': must be {p.rule}", path=where or None,
                         field=f"objectives.{name}.{key}")
    return x


def compute(name: str, lp: SeqLogps, params: dict) -> Output:
    """Run objective ``name`` with ``params`` (from :func:`resolve_params`), adding RPO-style NLL if asked.

    loss = objective loss + nll_weight·(−πc/|c|); with nll_weight > 0, ``extras["nll_loss"]`` = −πc/|c|.
    """
    obj = get(name)
    weight = params.get("nll_weight", 0.0)
    if obj.needs_reference and (lp.ref_chosen is None or lp.ref_rejected is None):
        raise ValueError(f"objective '{name}' needs reference log-probs")
    out = obj.fn(lp, **{k: v for k, v in params.items() if k != "nll_weight"})
    if weight > 0:
        extra = -mean_logps(lp)[0]
        out.loss = out.loss + weight * extra
        out.extras["nll_loss"] = extra.detach()
    return out
