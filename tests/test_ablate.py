"""The ablation matrix: layout, cells that differ only in their factors, shared model/data/reference, re-runs,
a killed cell, a failing cell, the lock, --grid parsing, the CLI and the parallel (subprocess) path."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from safetensors.torch import load_file

import preftune.core.objectives as O
import preftune.modeling.model as M
import preftune.modeling.reference as R
import preftune.training.loop as T
import preftune.training.step as S
from preftune.commands.cli import main
from preftune.core.config import Config
from preftune.core.errors import InputError
from preftune.core.files import read_jsonl
from preftune.core.layout import RunDir
from preftune.modeling.model import is_peft
from preftune.training.checkpoints import latest_checkpoint
from preftune.training.matrix import DEFAULT_GRID, parse_grid, plan, run_fallback, run_matrix

NAMES = ["objective=dpo,lora_rank=16", "objective=dpo,lora_rank=8", "objective=simpo,lora_rank=16",
         "objective=simpo,lora_rank=8"]
SIMPO = {"beta": 2.0, "gamma_beta_ratio": 0.5}


def base_cfg(world, root: Path, name: str, **kw) -> Config:
    d = dict(model=str(world.model_dir), data=str(world.train_path), eval_data=str(world.eval_path), lr=2e-3,
             batch_size=4, max_steps=4, eval_every=0, save_every=2, warmup_ratio=0.0, lora_dropout=0.1,
             objectives={"dpo": {"beta": 0.3}, "simpo": dict(SIMPO)}, output=str(root / name), cache_dir=str(root / "cache"), quiet=True,
             max_train_pairs=32)
    return Config(**{**d, **kw})


def count_train(monkeypatch) -> list[str]:
    calls: list[str] = []
    real = T.train

    def counted(cfg, **kw):
        calls.append(Path(cfg.output).name)
        return real(cfg, **kw)

    monkeypatch.setattr(T, "train", counted)
    return calls


def cell(out: Path, name: str, file: str) -> dict | list:
    path = out / "cells" / name / file
    return read_jsonl(path) if file.endswith(".jsonl") else json.loads(path.read_text())


def adapter(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "adapter" / "adapter_model.safetensors")


@pytest.fixture(scope="module")
def matrix(tiny_world, tmp_path_factory):
    """The default 2x2 matrix, run once, recording model loads, train calls and each cell's training batches."""
    root = tmp_path_factory.mktemp("ablate")
    base = base_cfg(tiny_world, root, "m")
    models, trains, batches = [], [], {}
    real_load, real_train, real_batch = M.load_model, T.train, S.make_batch

    def load(cfg):
        models.append(real_load(cfg))
        return models[-1]

    def train(cfg, **kw):
        trains.append(Path(cfg.output).name)
        return real_train(cfg, **kw)

    def batch(prompts, *a, **k):
        batches.setdefault(trains[-1], []).append([tuple(p) for p in prompts])
        return real_batch(prompts, *a, **k)

    with pytest.MonkeyPatch.context() as mp:
        for mod, name, fn in ((M, "load_model", load), (T, "load_model", load), (T, "train", train),
                              (S, "make_batch", batch)):
            mp.setattr(mod, name, fn)
        result = run_matrix(base, parse_grid([]))
    return SimpleNamespace(base=base, out=Path(base.output), result=result, models=models, trains=trains,
                           batches=batches)


