"""The ablation matrix: cells that differ only in the named factors.

Every cell is a normal run folder under ``matrix/cells/<name>/``. Cells share the tokenized data, the data
order per seed, the schedule, the held-out set and the reference log-probs (computed once, cached on disk);
the base model is loaded once and each LoRA cell adds and removes its own adapter.

Hyperparameters live per objective (docs/config.md), so a SimPO cell never silently runs with DPO's beta. A
hyperparameter factor (``--grid beta=0.05,0.1``) goes into each cell's own objective entry (each term of a
mixture that takes it), and every objective in the matrix must take it; any other factor is a config key. A
mixture is a value of ``objective`` like any other: ``--grid objective=dpo,"0.8*dpo+0.2*bco_pair+1*sft"``.

Re-running skips finished cells and resumes a killed one (a re-run with other settings over the same folder
is refused); a failing cell is recorded and the others go on; a lock keeps two processes from writing one
matrix. ``--parallel N`` runs cells in child processes (configs and stderr under ``matrix/.cells/``) after
computing every reference log-prob set they need once, in this process; on a machine with several GPUs each
child gets its own (``CUDA_VISIBLE_DEVICES``). ``--backend ray`` makes each cell a Ray task instead (see
``_run_ray``): same child configs, same folders, so ``decide`` and ``report`` can't tell the difference.

    preftune ablate --config base.yaml --grid objective=dpo,simpo --grid lora_rank=16,8 --output matrix
    preftune ablate ... --backend ray --address auto --cpus-per-cell 4 --gpus-per-cell 1
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import yaml

from ..core import config as config_mod
from ..core import objectives, trackers
from ..core.config import DEFAULT_GRID, Config, dump_yaml
from ..core.cpus import allowed_cpus
from ..core.errors import InputError
from ..core.files import FolderLock, atomic_write_text, check_writable_dir
from ..core.layout import CellEntry, MatrixDir, MatrixIndex, RunDir

# Fields that change the tokenized data; cells that agree on them share one Prepared.
DATA_FIELDS = ("model", "tokenizer", "data", "data_split", "eval_data", "eval_split", "eval_fraction", "split_seed",
               "max_length", "max_prompt_length", "apply_chat_template", "max_train_pairs", "columns", "bad_rows",
               "max_bad_rows", "chat_template")
NOT_A_FACTOR = ("output", "resume", "objectives", "cache_dir", "quiet")
# Settings a re-run may change without invalidating a cell's results (the parallel path sets some of them).
RERUN_FREE = ("output", "resume", "quiet", "threads", "cache_dir", "report_to", "audit")
_CHILD = ("import sys; from preftune.training.matrix import _cell_main; "
          "sys.exit(_cell_main(sys.argv[1], int(sys.argv[2])))")


def parse_grid(items: list[str]) -> dict[str, list[Any]]:
    """``["objective=dpo,simpo", "lora_rank=16,8"]`` -> ``{"objective": ["dpo", "simpo"], "lora_rank": [16, 8]}``.

    A key that is no config key but a hyperparameter of a registered objective (``beta``, or ``delta`` of a
    ``module:name`` objective in the same grid) is a hyperparameter factor, its values numbers.
    """
    split = []
    for item in items:
        key, sep, values = item.partition("=")
        key = key.strip().lstrip("-").replace("-", "_")
        if not sep or not values.strip():
            raise InputError(f"expected KEY=V1,V2,..., got {item!r}", field="grid")
        split.append((key, [v.strip() for v in values.split(",")]))
    for key, values in split:  # import module:name objectives first: they declare hyperparameters
        if key == "objective":
            values[:] = [objectives.canonical(v) for v in values]  # a mixture in one spelling: one cell name
    grid: dict[str, list[Any]] = {}
    for key, values in split:
        if key in NOT_A_FACTOR:
            raise InputError("cannot be a factor of the matrix", field=key)
        if key in grid:
            raise InputError("given twice in --grid: list all its values in one KEY=V1,V2", field=key)
        owner = next((o for o in objectives.REGISTRY.values() if key in o.params), None)
        if key not in config_mod.FIELDS and owner:  # a hyperparameter factor: its objective's rule checks the values
            coerced: list[Any] = [objectives.resolve_params(owner.name, {key: v})[key] for v in values]
        else:
            coerced = [config_mod.coerce(key, v, "--grid") for v in values]
        grid[key] = list({json.dumps(v): v for v in coerced}.values())  # a repeated value would repeat a cell
    return grid or {k: list(v) for k, v in DEFAULT_GRID.items()}


def cell_name(values: dict[str, Any]) -> str:
    return ",".join(f"{k}={v}" for k, v in values.items()).replace("/", "_")


def cell_config(base: Config, values: dict[str, Any], out: Path) -> Config:
    """The base config with the cell's factor values; a hyperparameter factor goes into the entry of the
    cell's own objective (see the module docstring)."""
    fields = base.to_dict()
    plain = {k: v for k, v in values.items() if k in config_mod.FIELDS}
    params = {k: v for k, v in values.items() if k not in config_mod.FIELDS}
    fields.update(plain, output=str(MatrixDir(out).cell(cell_name(values)).path), resume=True)
    for spec, given in objectives.spread(fields["objective"], params).items():  # a mixture's: each term's own
        obj = objectives.get(spec)
        entry = fields["objectives"].get(obj.spec, fields["objectives"].get(obj.name, {}))
        fields["objectives"] = {**fields["objectives"], obj.spec: {**entry, **given}}
    return Config(**fields).validate()


