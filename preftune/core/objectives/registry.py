"""Preference objectives as pure functions of per-sequence log-prob sums, one registry, no ``if`` chain.

Every objective maps a :class:`SeqLogps` batch (summed completion log-probs under the policy, completion token
counts and, where needed, the reference model's summed log-probs) to an :class:`Output`: a per-example loss and
TRL's per-example rewards. Notation used in the docstrings, per pair::

    πc, πr     summed completion log-probs of chosen / rejected under the policy
    refc, refr the same under the frozen reference
    |c|, |r|   completion token counts
    ρc, ρr     πc − refc, πr − refr                             log-ratios against the reference
    Δ          f(ρc) − f(ρr)                                    reference-relative margin; f: the f-divergence's
               score of a log-ratio, the identity (reverse KL) unless f_divergence_type says otherwise
    mc, mr     πc/|c|, πr/|r|                                   mean token log-probs
    σ          the logistic function

    compute("simpo", lp, resolve_params("simpo", {"beta": 2.0, "gamma_beta_ratio": 0.5}))

Each objective declares itself (``@objective``): its loss, whether it needs a reference, its family, its
hyperparameter schema, the modifiers it takes (modifiers.py) and, where TRL has it, its ``DPOConfig.loss_type``.
A weighted sum of objectives ("0.8*dpo + 0.2*bco_pair + 1*sft", mixture.py) is an Objective too, made on demand
by :func:`get`. Nothing outside this registry branches on an objective's name.
"""

from __future__ import annotations

import importlib
import math
import os
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ..errors import InputError, did_you_mean


@dataclass(frozen=True)
class SeqLogps:
    """One batch of pairs; every tensor is (B,).

    For an unpaired objective (``data="unpaired"``, KTO) each row is one completion with its ``label`` (True =
    desirable): ``chosen`` is the completion and ``rejected`` the mismatched KL completion (another row's
    completion under this row's prompt). Held-out evaluation always hands pairs, with ``label`` None.

    What a modifier needs beyond the sums (``modeling/logprobs.py`` computes them only when asked):
    ``shared`` / ``ref_shared`` the (chosen, rejected) sums over each pair's first min(|c|, |r|) completion tokens
    (LD-DPO), ``sumsq`` the (chosen, rejected) sums of log Σ_v p_v² over completion tokens, no gradient (WPO).
    ``divergence`` is the f-divergence's score of a log-ratio (None: the identity, reverse KL).
    """

    chosen: Tensor
    rejected: Tensor
    chosen_tokens: Tensor
    rejected_tokens: Tensor
    ref_chosen: Tensor | None = None
    ref_rejected: Tensor | None = None
    label: Tensor | None = None
    shared: tuple[Tensor, Tensor] | None = None
    ref_shared: tuple[Tensor, Tensor] | None = None
    sumsq: tuple[Tensor, Tensor] | None = None
    divergence: Callable[[Tensor], Tensor] | None = None

    @classmethod
    def of(cls, logps: Tensor, counts: Tensor, ref: Tensor | None = None, label: Tensor | None = None,
           more: dict[str, Tensor] | None = None) -> SeqLogps:
        """From (B, 2) columns (chosen, rejected): log-probs, counts, reference; ``more`` the (B, 2) extras
        (``shared``, ``ref_shared``, ``sumsq``) that were computed."""
        def pair(t: Tensor | None) -> tuple[Tensor, Tensor] | None:
            return None if t is None else (t[:, 0], t[:, 1])

        more = more or {}
        return cls(*pair(logps), *pair(counts), *(pair(ref) or (None, None)), label,
                   *(pair(more.get(k)) for k in ("shared", "ref_shared", "sumsq")))


