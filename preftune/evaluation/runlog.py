"""A run's logs, read back and normalized: a preftune run folder (metrics.jsonl, eval_pairs.jsonl, gen_eval.jsonl),
TRL's trainer_state.json, or any JSONL log of one object per logged step. ``review``, ``decide`` and ``report``
read runs only through :func:`load`.

    log = load("runs/x")                       # also out/trainer_state.json, logs.jsonl
    steps, margins = log.series("rewards/margins")

Key variants are normalized: ``train_loss`` is ``loss``, ``train_rewards/margins`` is ``rewards/margins``; eval keys
keep their ``eval_`` prefix and held-out accuracy is ``eval_accuracy`` or, failing that, TRL's
``eval_rewards/accuracies``.
"""

from __future__ import annotations

import contextlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..core.errors import InputError
from ..core.files import read_jsonl_lines  # a torn last line is dropped: a crashed run may leave one
from ..core.layout import TRL_STATE, RunDir
from .yardsticks import logprob_yardsticks

TRAIN_KEYS = ("loss", "rewards/margins", "rewards/accuracies", "rewards/chosen", "rewards/rejected",
              "logps/chosen", "logps/rejected")

EVAL_KEYS = tuple(f"eval_{k}" for k in TRAIN_KEYS) + ("eval_accuracy",) + \
    tuple(f"eval_{y.name}/accuracy" for y in logprob_yardsticks())

@dataclass
class Log:
    """A run's log lines, normalized: ``train`` lines keyed like TRL's training logs, ``eval`` lines by eval_."""

    source: str
    kind: str                     # run | trainer_state | jsonl
    train: list[dict]
    eval: list[dict]
    pairs: list[dict] | None = None   # eval_pairs.jsonl rows (run folders only)
    gen_eval: dict | None = None      # summary.json -> gen_eval (runs with a behavioural evaluation)
    generations: list[dict] | None = None  # gen_eval.jsonl rows: per prompt, both completions and the judgement

    def series(self, key: str) -> tuple[list[float], list[float]]:
        """(steps, values) of the lines holding ``key``, non-finite values left out."""
        lines = self.eval if key.startswith("eval_") else self.train
        pts = [(r["step"], r[key]) for r in lines if key in r and math.isfinite(r[key])]
        return [p[0] for p in pts], [p[1] for p in pts]

    def accuracy_series(self) -> tuple[list[float], list[float]]:
        steps, acc = self.series("eval_accuracy")
        return (steps, acc) if acc else self.series("eval_rewards/accuracies")

    def final_accuracy(self) -> tuple[float, int] | None:
        """(held-out accuracy, pairs) at the end: eval_pairs.jsonl if present, else the last eval line."""
        if self.pairs:
            return sum(bool(p.get("correct")) for p in self.pairs) / len(self.pairs), len(self.pairs)
        _, acc = self.accuracy_series()
        if not acc:
            return None
        n = next((r["eval_pairs"] for r in reversed(self.eval) if isinstance(r.get("eval_pairs"), int)), 0)
        return acc[-1], n

def load(path: str | Path) -> Log:
    """Read any supported log into a ``Log``; InputError naming the file (and line) when it can't."""
    path = Path(path)
    if path.is_dir():
        run = RunDir(path)
        if run.has_log():
            pairs = read_pairs(run.eval_pairs) if run.eval_pairs.is_file() else None
            log = _build(str(path), "run", read_jsonl_lines(run.metrics), pairs)
            if run.gen_eval.is_file():
                log.generations = [r for _, r in read_jsonl_lines(run.gen_eval)]
                with contextlib.suppress(OSError, ValueError):  # an unreadable summary: no gen_eval numbers
                    log.gen_eval = json.loads(run.summary.read_text()).get("gen_eval")
            return log
        if not (path / TRL_STATE).is_file():
            raise InputError("not a preftune run folder (no metrics.jsonl) nor a TRL output folder "
                             "(no trainer_state.json)", path=str(path))
        path = path / TRL_STATE
    if not path.is_file():
        raise InputError("no such file or folder", path=str(path))
    if path.suffix != ".jsonl":
        try:
            obj = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError) as e:
            raise InputError(f"cannot read: {e}", path=str(path)) from None
        except json.JSONDecodeError:
            obj = None  # not one JSON document: try it as JSONL below
        if isinstance(obj, dict):
            history = obj.get("log_history")
            if not isinstance(history, list):
                raise InputError("a JSON log must be a TRL trainer_state.json with a 'log_history' list",
                                 path=str(path))
            return _build(str(path), "trainer_state", [(i, r) for i, r in enumerate(history)], None,
                          where="log_history entry")
    return _build(str(path), "jsonl", read_jsonl_lines(path), None)

def read_pairs(path: str | Path) -> list[dict]:
    """Rows of an eval_pairs.jsonl; each needs ``id``, ``margin`` and ``correct``."""
    path = Path(path)
    rows = []
    for i, row in read_jsonl_lines(path):
        if not isinstance(row, dict):
            raise InputError("a line must be a JSON object", path=str(path), line=i)
        for key in ("id", "margin", "correct"):
            if key not in row:
                raise InputError("missing", path=str(path), line=i, field=key)
        if not isinstance(row["correct"], bool):
            raise InputError(f"{row['correct']!r} is not true/false", path=str(path), line=i, field="correct")
        margin = _number(row["margin"], str(path), i, "margin")
        row["margin"] = math.nan if margin is None else margin  # null: a NaN written as strict JSON
        rows.append(row)
    if not rows:
        raise InputError("no held-out pairs", path=str(path))
    return rows

def _number(value: Any, path: str, line: int | None, key: str) -> float | None:
    if value is None:
        return None
    try:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ValueError
        return float(value)
    except ValueError:
        raise InputError(f"{value!r} is not a number", path=path, line=line, field=key) from None

def _build(source: str, kind: str, rows: list[tuple[int, Any]], pairs: list[dict] | None,
           where: str = "") -> Log:
    """Split rows into train and eval lines. ``where`` names list entries (TRL) instead of file lines."""
    train, evals = [], []
    for i, row in rows:
        line, prefix = (None, f"{where} {i}: ") if where else (i, "")
        if not isinstance(row, dict):
            raise InputError("a log line must be a JSON object", path=source, line=line,
                             field=prefix[:-2] or None)
        if "train_runtime" in row:
            continue  # TRL's end-of-training summary (its train_loss is an average, not a step)
        step = _number(row.get("step", len(train) + len(evals)), source, line, prefix + "step")
        t, e = {"step": step}, {"step": step}
        for key, value in row.items():
            name = key.removeprefix("train_")
            if name in TRAIN_KEYS or name in EVAL_KEYS:
                x = _number(value, source, line, prefix + key)
                if x is not None:
                    (e if name.startswith("eval_") else t)[name] = x
            elif key == "eval_pairs" and isinstance(value, int):
                e[key] = value
        if len(t) > 1:
            train.append(t)
        if any(k in e for k in EVAL_KEYS):
            evals.append(e)
    if not train and not evals:
        raise InputError("no log lines with known keys (loss, rewards/margins, eval_accuracy, eval_loss, ...)",
                         path=source)
    return Log(source, kind, train, evals, pairs)
