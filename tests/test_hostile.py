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
