"""What every command shares: the :class:`Command` record of the command table, one flag per Config field, and
the Config a command line builds (defaults < ``--config`` YAML < flags).

    preftune train --config run.yaml --lora-rank 16       # config_from(args)
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import MISSING, dataclass

from ..core import config as config_mod
from ..core.config import Config


@dataclass(frozen=True)
class Command:
    """One entry of the command table: its name, one line of help, its flags, and what it runs (exit code)."""

    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]
    computes: bool = False  # runs a model's forward (train, eval, generate, ...): the CPU setup matters before torch


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_config_flags(p: argparse.ArgumentParser, skip: tuple[str, ...] = ()) -> None:
    """One flag per Config field (``lora_rank`` -> ``--lora-rank``), grouped and helped as config.py declares
    them (``config.field_docs``); only flags given on the line count. The objective group adds the shorthands."""
    p.add_argument("--config", help="YAML file whose keys mirror these flags; flags override it")
    groups: dict[str, argparse._ArgumentGroup] = {}
    for name, (group, text) in config_mod.field_docs().items():
        if name in skip or name == "objectives":
            continue
        g = groups.get(group) or groups.setdefault(group, p.add_argument_group(group))
        f = config_mod.FIELDS[name]
        default = f.default if f.default is not MISSING else f.default_factory()  # type: ignore[misc]
        kind = {"action": argparse.BooleanOptionalAction} if isinstance(default, bool) else {"metavar": name.upper()}
        if config_mod.repeatable(name):  # --judge A --judge B
            kind["action"] = "append"
        shown = ",".join(default) if isinstance(default, list) else default
        help = (f"{text} (default {shown})" if shown not in ("", None) else text).replace("%", "%%")  # argparse: %
        g.add_argument(flag(name), default=argparse.SUPPRESS, help=help, **kind)
        if name == "objective":
            for short in config_mod.SHORTHANDS:
                g.add_argument(flag(short), default=argparse.SUPPRESS, metavar=short.upper(),
                               help=f"sets objectives.<objective>.{short} (see `preftune objectives`)")


def config_from(args: argparse.Namespace, *, skip: tuple[str, ...] = ()) -> Config:
    """The Config of a command line: defaults < ``--config`` YAML < the flags given."""
    keys = set(config_mod.FIELDS) | set(config_mod.SHORTHANDS)
    given = {k: v for k, v in vars(args).items() if k in keys and k not in skip}
    if getattr(args, "config", None):
        return config_mod.from_file(args.config, **given)
    return config_mod.build({}, given)


def speaks() -> bool:
    """Whether this process prints results: always, except the ranks other than 0 under torchrun."""
    from ..core.runtime import launched_rank

    return launched_rank() == 0