def test_default_grid_layout(matrix):
    out = matrix.out
    assert matrix.result == {"finished": 4, "failed": 0}
    meta = json.loads((out / "matrix.json").read_text())
    assert meta["factors"] == {"objective": ["dpo", "simpo"], "lora_rank": [16, 8]}
    assert [c["name"] for c in meta["cells"]] == NAMES
    assert [c["values"] for c in meta["cells"]] == [{"objective": o, "lora_rank": r}
                                                    for o in ("dpo", "simpo") for r in (16, 8)]
    assert all(c["status"] == "finished" and c["error"] is None for c in meta["cells"])
    assert yaml.safe_load((out / "base_config.yaml").read_text()) == matrix.base.to_dict()
    assert not (out / ".lock").exists()
    ids = None
    for name in NAMES:
        s = cell(out, name, "summary.json")
        assert s["status"] == "finished" and s["steps"] == 4 and f"lora_rank={s['lora_rank']}" in name
        assert (out / "cells" / name / "adapter" / "adapter_config.json").exists()
        rows = cell(out, name, "eval_pairs.jsonl")
        got = [(r["id"], r["ref_chosen_logps"], r["ref_rejected_logps"]) for r in rows]
        ids = ids or got
        assert got == ids and len(got) == 64  # same held-out pairs, same reference log-probs


def test_cells_differ_only_in_their_factors(matrix):
    base = matrix.base.to_dict()
    free = {"objective", "lora_rank", "output", "resume", "objectives"}
    for name in NAMES:
        cfg = yaml.safe_load((matrix.out / "cells" / name / "config.yaml").read_text())
        assert cfg.keys() == base.keys() and {k for k in base if cfg[k] != base[k]} <= free
        assert cfg["output"] == str(matrix.out / "cells" / name) and cfg["resume"] is True
        params = cell(matrix.out, name, "summary.json")["params"]
        if "simpo" in name:  # its own `objectives:` entry, not the DPO cells' beta
            assert cfg["objectives"]["simpo"] == {"beta": 2.0, "gamma_beta_ratio": 0.5}
            assert params == {"beta": 2.0, "gamma_beta_ratio": 0.5, "nll_weight": 0.0}
        else:
            assert cfg["objectives"]["dpo"] == {"beta": 0.3} and params["beta"] == 0.3
    # Same batches in the same order for every cell.
    assert list(matrix.batches) == NAMES and len(matrix.batches[NAMES[0]]) == 4
    assert all(b == matrix.batches[NAMES[0]] for b in matrix.batches.values())


def test_shared_reference_and_base_model(matrix):
    cached = [cell(matrix.out, n, "summary.json")["timing"]["reference_cached"] for n in NAMES]
    assert cached[0] == {"train": False, "eval": False}       # computed once, by the first cell
    assert cached[1:] == [{"train": True, "eval": True}] * 3  # SimPO needs no train reference at all
    assert len(matrix.models) == 1 and matrix.trains == NAMES


def test_lora_cells_leave_the_shared_model_clean(matrix):
    model = matrix.models[0]
    assert not is_peft(model) and not [n for n, _ in model.named_modules() if "lora_" in n]
    step0 = [cell(matrix.out, n, "summary.json")["step0_eval"] for n in NAMES]
    final = [cell(matrix.out, n, "summary.json")["final_eval"] for n in NAMES]
    for key in ("eval_logps/chosen", "eval_logps/rejected"):
        assert len({e[key] for e in step0}) == 1  # no earlier cell's adapter left in the model
        assert all(f[key] != step0[0][key] for f in final)  # while every cell did train


def test_rerun_of_a_finished_matrix_trains_nothing(matrix, monkeypatch):
    files = {n: {f: (matrix.out / "cells" / n / f).read_bytes() for f in ("summary.json", "eval_pairs.jsonl")}
             for n in NAMES}
    calls = count_train(monkeypatch)
    assert run_matrix(matrix.base, parse_grid([])) == {"finished": 4, "failed": 0}
    assert calls == []
    assert files == {n: {f: (matrix.out / "cells" / n / f).read_bytes() for f in files[n]} for n in NAMES}
    assert all(c["status"] == "finished" for c in json.loads((matrix.out / "matrix.json").read_text())["cells"])
    # Other settings over the same folder would mix results: refused before anything is written.
    with pytest.raises(InputError, match=r"other settings \(lr\)"):
        run_matrix(replace(matrix.base, lr=1e-3), parse_grid([]))
    assert calls == []


