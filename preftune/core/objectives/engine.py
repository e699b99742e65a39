"""The registry's entry points for the rest of preftune: a run's params from its config, what it needs computed,
and its loss. One path for an entry, a ``module:name`` objective and a mixture alike.

    params = run_params("0.8*dpo+0.2*bco_pair+1*sft", {"dpo": {"beta": 0.2}}, modifiers={"ld_alpha": 0.5})
    out = compute("0.8*dpo+0.2*bco_pair+1*sft", lp, params)     # lp: a SeqLogps with what needs() asked for
"""

from __future__ import annotations

from typing import Any

from ..errors import InputError, did_you_mean
from .mixture import term_params
from .modifiers import KEYS, active, modifier_params, run_term
from .modifiers import needs as modifier_needs
from .registry import Objective, Output, Param, SeqLogps, get, mean_logps, number, resolve_params


def _entry(entries: dict[str, dict[str, Any]], obj: Objective) -> dict[str, Any]:
    return entries.get(obj.spec, entries.get(obj.name, {}))


def run_params(name: str, entries: dict[str, dict[str, Any]], *, nll_weight: float = 0.0,
               modifiers: dict[str, Any] | None = None, where: str = "") -> dict[str, Any]:
    """The params a run of objective ``name`` hands its loss: each objective's hyperparameters from its entry in
    ``entries`` (``objectives:`` of the config) over its schema's defaults (a mixture's spelled
    ``<term>.<key>``), ``nll_weight``, and the modifiers that are on (``modifiers``: config field -> value).
    Every value is checked here: InputError names the field.

        run_params("dpo", {})          # {"beta": 0.1, "nll_weight": 0.0}
    """
    obj = get(name)
    nll = number(nll_weight, Param(0.0, lambda v: v >= 0, ">= 0"), "nll_weight", where=where)
    if not obj.terms:
        out = resolve_params(obj.name, {"nll_weight": nll, **_entry(entries, obj)}, where=where)
    else:
        out = {}
        for _, term in obj.terms:
            own = resolve_params(term.name, _entry(entries, term), where=where)
            out.update({f"{term.name}.{k}": v for k, v in own.items() if k != "nll_weight"})
        out["nll_weight"] = nll
    return {**out, **modifier_params(obj, modifiers or {})}


def needs(name: str, params: dict[str, Any]) -> frozenset[str]:
    """What a run of ``name`` with ``params`` reads beyond the summed log-probs (``shared``, ``sumsq``): the
    training step asks ``batch_logps`` for exactly these, and the reference pass for its part of them."""
    return modifier_needs(get(name), params)


def entries_of(name: str, params: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The ``objectives:`` entries that give back ``params`` (a saved config.yaml holds these): one per
    objective, a mixture's one per term, without nll_weight and the modifiers (config fields of their own)."""
    obj = get(name)
    if not obj.terms:
        return {obj.spec: {k: v for k, v in params.items() if k != "nll_weight" and k not in KEYS}}
    return {term.spec: term_params(params, term) for _, term in obj.terms}


def spread(name: str, values: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Hyperparameter values given for the objective being run (``--beta``, a ``--grid beta=...`` factor) as
    entries: all of them for an entry; for a mixture each goes to every term that takes it, and one that no
    term takes is an InputError."""
    obj = get(name)
    if not obj.terms or not values:
        return {obj.spec: dict(values)} if values else {}
    for key in values:
        if not any(key in term.params for _, term in obj.terms):
            known = sorted({k for _, t in obj.terms for k in t.params})
            raise InputError(f"no term of '{obj.name}' takes '{key}'{did_you_mean(key, known)}; its terms take: "
                             f"{', '.join(known) or 'none'}", field=f"objectives.{obj.name}.{key}")
    return {term.spec: {k: v for k, v in values.items() if k in term.params} for _, term in obj.terms
            if any(k in term.params for k in values)}


def canonical(name: str) -> str:
    """How a run records objective ``name``: a mixture in its canonical spelling (no spaces, weights as
    ``repr``: ``0.8*dpo+0.2*bco_pair+1*sft``), anything else as given."""
    obj = get(name)
    return obj.spec if obj.terms else name


def compute(name: str, lp: SeqLogps, params: dict[str, Any]) -> Output:
    """Run objective ``name`` with ``params`` (from :func:`run_params`), its modifiers applied, adding
    RPO-style NLL if asked.

    loss = objective loss + nll_weight·(−πc/|c|); with nll_weight > 0, ``extras["nll_loss"]`` = −πc/|c|.
    """
    obj = get(name)
    weight = params.get("nll_weight", 0.0)
    if obj.needs_reference and (lp.ref_chosen is None or lp.ref_rejected is None):
        raise ValueError(f"objective '{name}' needs reference log-probs")
    hyper = {k: v for k, v in params.items() if k != "nll_weight" and k not in KEYS}
    out = obj.fn(lp, **hyper, **active(params)) if obj.terms else run_term(obj, lp, hyper, active(params))
    if weight > 0:
        extra = -mean_logps(lp)[0]
        out.loss = out.loss + weight * extra
        out.extras["nll_loss"] = extra.detach()
    return out
