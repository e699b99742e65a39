"""The matrix on Ray (a local instance, ray.init(num_cpus=2)): the same folders, matrix.json and decision as the
local backend, a worker killed mid-cell retried from its checkpoint, and the one-line errors for a missing Ray
and an unreachable address. Also the GPU choice of --parallel children."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import ray

import preftune
from preftune.commands.cli import main
from preftune.core.config import Config
from preftune.training.matrix import RayOptions, parse_grid, pick_gpu, run_matrix

GRID = ["objective=dpo,simpo", "lora_rank=8,4"]


def base_cfg(world, out: Path) -> Config:
    return Config(model=str(world.model_dir), data=str(world.train_path), eval_data=str(world.eval_path), lr=2e-3,
                  batch_size=4, max_steps=4, eval_every=0, save_every=2, warmup_ratio=0.0, threads=1,
                  objectives={"dpo": {"beta": 0.3}, "simpo": {"beta": 2.0, "gamma_beta_ratio": 0.5}},
                  output=str(out), cache_dir=str(out.parent / "cache"), quiet=True, max_train_pairs=32)


def rows(folder: Path) -> list[dict]:
    return [json.loads(x) for x in (folder / "eval_pairs.jsonl").read_text().splitlines()]


def test_ray_backend_matches_local_and_retries_a_killed_worker(tiny_world, tmp_path):
    local = tmp_path / "local"
    assert run_matrix(base_cfg(tiny_world, local), parse_grid(GRID)) == {"finished": 4, "failed": 0}
    want = preftune.decide(str(local))

    marker = tmp_path / "killed"
    # the first worker to write a checkpoint SIGKILLs itself (preftune.training.loop._crash_hook); Ray must retry it
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PREFTUNE_TEST_KILL_AFTER_CHECKPOINT": str(marker)}})
    try:
        on_ray = tmp_path / "ray"
        result = run_matrix(base_cfg(tiny_world, on_ray), parse_grid(GRID), backend="ray",
                            ray=RayOptions(cpus_per_cell=1, max_retries=2))
    finally:
        ray.shutdown()
    assert result == {"finished": 4, "failed": 0}
    assert marker.exists()  # a worker did die mid-cell, after its step-2 checkpoint, and the matrix finished

    got = preftune.decide(str(on_ray))
    assert (got.verdict, got.objective, got.lora_rank) == (want.verdict, want.objective, want.lora_rank)
    meta_l, meta_r = (json.loads((d / "matrix.json").read_text()) for d in (local, on_ray))
    assert meta_l == meta_r  # factors, names, values, statuses: decide and report see the same matrix
    for c in meta_l["cells"]:
        a, b = local / "cells" / c["name"], on_ray / "cells" / c["name"]
        assert sorted(p.name for p in a.iterdir()) == sorted(p.name for p in b.iterdir())
        assert not (b / "checkpoints").exists() and json.loads((b / "summary.json").read_text())["steps"] == 4
        for x, y in zip(rows(a), rows(b), strict=True):  # the killed and resumed cell too
            assert x["id"] == y["id"] and abs(x["margin"] - y["margin"]) < 1e-5
    assert sorted(p.name for p in (on_ray / ".cells").glob("*.yaml")) == sorted(f"{c['name']}.yaml"
                                                                                for c in meta_l["cells"])


def test_ray_missing_or_unreachable_is_one_line(tiny_world, tmp_path, monkeypatch, capsys):
    flags = ["ablate", "--model", str(tiny_world.model_dir), "--data", str(tiny_world.train_path), "--grid",
             "objective=dpo,simpo", "--backend", "ray", "--cache-dir", str(tmp_path / "cache")]
    out = tmp_path / "m"
    assert main(flags + ["--output", str(out), "--address", "127.0.0.1:1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot reach the Ray cluster at 127.0.0.1:1" in err[0] and not out.exists()

    assert main(flags + ["--output", str(out), "--cpus-per-cell", "0"]) == 2
    assert "field 'cpus_per_cell': must be > 0" in capsys.readouterr().err and not out.exists()

    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now raises ImportError: Ray not installed
    assert main(flags + ["--output", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["preftune: error: field 'backend': --backend ray needs Ray: pip install preftune[ray]"]
    assert not out.exists()


def test_parallel_children_get_distinct_gpus():
    gpus = ["0", "1", "2"]
    busy: list[str] = []
    for _ in range(4):  # 4 children on 3 GPUs: each GPU once, then the least busy again
        busy.append(pick_gpu(gpus, busy))
    assert busy == ["0", "1", "2", "0"]
    assert pick_gpu(["2", "3"], ["2"]) == "3"  # CUDA_VISIBLE_DEVICES=2,3: its own ids
    assert pick_gpu(gpus, ["0", "0", "1", "2"]) == "1"
