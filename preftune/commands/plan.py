"""``preftune plan``: will it fit? Memory and compute per objective x rank, from the model config alone.

    preftune plan --model M --objective dpo,simpo --lora-rank 16,8 --gpu-memory 24GiB
"""

from __future__ import annotations

import argparse

from .options import Command


def _arguments(p: argparse.ArgumentParser) -> None:
    from ..training.plan import add_arguments

    add_arguments(p)


def _run(args: argparse.Namespace) -> int:
    from ..training.plan import main

    return main(args)


PLAN = Command("plan", "will it fit? memory and compute per objective x rank, from the config alone", _arguments,
               _run)
