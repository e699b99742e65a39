"""The judge registry: each kind declares itself, and ``parse_judge`` makes a judge from a SPEC string.

    judge = parse_judge("python:preftune.tinyworld:judge", cfg)   # cfg's device and cache folder
    judge.prefer(["sort: 3 1 2 ="], [" 1 2 3"], [" 3 2 1"])        # ([1.0], [1.0], [0.333...])

The SPECs (``reward-model:PATH``, ``python:module:function``, ``openai:MODEL@BASE_URL``): docs/behaviour.md,
Judges; your own kind (``MODULE:KIND:ARGS``, ``@preftune.judge_kind``) and how a SPEC is resolved: the same
page, Your own judge kind.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from ...core.config import Config, refuse_credentials
from ...core.errors import InputError, did_you_mean, one_line
from .base import Judge, PairwiseJudge, PointwiseJudge, PythonJudge

MODES: dict[str, type[Judge]] = {"pointwise": PointwiseJudge, "pairwise": PairwiseJudge}
NEEDS = ("device", "cache_dir")  # what a factory may ask of the config, by keyword


@dataclass(frozen=True)
class JudgeKind:
    """A registry entry: how a SPEC of this kind becomes a judge."""

    name: str
    factory: Callable[..., Any]
    mode: str                 # pointwise | pairwise
    usage: str                # the SPEC's shape, shown when it doesn't parse
    needs: tuple[str, ...]    # keywords the factory gets: device, cache_dir
    env: tuple[str, ...]      # environment variables it reads, first set one wins (a network key)

    def make(self, spec: str, args: str, cfg: Config) -> Judge:
        given = {"device": cfg.resolved_device, "cache_dir": cfg.resolved_cache_dir}
        try:
            made = self.factory(args, **{need: given[need]() for need in self.needs})
        except InputError:
            raise
        except ValueError as e:
            why = f" ({one_line(e)})" if str(e).strip() else ""
            raise InputError(f"cannot parse {spec!r}: expected {self.usage}{why}", field="judge") from None
        except Exception as e:  # a user's factory can raise anything: one line
            raise InputError(f"judge {spec}: {type(e).__name__}: {one_line(e)}", field="judge") from None
        if self.mode == "pointwise" and callable(made) and not isinstance(made, Judge):
            made = PythonJudge(spec, made)
        if not isinstance(made, MODES[self.mode]):
            raise InputError(f"judge kind {self.name!r} is {self.mode} but its factory returned "
                             f"{type(made).__name__}", field="judge")
        made.spec = spec
        return made


KINDS: dict[str, JudgeKind] = {}


def judge_kind(name: str, *, mode: str, usage: str = "", needs: tuple[str, ...] = (),
               env: tuple[str, ...] = ()) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register a judge kind (see the module docstring); public as ``preftune.judge_kind``. ``usage`` defaults
    to ``MODULE:NAME:ARGS``."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    if set(needs) - set(NEEDS):
        raise ValueError(f"needs must be among {', '.join(NEEDS)}, got {needs!r}")

    def add(factory: Callable[..., Any]) -> Callable[..., Any]:
        KINDS[name] = JudgeKind(name, factory, mode, usage or f"{factory.__module__}:{name}:ARGS", tuple(needs),
                                tuple(env))
        return factory
    return add


def parse_judge(judge_spec: str, cfg: Config | None = None) -> Judge:
    """A judge from its SPEC, on ``cfg``'s device with its cache folder (without one: cpu, the default cache).

    Bad specs, missing modules or functions and missing model folders raise InputError; a reward model itself
    loads on first use, everything that can be checked without loading it is checked here.
    """
    if not isinstance(judge_spec, str) or not judge_spec.strip():
        raise InputError("empty judge spec", field="judge")
    spec = judge_spec.strip()
    refuse_credentials(spec)  # before any message could quote it
    head, sep, rest = spec.partition(":")
    if sep and head in KINDS:
        return KINDS[head].make(spec, rest, cfg or Config(device="cpu"))
    if sep and _import_kinds(head):
        name, _, args = rest.partition(":")
        if name not in KINDS:
            raise InputError(f"module '{head}' registers no judge kind '{name}'{did_you_mean(name, list(KINDS))}; "
                             "register it with @preftune.judge_kind", field="judge")
        return KINDS[name].make(spec, args, cfg or Config(device="cpu"))
    raise InputError(f"cannot parse {spec!r}: unknown judge kind '{head}'{did_you_mean(head, list(KINDS))}; "
                     f"expected one of {', '.join(k.usage for k in KINDS.values())}, MODULE:KIND:ARGS", field="judge")


def parse_judges(specs: Sequence[str], cfg: Config | None = None) -> list[Judge]:
    """Every judge of a list (``--judge A --judge B``), in order, or one line naming the first bad spec or a
    spec given twice -- before anything is generated or written."""
    Config(judge=list(specs)).check_judges()
    judges = []
    for spec in specs:
        try:
            judges.append(parse_judge(spec, cfg))
        except InputError as e:
            if spec.strip() in str(e):
                raise
            raise InputError(f"judge {spec.strip()}: {e.message}", path=e.path, line=e.line, field=e.field) from None
    return judges


def import_from_cwd(module: str) -> ModuleType:
    """``module`` from the working directory or PYTHONPATH, as ``python -m`` would find it."""
    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # the console script's sys.path[0] is its bin folder, not the cwd
    return importlib.import_module(module)


def _import_kinds(module: str) -> bool:
    """Import a user's module of judge kinds; False when no such module exists (the SPEC names an unknown kind)."""
    if not all(part.isidentifier() for part in module.split(".")):
        return False
    try:
        import_from_cwd(module)
    except ModuleNotFoundError as e:
        if e.name and (module == e.name or module.startswith(f"{e.name}.")):
            return False
        raise InputError(f"cannot import judge module '{module}': {one_line(e)}", field="judge") from None
    except Exception as e:  # a user's module can raise anything while importing
        raise InputError(f"cannot import judge module '{module}': {type(e).__name__}: {one_line(e)}",
                         field="judge") from None
    return True
