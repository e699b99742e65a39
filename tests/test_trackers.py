"""--report-to: TensorBoard, MLflow and W&B (offline) receive the run's metrics and config; read back here.

    .venv/bin/pytest -q tests/test_trackers.py
"""

from __future__ import annotations

import glob
import importlib.util
import json
import struct
from pathlib import Path

import pytest
import yaml

import preftune.training.step as S
from preftune.commands.cli import main
from preftune.core import trackers
from preftune.core.config import Config
from preftune.core.errors import InputError
from preftune.core.files import read_jsonl
from preftune.training.matrix import run_matrix


def train_argv(world, out: Path, *extra: str) -> list[str]:
    return ["train", "--model", str(world.model_dir), "--data", str(world.train_path), "--eval-data",
            str(world.eval_path), "--max-train-pairs", "16", "--batch-size", "4", "--max-steps", "4",
            "--eval-every", "2", "--save-every", "0", "--lr", "2e-3", "--quiet", "--output", str(out),
            "--cache-dir", str(out.parent / "cache"), *extra]


def by_step(rows: list[dict], key: str) -> list[tuple[int, float]]:
    return [(r["step"], r[key]) for r in rows if key in r]


@pytest.fixture(scope="module")
def tracked(tiny_world, tmp_path_factory):
    """One run through the CLI with --report-to tensorboard,mlflow, and its metrics.jsonl rows."""
    out = tmp_path_factory.mktemp("tracked") / "run"
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        assert main(train_argv(tiny_world, out, "--report-to", "tensorboard,mlflow")) == 0
    return out, read_jsonl(out / "metrics.jsonl")


def test_tensorboard_gets_trl_named_metrics_and_hparams(tracked):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    out, rows = tracked
    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train/loss", "train/rewards/margins", "train/grad_norm", "eval/loss", "eval/accuracy",
            "eval/refrel/accuracy", "eval/lennorm/accuracy"} <= tags
    for key, tag in (("loss", "train/loss"), ("rewards/margins", "train/rewards/margins"),
                     ("eval_accuracy", "eval/accuracy"), ("eval_refrel/accuracy", "eval/refrel/accuracy")):
        got = [(e.step, e.value) for e in acc.Scalars(tag)]
        want = by_step(rows, key)
        assert [s for s, _ in got] == [s for s, _ in want] and len(want) >= 3
        assert [v for _, v in got] == pytest.approx([v for _, v in want], rel=1e-6)  # stored as float32
    content = acc.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    hp = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info.hparams
    assert hp["lr"].number_value == 2e-3 and hp["objective"].string_value == "dpo"
    assert hp["lora_rank"].number_value == 8 and hp["report_to"].string_value == "['tensorboard', 'mlflow']"


def test_mlflow_file_store_gets_metrics_and_params(tracked):
    from mlflow.tracking import MlflowClient

    out, rows = tracked
    client = MlflowClient(tracking_uri=f"file:{out.absolute() / 'mlruns'}")
    exp = client.get_experiment_by_name("preftune")
    [run] = client.search_runs([exp.experiment_id])
    assert run.info.run_name == "run" and run.info.status == "FINISHED"
    for key in ("loss", "rewards/margins", "eval_loss", "eval_accuracy", "eval_lennorm/accuracy"):
        got = [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, key)]
        assert sorted(got) == by_step(rows, key), key
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert run.data.params["lr"] == str(config["lr"]) and run.data.params["objective"] == "dpo"
    assert run.data.params["max_steps"] == "4" and len(run.data.params) == len(config)


