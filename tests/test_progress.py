"""What a run prints: a live bar in a (pseudo-)terminal, plain lines through a pipe, and the resume line.

    .venv/bin/pytest -q tests/test_progress.py
"""

from __future__ import annotations

import fcntl
import os
import pty
import re
import struct
import subprocess
import sys
import termios
from dataclasses import replace

import pytest

import preftune.training.loop as T
import preftune.training.step as S
from preftune.core import config, progress
from preftune.core.files import read_jsonl
from preftune.core.layout import RunDir
from preftune.training.checkpoints import latest_checkpoint

NAME = "[dpo r=8]"


def argv(world, out) -> list[str]:
    return [sys.executable, "-m", "preftune.commands.cli", "train", "--model", str(world.model_dir), "--data",
            str(world.train_path), "--eval-data", str(world.eval_path), "--max-train-pairs", "32", "--batch-size",
            "4", "--max-steps", "8", "--eval-every", "4", "--save-every", "0", "--lr", "2e-3", "--output", str(out),
            "--cache-dir", str(out.parent / "cache")]


def no_ci() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k != "CI"}


def run_in_pty(cmd: list[str], env: dict[str, str]) -> tuple[int, str]:
    """Run ``cmd`` with a pseudo-terminal (120x30) as stdin/stdout/stderr; everything it drew, and its exit code."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 30, 120, 0, 0))
    proc = subprocess.Popen(cmd, stdin=slave, stdout=slave, stderr=slave, env=env, close_fds=True)
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    os.close(master)
    return proc.wait(timeout=300), b"".join(chunks).decode("utf-8", "replace")


def test_terminal_shows_live_bars_with_eta(tiny_world, tmp_path):
    code, out = run_in_pty(argv(tiny_world, tmp_path / "tty"), no_ci())
    assert code == 0, out[-2000:]
    assert out.count("\r") >= 8                                          # the bar redraws in place
    # step n/total, elapsed<ETA, loss, margin, last held-out accuracy, pairs/s
    bar = re.findall(rf"{re.escape(NAME)} +\d+%\|.*\| (\d)/8 \[\d\d:\d\d<\d\d:\d\d, loss \d+\.\d{{4}} "
                     r"margin [+-][0-9.e+-]+ held-out acc (\d\.\d{3}) (\d+\.\d) pairs/s\]", out)
    assert bar and bar[-1][0] == "8" and float(bar[-1][2]) > 0
    for label in ("tokenize", "reference pass (train)", "reference pass (eval)", "eval @ step 4"):
        assert label in out, label
    assert f"{NAME} eval @ step 8: held-out acc" in out and "held-out accuracy" in out


def test_pipe_gets_plain_lines(tiny_world, tmp_path):
    done = subprocess.run(argv(tiny_world, tmp_path / "pipe"), capture_output=True, text=True, env=no_ci(),
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    err = done.stderr
    assert "\r" not in err and "\x1b[" not in err and "reference pass" not in err
    lines = [line for line in err.splitlines() if line.startswith(NAME)]
    steps = [int(m.group(1)) for line in lines if (m := re.match(rf"{re.escape(NAME)} step (\d+)/8 ", line))]
    evals = [int(m.group(1)) for line in lines if (m := re.match(rf"{re.escape(NAME)} eval @ step (\d+):", line))]
    assert steps == list(range(1, 9)) and evals == [0, 4, 8]            # every step: 8 // 10 rounds up to 1
    assert lines[-1].startswith(f"{NAME} done in ")


def test_interactive_needs_a_terminal_and_no_ci(monkeypatch):
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    monkeypatch.delenv("CI", raising=False)
    assert progress.interactive()
    monkeypatch.setenv("CI", "true")
    assert not progress.interactive()


def test_resume_says_where_it_picked_up(tiny_world, tmp_path, monkeypatch, capsys):
    cfg = config.build(dict(model=str(tiny_world.model_dir), data=str(tiny_world.train_path),
                            eval_data=str(tiny_world.eval_path), lr=2e-3, batch_size=4, max_steps=6, eval_every=2,
                            save_every=3, warmup_ratio=0.0, max_train_pairs=32, output=str(tmp_path / "r"),
                            cache_dir=str(tmp_path / "cache")))
    calls, real = {"n": 0}, S.batch_logps

    def crash_at_step_5(*a, **k):  # one training forward per step
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(S, "batch_logps", crash_at_step_5)
    with pytest.raises(KeyboardInterrupt):
        T.train(cfg)
    monkeypatch.setattr(S, "batch_logps", real)
    capsys.readouterr()
    checkpoint = latest_checkpoint(RunDir(tmp_path / "r"))
    acc = next(r["eval_accuracy"] for r in read_jsonl(tmp_path / "r" / "metrics.jsonl") if r["step"] == 2
               and "eval_loss" in r)
    T.train(replace(cfg, resume=True))
    err = capsys.readouterr().err.splitlines()
    assert err[0] == f"{NAME} resumed at step 3 from {checkpoint}; last held-out acc {acc:.3f} (step 2)"
    assert not any("eval @ step 0" in line for line in err)
    assert re.match(rf"{re.escape(NAME)} step 4/6 loss \S+ margin \S+ held-out acc {acc:.3f} ", err[1]), err[1]
    assert [line.split(":")[0] for line in err if " eval @ " in line] == [f"{NAME} eval @ step 4",
                                                                       f"{NAME} eval @ step 6"]
