"""Validate ``preftune plan`` on the CPU: its estimate against the measured peak RSS of real short runs.

    .venv/bin/python bench/bench_plan.py [--out bench_out/plan] [--steps 3] [--only tiny|bench] [--with-checkpointing]
    .venv/bin/python bench/bench_plan.py --probe     # the plan's per-layer terms against autograd and glibc

Configurations: 2 models (the demo-size tiny world, ``preftune world DIR --hidden 128 --layers 4``, and the
29.5M-parameter benchmark Llama that bench/bench.py builds) x DPO and SimPO; ``--with-checkpointing`` adds SimPO
on the benchmark model with --gradient-checkpointing. Each run is a real
``preftune train`` in its own process, with truncation settings that every pair reaches (so the row length the
plan assumes, max_prompt_length + 2 x (max_length - max_prompt_length), is the one trained), and its peak
RSS is read from summary.json (timing.peak_rss_mb). The plan's estimate comes from the model config alone,
with the interpreter + import baseline measured in a subprocess as ``preftune plan`` does. Target: the ratio
estimate / measured within 0.75-1.25. Writes <out>/plan_validation.json and .md. About 4 minutes of
CPU time on 2 cores (more wall time on a shared machine).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import bench  # noqa: E402  (the benchmark model builder)

# model -> (batch size, max_length, max_prompt_length): lengths every pair of that data set reaches
SETTINGS = {
    "tiny": (32, 10, 6),       # sorting prompts have 7-12 tokens, completions 4-13 with EOS -> rows of 6 + 2 x 4
    "bench": (8, 200, 160),    # "long" prompts ~175-215 tokens, completions ~41-61 -> rows of 160 + 2 x 40
}


def assets(out: Path) -> dict[str, dict[str, str]]:
    from preftune.tinyworld import build_world

    w = build_world(out / "tiny_world", hidden=128, layers=4)
    b = bench.build_assets(out / "bench_assets", tiny=False, n_train=32)
    return {"tiny": {"model": str(w.model_dir), "data": str(w.train_path), "eval": str(w.eval_path)},
            "bench": {"model": b["model"], "data": f"{b['data']}/train_long_32_v{bench.DATA_VERSION}.jsonl",
                      "eval": f"{b['data']}/heldout_long_{bench.HELDOUT_PAIRS}_v{bench.DATA_VERSION}.jsonl"}}


def measure(paths: dict[str, str], objective: str, batch: int, max_len: int, max_prompt: int, steps: int,
            run_dir: Path, checkpointing: bool = False) -> dict:
    """One real ``preftune train`` in a fresh process; its own peak RSS from summary.json and from wait4."""
    shutil.rmtree(run_dir, ignore_errors=True)
    cmd = [sys.executable, "-m", "preftune.commands.cli", "train", "--model", paths["model"], "--data", paths["data"],
           "--eval-data", paths["eval"], "--objective", objective, "--batch-size", str(batch),
           "--max-length", str(max_len), "--max-prompt-length", str(max_prompt), "--max-steps", str(steps),
           "--eval-every", "0", "--save-every", "0", "--quiet", "--output", str(run_dir / "run"),
           "--cache-dir", str(run_dir / "cache")] + (["--gradient-checkpointing"] if checkpointing else [])
    env = {**os.environ, "TRANSFORMERS_VERBOSITY": "error", "PYTHONWARNINGS": "ignore", "HF_HUB_OFFLINE": "1"}
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, text=True)
    _, status, usage = os.wait4(proc.pid, 0)
    err = proc.stderr.read() if proc.stderr else ""
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"train failed: {err.strip().splitlines()[-1:] if err.strip() else status}")
    summary = json.loads((run_dir / "run" / "summary.json").read_text())
    return {"measured_mb": summary.timing["peak_rss_mb"], "wait4_mb": usage.ru_maxrss / 1024,
            "train_tokens": summary.timing["train_tokens"], "wall_s": time.perf_counter() - t}


def probe(paths: dict[str, str], batch: int, max_len: int, max_prompt: int, steps: int, out: Path) -> None:
    """The plan's CPU terms against this process. 1) A real ``train`` of ``steps`` steps in this fresh process,
    sampling RSS and glibc's heap (mallinfo2: bytes in use, freed bytes kept resident) every 0.2 s: at the peak,
    the free heap against the plan's allocator-slack term. 2) One more forward: autograd's saved tensors per layer
    (saved-tensor hooks, by storage) against the plan's saved bytes."""
    import ctypes
    import threading

    import torch

    from preftune.core import config
    from preftune.modeling.logprobs import batch_logps, make_batch
    from preftune.modeling.model import add_lora, load_model
    from preftune.training.loop import train
    from preftune.training.plan import MIB, Setting, _layer_tensors, estimate, read_arch

    class Mallinfo2(ctypes.Structure):
        _fields_ = [(n, ctypes.c_size_t) for n in
                    "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]

    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = Mallinfo2
    model = paths["model"]
    prompt, completion = max_prompt, max_len - max_prompt
    arch = read_arch(model)
    s = Setting.of(config.Config(objective="simpo", lora_rank=8, batch_size=batch), device="cpu", prompt_len=prompt,
                   completion_len=completion)

    samples: list[tuple[float, float, float]] = []
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.2):
            m = libc.mallinfo2()
            rss = int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
            samples.append((rss, m.uordblks, m.fordblks))

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    run = out / "probe_run"
    shutil.rmtree(run, ignore_errors=True)
    train(config.build(dict(model=model, data=paths["data"], eval_data=paths["eval"], objective="simpo",
                            batch_size=batch, max_length=max_len, max_prompt_length=max_prompt, max_steps=steps,
                            eval_every=0, save_every=0, quiet=True, output=str(run / "run"),
                            cache_dir=str(run / "cache"))))
    done.set()
    th.join()
    rss, inuse, free = max(samples)
    plan = estimate(arch, s)
    print(f"at the peak RSS of a {steps}-step run ({rss / MIB:.0f} MiB): heap in use {inuse / MIB:.0f} MiB, "
          f"freed but resident {free / MIB:.0f} MiB; plan: activations {plan.activations_bytes / MIB:.0f} MiB, "
          f"allocator slack {plan.allocator_slack_bytes / MIB:.0f} MiB")
    cfg = config.build(dict(model=model, data="unused", lora_rank=8, device="cpu"))
    lm = add_lora(load_model(cfg), cfg)
    g = torch.Generator().manual_seed(0)
    ids = [torch.randint(3, lm.config.vocab_size, (n,), generator=g).tolist()
           for _ in range(batch) for n in (prompt, completion, completion)]
    layers = lm.get_base_model().get_decoder().layers
    seen: dict[int, tuple[int, int | None]] = {}
    current: list[int | None] = [None]
    params = {p.untyped_storage().data_ptr() for p in lm.parameters()}

    def pack(t: torch.Tensor) -> torch.Tensor:
        st = t.untyped_storage()
        if st.data_ptr() not in params and st.data_ptr() not in seen:
            seen[st.data_ptr()] = (st.nbytes(), current[0])
        return t

    hooks = []
    for k, layer in enumerate(layers):
        hooks.append(layer.register_forward_pre_hook(lambda m, a, k=k: current.__setitem__(0, k)))
        hooks.append(layer.register_forward_hook(lambda m, a, o: current.__setitem__(0, None)))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        batch_logps(lm, make_batch(ids[0::3], ids[1::3], ids[2::3], 0))
    for h in hooks:
        h.remove()
    del lm
    saved_real = [sum(n for n, k in seen.values() if k == i) for i in range(len(layers))]
    print(f"saved per layer: plan {_layer_tensors(arch, s, batch, grad=True)[0] / MIB:.2f} MiB, autograd "
          + ", ".join(f"{x / MIB:.2f}" for x in saved_real) + " (layer 0: the embedding output needs no gradient)")



