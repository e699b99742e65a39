"""Yardsticks: objective-free per-pair margins on which runs of different objectives can be compared.

Why objectives are judged only here, and the yardsticks (``behaviour`` included): docs/decisions.md, Two common
yardsticks; docs/behaviour.md, Behaviour in the decision. A yardstick is a registry entry: its name, whether it
needs reference log-probs, and a per-pair margin (> 0: chosen ranked above rejected). ``evaluate``, ``decide``
and ``report`` iterate :data:`REGISTRY`.

    preftune eval --model M --adapter runs/x/adapter --eval-data heldout.jsonl   # eval_refrel/accuracy, ...
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor

from ..core.objectives import SeqLogps, delta, mean_logps


@dataclass(frozen=True)
class Yardstick:
    name: str
    needs_reference: bool
    margin: Callable[[SeqLogps], Tensor] | None  # (B,) per-pair margin; None for ``behaviour`` (generations)
    help: str


def logprob_yardsticks() -> list[Yardstick]:
    """The yardsticks computed from held-out log-probs (eval_pairs.jsonl ``<name>_margin``)."""
    return [y for y in REGISTRY.values() if y.margin is not None]


REGISTRY: dict[str, Yardstick] = {}


def yardstick(name: str, *, needs_reference: bool, help: str) -> Callable[[Callable], Callable]:
    def add(fn: Callable[[SeqLogps], Tensor]) -> Callable[[SeqLogps], Tensor]:
        REGISTRY[name] = Yardstick(name, needs_reference, fn, help)
        return fn
    return add


@yardstick("refrel", needs_reference=True, help="reference-relative log-ratio margin > 0 (DPO's reward, β = 1)")
def refrel(lp: SeqLogps) -> Tensor:
    """(πc − refc) − (πr − refr): exactly 0 at step 0, where the policy is the reference."""
    return delta(lp)


@yardstick("lennorm", needs_reference=False,
           help="length-normalized log-prob margin > 0 (SimPO's reward, β = 1, γ = 0)")
def lennorm(lp: SeqLogps) -> Tensor:
    """πc/|c| − πr/|r|, token counts clamped to at least 1 as the objectives do."""
    mc, mr = mean_logps(lp)
    return mc - mr


BEHAVIOUR = "behaviour"
REGISTRY[BEHAVIOUR] = Yardstick(BEHAVIOUR, needs_reference=True, margin=None,
                                help="judge's preference of the policy's generation over the reference's on the "
                                     "same prompt (gen_eval.jsonl)")