@dataclass
class Output:
    """Per-example loss (differentiable) and detached per-example rewards and extras, all (B,)."""

    loss: Tensor
    chosen_rewards: Tensor
    rejected_rewards: Tensor
    extras: dict[str, Tensor] = field(default_factory=dict)

    @staticmethod
    def concat(outs: list[Output], fn: Callable[[Tensor], Tensor] = lambda t: t) -> Output:
        """Several micro-batches' outputs as one: each tensor concatenated, then passed through ``fn``."""
        def cat(tensors: Iterable[Tensor]) -> Tensor:
            return fn(torch.cat(list(tensors)))

        return Output(cat(o.loss for o in outs), cat(o.chosen_rewards for o in outs),
                      cat(o.rejected_rewards for o in outs), {k: cat(o.extras[k] for o in outs) for k in outs[0].extras})


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
    ``modifiers``: the modifiers it takes (modifiers.py: ``ld_alpha``, ``use_weighting``, ``f_divergence_type``).
    ``needs``: per-sequence quantities beyond the sums that it reads (``shared``, ``sumsq``: see SeqLogps).
    ``trl_loss_type``: its name in TRL's ``DPOConfig.loss_type``, if TRL's DPOTrainer has it (it names the
    per-term loss a mixture logs). ``terms``: a mixture's (weight, objective) terms; empty for an entry.
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
    modifiers: frozenset[str] = frozenset()
    needs: tuple[str, ...] = ()
    trl_loss_type: str | None = None
    terms: tuple[tuple[float, Objective], ...] = ()

    @property
    def spec(self) -> str:
        """The name that finds it again in a fresh process: ``module:name`` for an objective registered outside
        preftune (so a --parallel child or a saved config.yaml imports its module), else the name; a mixture
        spells its terms so."""
        if self.terms:
            return "+".join(f"{weight_text(w)}*{o.spec}" for w, o in self.terms)
        module = self.fn.__module__
        return self.name if module.startswith(f"{__package__}.") else f"{module}:{self.name}"

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
              modifiers: Iterable[str] = (), needs: Iterable[str] = (), trl_loss_type: str | None = None,
              ) -> Callable[[Callable[..., Output]], Callable[..., Output]]:
    """Register an objective; public as ``preftune.objective``. The function gets a :class:`SeqLogps` and the
    hyperparameters as keywords, and returns an :class:`Output`. An example, and what ``params``, ``modifiers``
    and ``needs`` say: docs/api.md, Your own objective.

        preftune train --objective mymodule:slic ...      # imports mymodule, which registers slic
    """
    from .modifiers import MODIFIERS, NEEDS

    modifiers, needs = tuple(modifiers), tuple(needs)
    for what, value, allowed in (("family", family, FAMILIES), ("data", data, DATA_KINDS)):
        if value not in allowed:
            raise ValueError(f"{what} must be one of {', '.join(allowed)}, got {value!r}")
    for what, values, allowed in (("modifiers", modifiers, tuple(MODIFIERS)), ("needs", needs, NEEDS)):
        if set(values) - set(allowed):
            raise ValueError(f"{what} must be among {', '.join(allowed)}, got {sorted(set(values) - set(allowed))}")
    schema = {k: v if isinstance(v, Param) else Param(float(v)) for k, v in (params or {}).items()}

    def add(fn: Callable[..., Output]) -> Callable[..., Output]:
        doc = (fn.__doc__ or "").strip().splitlines()
        REGISTRY[name] = Objective(name, fn, needs_reference, family, schema, summary or (doc[0] if doc else name),
                                   fallback, exclusive, data, min_batch_size, advice, frozenset(modifiers),
                                   tuple(needs), trl_loss_type)
        return fn
    return add


def weight_text(w: float) -> str:
    """A mixture weight as the canonical name spells it: the shortest exact form, ``1`` rather than ``1.0``."""
    return repr(float(w)).removesuffix(".0")


BETA = Param(0.1, lambda v: v > 0, "> 0", "preference strength β (KL strength for reference-relative losses)")
EPS = Param(0.1, lambda v: 0 <= v < 0.5, "in [0, 0.5)", "assumed label-flip probability ε")


# --- shared pieces -------------------------------------------------------------------------------------------

def logratios(lp: SeqLogps) -> tuple[Tensor, Tensor]:
    """(ρc, ρr) = (πc − refc, πr − refr)."""
    return lp.chosen - lp.ref_chosen, lp.rejected - lp.ref_rejected


