"""A pipeline recipe: which stages run (SFT, the preference matrix, decide, the gate, ship, rounds) and their
settings, read from YAML and checked whole before any stage runs.

    recipe = load_recipe("recipe.yaml")      # InputError naming the file and field on any mistake

Its keys, an example recipe and what is refused: docs/pipeline.md, The recipe.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ..core import config as config_mod
from ..core.config import DEFAULT_GRID, Config
from ..core.errors import InputError, did_you_mean
from ..verdict.gate import Check

STAGES = ("sft", "matrix", "decide", "gate", "ship", "iterate")
RULES = ("not_worse", "at_least", "at_most")  # regression, safety share, over-refusal share
CHECK_KEYS = ("name", "prompts", "judge", "rule", "threshold", "margin", "alpha", "max_prompts")
SECTION_KEYS = {"decide": ("alpha", "baseline"), "gate": ("checks", "max_new_tokens"),
                "ship": ("merge", "dtype"),
                "iterate": ("rounds", "prompts", "judge", "num_samples", "temperature", "top_p", "max_new_tokens",
                            "pair_rule", "min_gap", "reference", "gen_eval_prompts")}


@dataclass(frozen=True)
class Recipe:
    """A checked recipe: one Config per training stage and the other stages' settings."""

    path: str
    sft: Config | None
    matrix: Config                 # the matrix's base config (its model is filled in from the SFT stage)
    grid: dict[str, list[Any]]
    alpha: float = 0.05
    baseline: dict[str, Any] | None = None
    checks: tuple[Check, ...] = ()
    max_new_tokens: int = 32
    merge: bool = True
    dtype: str | None = None
    iterate: dict[str, Any] | None = None
    raw: dict[str, Any] = field(default_factory=dict)  # the YAML as read, for the manifest and the evidence


def load_recipe(path: str | Path) -> Recipe:
    """Read and check a recipe; every mistake is one line naming the file and the key."""
    where = str(path)
    raw = config_mod.load_yaml(path)
    shared = {k: v for k, v in raw.items() if k not in STAGES}
    for key in shared:
        if key not in config_mod.FIELDS:
            choices = list(STAGES) + list(config_mod.FIELDS)
            raise InputError(f"unknown key{did_you_mean(key, choices)}: a recipe holds stages ({', '.join(STAGES)})"
                             " and config keys shared by them", path=where, field=key)
    sections = {s: _section(raw, s, where) for s in STAGES}
    sft = _config(shared, sections["sft"], where, "sft", objective="sft") if "sft" in raw else None
    if sft is None and not shared.get("model"):
        raise InputError("the stages don't connect: the matrix needs a `model` (or an `sft` stage to make one)",
                         path=where, field="model")
    grid = sections["matrix"].pop("grid", None) or {k: list(v) for k, v in DEFAULT_GRID.items()}
    matrix = _config(shared, sections["matrix"], where, "matrix", model=str(shared.get("model") or "from-sft"))
    _known(sections, where)
    gate = sections["gate"]
    checks = tuple(_check(c, i, where) for i, c in enumerate(gate.get("checks") or []))
    if len({c.name for c in checks}) != len(checks):
        raise InputError("two gate checks share a name", path=where, field="gate.checks")
    ship = sections["ship"]
    return Recipe(where, sft, matrix, _grid(grid, where), alpha=_number(sections["decide"].get("alpha", 0.05),
                  where, "decide.alpha", 0, 1), baseline=sections["decide"].get("baseline"), checks=checks,
                  max_new_tokens=int(_number(gate.get("max_new_tokens", 32), where, "gate.max_new_tokens", 1)),
                  merge=bool(ship.get("merge", True)), dtype=ship.get("dtype"),
                  iterate=sections["iterate"] if "iterate" in raw else None, raw=raw)


def _section(raw: dict, stage: str, where: str) -> dict[str, Any]:
    value = raw.get(stage) or {}
    if not isinstance(value, dict):
        raise InputError("must be a mapping of key: value", path=where, field=stage)
    return dict(value)