def test_killed_cell_resumes_and_matches_uninterrupted(matrix, tmp_path, monkeypatch):
    base = replace(matrix.base, output=str(tmp_path / "k"))
    grid = {"objective": ["dpo", "simpo"], "lora_rank": [8]}
    real, n = S.batch_logps, {"calls": 0}

    def killed(*a, **k):  # one training forward per step: 4 for the dpo cell, then simpo's third step dies
        n["calls"] += 1
        if n["calls"] == 4 + 3:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(S, "batch_logps", killed)
    with pytest.raises(KeyboardInterrupt):
        run_matrix(base, grid)
    monkeypatch.setattr(S, "batch_logps", real)
    out, killed_cell = tmp_path / "k", NAMES[3]
    meta = json.loads((out / "matrix.json").read_text())
    assert [c["status"] for c in meta["cells"]] == ["finished", "running"]
    assert not (out / ".lock").exists() and not (out / "cells" / killed_cell / ".lock").exists()
    assert latest_checkpoint(RunDir(out / "cells" / killed_cell)).name == "step-0000002"

    calls = count_train(monkeypatch)
    assert run_matrix(base, grid) == {"finished": 2, "failed": 0}
    assert calls == [killed_cell]  # the finished cell is skipped
    a, b = adapter(out / "cells" / killed_cell), adapter(matrix.out / "cells" / killed_cell)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert cell(out, killed_cell, "summary.json")["status"] == "finished"


def test_failing_cell_is_recorded_and_others_finish(matrix, tmp_path, monkeypatch, capsys):
    real = O.compute

    def broken(name, *a, **k):
        if name == "simpo":
            raise RuntimeError("boom\nsecond line")
        return real(name, *a, **k)

    monkeypatch.setattr(O, "compute", broken)
    base = replace(matrix.base, output=str(tmp_path / "f"))
    assert run_matrix(base, {"objective": ["simpo", "dpo"], "lora_rank": [8]}) == {"finished": 1, "failed": 1}
    cells = json.loads((tmp_path / "f" / "matrix.json").read_text())["cells"]
    assert [(c["status"], c["error"]) for c in cells] == [("failed", "RuntimeError: boom"), ("finished", None)]
    assert "RuntimeError: boom" in capsys.readouterr().err
    # The dpo cell ran on the model the failed cell had wrapped: its adapter was removed.
    step0 = cell(tmp_path / "f", NAMES[1], "summary.json")["step0_eval"]
    assert step0["eval_logps/chosen"] == cell(matrix.out, NAMES[1], "summary.json")["step0_eval"]["eval_logps/chosen"]


def test_second_process_holding_the_lock_is_refused(matrix, tmp_path):
    out = tmp_path / "locked"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from preftune.core.files import FolderLock; "
                               "FolderLock(sys.argv[1]).__enter__(); print('held', flush=True); time.sleep(60)",
                               str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(InputError, match=f"pid {holder.pid}"):
            run_matrix(replace(matrix.base, output=str(out)), parse_grid([]))
        assert sorted(p.name for p in out.iterdir()) == [".lock"]
    finally:
        holder.kill()
        holder.wait()


def test_parse_grid(matrix):
    assert parse_grid(["objective=dpo,simpo", "lora-rank=16, 8", "lr=1e-5,2e-5"]) == {
        "objective": ["dpo", "simpo"], "lora_rank": [16, 8], "lr": [1e-5, 2e-5]}
    assert type(parse_grid(["lora_rank=4"])["lora_rank"][0]) is int
    assert parse_grid(["lora_rank=8,8"]) == {"lora_rank": [8]}
    grid = parse_grid([])
    assert grid == DEFAULT_GRID
    grid["objective"].append("orpo")
    assert DEFAULT_GRID["objective"] == ["dpo", "simpo"]
    for bad, msg in [("lora_rnak=4", "did you mean 'lora_rank'"), ("output=a,b", "cannot be a factor"),
                     ("lora_rank=a", "lora_rank"), ("objective", "expected KEY=V1"), ("lr=", "expected KEY=V1")]:
        with pytest.raises(InputError, match=msg):
            parse_grid([bad])
    with pytest.raises(InputError, match="given twice"):
        parse_grid(["lora_rank=4", "lora_rank=8"])
    with pytest.raises(InputError, match="did you mean 'dpo'"):
        plan(matrix.base, parse_grid(["objective=dpoo"]))