def plan(base: Config, grid: dict[str, list[Any]]) -> list[tuple[str, dict[str, Any], Config]]:
    combos = (dict(zip(grid, combo)) for combo in itertools.product(*grid.values()))
    return [(cell_name(values), values, cell_config(base, values, Path(base.output))) for values in combos]


@dataclass(frozen=True)
class RayOptions:
    """``--backend ray``: where the cluster is (None: a local instance on this machine) and each cell's share."""

    address: str | None = None
    cpus_per_cell: float = 1
    gpus_per_cell: float = 0
    max_retries: int = 3  # a cell whose worker dies is run again, resuming from its last checkpoint


def run_matrix(base: Config, grid: dict[str, list[Any]], *, parallel: int = 1, backend: str = "local",
               ray: RayOptions | None = None) -> dict[str, int]:
    """Run (or finish) every cell. Returns counts of finished and failed cells.

    ``backend="ray"`` runs each cell as a Ray task with ``ray``'s resources (``parallel`` is then Ray's to
    decide). A KeyboardInterrupt propagates: the cell it hit stays "running" in matrix.json and resumes on the
    next call.
    """
    if backend not in ("local", "ray"):
        raise InputError(f"{backend!r} is not one of local, ray", field="backend")
    return _matrix(base, grid, parallel, ray=(ray or RayOptions()) if backend == "ray" else None)


def _matrix(base: Config, grid: dict[str, list[Any]], parallel: int,
            keep: tuple[dict, list[CellEntry]] | None = None, ray: RayOptions | None = None) -> dict[str, int]:
    """run_matrix; ``keep`` = (factors, cells) listed in matrix.json beside the planned ones (the fallback)."""
    from ..evaluation.behaviour import check_gen_eval
    from ..modeling.model import load_tokenizer
    from .prepare import announce, prepare_data

    if "objective" in grid:  # a module:name objective registers itself (and its entry's schema); a mixture, one spelling
        grid = {**grid, "objective": list(dict.fromkeys(objectives.canonical(v) for v in grid["objective"]))}
    base.validate()
    check_gen_eval(base)  # every judge parses (one line naming a bad one) before the matrix folder is written
    check_writable_dir(base.output, field="output")  # the Python API gets the CLI's early checks too
    check_writable_dir(base.resolved_cache_dir(), field="cache_dir")
    trackers.check(base.report_to)  # once, before the matrix folder is written, not once per failing cell
    cells = plan(base, grid)              # every cell's config is valid before anything is written
    started_ray = _connect_ray(ray) if ray else False  # no Ray, or no cluster there: one line, nothing written
    out = MatrixDir(Path(base.output))
    toks: dict[tuple, Any] = {}
    prepared: dict[tuple, Any] = {}
    for _, _, cfg in cells:               # and every cell's data is readable and tokenizes
        key = _data_key(cfg)
        if key not in prepared:
            tkey = (cfg.tokenizer or cfg.model, cfg.trust_remote_code, cfg.chat_template)
            if tkey not in toks:
                toks[tkey] = load_tokenizer(cfg)
            prepared[key] = prepare_data(replace(cfg, audit=cfg.audit and not prepared), toks[tkey])

    with FolderLock(out.path):
        _check_settings(out.path, cells)
        first = next(iter(prepared.values()))  # the data's lines and audit.json, once for the matrix
        announce(first, out.path, quiet=base.quiet)
        prepared = {k: replace(p, notes=[], audit=None) for k, p in prepared.items()}
        atomic_write_text(out.base_config, dump_yaml(base))
        status = _load_status(cells)
        factors, kept = keep or (grid, [])

        def write() -> None:
            out.write_index(MatrixIndex(factors, kept + list(status.values())))

        write()
        todo = [c for c in cells if status[c[0]].status != "finished"]
        try:
            if ray and todo:
                _run_ray(out, todo, prepared, status, write, ray)
            elif parallel > 1 and len(todo) > 1:
                _run_parallel(out, todo, prepared, status, write, parallel)
            else:
                _run_serial(todo, prepared, status, write)
        finally:
            if started_ray:  # a local instance we started goes with us; a cluster we joined stays
                import ray as ray_mod

                ray_mod.shutdown()
    finished = sum(s.status == "finished" for s in status.values())
    return {"finished": finished, "failed": len(status) - finished}


