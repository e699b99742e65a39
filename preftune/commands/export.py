"""``preftune export``: a run's adapter, or the model with it merged, plus a model card.

    preftune export runs/x --merge --output merged/        # base + adapter merged: plain transformers loads it
    preftune export runs/x --output adapter/               # the peft adapter, as it is
"""

from __future__ import annotations

import argparse

from .options import Command

DTYPES = ("float32", "bfloat16", "float16")


def _arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", help="a finished run folder (also a matrix cell: <matrix>/cells/<name>)")
    p.add_argument("--output", required=True, help="folder to write (must not exist or be empty)")
    p.add_argument("--merge", action="store_true", help="fold the adapter into the base model's weights")
    p.add_argument("--dtype", choices=DTYPES, default=None,
                   help="weights' dtype of a merged export (default float32; the merge itself runs in fp32)")


def _run(args: argparse.Namespace) -> int:
    from ..training.export import export

    out = export(args.run, args.output, merge=args.merge, dtype=args.dtype)
    print(f"exported {'merged model' if args.merge else 'adapter'} of {args.run} -> {out}")
    return 0


EXPORT = Command("export", "a run's adapter, or the model with it merged, plus a model card", _arguments, _run, computes=True)
