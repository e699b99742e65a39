"""Modifiers: changes to how an objective reads its log-probs, declared once here and applied to every objective
that says it takes them (``@objective(..., modifiers=...)``), never copied into the objectives themselves. What
each does, and the rules in mixtures and for errors: docs/objectives.md, Across objectives. Each has TRL's
``DPOConfig`` name; the papers:

* ``ld_alpha``: LD-DPO, Liu et al. 2024, "Length Desensitization in Direct Preference Optimization", Eq. 9.
* ``use_weighting``: WPO, Zhou et al. 2024, "WPO: Enhancing RLHF with Weighted Preference Optimization", Eq. 2.
* ``f_divergence_type``: f-DPO, Wang et al. 2023, "Beyond Reverse KL", Thm. 1; ρ enters Δ as f'(e^ρ):
  reverse_kl ρ, forward_kl 1 − e^−ρ, js_divergence log 2 + log σ(ρ), alpha_divergence (e^((α−1)ρ) − 1)/(α − 1).

They go into a run's params only when they change anything, so a run without them records what it did before.

    preftune train ... --objective dpo --ld-alpha 0.5 --use-weighting --f-divergence-type js_divergence
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import InputError
from .registry import PREFERENCE_FAMILIES, REGISTRY, Objective, Output, Param, SeqLogps, number, per_token

NEEDS = ("shared", "sumsq")  # per-sequence quantities beyond the sums, computed only on request (logprobs.py)
F_DIVERGENCES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")


@dataclass(frozen=True)
class Modifier:
    """One modifier: the config fields it reads, the params it adds when on, what it needs computed, and how it
    changes a term: ``apply`` the log-probs the objective sees, ``weight`` a per-pair factor on its loss,
    ``extras`` the metrics it overrides (as TRL logs them)."""

    name: str
    fields: tuple[str, ...]
    summary: str
    params: Callable[[dict[str, Any]], dict[str, Any]]
    needs: tuple[str, ...] = ()
    apply: Callable[[SeqLogps, dict[str, Any]], SeqLogps] = lambda lp, p: lp
    weight: Callable[[SeqLogps], Tensor] | None = None
    extras: Callable[[SeqLogps], dict[str, Tensor]] | None = None


def _ld_params(values: dict[str, Any]) -> dict[str, Any]:
    alpha = values.get("ld_alpha")
    if alpha is None:
        return {}
    return {"ld_alpha": number(alpha, Param(None, lambda v: 0 <= v <= 1, "in [0, 1] (1 = no desensitization)"),
                               "ld_alpha")}


def _ld(lp: SeqLogps, p: dict[str, Any]) -> SeqLogps:
    """shared + α·(total − shared) on both sides, for the policy and (if any) the reference."""
    if lp.shared is None or (lp.ref_chosen is not None and lp.ref_shared is None):
        raise ValueError("ld_alpha needs the shared-prefix sums of the policy and the reference (needs 'shared')")
    a = p["ld_alpha"]

    def desensitized(total: Tensor, shared: Tensor) -> Tensor:
        return shared + a * (total - shared)

    ref = {} if lp.ref_chosen is None or lp.ref_shared is None else {
        "ref_chosen": desensitized(lp.ref_chosen, lp.ref_shared[0]),
        "ref_rejected": desensitized(lp.ref_rejected, lp.ref_shared[1])}
    return replace(lp, chosen=desensitized(lp.chosen, lp.shared[0]), rejected=desensitized(lp.rejected, lp.shared[1]),
                   **ref)


def _wpo_weight(lp: SeqLogps) -> Tensor:
    """w_c·w_r, w = exp((π − Σ log Σ_v p_v²)/|y|), without gradient (TRL computes it under no_grad)."""
    if lp.sumsq is None:
        raise ValueError("use_weighting needs the sums of log Σ_v p_v² (needs 'sumsq')")
    c, r = per_token(lp, lp.chosen.detach() - lp.sumsq[0], lp.rejected.detach() - lp.sumsq[1])
    return torch.exp(c) * torch.exp(r)


def _alpha_score(coef: float) -> Callable[[Tensor], Tensor]:
    if abs(coef - 1.0) < 1e-6:  # the limit is log t: reverse KL (as TRL)
        return lambda x: x
    inv = 1.0 / (coef - 1.0)

    def score(x: Tensor) -> Tensor:  # clamped so that exp stays finite in the input's dtype (as TRL)
        top = 11.0 if x.dtype == torch.float16 else 80.0
        return (torch.exp(((coef - 1.0) * x).float().clamp(max=top)) - 1.0).to(x.dtype) * inv
    return score


_SCORES: dict[str, Callable[[float], Callable[[Tensor], Tensor]]] = {
    "forward_kl": lambda coef: lambda x: 1 - torch.exp(-x),
    "js_divergence": lambda coef: lambda x: math.log(2) + F.logsigmoid(x),
    "alpha_divergence": _alpha_score,
}


def _f_params(values: dict[str, Any]) -> dict[str, Any]:
    kind = values.get("f_divergence_type") or F_DIVERGENCES[0]
    if kind not in F_DIVERGENCES:
        raise InputError(f"{kind!r} is not one of {', '.join(F_DIVERGENCES)}", field="f_divergence_type")
    if kind == F_DIVERGENCES[0]:  # reverse KL is the plain log-ratio: nothing changes
        return {}
    out: dict[str, Any] = {"f_divergence_type": kind}
    if kind == "alpha_divergence":
        out["f_alpha_divergence_coef"] = number(values.get("f_alpha_divergence_coef"), Param(None),
                                                "f_alpha_divergence_coef")
    return out


def _f(lp: SeqLogps, p: dict[str, Any]) -> SeqLogps:
    return replace(lp, divergence=_SCORES[p["f_divergence_type"]](p.get("f_alpha_divergence_coef", 1.0)))


MODIFIERS: dict[str, Modifier] = {m.name: m for m in (
    Modifier("ld_alpha", ("ld_alpha",), "LD-DPO length desensitization: shared + α·tail", _ld_params,
             needs=("shared",), apply=_ld,
             extras=lambda lp: {"logps/chosen": lp.chosen.detach(), "logps/rejected": lp.rejected.detach()}),
    Modifier("use_weighting", ("use_weighting",), "WPO: each pair's loss weighted by its policy probability",
             lambda v: {"use_weighting": 1.0} if v.get("use_weighting") else {}, needs=("sumsq",), weight=_wpo_weight),
    Modifier("f_divergence_type", ("f_divergence_type", "f_alpha_divergence_coef"),
             "f-DPO: the divergence that scores each log-ratio", _f_params, apply=_f),
)}
KEYS = frozenset(k for m in MODIFIERS.values() for k in m.fields)  # the params keys modifiers own


def active(params: dict[str, Any]) -> dict[str, Any]:
    """The modifier entries of a run's params (the rest are hyperparameters and nll_weight)."""
    return {k: v for k, v in params.items() if k in KEYS}


