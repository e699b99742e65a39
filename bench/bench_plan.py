"""Validate ``preftune plan`` on the CPU: its estimate against the measured peak RSS of real short runs, at three
model sizes and two run lengths.

    .venv/bin/python bench/bench_plan.py [--out bench_out/plan] [--only S,M,L] [--with-checkpointing]
    .venv/bin/python bench/bench_plan.py --probe     # the plan's per-layer terms against autograd and glibc

Models: three random Llamas built here (no hub), on bench/bench.py's tokenizer (byte-level BPE, vocab 4096):
S (hidden 128, 4 layers, 1.8M parameters), M (hidden 256, 6 layers, 6.8M) and L (hidden 512, 8 layers,
29.5M, bench/bench.py's model). Every run is issue 24's setting: DPO, LoRA r=8 on every linear, batch 8,
--max-length 256, fp32, on bench.py's "standard" pairs (prompts 59-75 tokens, completions 45-61), so no pair
reaches the caps. Each is a real ``preftune train`` in its own process at two run lengths (RUNS below), and
its peak RSS is read from summary.json (timing.peak_rss_mb; wait4's ru_maxrss beside it). The plan's estimate
is ``preftune.plan`` with ``data=`` (the longest training row, as ``preftune plan --data`` plans) and, for
comparison, without it (every pair at the caps: what the issue measured). Target: estimate / measured within
0.75-1.25. Writes <out>/plan_validation.json and .md, and prints the CPU model and the load average before and
after each run: this machine is shared, and a busy one changes the timings (not the memory). About 8 minutes
of wall time on 2 idle cores.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import bench  # noqa: E402  (the tokenizer, the data and the L model)
from preftune.core.cpus import allowed_cpus  # noqa: E402

# name -> LlamaConfig sizes (L is bench.FULL_MODEL, built by bench.build_assets)
MODELS = {
    "S": dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, intermediate_size=344),
    "M": dict(hidden_size=256, num_hidden_layers=6, num_attention_heads=4, intermediate_size=688),
    "L": bench.FULL_MODEL,
}
# name -> optimizer steps of its two runs: one epoch of the 32 pairs (4 steps) and several epochs, kept short
# for a shared 2-core machine (each run has ~40 s of fixed cost: imports, tokenizing, reference, held-out passes)
RUNS = {"S": (4, 16), "M": (4, 12), "L": (4, 8)}
BATCH, MAX_LENGTH = 8, 256
# --probe: lengths every pair of the "long" pairs reaches (rows of 160 + 2 x 40), so the plan's row is the trained one
PROBE = (8, 200, 160)


def assets(out: Path) -> dict[str, dict[str, str]]:
    """The three models and the pairs, built once under ``out`` (deterministic; reused when present)."""
    b = bench.build_assets(out / "bench_assets", tiny=False, n_train=32)
    data = {"data": f"{b['data']}/train_standard_32_v{bench.DATA_VERSION}.jsonl",
            "eval": f"{b['data']}/heldout_standard_{bench.HELDOUT_PAIRS}_v{bench.DATA_VERSION}.jsonl",
            "long": f"{b['data']}/train_long_32_v{bench.DATA_VERSION}.jsonl",
            "long_eval": f"{b['data']}/heldout_long_{bench.HELDOUT_PAIRS}_v{bench.DATA_VERSION}.jsonl"}
    out_models = {}
    for name in ("S", "M"):
        folder = out / "bench_assets" / f"model_{name}"
        if not (folder / "config.json").exists():
            import torch
            from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

            tok = AutoTokenizer.from_pretrained(b["model"])
            torch.manual_seed(0)
            cfg = LlamaConfig(vocab_size=bench.VOCAB, max_position_embeddings=1024, tie_word_embeddings=False,
                              bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                              pad_token_id=tok.pad_token_id, **MODELS[name])
            tmp = folder.with_name(folder.name + ".tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            LlamaForCausalLM(cfg).save_pretrained(tmp)
            tok.save_pretrained(tmp)
            tmp.replace(folder)
        out_models[name] = str(folder)
    out_models["L"] = b["model"]
    return {name: {"model": m, **data} for name, m in out_models.items()}


def machine() -> dict[str, object]:
    """The CPU and how busy the machine is: this one is shared with other jobs."""
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor() or "unknown")
    return {"cpu": cpu, "cpus": os.cpu_count(), "allowed_cpus": allowed_cpus(),
            "load_1min": os.getloadavg()[0]}


def idle(load: float, cpus: int) -> str:
    return "idle" if load < 0.5 else f"busy: load {load:.1f} on {cpus} CPUs, shared with other jobs"


def measure(paths: dict[str, str], steps: int, run_dir: Path, *, data: str = "data", eval_data: str = "eval",
            extra: list[str] | None = None) -> dict:
    """One real ``preftune train`` in a fresh process; its own peak RSS from summary.json and from wait4."""
    shutil.rmtree(run_dir, ignore_errors=True)
    cmd = [sys.executable, "-m", "preftune.commands.cli", "train", "--model", paths["model"], "--data", paths[data],
           "--eval-data", paths[eval_data], "--objective", "dpo", "--batch-size", str(BATCH),
           "--max-length", str(MAX_LENGTH), "--max-steps", str(steps), "--eval-every", "0", "--save-every", "0",
           "--quiet", "--output", str(run_dir / "run"), "--cache-dir", str(run_dir / "cache"), *(extra or [])]
    env = {**os.environ, "TRANSFORMERS_VERBOSITY": "error", "PYTHONWARNINGS": "ignore", "HF_HUB_OFFLINE": "1"}
    load = os.getloadavg()[0]
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, text=True)
    _, status, usage = os.wait4(proc.pid, 0)
    err = proc.stderr.read() if proc.stderr else ""
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"train failed: {err.strip().splitlines()[-1:] if err.strip() else status}")
    timing = json.loads((run_dir / "run" / "summary.json").read_text())["timing"]
    return {"measured_mb": timing["peak_rss_mb"], "wait4_mb": usage.ru_maxrss / 1024,
            "train_tokens": timing["train_tokens"], "wall_s": time.perf_counter() - t,
            "cpu_s": usage.ru_utime + usage.ru_stime, "load_before": load, "load_after": os.getloadavg()[0]}


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
    ap.add_argument("--only", default=",".join(MODELS), help="models, comma-separated (default S,M,L)")
    ap.add_argument("--with-checkpointing", action="store_true",
                    help="also L with --gradient-checkpointing, at its shorter run length")
    ap.add_argument("--probe", action="store_true",
                    help="instead: saved bytes per layer and the heap at the peak of a run, against the plan's terms")
    ap.add_argument("--probe-steps", type=int, default=3)
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    m = machine()
    print(f"CPU: {m['cpu']}, {m['cpus']} CPUs ({m['allowed_cpus']} allowed); at start the machine was "
          f"{idle(m['load_1min'], m['cpus'])}", flush=True)
    if args.probe:
        paths = assets(out)["L"]
        probe({"model": paths["model"], "data": paths["long"], "eval": paths["long_eval"]}, *PROBE,
              args.probe_steps, out)
        return 0
    import preftune
    from preftune.training.plan import MIB
    from preftune.training.plan_arch import measure_baseline

    rows = []
    for name, paths in assets(out).items():
        if name not in args.only.split(","):
            continue
        baseline = measure_baseline(paths["model"])  # once per model: what `plan` measures on every call
        runs = [(steps, False) for steps in RUNS[name]] + ([(RUNS[name][0], True)] if name == "L" and
                                                             args.with_checkpointing else [])
        plans: dict[bool, tuple] = {}  # the plan doesn't depend on the run's length: once per checkpointing
        for steps, ckpt in runs:
            if ckpt not in plans:
                cfg = preftune.Config(model=paths["model"], data=paths["data"], eval_data=paths["eval"],
                                      objective="dpo", lora_rank=8, batch_size=BATCH, max_length=MAX_LENGTH,
                                      gradient_checkpointing=ckpt)
                kw = dict(device="cpu", budget=1 << 40, baseline=baseline)
                grid = {"objective": ["dpo"], "lora_rank": [8]}
                plans[ckpt] = preftune.plan(cfg, grid, **kw), preftune.plan(replace(cfg, data=""), grid, **kw)
            p, caps = plans[ckpt]
            label = f"{name}{' +ckpt' if ckpt else ''}"
            r = measure(paths, steps, out / "runs" / f"{label.replace(' +', '-')}-{steps}",
                        extra=["--gradient-checkpointing"] if ckpt else [])
            cell = p.cells[0]
            est = cell.peak_bytes / MIB
            rows.append({"model": label, "params": p.model.params, "steps": steps,
                         "row_tokens": cell.row_tokens, "estimate_mb": est, **r, "ratio": est / r["measured_mb"],
                         "caps_row_tokens": caps.cells[0].row_tokens, "caps_estimate_mb": caps.cells[0].peak_bytes / MIB,
                         "caps_ratio": caps.cells[0].peak_bytes / MIB / r["measured_mb"],
                         "terms_mb": {k: v / MIB for k, v in vars(cell).items() if k.endswith("_bytes")}})
            x = rows[-1]
            print(f"{label:8s} {x['params'] / 1e6:5.1f}M {steps:3d} steps  estimate {est:6.0f} MiB  measured "
                  f"{x['measured_mb']:6.0f} MiB  ratio {x['ratio']:.2f}  (at the caps {x['caps_estimate_mb']:.0f} MiB, "
                  f"{x['caps_ratio']:.2f}; {x['wall_s']:.0f} s wall, {x['cpu_s']:.0f} CPU-s, load "
                  f"{x['load_before']:.1f} -> {x['load_after']:.1f})", flush=True)
    ok = all(0.75 <= r["ratio"] <= 1.25 for r in rows)
    end = machine()
    lines = [f"CPU: {m['cpu']}, {m['cpus']} CPUs; load {m['load_1min']:.1f} at start, {end['load_1min']:.1f} at "
             f"the end ({idle(max(m['load_1min'], end['load_1min']), m['cpus'])})", "",
             "| model | steps | row tokens | estimate MiB | measured peak RSS MiB | ratio | at the caps: row, MiB, ratio |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['model']} ({r['params'] / 1e6:.1f}M) | {r['steps']} | {r['row_tokens']} | {r['estimate_mb']:.0f} | "
              f"{r['measured_mb']:.0f} | {r['ratio']:.2f} | {r['caps_row_tokens']}, {r['caps_estimate_mb']:.0f}, "
              f"{r['caps_ratio']:.2f} |" for r in rows]
    (out / "plan_validation.md").write_text("\n".join(lines) + "\n")
    (out / "plan_validation.json").write_text(json.dumps({"machine": {"start": m, "end": end},
                                                          "within_25_percent": ok, "rows": rows}, indent=1))
    print("\n".join(lines))
    print(f"all within +-25%: {ok}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
