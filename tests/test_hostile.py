"""What a hostile tester found (issue 24): bounded YAML, SIGTERM and disk errors as one line with no stale lock,
children of `ablate --parallel` that die with their parent, and files that honour the umask.

    pytest tests/test_hostile.py
"""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from preftune.commands.cli import main
from preftune.core.files import atomic_dir

BOMB = "\n".join(['a0: &a0 ["x", "x", "x", "x", "x", "x", "x", "x", "x"]']
                 + [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, 8)]
                 + ["lora_target_modules: [" + ", ".join(["*a7"] * 9) + "]"]) + "\n"


def _train_args(world, out: Path, cache: Path, *extra: str) -> list[str]:
    return ["train", "--model", str(world.model_dir), "--data", str(world.train_path), "--eval-data",
            str(world.eval_path), "--max-train-pairs", "64", "--batch-size", "4", "--eval-every", "0",
            "--output", str(out), "--cache-dir", str(cache), "--quiet", *extra]


def test_yaml_alias_bomb_is_one_line_at_once(tmp_path, capsys):
    path = tmp_path / "bomb.yaml"
    path.write_text(BOMB)
    t = time.perf_counter()
    assert main(["train", "--config", str(path), "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert time.perf_counter() - t < 1.0
    assert err.count("\n") == 1 and "aliases" in err and str(path) in err and not (tmp_path / "out").exists()


def test_a_huge_config_file_is_refused(tmp_path, capsys):
    path = tmp_path / "big.yaml"
    path.write_text("lora_rank: 8\n" + "# padding\n" * 200_000)
    assert main(["train", "--config", str(path)]) == 2
    assert "not a config file" in capsys.readouterr().err


def test_sigterm_is_the_ctrl_c_line_and_leaves_no_lock(tiny_world, tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "preftune", *_train_args(tiny_world, out, tmp_path / "cache", "--max-steps", "400",
                                                        "--save-every", "2")]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (out / "checkpoints").exists() and time.time() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert err.strip().splitlines()[-1] == "preftune: interrupted; continue with --resume"
    assert "Traceback" not in err and not (out / ".lock").exists()


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS])
def test_disk_errors_mid_run_are_one_line_exit_1(tiny_world, tmp_path, monkeypatch, capsys, code):
    """A full disk or a read-only folder while training: one line naming the path, exit 1, no stale lock."""
    import preftune.training.loop as loop

    out = tmp_path / "run"
    real = loop.append_jsonl

    def failing(path, row):
        if row.get("step", 0) >= 2:
            raise OSError(code, os.strerror(code), str(path))
        return real(path, row)

    monkeypatch.setattr(loop, "append_jsonl", failing)
    assert main(_train_args(tiny_world, out, tmp_path / "cache", "--max-steps", "4")) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(out / "metrics.jsonl") in err[0] and os.strerror(code) in err[0]
    assert not (out / ".lock").exists()


def test_parallel_children_die_with_their_parent(tiny_world, tmp_path):
    """kill -9 of `ablate --parallel 2`: no child keeps training, and a re-run resumes both cells."""
    out = tmp_path / "m"
    args = ["ablate", "--model", str(tiny_world.model_dir), "--data", str(tiny_world.train_path), "--eval-data",
            str(tiny_world.eval_path), "--max-train-pairs", "64", "--batch-size", "4", "--max-steps", "120",
            "--save-every", "2", "--eval-every", "0", "--grid", "objective=dpo,simpo", "--grid", "lora_rank=4",
            "--parallel", "2", "--output", str(out), "--cache-dir", str(tmp_path / "cache"), "--quiet"]
    parent = subprocess.Popen([sys.executable, "-m", "preftune", *args], stderr=subprocess.DEVNULL)
    cells = out / "cells"
    deadline = time.time() + 240
    while time.time() < deadline and len(list(cells.glob("*/checkpoints"))) < 2:
        time.sleep(0.2)
    children = _children(parent.pid)
    assert len(children) == 2, children
    parent.kill()
    parent.wait()
    deadline = time.time() + 30
    while time.time() < deadline and any(_alive(pid) for pid in children):
        time.sleep(0.2)
    assert not any(_alive(pid) for pid in children)
    resumed = [d for d in cells.iterdir() if (d / "checkpoints").exists() and not (d / "summary.json").exists()]
    assert len(resumed) == 2
    i = args.index("--parallel")
    assert main(args[:i] + args[i + 2:]) == 0
    assert all((d / "summary.json").exists() and not (d / ".lock").exists() for d in resumed)


def _children(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True).stdout
    return [int(x) for x in out.split()]


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split()[2]
    except OSError:
        return False
    return state != "Z"


def test_atomic_folders_honour_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        with atomic_dir(tmp_path / "adapter") as d:
            (d / "weights.safetensors").write_bytes(b"x")
            os.chmod(d / "weights.safetensors", 0o600)  # as some writers make them
    finally:
        os.umask(old)
    assert (tmp_path / "adapter").stat().st_mode & 0o777 == 0o755
    assert (tmp_path / "adapter" / "weights.safetensors").stat().st_mode & 0o777 == 0o644


# --- integrity: files preftune reads back are checked, not trusted -----------------------------------------------

def _run_cfg(world, tmp_path, name, **kw):
    from preftune.core import config

    base = dict(model=str(world.model_dir), data=str(world.train_path), eval_data=str(world.eval_path), lr=2e-3,
                batch_size=8, max_steps=8, eval_every=0, save_every=2, warmup_ratio=0.0, lora_dropout=0.1,
                output=str(tmp_path / name), cache_dir=str(tmp_path / "cache"), quiet=True, max_train_pairs=128)
    return config.build({**base, **kw})


