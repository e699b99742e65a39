"""preftune side of the benchmark: one case (or the 2x2 ablate) per process, started by bench/bench.py.

    .venv/bin/python bench/preftune_run.py SPEC.json RESULT.json

SPEC: the keys of bench/trl_run.py plus objective, eval_data, max_prompt_length, and for the ablate
``matrix`` ({"objective": [...], "lora_rank": [...]}) with per-objective ``objectives`` overrides.
Output and reference cache live in a fresh <run dir>/tmp, so the reference precompute is always counted.
RESULT: loop_s = timing.train_s, ref_s = timing.reference_s (pairs/s uses their sum; it includes the held-out
reference pass, for every objective), eval_s, policy_tokens = timing.train_tokens, ref_tokens =
timing.reference_tokens, plus preftune's own pairs_per_second / peak_rss_mb for cross-checking.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import statistics
import sys
import time
import traceback
import warnings
from pathlib import Path
from typing import Any

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
warnings.filterwarnings("ignore")


def build_config(spec: dict[str, Any], tmp: Path, **over: Any) -> Any:
    """The preftune Config equivalent to the TRL runs (same data, LoRA, lr, batch, steps, lengths, seed)."""
    from preftune.core.config import Config

    values = dict(
        model=spec["model"], data=spec["data"], eval_data=spec["eval_data"], objective=spec.get("objective", "dpo"),
        objectives={spec.get("objective", "dpo"): {k: spec[k] for k in ("beta", "gamma") if spec.get(k) is not None}},
        lora_rank=spec["lora_rank"],
        lora_alpha=float(spec["lora_alpha"]), lora_dropout=0.0, lora_target_modules=list(spec["lora_targets"]),
        lr=spec["lr"], batch_size=spec["batch_size"], grad_accum=1, max_steps=spec["steps"],
        max_length=spec["max_length"], max_prompt_length=spec["max_prompt_length"], scheduler="linear",
        warmup_ratio=0.0, weight_decay=0.0, max_grad_norm=1.0, seed=spec["seed"], eval_every=0,
        eval_batch_size=16, log_every=1, save_every=0, output=str(tmp / "run"), cache_dir=str(tmp / "cache"),
        # bf16 mode: bf16 frozen weights, fp32 LoRA weights, attention, log-probs and loss (see preftune.modeling.model);
        # held-out pairs in fp32 arithmetic: bf16's 0.03-0.05 nats of noise per margin would swamp the ~0.05-nat
        # margins of 30 steps at lr 5e-6 (bench/README.md, "bf16 held-out, investigated")
        dtype="bfloat16" if spec.get("bf16") else "float32", eval_fp32=bool(spec.get("bf16")),
        threads=spec["threads"], quiet=True,
        compile=bool(spec.get("compile")))
    values.update(over)
    return Config(**values).validate()


def run_single(spec: dict[str, Any], tmp: Path) -> dict[str, Any]:
    from preftune.training.loop import train

    cfg = build_config(spec, tmp)
    summary = train(cfg)
    t = summary.timing
    steps = int(summary.steps or spec["steps"])
    # per-step wall times (log_every=1): the steady state is the median after 5 warm-up steps; what the first
    # steps took beyond it is the warm-up (torch.compile's compilation lands there)
    rows = [json.loads(line) for line in open(tmp / "run" / "metrics.jsonl")]
    step_rows = [r for r in rows if r.get("pairs_per_second")]
    step_s = [cfg.batch_size * cfg.grad_accum / r["pairs_per_second"] for r in step_rows]
    step_tokens = [r["tokens_per_second"] * s for r, s in zip(step_rows, step_s)]  # real tokens of each step
    steady = statistics.median(step_s[5:] or step_s)
    # timing.processed_tokens = train_tokens (policy, padded) + reference_tokens (reference passes, train + eval)
    policy = t.get("train_tokens", t["processed_tokens"])
    ref_tokens = t.get("reference_tokens")
    return {"library": "preftune", "objective": cfg.objective, "status": summary.status, "steps": steps,
            "pairs": steps * cfg.batch_size * cfg.grad_accum, "loop_s": t["train_s"], "ref_s": t.get("reference_s") or 0.0,
            "eval_s": t.get("eval_s"), "preftune_total_s": t.get("total_s"), "policy_tokens": policy,
            "policy_tokens_real": t.get("real_train_tokens"),
            # without a reported count, a DPO reference pass is taken to see as many tokens as the policy pass
            "ref_tokens": ref_tokens if ref_tokens is not None else (policy if cfg.objective == "dpo" else 0),
            "ref_tokens_estimated": ref_tokens is None,
            "preftune_pairs_per_second": t.get("pairs_per_second"), "preftune_peak_rss_mb": t.get("peak_rss_mb"),
            "last_loss": (summary.train_last or {}).get("loss"), "bf16": cfg.dtype == "bfloat16",
            "final_eval_accuracy": (summary.final_eval or {}).get("eval_accuracy"),
            "final_eval_pairs_right": sum(json.loads(line)["correct"] for line in open(tmp / "run" / "eval_pairs.jsonl")),
            "reference_cached": t.get("reference_cached"), "compile": cfg.compile, "step_s": step_s,
            "step_s_steady": steady, "warmup_extra_s": sum(step_s) - steady * len(step_s), "step_tokens_real": step_tokens,
            "eval_arithmetic": summary.model["eval_arithmetic"],
            "compile_graphs": t.get("compile", {}).get("graphs"), "compile_s": t.get("compile", {}).get("compile_s")}


# ==================================================================================================
# The 2x2 ablate (objective dpo/simpo x lora_rank 16/8); bench.py times this whole process end to end.
# Uses preftune.training.matrix.run_matrix(base, grid, parallel=1) -> {"finished": n, "failed": n}; the matrix folder is
# base.output. lora_alpha None = 2 x rank, like the TRL r16 (alpha 32) / r8 (alpha 16) runs. SimPO's beta/gamma
# come from the base's `objectives` overrides. Adjust here if the ablate API changes.
# ==================================================================================================
def run_preftune_matrix(spec: dict[str, Any], tmp: Path) -> dict[str, Any]:
    from preftune.training.matrix import run_matrix

    objectives = spec.get("objectives", {})
    base = build_config(spec, tmp, objective="dpo", objectives=objectives, lora_alpha=None,
                        output=str(tmp / "matrix"), **objectives.get("dpo", {}))
    counts = run_matrix(base, dict(spec["matrix"]), parallel=int(spec.get("parallel", 1)))
    if counts.get("failed"):
        raise RuntimeError(f"ablate: {counts} (see {tmp / 'matrix' / 'matrix.json'})")
    cells = json.loads((tmp / "matrix" / "matrix.json").read_text()).get("cells", [])
    return {"library": "preftune", "matrix": spec["matrix"], "counts": counts,
            "cell_train_s": {c["name"]: _cell_timing(tmp / "matrix" / "cells" / c["name"]) for c in cells}}


def _cell_timing(cell: Path) -> dict[str, Any] | None:
    path = cell / "summary.json"
    return json.loads(path.read_text()).get("timing") if path.exists() else None


def main(argv: list[str]) -> int:
    spec_path, result_path = argv[1], argv[2]
    spec = json.loads(Path(spec_path).read_text())
    tmp = Path(result_path).parent / "tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    result: dict[str, Any] = {"ok": False, "bf16": bool(spec.get("bf16"))}
    t = time.perf_counter()
    try:
        import torch

        torch.set_num_threads(spec["threads"])
        result.update(run_preftune_matrix(spec, tmp) if "matrix" in spec else run_single(spec, tmp), ok=True)
    except Exception as e:  # reported in the table, traceback in the run's log.txt
        traceback.print_exc()
        result["error"] = f"{type(e).__name__}: {e}".splitlines()[0][:300]
    result["child_total_s"] = time.perf_counter() - t
    result["self_maxrss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    Path(result_path).write_text(json.dumps(result, indent=1))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