def test_matrix_cells_are_runs_grouped_by_matrix(tiny_world, tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    base = Config(model=str(tiny_world.model_dir), data=str(tiny_world.train_path),
                  eval_data=str(tiny_world.eval_path), max_train_pairs=8, batch_size=4, max_steps=2, eval_every=0,
                  save_every=0, quiet=True, output=str(tmp_path / "mx"), cache_dir=str(tmp_path / "cache"),
                  report_to=["mlflow", "tensorboard"])
    assert run_matrix(base, {"objective": ["dpo", "simpo"], "lora_rank": [8]}) == {"finished": 2, "failed": 0}
    client = MlflowClient(tracking_uri=f"file:{tmp_path / 'mx' / 'mlruns'}")
    runs = client.search_runs([client.get_experiment_by_name("mx").experiment_id])
    assert sorted(r.info.run_name for r in runs) == ["objective=dpo,lora_rank=8", "objective=simpo,lora_rank=8"]
    assert sorted(r.data.params["objective"] for r in runs) == ["dpo", "simpo"]
    for r in runs:
        cell = tmp_path / "mx" / "cells" / r.info.run_name
        assert [m.step for m in client.get_metric_history(r.info.run_id, "eval_accuracy")] == [0, 2]
        assert list((cell / "tensorboard").glob("events.out.tfevents.*"))
        assert not (cell / "mlruns").exists()


def wandb_records(path: str) -> list:
    """Records of an offline .wandb file: W&B's header, then LevelDB-log framed protobuf Records."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(path).read_bytes()
    assert data[:4] == b":W&B"
    block, pos, out, pending = 32768, 7, [], b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST
            rec = pb.Record()
            rec.ParseFromString(pending)
            out.append(rec)
            pending = b""
        elif kind == 0:
            break
    return out


def test_wandb_offline(tiny_world, tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)  # offline is the default
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "wb"
    assert main(train_argv(tiny_world, out, "--report-to", "wandb")) == 0
    rows = read_jsonl(out / "metrics.jsonl")
    [path] = glob.glob(str(out / "wandb" / "offline-run-*" / "run-*.wandb"))
    records = wandb_records(path)
    assert records[-1].WhichOneof("record_type") == "exit"  # complete when preftune returned
    history: dict[str, list[tuple[int, float]]] = {}
    for rec in records:
        if rec.WhichOneof("record_type") == "history":
            items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.history.item}
            for k, v in items.items():
                if not k.startswith("_"):
                    history.setdefault(k, []).append((items["_step"], v))
    assert history["train/loss"] == by_step(rows, "loss")
    assert history["eval/accuracy"] == by_step(rows, "eval_accuracy")
    run = next(r.run for r in records if r.WhichOneof("record_type") == "run")
    config = {u.key: json.loads(u.value_json) for u in run.config.update}
    assert run.display_name == "wb" and config["lr"] == 2e-3 and config["objective"] == "dpo"


def test_report_to_choices_and_missing_extras(tiny_world, tmp_path, capsys, monkeypatch):
    assert trackers.check(["none"]) == [] and trackers.check("tensorboard, mlflow") == ["tensorboard", "mlflow"]
    with pytest.raises(InputError, match="field 'report_to': unknown tracker 'tensorbord'; choose from "
                                         "tensorboard, mlflow, wandb, trackio, none"):
        trackers.check(["tensorbord"])
    with pytest.raises(InputError, match="'none' cannot be combined"):
        trackers.check(["none", "mlflow"])
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "trackio" else real(name, *a))
    for cmd in ("train", "ablate"):
        out = tmp_path / cmd
        assert main([cmd, *train_argv(tiny_world, out, "--report-to", "tensorboard,trackio")[1:]]) == 2
        err = capsys.readouterr().err
        assert err == ("preftune: error: field 'report_to': --report-to trackio needs the trackio package: "
                       "pip install preftune[trackio]\n")
        assert not out.exists()


def test_resume_continues_the_tracker_runs(tiny_world, tmp_path, monkeypatch):
    """A killed run resumed: TensorBoard drops the steps after the checkpoint, MLflow keeps one run."""
    from dataclasses import replace

    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    import preftune.training.loop as T
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = Config(model=str(tiny_world.model_dir), data=str(tiny_world.train_path),
                 eval_data=str(tiny_world.eval_path), max_train_pairs=16, batch_size=4, max_steps=5, eval_every=0,
                 save_every=2, lr=2e-3, quiet=True, output=str(tmp_path / "r"), cache_dir=str(tmp_path / "cache"),
                 report_to=["tensorboard", "mlflow"])
    calls, real = {"n": 0}, S.batch_logps

    def crash_at_step_4(*a, **k):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt  # step 3 is logged, the checkpoint is at step 2
        return real(*a, **k)

    monkeypatch.setattr(S, "batch_logps", crash_at_step_4)
    with pytest.raises(KeyboardInterrupt):
        T.train(cfg)
    monkeypatch.setattr(S, "batch_logps", real)
    T.train(replace(cfg, resume=True))
    rows = read_jsonl(tmp_path / "r" / "metrics.jsonl")
    acc = EventAccumulator(str(tmp_path / "r" / "tensorboard"))
    acc.Reload()
    got, want = [(e.step, e.value) for e in acc.Scalars("train/loss")], by_step(rows, "loss")
    assert [s for s, _ in got] == [1, 2, 3, 4, 5] == [s for s, _ in want]  # step 3 once, not twice
    assert [v for _, v in got] == pytest.approx([v for _, v in want], rel=1e-6)
    client = MlflowClient(tracking_uri=f"file:{tmp_path / 'r' / 'mlruns'}")
    [run] = client.search_runs([client.get_experiment_by_name("preftune").experiment_id])
    assert run.info.status == "FINISHED"
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "loss")]
    assert sorted(set(steps)) == [1, 2, 3, 4, 5]