def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench_out/plan")
    ap.add_argument("--steps", type=int, default=3,
                    help="optimizer steps per run (the README also reports --steps 8)")
    ap.add_argument("--only", choices=sorted(SETTINGS), help="one model only")
    ap.add_argument("--with-checkpointing", action="store_true",
                    help="also SimPO on the benchmark model with --gradient-checkpointing (about 1.5 min more)")
    ap.add_argument("--probe", action="store_true",
                    help="instead: saved bytes per layer and the heap at the peak of a run, against the plan's terms")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.probe:
        probe(assets(out)["bench"], *SETTINGS["bench"], args.steps, out)
        return 0
    from dataclasses import asdict

    import preftune
    from preftune.training.plan import MIB

    rows = []
    for name, paths in assets(out).items():
        if args.only and name != args.only:
            continue
        batch, max_len, max_prompt = SETTINGS[name]
        # the four required configurations, and the benchmark model with the checkpointing the plan suggests
        for objective, ckpt in [("dpo", False), ("simpo", False)] + ([("simpo", True)] if name == "bench" and args.with_checkpointing else []):
            cfg = preftune.Config(model=paths["model"], batch_size=batch, max_length=max_len,
                                  max_prompt_length=max_prompt, gradient_checkpointing=ckpt)
            cell = asdict(preftune.plan(cfg, {"objective": [objective], "lora_rank": [8]}, device="cpu",
                                        budget=1 << 40).cells[0])
            label = objective + (" +ckpt" if ckpt else "")
            m = measure(paths, objective, batch, max_len, max_prompt, args.steps,
                        out / "runs" / f"{name}-{label.replace(' +', '-')}", checkpointing=ckpt)
            expected_tokens = args.steps * batch * cell["row_tokens"]
            est = cell["peak_bytes"] / MIB
            rows.append({"model": name, "objective": label, "batch": batch, "row_tokens": cell["row_tokens"],
                         "layout_matches": m["train_tokens"] == expected_tokens, "estimate_mb": est, **m,
                         "ratio": est / m["measured_mb"],
                         "terms_mb": {k: v / MIB for k, v in cell.items() if k.endswith("_bytes") and k != "peak_bytes"}})
            r = rows[-1]
            print(f"{name:6s} {label:12s} estimate {est:7.0f} MiB  measured {r['measured_mb']:7.0f} MiB  "
                  f"ratio {r['ratio']:.2f}  ({r['wall_s']:.0f} s)", flush=True)
    ok = all(0.75 <= r["ratio"] <= 1.25 for r in rows)
    lines = ["| model | objective | batch x row tokens | estimate MiB | measured peak RSS MiB | ratio |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r['model']} | {r['objective']} | {r['batch']} x {r['row_tokens']} | {r['estimate_mb']:.0f} | "
              f"{r['measured_mb']:.0f} | {r['ratio']:.2f} |" for r in rows]
    (out / "plan_validation.md").write_text("\n".join(lines) + "\n")
    (out / "plan_validation.json").write_text(json.dumps({"within_25_percent": ok, "rows": rows}, indent=1))
    print("\n".join(lines))
    print(f"all within +-25%: {ok}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