def test_cli_ablate_and_fallback(tiny_world, tmp_path, capsys):
    cfg = {"model": str(tiny_world.model_dir), "data": str(tiny_world.train_path), "eval_data": str(tiny_world.eval_path),
           "max_steps": 2, "batch_size": 4, "max_train_pairs": 16, "eval_every": 0, "save_every": 0,
           "cache_dir": str(tmp_path / "cache"), "quiet": True, "objectives": {"dpo": {"beta": 0.1}, "simpo": SIMPO}}
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(cfg))
    args = ["ablate", "--config", str(tmp_path / "base.yaml"), "--grid", "objective=dpo,simpo", "--grid", "lora_rank=4",
            "--beta", "0.2", "--output", str(tmp_path / "M")]
    assert main(args) == 0
    assert "2 finished, 0 failed" in capsys.readouterr().out
    betas = [yaml.safe_load((tmp_path / "M" / "cells" / f"objective={o},lora_rank=4" / "config.yaml").read_text())
             ["objectives"][o]["beta"] for o in ("dpo", "simpo")]
    assert betas == [0.2, 2.0]  # the command line wins over the base objective's entry; simpo keeps its own
    assert main(args[:3] + ["--grid", "lora_rnak=4", "--output", str(tmp_path / "N")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "lora_rank" in err[0] and not (tmp_path / "N").exists()
    # decide --fallback adds ORPO cells at the matrix's ranks; matrix.json lists all of them.
    assert run_fallback(tmp_path / "M") == {"finished": 1, "failed": 0}
    meta = json.loads((tmp_path / "M" / "matrix.json").read_text())
    assert meta["factors"] == {"objective": ["dpo", "simpo", "orpo"], "lora_rank": [4]}
    assert [c["name"] for c in meta["cells"]] == [f"objective={o},lora_rank=4" for o in ("dpo", "simpo", "orpo")]
    assert all(c["status"] == "finished" for c in meta["cells"])
    dpo, orpo = (yaml.safe_load((tmp_path / "M" / "cells" / f"objective={o},lora_rank=4" / "config.yaml").read_text())
                 for o in ("dpo", "orpo"))
    assert dpo | {"objective": "orpo", "output": orpo["output"], "objectives": orpo["objectives"]} == orpo
    assert orpo["objectives"] == dpo["objectives"] | {"orpo": {"beta": 0.1}}  # its own default, not DPO's beta


def test_parallel_cells_in_subprocesses(matrix, tmp_path, monkeypatch):
    cache = tmp_path / "env-cache"
    monkeypatch.setenv("PREFTUNE_CACHE", str(cache))  # cache_dir unset: the children must use the parent's
    computed = []
    real = R.reference_logps

    def counted(*a, **k):
        logps, hit = real(*a, **k)
        computed.append(hit)
        return logps, hit

    monkeypatch.setattr(R, "reference_logps", counted)
    base = replace(matrix.base, output=str(tmp_path / "P"), cache_dir=None, max_steps=2)
    assert run_matrix(base, {"objective": ["dpo", "simpo"], "lora_rank": [4]}, parallel=2) == {"finished": 2,
                                                                                                 "failed": 0}
    assert computed == [False, False]  # held-out and train reference, warmed up once, in the parent
    cells = json.loads((tmp_path / "P" / "matrix.json").read_text())["cells"]
    assert [c["status"] for c in cells] == ["finished", "finished"]
    for c in cells:
        s = cell(tmp_path / "P", c["name"], "summary.json")
        assert s["status"] == "finished" and s["timing"]["reference_cached"] == {"train": True, "eval": True}
        assert yaml.safe_load((tmp_path / "P" / "cells" / c["name"] / "config.yaml").read_text())["cache_dir"] == \
            str(cache)
