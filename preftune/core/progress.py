"""What a run prints while it works: a live bar in a terminal, plain log lines everywhere else (when and
what: docs/runs.md, Progress).

    preftune train --model M --data train.jsonl --output runs/x          # a bar in a terminal
    preftune train --model M --data train.jsonl --output runs/x 2>&1 | tee log   # plain lines

    with phase("reference pass", total=len(pairs)):
        ...  # logprobs.score_pairs calls tick(k) after every batch
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

_active: list[Any] = []  # open phase bars, innermost last; tick() advances it


def interactive() -> bool:
    """A person watching: stderr is a terminal and this is not CI."""
    return sys.stderr.isatty() and not os.environ.get("CI")


@contextlib.contextmanager
def phase(label: str, total: int | None = None, *, quiet: bool = False, unit: str = "pair") -> Iterator[None]:
    """A bar for one phase (``tick`` advances it) in a terminal; nothing at all otherwise.

        with phase("tokenize", total=len(rows), quiet=cfg.quiet):
            ...
    """
    if quiet or not interactive():
        yield
        return
    from tqdm.auto import tqdm

    bar = tqdm(total=total, desc=label, unit=unit, file=sys.stderr, leave=False, dynamic_ncols=True)
    _active.append(bar)
    try:
        yield
    finally:
        _active.remove(bar)
        if bar.total is not None and bar.n < bar.total:  # phases without per-item ticks finish in one go
            bar.update(bar.total - bar.n)
        bar.close()


def tick(n: int = 1) -> None:
    """Advance the innermost open phase bar by ``n`` items (no-op without one)."""
    if _active:
        _active[-1].update(n)


class Progress:
    """Training progress: a tqdm bar in a terminal; plain log lines (about ten per run) otherwise."""

    def __init__(self, total: int, *, quiet: bool, name: str, start: int = 0) -> None:
        self.total, self.quiet, self.name, self.start = total, quiet, name, start
        self.every = max(1, total // 10)
        self.acc = float("nan")
        self.t0 = time.perf_counter()
        self.bar = None
        if interactive() and not quiet:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=start, desc=f"[{name}]", unit="step", file=sys.stderr,
                            dynamic_ncols=True, bar_format="{desc} {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} "
                            "[{elapsed}<{remaining}{postfix}]")  # tqdm puts ", " before the postfix

    def _print(self, text: str) -> None:
        if self.quiet:
            return
        if self.bar is not None:
            self.bar.write(text, file=sys.stderr)  # above the bar, which redraws below it
        else:
            print(text, file=sys.stderr, flush=True)

    def resumed(self, step: int, checkpoint: str | Path, last_eval: dict | None) -> None:
        """The line a resumed run starts with: where it picked up and the last held-out accuracy it logged."""
        held = ""
        if last_eval and "eval_accuracy" in last_eval:
            self.acc = last_eval["eval_accuracy"]
            held = f"; last held-out acc {self.acc:.3f} (step {last_eval['step']})"
        self._print(f"[{self.name}] resumed at step {step} from {checkpoint}{held}")

    def step(self, step: int, row: dict) -> None:
        margin = _signed(row.get("rewards/margins", math.nan))
        numbers = f"loss {row['loss']:.4f} margin {margin} held-out acc {self.acc:.3f}"
        if self.bar is not None:
            pairs_s = row.get("pairs_per_second", math.nan)
            self.bar.set_postfix_str(f"{numbers} {pairs_s:.1f} pairs/s", refresh=False)
            self.bar.update(step - self.bar.n)
        elif step % self.every == 0 or step == self.total:
            rate = (step - self.start) / max(1e-9, time.perf_counter() - self.t0)
            self._print(f"[{self.name}] step {step}/{self.total} {numbers} ({rate:.2f} steps/s)")

    def eval(self, m: dict) -> None:
        if "eval_accuracy" not in m:
            return
        self.acc = m["eval_accuracy"]
        self._print(f"[{self.name}] eval @ step {m['step']}: held-out acc {m['eval_accuracy']:.3f} "
                    f"margin {_signed(m['eval_rewards/margins'])} (refrel acc {m['eval_refrel/accuracy']:.3f}, "
                    f"lennorm acc {m['eval_lennorm/accuracy']:.3f}, {m['eval_pairs']} pairs)")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def done(self, t: dict, out: Path) -> None:
        """The run's last line(s): its time and throughput (summary.json's ``timing``), and --compile's cost."""
        self.close()
        pairs_s = t.get("pairs_per_second", math.nan)
        self._print(f"[{self.name}] done in {t['total_s']:.1f}s ({pairs_s:.2f} pairs/s): {out}")
        if "compile" in t:  # --compile: what compiling cost against what it saves per step
            c = t["compile"]
            steady = "n/a" if c["steady_step_s"] is None else f"{c['steady_step_s']:.3f}s"
            self._print(f"[{self.name}] compile: {c['compile_s']:.1f}s for {c['graphs']} graph(s); "
                        f"steady step {steady}")


def _signed(x: float) -> str:
    """A margin with 3 significant digits: 1e-5 is +1.23e-05, not a +0.0000 beside an accuracy that moved."""
    return f"{x:+.3g}"
