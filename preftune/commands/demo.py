"""``make demo``: the main job on the built-in tiny world, end to end, in a few minutes on 2 CPU cores.

1. build the tiny world (tokenizer, random Llama, sorting preference task with a ground truth);
2. SFT the model briefly on chosen answers, so it is a real language model of that world;
3. run the default matrix, DPO/SimPO x LoRA r=16/8, cells differing only in those factors; each cell ends with
   a behavioural evaluation: policy and reference generate on held-out prompts, and the world's ground-truth
   judge (``python:preftune.tinyworld:judge``) says which sorted better;
4. decide (statistics and verdict) and write the report; print the verdict and where everything is.

    preftune demo --output demo_out
"""

from __future__ import annotations

import time
from pathlib import Path

from ..core.config import DEFAULT_GRID, Config
from ..core.layout import Decision, write_decision
from ..tinyworld import build_world
from ..training.loop import train
from ..training.matrix import run_matrix
from ..verdict.decide import decide
from ..verdict.report import write_report


def run_demo(output: str | Path = "demo_out", *, quick: bool = False) -> Decision:
    out = Path(output)
    t0 = time.perf_counter()
    size = dict(hidden=64, layers=2, heads=4) if quick else dict(hidden=128, layers=4, heads=4)
    world = build_world(out / "world", n_train=128 if quick else 1024, n_eval=64 if quick else 400, **size)
    print(f"[demo] tiny world: {world.model_dir}", flush=True)
    common = dict(data=str(world.train_path), eval_data=str(world.eval_path), cache_dir=str(out / "cache"),
                  batch_size=8, max_length=128, max_prompt_length=64, seed=0, resume=True)

    sft = Config(model=str(world.model_dir), objective="sft", lora_rank=0, lr=2e-3, warmup_ratio=0.05,
                 max_steps=20 if quick else 30, batch_size=16, eval_every=0, save_every=0, output=str(out / "sft"),
                 **{k: v for k, v in common.items() if k != "batch_size"})
    s = train(sft)
    print(f"[demo] SFT done: held-out length-normalized accuracy {s.step0_eval['eval_lennorm/accuracy']:.3f} "
          f"-> {s.final_eval['eval_lennorm/accuracy']:.3f}", flush=True)

    base = Config(model=str(out / "sft" / "model"), objective="dpo", lr=1e-3 if quick else 5e-4,
                  max_steps=20 if quick else 96, eval_every=6 if quick else 12, save_every=24, warmup_ratio=0.1,
                  objectives={"dpo": {"beta": 0.1}, "simpo": {"beta": 2.0, "gamma_beta_ratio": 0.5}},
                  judge="python:preftune.tinyworld:judge", gen_eval_prompts=32 if quick else 100,
                  gen_max_new_tokens=16,
                  output=str(out / "matrix"), **common)
    run_matrix(base, dict(DEFAULT_GRID))
    decision = decide(out / "matrix")
    write_decision(out / "matrix", decision)
    md, html = write_report(out / "matrix")
    print(f"\n[demo] verdict: {decision.verdict} -> {decision.objective} r={decision.lora_rank}")
    print(f"[demo] {decision.summary}")
    for reason in decision.explanation:
        print(f"  - {reason}")
    for c in decision.cells:
        g = c.gen_eval
        if g:
            print(f"[demo] behaviour of {c.name}: win rate {g['win_rate']:.3f} against the reference "
                  f"(length-controlled {g['lc_win_rate']:.3f}) on {g['prompts']} held-out prompts, judged by the "
                  f"ground truth; generated length {g['policy_len']:.1f} vs {g['reference_len']:.1f} tokens")
    print(f"[demo] done in {time.perf_counter() - t0:.0f}s\n[demo] report: {html}\n[demo] markdown: {md}\n"
          f"[demo] cells: {out / 'matrix' / 'cells'}")
    return decision