def _known(sections: dict[str, dict], where: str) -> None:
    for stage, keys in SECTION_KEYS.items():
        for key in sections[stage]:
            if key not in keys:
                raise InputError(f"unknown key{did_you_mean(key, list(keys))}; {stage} takes {', '.join(keys)}",
                                 path=where, field=f"{stage}.{key}")


def _config(shared: dict, section: dict, where: str, stage: str, **defaults: Any) -> Config:
    """A stage's Config: defaults < shared keys < the stage's own; validated with the same rules as a run."""
    values = {**defaults, **shared, **section}
    cfg = config_mod.build(values, source=f"{where}: {stage}")  # its errors name the file and the stage already
    try:
        return replace(cfg, model=cfg.model or "from-sft").validate()
    except InputError as e:
        raise InputError(f"{stage}: {e}", path=where) from None


def _grid(grid: Any, where: str) -> dict[str, list[Any]]:
    if not isinstance(grid, dict) or not all(isinstance(v, list) and v for v in grid.values()):
        raise InputError("must map a factor to a list of values, e.g. {objective: [dpo, simpo]}", path=where,
                         field="matrix.grid")
    from ..training.matrix import parse_grid

    return parse_grid([f"{k}={','.join(str(x) for x in v)}" for k, v in grid.items()])


def _check(c: Any, i: int, where: str) -> Check:
    at = f"gate.checks[{i}]"
    if not isinstance(c, dict):
        raise InputError("a check is a mapping: {name, prompts, judge, rule, ...}", path=where, field=at)
    for key in c:
        if key not in CHECK_KEYS:
            raise InputError(f"unknown key{did_you_mean(key, list(CHECK_KEYS))}", path=where, field=f"{at}.{key}")
    name = str(c.get("name") or f"check{i + 1}")
    judges = c.get("judge")
    judges = [judges] if isinstance(judges, str) else judges
    if not c.get("prompts"):
        raise InputError("a gate check needs `prompts` (a file of prompts both models answer)", path=where,
                         field=f"{at}.prompts")
    if not judges or not all(isinstance(j, str) and j.strip() for j in judges):
        raise InputError("a gate check needs a `judge` (one spec or a list)", path=where, field=f"{at}.judge")
    rule = c.get("rule")
    if rule not in RULES:
        raise InputError(f"{rule!r} is not a rule{did_you_mean(str(rule), list(RULES))}; choose from "
                         f"{', '.join(RULES)}", path=where, field=f"{at}.rule")
    threshold = c.get("threshold")
    if rule != "not_worse":
        if threshold is None:
            raise InputError(f"rule {rule} needs a `threshold` (a share in [0, 1])", path=where,
                             field=f"{at}.threshold")
        threshold = _number(threshold, where, f"{at}.threshold", 0, 1)
    margin = _number(c.get("margin", 0.05), where, f"{at}.margin", 0, 1)
    alpha = _number(c.get("alpha", 0.05), where, f"{at}.alpha", 0, 0.5, open_low=True)
    n = c.get("max_prompts")
    return Check(name, str(c["prompts"]), tuple(judges), rule, threshold, margin, alpha,
                 int(_number(n, where, f"{at}.max_prompts", 1)) if n is not None else None)


def _number(value: Any, where: str, key: str, lo: float, hi: float = math.inf, *, open_low: bool = False) -> float:
    try:
        if isinstance(value, bool):
            raise ValueError
        x = float(value)
    except (TypeError, ValueError):
        raise InputError(f"{value!r} is not a number", path=where, field=key) from None
    if not math.isfinite(x) or x < lo or x > hi or (open_low and x == lo):
        span = f"({lo}, {hi}]" if open_low else f"[{lo}, {hi}]" if hi != math.inf else f">= {lo}"
        raise InputError(f"{value!r} is out of range: must be in {span}", path=where, field=key)
    return x