def _base_model(loaded: dict, cfg: Config) -> Any:
    """The base model ``cfg`` loads, kept in ``loaded`` for the next cells that agree on what loading depends on
    (one model in memory at a time)."""
    from ..modeling.model import load_model
    from ..modeling.precision import resolve_dtype

    key = cfg.model, resolve_dtype(cfg), cfg.trust_remote_code, cfg.attn_implementation, cfg.device
    if key not in loaded:
        loaded.clear()
        loaded[key] = load_model(cfg)
    return loaded[key]


def _data_key(cfg: Config) -> tuple:
    """Cells that agree on this share one Prepared: the data fields, and for an unpaired objective (KTO) the
    unpaired view, whose shuffle and KL rotation follow the seed and the batch size."""
    kind = objectives.get(cfg.objective).data
    view = (kind, cfg.batch_size, cfg.seed) if kind == "unpaired" else (kind,)
    return tuple(json.dumps(getattr(cfg, f)) for f in DATA_FIELDS) + view


def _check_settings(out: Path, cells: list) -> None:
    """A cell already (partly) run with other settings would be skipped or resumed with the wrong results."""
    for name, _, cfg in cells:
        path = RunDir(Path(cfg.output)).config
        if not path.exists():
            continue
        old, new = yaml.safe_load(path.read_text()) or {}, yaml.safe_load(dump_yaml(cfg))
        diff = [k for k, v in old.items() if k in new and k not in RERUN_FREE and v != new[k]]
        if diff:
            raise InputError(f"cell {name} was run with other settings ({', '.join(diff)}): use the same base "
                             "config and grid, or another --output", path=str(out))


def _load_status(cells: list) -> dict[str, CellEntry]:
    status = {name: CellEntry(name, values) for name, values, _ in cells}
    for name, _, cfg in cells:
        run = RunDir(Path(cfg.output))
        if not run.summary.exists():
            continue
        try:
            status[name].mark("finished" if run.read_summary().finished else "failed")
        except InputError as e:  # a damaged summary is not a finished cell: run it again
            print(f"preftune ablate: {e}; cell {name} runs again", file=sys.stderr)
            status[name].mark("failed", str(e))
    return status


def _run_serial(todo: list, prepared: dict, status: dict, write: Callable[[], None]) -> None:
    from .loop import train

    base_models: dict[tuple, Any] = {}
    for name, _, cfg in todo:
        status[name].mark("running")
        write()
        try:
            # full fine-tuning changes the weights: it loads its own copy
            shared = _base_model(base_models, cfg) if cfg.lora_rank > 0 else None
            train(cfg, prepared=prepared[_data_key(cfg)], base_model=shared)
            status[name].mark("finished")
        except Exception as e:  # one failing cell must not stop the matrix; KeyboardInterrupt does
            status[name].mark("failed", _one_line(e))
            print(f"preftune ablate: cell {name} failed: {_one_line(e)}", file=sys.stderr)
        write()