def _crashed_run(world, tmp_path, monkeypatch, name):
    """A run killed during step 7: checkpoints at steps 4 and 6 on disk."""
    from dataclasses import replace

    import preftune.training.loop as T
    import preftune.training.step as S

    calls, real = {"n": 0}, S.batch_logps

    def crash(*a, **k):
        calls["n"] += 1
        if calls["n"] == 7:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(S, "batch_logps", crash)
    cfg = _run_cfg(world, tmp_path, name)
    with pytest.raises(KeyboardInterrupt):
        T.train(cfg)
    monkeypatch.setattr(S, "batch_logps", real)
    return replace(cfg, resume=True)


def _adapter(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(folder / "adapter" / "adapter_model.safetensors")


@pytest.fixture(scope="module")
def uninterrupted(tiny_world, tmp_path_factory):
    import preftune.training.loop as T

    root = tmp_path_factory.mktemp("whole")
    T.train(_run_cfg(tiny_world, root, "whole"))
    return _adapter(root / "whole")


@pytest.mark.parametrize("damage", ["truncate trainable", "truncate optimizer", "garble state", "flip optimizer"])
def test_a_damaged_checkpoint_falls_back_to_the_one_before(tiny_world, tmp_path, monkeypatch, capsys, damage,
                                                          uninterrupted):
    import preftune.training.loop as T

    cfg = _crashed_run(tiny_world, tmp_path, monkeypatch, damage.replace(" ", "-"))
    newest = Path(cfg.output) / "checkpoints" / "step-0000006"
    assert sorted(p.name for p in newest.parent.iterdir()) == ["step-0000004", "step-0000006"]
    how, what = damage.split()
    f = newest / {"trainable": "trainable.safetensors", "optimizer": "optimizer.safetensors", "state": "state.json"}[what]
    data = bytearray(f.read_bytes())
    if how == "truncate":
        data = data[:len(data) // 2]
    elif how == "garble":
        data = b'{"step": 6, "param_gr'
    else:
        data[-20] ^= 0xFF
    f.write_bytes(bytes(data))
    capsys.readouterr()
    T.train(cfg)
    err = capsys.readouterr().err
    assert f"{f}: damaged" in err and "trying the checkpoint before it" in err and "diverged" not in err
    got = _adapter(Path(cfg.output))
    assert all(torch_equal(got[k], uninterrupted[k]) for k in uninterrupted)  # resumed at step 4: the same run


def torch_equal(a, b) -> bool:
    import torch

    return bool(torch.equal(a, b))


def test_no_good_checkpoint_is_one_line(tiny_world, tmp_path, monkeypatch, capsys):
    cfg = _crashed_run(tiny_world, tmp_path, monkeypatch, "bad")
    for ckpt in (Path(cfg.output) / "checkpoints").iterdir():
        (ckpt / "trainable.safetensors").write_bytes(b"not a safetensors file")
    args = ["train", "--config", str(Path(cfg.output) / "config.yaml"), "--resume"]
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("preftune: error: ") and "trainable.safetensors: damaged" in err[-1]
    assert "Traceback" not in "\n".join(err)


def test_an_altered_reference_cache_is_recomputed(tiny_world, tmp_path):
    """A cache file rewritten with other values of the same shape is caught by its checksum: step 0 ties."""
    import torch
    from safetensors.torch import load_file, save_file

    import preftune.training.loop as T

    first = T.train(_run_cfg(tiny_world, tmp_path, "a", max_steps=2, save_every=0, objective="dpo"))
    for f in (tmp_path / "cache" / "reference").glob("*.safetensors"):
        t = load_file(f)
        save_file({"logps": t["logps"] + torch.randn_like(t["logps"])}, str(f))  # same shape, other numbers
    again = T.train(_run_cfg(tiny_world, tmp_path, "b", max_steps=2, save_every=0, objective="dpo"))
    assert first.timing["reference_cached"] == {"train": False, "eval": False}
    assert again.timing["reference_cached"] == {"train": False, "eval": False}  # recomputed, not trusted
    assert again.step0_eval["eval_accuracy"] == 0.5 and again.step0_eval["eval_refrel/margin"] == 0.0


def test_a_garbled_cell_summary_runs_the_cell_again(tiny_world, tmp_path, capsys):
    out = tmp_path / "m"
    args = ["ablate", "--model", str(tiny_world.model_dir), "--data", str(tiny_world.train_path), "--eval-data",
            str(tiny_world.eval_path), "--max-train-pairs", "32", "--batch-size", "4", "--max-steps", "2",
            "--eval-every", "0", "--grid", "objective=dpo", "--grid", "lora_rank=4,2", "--output", str(out),
            "--cache-dir", str(tmp_path / "cache"), "--quiet"]
    assert main(args) == 0
    summary = out / "cells" / "objective=dpo,lora_rank=4" / "summary.json"
    summary.write_text(summary.read_text().replace('"steps": 2', '"steps": 3'))  # altered, still valid JSON
    capsys.readouterr()
    assert main(args) == 0
    err = capsys.readouterr().err
    assert f"{summary}: damaged" in err and "runs again" in err and "Traceback" not in err
    assert '"steps": 2' in summary.read_text()


def test_another_commands_flag_is_named_as_such(capsys):
    with pytest.raises(SystemExit) as e:
        main(["iterate", "--prompts", "p.jsonl", "--judge", "python:m:f", "--gen-max-new-tokens", "8"])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and err.count("\n") == 0
    assert "--gen-max-new-tokens is a flag of preftune train" in err and "not of preftune iterate" in err
    assert "did you mean" not in err
