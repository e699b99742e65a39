"""``preftune ablate``: the objective x rank (x seed x ...) matrix, on this machine or on Ray.

    preftune ablate --config base.yaml --grid objective=dpo,simpo --grid lora_rank=16,8 --output matrix
"""

from __future__ import annotations

import argparse

from .options import Command, add_config_flags, config_from


def _arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2",
                   help="a factor and its values (repeatable); default objective=dpo,simpo and lora_rank=16,8")
    p.add_argument("--parallel", type=int, default=1, help="cells run at once on this machine")
    p.add_argument("--backend", choices=["local", "ray"], default="local",
                   help="local: this machine (serial or --parallel); ray: each cell a Ray task")
    p.add_argument("--address", help="Ray cluster to join (host:port or auto); default: a local instance")
    p.add_argument("--cpus-per-cell", type=float, default=1, help="Ray: CPUs each cell reserves (default 1)")
    p.add_argument("--gpus-per-cell", type=float, default=0, help="Ray: GPUs each cell reserves (default 0)")
    add_config_flags(p)


def _run(args: argparse.Namespace) -> int:
    cfg = config_from(args)
    from ..training.matrix import RayOptions, parse_grid, run_matrix

    ray = RayOptions(address=args.address, cpus_per_cell=args.cpus_per_cell, gpus_per_cell=args.gpus_per_cell)
    result = run_matrix(cfg, parse_grid(args.grid), parallel=args.parallel, backend=args.backend, ray=ray)
    print(f"matrix: {result['finished']} finished, {result['failed']} failed -> {cfg.output}")
    return 0 if result["failed"] == 0 else 1


ABLATE = Command("ablate", "run an objective x rank (x seed x ...) matrix", _arguments, _run, computes=True)
