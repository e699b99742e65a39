"""TRL side of the benchmark: one case per process, started by bench/bench.py.

    .venv/bin/python bench/trl_run.py SPEC.json RESULT.json

SPEC keys: model, data, trainer (dpo | cpo_simpo | orpo), precompute, bf16, beta, gamma, steps, batch_size,
max_length, lr, seed, threads, lora_rank, lora_alpha, lora_targets, trl_gradient_checkpointing, output (optional).
RESULT: loop_s (on_train_begin -> on_train_end), train_runtime (Trainer's metric, same span), ref_s (the
precompute_ref_log_probs pass, done inside DPOTrainer.__init__), setup_s (model load + trainer init incl.
tokenization and precompute), step_s (per-step wall), token counts from a hook on the decoder stack:
policy_tokens / ref_tokens = rows x padded length of every grad / no-grad forward (incl. padding), *_real = sum of
attention_mask, and self_maxrss_mb.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
import traceback
import warnings
from pathlib import Path
from typing import Any

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
warnings.filterwarnings("ignore")


class TokenCounter:
    """Forward-pre-hook on the decoder stack: counts the tokens of every forward, split by phase."""

    def __init__(self) -> None:
        self.phase = "setup"
        self.counts: dict[str, int] = {}

    def __call__(self, module: Any, args: tuple, kwargs: dict) -> None:
        import torch

        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:
            return
        mask = kwargs.get("attention_mask")
        kind = "policy" if torch.is_grad_enabled() else "ref"
        if self.phase == "precompute":
            kind = "ref"
        for key, n in ((kind, ids.numel()), (kind + "_real", int(mask.sum()) if mask is not None else ids.numel())):
            self.counts[key] = self.counts.get(key, 0) + n


def run(spec: dict[str, Any]) -> dict[str, Any]:
    t_proc = time.perf_counter()
    import torch

    torch.set_num_threads(spec["threads"])
    import datasets
    import transformers
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

    transformers.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()

    class Clock(TrainerCallback):
        def __init__(self) -> None:
            self.t0 = self.t1 = 0.0
            self.steps: list[float] = []
            self.last_loss: float | None = None

        def on_train_begin(self, *a: Any, **k: Any) -> None:
            self.t0 = time.perf_counter()
            self.steps.append(self.t0)

        def on_step_end(self, *a: Any, **k: Any) -> None:
            self.steps.append(time.perf_counter())

        def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, **k: Any) -> None:
            if logs and "loss" in logs:
                self.last_loss = float(logs["loss"])

        def on_train_end(self, *a: Any, **k: Any) -> None:
            self.t1 = time.perf_counter()

    counter, clock, times = TokenCounter(), Clock(), {"precompute": 0.0}
    rows = [json.loads(line) for line in open(spec["data"])]
    train = datasets.Dataset.from_list([{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in rows])
    tok = AutoTokenizer.from_pretrained(spec["model"])
    model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32)
    model.get_decoder().register_forward_pre_hook(counter, with_kwargs=True)
    peft_config = LoraConfig(r=spec["lora_rank"], lora_alpha=spec["lora_alpha"], lora_dropout=0.0,
                             target_modules=spec["lora_targets"], task_type="CAUSAL_LM")
    out_dir = spec.get("output") or str(Path(spec.get("_run_dir", ".")) / "trl_out")
    common = dict(output_dir=out_dir, per_device_train_batch_size=spec["batch_size"], gradient_accumulation_steps=1,
                  max_steps=spec["steps"], learning_rate=spec["lr"], logging_steps=1, save_strategy="no",
                  report_to="none", eval_strategy="no", use_cpu=True, bf16=bool(spec.get("bf16")), fp16=False,
                  dataloader_num_workers=0, seed=spec["seed"], disable_tqdm=True, max_length=spec["max_length"],
                  gradient_checkpointing=bool(spec.get("trl_gradient_checkpointing")), lr_scheduler_type="linear",
                  warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0)
    kind = spec["trainer"]
    if kind == "dpo":
        from trl import DPOConfig, DPOTrainer

        class TimedDPOTrainer(DPOTrainer):
            def _precompute_ref_logps(self, *a: Any, **k: Any) -> Any:
                t, counter.phase = time.perf_counter(), "precompute"
                try:
                    return super()._precompute_ref_logps(*a, **k)
                finally:
                    times["precompute"] += time.perf_counter() - t
                    counter.phase = "setup"

        cls: Any = TimedDPOTrainer
        cfg: Any = DPOConfig(**common, loss_type=["sigmoid"], beta=spec["beta"],
                             precompute_ref_log_probs=bool(spec.get("precompute")))
    elif kind == "cpo_simpo":
        from trl.experimental.cpo import CPOConfig, CPOTrainer

        cls = CPOTrainer
        cfg = CPOConfig(**common, loss_type="simpo", cpo_alpha=0.0, simpo_gamma=spec["gamma"], beta=spec["beta"],
                        remove_unused_columns=False)
    elif kind == "orpo":
        from trl.experimental.orpo import ORPOConfig, ORPOTrainer

        cls = ORPOTrainer
        cfg = ORPOConfig(**common, beta=spec["beta"], remove_unused_columns=False)
    else:
        raise ValueError(f"unknown trainer {kind!r}")

    t = time.perf_counter()
    trainer = cls(model=model, args=cfg, train_dataset=train, processing_class=tok, peft_config=peft_config,
                  callbacks=[clock])
    setup_s = time.perf_counter() - t
    counter.phase = "train"
    metrics = trainer.train().metrics
    c = counter.counts
    steps = [b - a for a, b in zip(clock.steps, clock.steps[1:])]
    return {"library": "trl", "trainer": kind, "steps": trainer.state.global_step,
            "pairs": trainer.state.global_step * spec["batch_size"], "loop_s": clock.t1 - clock.t0,
            "train_runtime": metrics.get("train_runtime"), "ref_s": times["precompute"], "setup_s": setup_s,
            "child_total_s": time.perf_counter() - t_proc, "step_s": steps, "last_loss": clock.last_loss,
            "policy_tokens": c.get("policy", 0), "policy_tokens_real": c.get("policy_real", 0),
            "ref_tokens": c.get("ref", 0), "ref_tokens_real": c.get("ref_real", 0),
            "gradient_checkpointing": cfg.gradient_checkpointing, "bf16": bool(cfg.bf16),
            "precompute": bool(spec.get("precompute"))}


def main(argv: list[str]) -> int:
    spec_path, result_path = argv[1], argv[2]
    spec = json.loads(Path(spec_path).read_text())
    spec.setdefault("_run_dir", str(Path(result_path).parent))
    result: dict[str, Any] = {"ok": False, "bf16": bool(spec.get("bf16"))}
    try:
        result.update(run(spec), ok=True)
    except Exception as e:  # reported in the table, traceback in the run's log.txt
        traceback.print_exc()
        result["error"] = f"{type(e).__name__}: {e}".splitlines()[0][:300]
    result["self_maxrss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    Path(result_path).write_text(json.dumps(result, indent=1))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
