"""How a run ended, as summary.json says it: the last evals, the end of training, the data, timings, and how the
model ran (docs/formats.md, section summary.json).

    summary = write_summary(cfg, run, steps=100, status="finished", data=data, timing=timing, t_start=t0)
"""

from __future__ import annotations

import os
import resource
import statistics
import time
from dataclasses import dataclass
from typing import Any

import torch

from ..core.config import Config
from ..core.files import read_jsonl
from ..core.layout import RunDir, RunSummary
from ..evaluation import stats
from .prepare import Prepared


@dataclass
class CompileClock:
    """``--compile``'s one-off cost, apart from its steady state (``summary.json`` → ``timing.compile``).

    A step in which dynamo compiled a graph (its own counter rose) paid for compiling it, forward and
    backward; every other step is the steady state. ``compile_s`` is what the compiling steps took beyond
    the steady mean. Run: ``c = CompileClock(); c.add(9.1, 1); c.add(0.8, 0); c.summary()``.
    """

    graphs: int = 0
    compile_steps: int = 0
    compile_steps_s: float = 0.0
    steady_steps: int = 0
    steady_s: float = 0.0

    def add(self, dt: float, new_graphs: int) -> None:
        if new_graphs:
            self.graphs += new_graphs
            self.compile_steps += 1
            self.compile_steps_s += dt
        else:
            self.steady_steps += 1
            self.steady_s += dt

    def summary(self) -> dict[str, Any]:
        steady = self.steady_s / self.steady_steps if self.steady_steps else None
        return {"graphs": self.graphs, "compile_s": self.compile_steps_s - self.compile_steps * (steady or 0.0),
                "steady_step_s": steady}


def new_timing() -> dict[str, Any]:
    """The counters a run adds to as it goes (summary.json → ``timing``)."""
    return {"reference_s": 0.0, "train_s": 0.0, "eval_s": 0.0, "train_pairs": 0, "train_tokens": 0,
            "real_train_tokens": 0, "reference_tokens": 0, "eval_tokens": 0}


def write_summary(cfg: Config, run: RunDir, *, steps: int, status: str, data: Prepared | None,
                  timing: dict[str, Any], t_start: float, model_info: dict[str, Any] | None = None,
                  gen_eval: dict[str, Any] | None = None, ref_sync: dict[str, Any] | None = None) -> RunSummary:
    """Build summary.json from metrics.jsonl and the run's counters, write it, and return it."""
    rows = read_jsonl(run.metrics) if run.metrics.exists() else []
    evals = [r for r in rows if "eval_loss" in r]
    tail = stats.tail([r for r in rows if "loss" in r])  # the same "last 10% of training" that review and decide read
    keys = dict.fromkeys(k for r in tail for k in r if k not in ("step", "epoch"))  # a KTO row may lack a label's
    train_last = {k: statistics.fmean(r[k] for r in tail if k in r) for k in keys}
    loop_s = timing["train_s"] + timing["reference_s"]  # reference work counts against throughput
    timing = {**timing, "total_s": time.perf_counter() - t_start,
              "pairs_per_second": timing["train_pairs"] / loop_s if loop_s else 0.0,
              "tokens_per_second": timing["train_tokens"] / timing["train_s"] if timing["train_s"] else 0.0,
              "processed_tokens": timing["train_tokens"] + timing["reference_tokens"],
              "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
              # the process's CPU-seconds (all threads) and how its threads waited: wall time alone can't tell a
              # slow run from one that shared its CPUs (docs/speed.md, "On a shared machine")
              "cpu_s": time.process_time(), "threads": torch.get_num_threads(),
              "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "default"),
              **({"peak_gpu_mb": torch.cuda.max_memory_allocated() / 2**20} if torch.cuda.is_available() else {})}
    summary = RunSummary(
        objective=cfg.objective, lora_rank=cfg.lora_rank, seed=cfg.seed, steps=steps, status=status,
        params=cfg.objective_params(), final_eval=evals[-1] if evals else None,
        step0_eval=evals[0] if evals else None, train_last=train_last,
        data={k: v.to_dict() for k, v in data.stats.items()} if data else None,
        length_bias=stats.length_bias([len(p.chosen_ids) for p in data.eval],
                                      [len(p.rejected_ids) for p in data.eval]) if data else None,
        timing=timing, model=model_info, gen_eval=gen_eval, ref_sync=ref_sync)
    run.write_summary(summary)
    return summary