def scores(lp: SeqLogps) -> tuple[Tensor, Tensor]:
    """(f(ρc), f(ρr)): the log-ratios as the f-divergence scores them (the identity for reverse KL)."""
    c, r = logratios(lp)
    return (c, r) if lp.divergence is None else (lp.divergence(c), lp.divergence(r))


def delta(lp: SeqLogps) -> Tensor:
    """Δ = f(ρc) − f(ρr), the reference-relative margin (ρc − ρr under reverse KL)."""
    c, r = scores(lp)
    return c - r


def mean_logps(lp: SeqLogps) -> tuple[Tensor, Tensor]:
    """(πc/|c|, πr/|r|), counts clamped to at least 1 as TRL does."""
    return lp.chosen / lp.chosen_tokens.clamp(min=1), lp.rejected / lp.rejected_tokens.clamp(min=1)


def per_token(lp: SeqLogps, c: Tensor, r: Tensor) -> tuple[Tensor, Tensor]:
    """(c/|c|, r/|r|), counts clamped to at least 1 as TRL does."""
    return c / lp.chosen_tokens.clamp(min=1), r / lp.rejected_tokens.clamp(min=1)


def log1mexp(x: Tensor) -> Tensor:
    """log(1 − eˣ) for x ≤ 0, stable everywhere (Mächler 2012): log(−expm1 x) above −ln 2, log1p(−eˣ) below.

    x is clamped to ≤ −machine-epsilon first, so x = 0 (probability 1) gives a large finite value instead of
    −inf, and neither ``torch.where`` branch can put a NaN into the gradient.
    """
    x = x.clamp(max=-torch.finfo(x.dtype).eps)
    return torch.where(x > -math.log(2), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def ref_output(loss: Tensor, beta: float, lp: SeqLogps) -> Output:
    """DPO-family rewards (TRL): β·(π − ref), summed over the completion."""
    c, r = logratios(lp)
    return Output(loss, (beta * c).detach(), (beta * r).detach())


# --- lookup and parameters -----------------------------------------------------------------------------------

def get(name: str) -> Objective:
    """The objective ``name``, or ``module:name`` (imports ``module`` from the working directory or PYTHONPATH,
    which registers it), or a mixture such as ``0.8*dpo + 0.2*bco_pair + 1*sft`` (mixture.py). InputError with
    a close match and the choices otherwise."""
    if name in REGISTRY:
        return REGISTRY[name]
    from .mixture import is_mixture, mixture

    if is_mixture(name):
        return mixture(name)
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
    A mixture has no hyperparameters of its own: each term's come from its own entry (``run_params``).

        resolve_params("simpo", {"beta": 2.5})   # {"beta": 2.5, "gamma_beta_ratio": 0.5, "nll_weight": 0.0}
    """
    obj = get(name)
    given = dict(given)
    weight = given.pop("nll_weight", None)
    out: dict[str, float] = {}
    for key in given:
        if key not in obj.params:
            takes = f"it takes: {', '.join(obj.params) or 'none'}" if not obj.terms else \
                f"set it in a term's own entry (objectives: {{{obj.terms[0][1].name}: {{{key}: ...}}}})"
            raise InputError(f"'{obj.name}' has no hyperparameter '{key}'{did_you_mean(key, list(obj.params))}; "
                             f"{takes}", path=where or None, field=f"objectives.{obj.name}.{key}")
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
        out[key] = number(value, p, f"objectives.{obj.name}.{key}", obj.name, where)
    out["nll_weight"] = number(weight or 0.0, Param(0.0, lambda v: v >= 0, ">= 0"), f"objectives.{obj.name}.nll_weight",
                               obj.name, where)
    return out


def number(value: Any, p: Param, field: str, name: str = "", where: str = "") -> float:
    """``value`` as a finite float that satisfies ``p``; InputError naming ``field`` otherwise."""
    try:
        if isinstance(value, bool):
            raise ValueError
        x = float(value)
    except (TypeError, ValueError):
        raise InputError(f"{value!r} is not a number", path=where or None, field=field) from None
    if not (math.isfinite(x) and p.check(x)):
        whose = f" for '{name}'" if name else ""
        raise InputError(f"invalid value {value!r}{whose}: must be {p.rule}", path=where or None, field=field)
    return x