def _run_parallel(out: MatrixDir, todo: list, prepared: dict, status: dict, write: Callable[[], None],
                  parallel: int) -> None:
    """N cells at once, each in its own process; reference log-probs are cached first so no cell recomputes."""
    _warm_reference_cache(todo, prepared)
    threads = max(1, allowed_cpus() // parallel)
    pending = list(todo)
    running: list[tuple[str, subprocess.Popen, Path]] = []
    gpus = _visible_gpus() if any(c[2].resolved_device() == "cuda" for c in todo) else []
    held: dict[str, str] = {}  # cell -> the GPU its child was given
    try:
        while pending or running:
            while pending and len(running) < parallel:
                name, _, cfg = pending.pop(0)
                cfg_path, err = _child_config(out, name, cfg, threads), out.child_stderr(name)
                env = None
                if gpus and cfg.resolved_device() == "cuda":  # several GPUs: one per child, the least busy
                    held[name] = pick_gpu(gpus, list(held.values()))
                    env = {**os.environ, "CUDA_VISIBLE_DEVICES": held[name]}
                with open(err, "w") as fh:
                    proc = subprocess.Popen([sys.executable, "-c", _CHILD, str(cfg_path), str(os.getpid())],
                                            stdout=subprocess.DEVNULL, stderr=fh, env=env)
                status[name].mark("running")
                running.append((name, proc, err))
                write()
            time.sleep(0.1)
            for name, proc, err in [r for r in running if r[1].poll() is not None]:
                running.remove((name, proc, err))
                held.pop(name, None)
                lines = [line for line in err.read_text().splitlines() if line.strip()]
                ok = proc.returncode == 0
                status[name].mark("finished" if ok else "failed",
                                  None if ok else (lines[-1] if lines else f"exit code {proc.returncode}"))
                write()
    finally:  # interrupted: stop the cells (each keeps its last checkpoint) before the matrix lock goes
        for _, proc, _ in running:
            proc.send_signal(signal.SIGINT)
        for _, proc, _ in running:
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _child_config(out: MatrixDir, name: str, cfg: Config, threads: int) -> Path:
    """The exact config a cell runs in another process (a ``--parallel`` child or a Ray task), written to
    ``matrix/.cells/<name>.yaml``: the cell's own, with threads, no progress bars and the parent's cache."""
    child = replace(cfg, threads=cfg.threads or threads, quiet=True, audit=False,
                    cache_dir=str(cfg.resolved_cache_dir().absolute()))  # the parent's cache
    atomic_write_text(out.child_config(name), dump_yaml(child))
    return out.child_config(name)


def _visible_gpus() -> list[str]:
    """The GPU ids children may be given: CUDA_VISIBLE_DEVICES' entries if set, else 0..count-1; [] for <2."""
    try:
        import torch

        count = torch.cuda.device_count()
    except Exception:
        count = 0
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = [g.strip() for g in visible.split(",") if g.strip()][:count] if visible else [str(i) for i in range(count)]
    return ids if len(ids) > 1 else []  # one GPU: every child shares it, as before


def pick_gpu(gpus: list[str], busy: list[str]) -> str:
    """The GPU for the next ``--parallel`` child: the one running the fewest cells, lowest first.

    >>> pick_gpu(["0", "1"], ["0"])
    '1'
    """
    return min(gpus, key=lambda g: (busy.count(g), gpus.index(g)))


def _connect_ray(opts: RayOptions) -> bool:
    """Join the cluster at ``opts.address``, or start a local instance; True when we started it.

    One InputError line (exit code 2) when Ray isn't installed or the address can't be reached, before the
    matrix folder is touched. A host:port is probed with a plain TCP connect first: ray.init itself waits
    minutes on an address where nothing listens.
    """
    try:
        import ray
    except ImportError:
        raise InputError("--backend ray needs Ray: pip install preftune[ray]", field="backend") from None
    for name, value, low in (("cpus_per_cell", opts.cpus_per_cell, 0), ("gpus_per_cell", opts.gpus_per_cell, -1)):
        if not value > low:
            raise InputError(f"must be {'> 0' if low == 0 else '>= 0'}, got {value}", field=name)
    host, sep, port = (opts.address or "").split("://", 1)[-1].rpartition(":")
    if opts.address and opts.address != "auto" and sep and port.isdigit():
        try:
            socket.create_connection((host or "127.0.0.1", int(port)), timeout=5).close()
        except OSError as e:
            raise InputError(f"cannot reach the Ray cluster at {opts.address}: {e.strerror or e}",
                             field="address") from None
    if ray.is_initialized():  # a caller (a notebook, a test) already chose the cluster
        return False
    if opts.address is None:
        ray.init(num_cpus=allowed_cpus(), include_dashboard=False, log_to_driver=False)
        return True
    try:
        ray.init(address=opts.address, log_to_driver=False)
    except Exception as e:
        raise InputError(f"cannot reach the Ray cluster at {opts.address}: {_one_line(e)}", field="address") from None
    return False


def _run_ray(out: MatrixDir, todo: list, prepared: dict, status: dict, write: Callable[[], None],
             opts: RayOptions) -> None:
    """Each cell a Ray task of ``cpus_per_cell``/``gpus_per_cell``, running its exact child config.

    The reference log-probs are computed first, here, into the cache the cells read: with workers on other
    machines, the matrix folder and the cache directory must be on a filesystem every node sees (the same
    paths). A task whose worker dies (killed, out of memory, node lost) is retried up to ``max_retries``
    times and resumes from the cell's last checkpoint, since the child config has ``resume: true``.
    """
    import ray

    _warm_reference_cache(todo, prepared)
    threads = max(1, int(opts.cpus_per_cell))
    task = ray.remote(_run_cell).options(num_cpus=opts.cpus_per_cell, num_gpus=opts.gpus_per_cell,
                                         max_retries=opts.max_retries)
    cwd = os.getcwd()  # relative matrix paths resolve on the worker as they do here
    refs: dict[Any, str] = {}
    for name, _, cfg in todo:
        refs[task.remote(str(_child_config(out, name, cfg, threads).absolute()), cwd)] = name
        status[name].mark("running")
    write()
    try:
        while refs:
            ready, _ = ray.wait(list(refs), num_returns=1)
            name = refs.pop(ready[0])
            try:
                error = ray.get(ready[0])
            except Exception as e:  # retries used up, or the task could not run at all
                error = _one_line(e)
            status[name].mark("finished" if error is None else "failed", error)
            if error is not None:
                print(f"preftune ablate: cell {name} failed: {error}", file=sys.stderr)
            write()
    finally:  # interrupted: stop the cells still queued or running; each keeps its last checkpoint
        for ref in refs:
            ray.cancel(ref, force=True)


def _run_cell(cfg_path: str, cwd: str) -> str | None:
    """One cell in this process (a Ray worker, a ``--parallel`` child): the error line, or None when it
    finished. In-process, so a killed Ray worker is a dead task that Ray retries, not a child's exit code."""
    from .loop import train

    if os.path.isdir(cwd):
        os.chdir(cwd)
    try:
        train(config_mod.from_file(cfg_path))
    except Exception as e:  # a failing cell is recorded, not retried: it would fail again
        return _one_line(e)
    return None


def _cell_main(path: str, parent: int) -> int:
    """One cell in a child process (the parallel path): the exact config, one line on stderr if it fails."""
    _die_with_parent(parent)
    try:
        error = _run_cell(path, os.getcwd())
    except KeyboardInterrupt:
        print("KeyboardInterrupt: interrupted", file=sys.stderr)
        return 130
    if error is not None:
        print(error, file=sys.stderr)
    return 0 if error is None else 1


def _die_with_parent(parent: int) -> None:
    """A ``--parallel`` child ends when the ablate process that started it ends, however that ends (kill -9
    too): Linux sends it SIGTERM then (prctl PR_SET_PDEATHSIG), so a re-run never finds orphans still training
    and holding the cells' locks. The parent may already have gone before the call: then end now."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: no such guarantee
        return
    if os.getppid() != parent:
        os._exit(143)


def _warm_reference_cache(todo: list, prepared: dict) -> None:
    """Every reference log-prob set the cells will need, computed here once (the base model, no adapter)."""
    from ..modeling.model import fingerprint
    from ..modeling.reference import cache_key, reference_logps
    from .prepare import Schedule, reference_requests

    models: dict[tuple, Any] = {}
    done: set[tuple] = set()
    for _, _, cfg in todo:
        data = prepared[_data_key(cfg)]
        cache_dir = cfg.resolved_cache_dir()
        fp = fingerprint(cfg.model, cache_dir)
        for req in reference_requests(cfg, data, Schedule(cfg, data.train)).values():
            key = (cache_key(fp, req.pairs, req.arith), str(cache_dir))
            if key in done:
                continue
            done.add(key)
            reference_logps(_base_model(models, cfg), req.pairs, fingerprint=fp, arith=req.arith,
                            cache_dir=cache_dir, pad_id=data.tokenizer.pad_token_id, batch_size=req.batch_size,
                            tokens=req.tokens, share_prompt=cfg.share_prompt, chunk=cfg.logit_chunk)


def run_fallback(matrix_dir: str | Path) -> dict[str, int]:
    """``preftune decide --fallback``: add cells of the fallback objective (ORPO) at the matrix's ranks and run
    them."""
    out = MatrixDir(Path(matrix_dir))
    meta = out.read_index()
    base = config_mod.from_file(out.base_config, output=str(out.path))
    factors, fallback = meta.factors, objectives.fallback()
    grid = {k: ([fallback] if k == "objective" else v) for k, v in factors.items()}
    grid = grid if "objective" in grid else {"objective": [fallback], **grid}
    merged = {**grid, **factors, "objective": list(dict.fromkeys(factors.get("objective", [base.objective])
                                                                 + [fallback]))}
    names = {cell_name(dict(zip(grid, combo))) for combo in itertools.product(*grid.values())}
    kept = [c for c in meta.cells if c.name not in names]
    return _matrix(base, grid, 1, keep=(merged, kept))  # matrix.json lists both while the ORPO cells run


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"
