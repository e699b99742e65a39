"""The ablation matrix: cells that differ only in the named factors.

Every cell is a normal run folder under ``matrix/cells/<name>/``. Cells share the tokenized data, the data
order per seed, the schedule, the held-out set and the reference log-probs (computed once, cached on disk);
the base model is loaded once and each LoRA cell adds and removes its own adapter.

Hyperparameters per objective: in a matrix over objectives, the top-level beta/gamma apply to the base
objective only; every other objective takes its ``objectives: {name: {...}}`` entry or its own default, so a
SimPO cell never silently runs with DPO's beta. A factor in ``--grid`` applies to every cell.

Re-running skips finished cells and resumes a killed one; a failing cell is recorded and the others go on;
a lock keeps two processes from writing one matrix.

    preftune ablate --config base.yaml --grid objective=dpo,simpo --grid lora_rank=16,8 --output matrix
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

from . import config as config_mod
from .config import Config, dump_yaml
from .errors import InputError
from .files import FolderLock, atomic_write_json, atomic_write_text

DEFAULT_GRID: dict[str, list[Any]] = {"objective": ["dpo", "simpo"], "lora_rank": [16, 8]}
OBJECTIVE_PARAMS = ("beta", "gamma", "gamma_beta_ratio", "label_smoothing")
# Fields that change the tokenized data; cells that agree on them share one Prepared.
DATA_FIELDS = ("model", "tokenizer", "data", "data_split", "eval_data", "eval_split", "eval_fraction", "split_seed",
               "max_length", "max_prompt_length", "apply_chat_template", "max_train_pairs")
NOT_A_FACTOR = ("output", "resume", "objectives", "cache_dir", "quiet")


def parse_grid(items: list[str]) -> dict[str, list[Any]]:
    """``["objective=dpo,simpo", "lora_rank=16,8"]`` -> ``{"objective": ["dpo", "simpo"], "lora_rank": [16, 8]}``."""
    grid: dict[str, list[Any]] = {}
    for item in items:
        key, sep, values = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not values.strip():
            raise InputError(f"expected KEY=V1,V2,..., got {item!r}", field="grid")
        if key in NOT_A_FACTOR:
            raise InputError("cannot be a factor of the matrix", field=key)
        grid[key] = [config_mod.coerce(key, v.strip(), "--grid") for v in values.split(",")]
    return grid or dict(DEFAULT_GRID)


def cell_name(values: dict[str, Any]) -> str:
    return ",".join(f"{k}={v}" for k, v in values.items()).replace("/", "_")


def cell_config(base: Config, values: dict[str, Any], out: Path) -> Config:
    """The base config with the cell's factor values; see the module docstring for objective parameters."""
    fields = base.to_dict()
    objective = values.get("objective", base.objective)
    if objective != base.objective:
        for k in OBJECTIVE_PARAMS:
            fields[k] = config_mod.FIELDS[k].default
    fields.update(base.objectives.get(objective, {}))
    fields.update(values)
    fields.update(output=str(out / "cells" / cell_name(values)), resume=True)
    return Config(**fields).validate()


def plan(base: Config, grid: dict[str, list[Any]]) -> list[tuple[str, dict[str, Any], Config]]:
    out = Path(base.output)
    cells = []
    for combo in itertools.product(*grid.values()):
        values = dict(zip(grid, combo))
        cells.append((cell_name(values), values, cell_config(base, values, out)))
    return cells


def run_matrix(base: Config, grid: dict[str, list[Any]], *, parallel: int = 1) -> dict[str, int]:
    """Run (or finish) every cell. Returns counts of finished and failed cells."""
    from .train import prepare_data

    base.validate()
    cells = plan(base, grid)              # every cell's config is valid before anything is written
    out = Path(base.output)
    from .model import load_tokenizer

    tok = load_tokenizer(base)
    prepared: dict[tuple, Any] = {}
    for _, _, cfg in cells:               # and every cell's data is readable and tokenizes
        key = _data_key(cfg)
        if key not in prepared:
            prepared[key] = prepare_data(cfg, tok)

    with FolderLock(out):
        atomic_write_text(out / "base_config.yaml", dump_yaml(base))
        status = _load_status(out, cells, grid)
        _write_status(out, grid, status)
        todo = [c for c in cells if status[c[0]]["status"] != "finished"]
        if parallel > 1 and len(todo) > 1:
            _run_parallel(out, todo, prepared, status, grid, parallel)
        else:
            _run_serial(out, todo, prepared, status, grid)
    finished = sum(s["status"] == "finished" for s in status.values())
    return {"finished": finished, "failed": len(status) - finished}


def _data_key(cfg: Config) -> tuple:
    return tuple(json.dumps(getattr(cfg, f)) for f in DATA_FIELDS)


