"""The objective registry and its built-in entries: preference losses as pure functions of per-sequence log-probs."""

# Importing the entries registers them, in the order `preftune objectives` lists them.
# isort: off
from . import reference_relative  # noqa: F401
from . import reference_free  # noqa: F401
from . import unpaired  # noqa: F401
# isort: on
from .registry import (
    DATA_KINDS,
    FAMILIES,
    PREFERENCE_FAMILIES,
    REGISTRY,
    Objective,
    ObjectiveOutput,
    Output,
    Param,
    SeqLogps,
    compute,
    delta,
    fallback,
    get,
    log1mexp,
    logratios,
    mean_logps,
    objective,
    resolve_params,
)

__all__ = ["DATA_KINDS", "FAMILIES", "PREFERENCE_FAMILIES", "REGISTRY", "Objective", "ObjectiveOutput", "Output",
           "Param", "SeqLogps", "compute", "delta", "fallback", "get", "log1mexp", "logratios", "mean_logps",
           "objective", "resolve_params"]
