"""The objective registry and its built-in entries: preference losses as pure functions of per-sequence log-probs."""

# Importing the entries registers them, in the order `preftune objectives` lists them.
# isort: off
from . import reference_relative  # noqa: F401
from . import reference_anchored  # noqa: F401
from . import reference_free  # noqa: F401
from . import unpaired  # noqa: F401
# isort: on
from .engine import canonical, compute, entries_of, needs, run_params, spread
from .modifiers import MODIFIERS
from .registry import (
    FAMILIES,
    PREFERENCE_FAMILIES,
    REGISTRY,
    Objective,
    ObjectiveOutput,
    Output,
    Param,
    SeqLogps,
    delta,
    fallback,
    get,
    log1mexp,
    logratios,
    mean_logps,
    objective,
    resolve_params,
    scores,
)

__all__ = ["FAMILIES", "MODIFIERS", "PREFERENCE_FAMILIES", "REGISTRY", "Objective", "ObjectiveOutput",
           "Output", "Param", "SeqLogps", "canonical", "compute", "delta", "entries_of", "fallback", "get",
           "log1mexp", "logratios", "mean_logps", "needs", "objective", "resolve_params", "run_params",
           "scores", "spread"]