def _load_status(out: Path, cells: list, grid: dict) -> dict[str, dict]:
    status = {name: {"name": name, "values": values, "status": "pending", "error": None}
              for name, values, _ in cells}
    for name, _, cfg in cells:
        summary = Path(cfg.output) / "summary.json"
        if summary.exists():
            s = json.loads(summary.read_text()).get("status")
            status[name]["status"] = "finished" if s == "finished" else "failed"
    return status


def _write_status(out: Path, grid: dict, status: dict[str, dict]) -> None:
    atomic_write_json(out / "matrix.json", {"factors": grid, "cells": list(status.values())})


def _run_serial(out: Path, todo: list, prepared: dict, status: dict, grid: dict) -> None:
    from .model import load_model
    from .train import train

    base_models: dict[tuple, Any] = {}
    for name, _, cfg in todo:
        status[name].update(status="running", error=None)
        _write_status(out, grid, status)
        try:
            shared = None
            if cfg.lora_rank > 0:  # full fine-tuning changes the weights: it loads its own copy
                mkey = (cfg.model, cfg.dtype, cfg.trust_remote_code)
                if mkey not in base_models:
                    base_models = {mkey: load_model(cfg)}
                shared = base_models[mkey]
            train(cfg, prepared=prepared[_data_key(cfg)], base_model=shared)
            status[name]["status"] = "finished"
        except Exception as e:  # one failing cell must not stop the matrix
            status[name].update(status="failed", error=_one_line(e))
            print(f"preftune ablate: cell {name} failed: {_one_line(e)}", file=sys.stderr)
        _write_status(out, grid, status)


def _run_parallel(out: Path, todo: list, prepared: dict, status: dict, grid: dict, parallel: int) -> None:
    """N cells at once, each in its own process; reference log-probs are cached first so no cell recomputes."""
    _warm_reference_cache(todo, prepared)
    threads = max(1, (os.cpu_count() or 1) // parallel)
    pending = list(todo)
    running: list[tuple[str, subprocess.Popen, Path]] = []
    while pending or running:
        while pending and len(running) < parallel:
            name, _, cfg = pending.pop(0)
            cfg_path = out / ".cells" / f"{name}.yaml"
            atomic_write_text(cfg_path, dump_yaml(replace(cfg, threads=cfg.threads or threads, quiet=True)))
            err = cfg_path.with_suffix(".err")
            proc = subprocess.Popen([sys.executable, "-m", "preftune.cli", "train", "--config", str(cfg_path)],
                                    stdout=subprocess.DEVNULL, stderr=open(err, "w"))
            status[name].update(status="running", error=None)
            running.append((name, proc, err))
            _write_status(out, grid, status)
        name, proc, err = running.pop(0)
        code = proc.wait()
        lines = [line for line in err.read_text().splitlines() if line.strip()]
        status[name].update(status="finished" if code == 0 else "failed",
                            error=None if code == 0 else (lines[-1] if lines else f"exit code {code}"))
        _write_status(out, grid, status)


def _warm_reference_cache(todo: list, prepared: dict) -> None:
    from .model import add_lora, fingerprint, load_model
    from .objectives import get
    from .reference import cache_key, reference_logps

    done = set()
    for _, _, cfg in todo:
        data = prepared[_data_key(cfg)]
        key = (_data_key(cfg), cfg.dtype, cfg.autocast_bf16, get(cfg.objective).needs_reference)
        if key in done:
            continue
        done.add(key)
        model = add_lora(load_model(cfg), replace(cfg, lora_rank=max(1, cfg.lora_rank)))
        fp = fingerprint(cfg.model, cfg.resolved_cache_dir())
        sets = [data.eval] + ([data.train] if get(cfg.objective).needs_reference else [])
        for pairs in sets:
            reference_logps(model, pairs, key=cache_key(fp, pairs, cfg.dtype, cfg.autocast_bf16),
                            cache_dir=cfg.resolved_cache_dir(), pad_id=data.tokenizer.pad_token_id,
                            batch_size=max(32, cfg.eval_batch_size), share_prompt=cfg.share_prompt,
                            chunk=cfg.logit_chunk, autocast_bf16=cfg.autocast_bf16)


def run_fallback(matrix_dir: str | Path) -> dict[str, int]:
    """``preftune decide --fallback``: add ORPO cells at the matrix's ranks and run them."""
    out = Path(matrix_dir)
    meta = json.loads((out / "matrix.json").read_text())
    base = config_mod.from_file(out / "base_config.yaml", output=str(out))
    grid = {k: v for k, v in meta["factors"].items() if k != "objective"}
    grid = {"objective": ["orpo"], **grid}
    result = run_matrix(base, grid)
    # Merge: matrix.json lists the original cells and the ORPO ones.
    new = json.loads((out / "matrix.json").read_text())["cells"]
    names = {c["name"] for c in new}
    cells = [c for c in meta["cells"] if c["name"] not in names] + new
    factors = dict(meta["factors"])
    factors["objective"] = list(dict.fromkeys(factors.get("objective", []) + ["orpo"]))
    atomic_write_json(out / "matrix.json", {"factors": factors, "cells": cells})
    return result


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"
