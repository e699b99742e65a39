"""What one run holds while it trains: its config, data, schedule, model, where it scores, and its counters.
:func:`loop.train` builds it before the output folder is touched and hands it to every step.

    r = Run(cfg, rt, RunDir(path), data, schedule, model, tok, judge, ...)   # training/loop.py _load
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ..core import trackers
from ..core.config import Config
from ..core.layout import RunDir
from ..core.runtime import Runtime
from ..generation.judges import Judge
from ..modeling.precision import Arithmetic
from .prepare import Prepared, Schedule
from .summary import CompileClock, new_timing

Evaluate = Callable[[int], tuple[dict, list[dict]]]  # held-out metrics and per-pair rows at a step


@dataclass
class Run:
    """What one run holds while it trains, settled before its folder is touched (:func:`_load`)."""

    cfg: Config
    rt: Runtime
    dir: RunDir
    data: Prepared
    schedule: Schedule
    model: torch.nn.Module
    tok: Any
    judge: list[Judge] | None  # the behavioural evaluation's judges
    fsdp: bool
    score_rt: Runtime                 # who scores the reference and held-out pairs: every rank, or each one alone
    eval_arith: Arithmetic
    share: bool                       # prefix sharing: one row per pair, the prompt run once
    fingerprint: str
    model_info: dict[str, Any]
    params: dict[str, Any]
    t_start: float
    timing: dict[str, Any] = field(default_factory=new_timing)
    trainable: list[tuple[str, Tensor]] = field(default_factory=list)
    clock: CompileClock | None = None
    tracker: trackers.Trackers | None = None

    @property
    def quiet(self) -> bool:
        return self.cfg.quiet or not self.rt.is_main