def modifier_params(obj: Objective, values: dict[str, Any]) -> dict[str, Any]:
    """The params the modifiers add for ``obj`` from the config ``values`` (field -> value), checked: InputError
    (one line, the field) for a bad value, or for a modifier that ``obj`` (every preference term of a mixture)
    doesn't take."""
    out: dict[str, Any] = {}
    for m in MODIFIERS.values():
        added = m.params(values)
        if not added:
            continue
        terms = [o for _, o in obj.terms] or [obj]
        refuse = [o.name for o in terms if m.name not in o.modifiers
                  and (o is obj or o.family in PREFERENCE_FAMILIES)]
        if refuse or not any(m.name in o.modifiers for o in terms):
            takes = ", ".join(o.name for o in REGISTRY.values() if m.name in o.modifiers)
            raise InputError(f"'{(refuse or [obj.name])[0]}' does not take {m.name} ({m.summary}); objectives "
                             f"that do: {takes}", field=m.name)
        out.update(added)
    return out


def needs(obj: Objective, params: dict[str, Any]) -> frozenset[str]:
    """What a run of ``obj`` with ``params`` needs computed beyond the sums: its (terms') own needs and those of
    the modifiers that are on and that it takes."""
    terms = [o for _, o in obj.terms] or [obj]
    on = [m for m in MODIFIERS.values() if set(m.fields) & set(params)]
    return frozenset(n for o in terms for n in (*o.needs, *(n for m in on if m.name in o.modifiers for n in m.needs)))


def run_term(obj: Objective, lp: SeqLogps, hyper: dict[str, Any], mods: dict[str, Any]) -> Output:
    """One registry entry on ``lp`` with its hyperparameters and the modifiers it takes: the weight from the
    plain log-probs (TRL: WPO reads the raw per-token log-probs), then each modifier's view, then the loss."""
    taken = [m for m in MODIFIERS.values() if m.name in obj.modifiers and set(m.fields) & set(mods)]
    weight = next((m.weight(lp) for m in taken if m.weight), None)
    for m in taken:
        lp = m.apply(lp, mods)
    out = obj.fn(lp, **hyper)
    if weight is not None:
        out.loss = out.loss * weight
    for m in taken:
        out.extras = {**(m.extras(lp) if m.extras else {}), **out.extras}
    return out
