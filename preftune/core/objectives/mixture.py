"""Mixtures: a weighted sum of objectives, written ``0.8*dpo + 0.2*bco_pair + 1*sft`` wherever an objective name
goes, as TRL's ``loss_type`` list with ``loss_weights``; what one costs, needs, logs and refuses:
docs/objectives.md, Across objectives.

``get("0.8*dpo+0.2*bco_pair+1*sft")`` returns an :class:`Objective` describing the mixture, so nothing outside
the registry knows mixtures exist. Beyond that page: its family is reference-relative if any term is, else
reference-free if any term is a preference objective, else likelihood; its extras are its terms' (the first
term's win a clash); a weight left out is ``1``, and a term appears once.
"""

from __future__ import annotations

import math
import re
from functools import partial
from typing import Any

from torch import Tensor

from ..errors import InputError
from .modifiers import active, run_term
from .registry import PREFERENCE_FAMILIES, Objective, Output, SeqLogps, get, weight_text

_TERM = re.compile(r"\s*(?:(?P<weight>[^*]*?)\s*\*)?\s*(?P<name>[^\s*]+)\s*")
_MADE: dict[str, Objective] = {}  # mixtures already parsed, by the text they were given as


def is_mixture(name: str) -> bool:
    return "+" in name or "*" in name


def term_params(params: dict[str, Any], obj: Objective) -> dict[str, Any]:
    """A term's hyperparameters out of a mixture's params, where they are spelled ``<term>.<key>``."""
    prefix = f"{obj.name}."
    return {k[len(prefix):]: v for k, v in params.items() if k.startswith(prefix)}


def mixture(text: str) -> Objective:
    """The Objective for mixture ``text``; InputError (field ``objective``) for an unknown term (with a close
    match), a bad weight, a repeated term, or paired and unpaired terms together."""
    if text in _MADE:
        return _MADE[text]
    terms: list[tuple[float, Objective]] = []
    for part in text.split("+"):
        m = _TERM.fullmatch(part)
        if not m:
            raise InputError(f"cannot read {part.strip()!r} in mixture '{text}': write WEIGHT*OBJECTIVE terms joined "
                             "by + (0.8*dpo + 0.2*bco_pair + 1*sft)", field="objective")
        obj = get(m["name"])
        terms.append((_weight(m["weight"], obj.name, text), obj))
    names = [o.name for _, o in terms]
    if len(set(names)) < len(names):
        twice = next(n for n in names if names.count(n) > 1)
        raise InputError(f"'{twice}' appears twice in mixture '{text}': give it one weight", field="objective")
    kinds = {o.data for _, o in terms}
    if len(kinds) > 1:
        by = "; ".join(f"{k}: " + ", ".join(o.name for _, o in terms if o.data == k) for k in sorted(kinds))
        raise InputError(f"mixture '{text}' mixes data kinds ({by}): its terms must all train on pairs or all on "
                         "unpaired rows", field="objective")
    _MADE[text] = _describe(tuple(terms))
    return _MADE[text]


def _weight(text: str | None, name: str, whole: str) -> float:
    if text is None:
        return 1.0
    try:
        w = float(text)
    except ValueError:
        raise InputError(f"weight {text.strip()!r} of '{name}' in mixture '{whole}' is not a number",
                         field="objective") from None
    if not math.isfinite(w) or w < 0:
        raise InputError(f"weight {text.strip()} of '{name}' in mixture '{whole}' must be a finite number >= 0",
                         field="objective")
    return w


def _describe(terms: tuple[tuple[float, Objective], ...]) -> Objective:
    objs = [o for _, o in terms]
    families = {o.family for o in objs}
    family = next((f for f in (*PREFERENCE_FAMILIES, "likelihood") if f in families), "likelihood")
    summary = "mixture: " + " + ".join(f"{weight_text(w)}·{o.name}" for w, o in terms)
    return Objective(
        "+".join(f"{weight_text(w)}*{o.name}" for w, o in terms), partial(_combine, terms),
        needs_reference=any(o.needs_reference for o in objs), family=family, params={}, summary=summary,
        data=objs[0].data, min_batch_size=max(o.min_batch_size for o in objs),
        advice=partial(_advice, terms) if any(o.advice for o in objs) else None,
        needs=tuple(sorted({n for o in objs for n in o.needs})), terms=terms)


def _combine(terms: tuple[tuple[float, Objective], ...], lp: SeqLogps, **params: Any) -> Output:
    """Σ wₖ·lossₖ over one shared set of log-probs; rewards from the first preference term."""
    mods = active(params)
    outs = [(w, o, run_term(o, lp, term_params(params, o), mods)) for w, o in terms]
    lead = next((out for _, o, out in outs if o.family in PREFERENCE_FAMILIES), outs[0][2])
    loss: Tensor = sum(w * out.loss for w, _, out in outs)  # type: ignore[assignment]
    extras: dict[str, Tensor] = {}
    for *_, out in outs:  # the first term's extras win a clash
        extras.update({k: v for k, v in out.extras.items() if k not in extras})
    extras.update({f"loss/{o.trl_loss_type or o.name}": out.loss.detach() for _, o, out in outs})
    return Output(loss, lead.chosen_rewards, lead.rejected_rewards, extras)


def _advice(terms: tuple[tuple[float, Objective], ...], counts: dict[str, int], params: dict[str, Any]) -> list[str]:
    """Each term's advice about the training data, from its own hyperparameters."""
    return [line for _, o in terms if o.advice for line in o.advice(counts, term_params(params, o))]
