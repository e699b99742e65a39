"""Sampling benchmark: preftune's engine (one prefill per prompt, cache shared by K samples) against transformers'
``generate(num_return_sequences=K)`` (prefill repeated K times), same prompts, same model, one invocation.

    .venv/bin/python bench/bench_generate.py                       # both prompt settings, K=4, 32 new tokens
    .venv/bin/python bench/bench_generate.py --settings standard   # ~65-token prompts only (long: ~200)

The model is bench/bench.py's 29.5M-param Llama (hidden 512, 8 layers, vocab 4096), built once under
``<out>/assets``; the prompts are its 8 held-out prompts of each setting. Both engines sample at temperature 1.0, top_p 0.95, and
generate exactly ``--max-new-tokens`` per row (EOS is ignored on both sides, so both do the same work):
tokens/s = prompts x K x new tokens / wall seconds, best of ``--reps`` interleaved rounds after one warm-up each. The CPU model and
the fp32 matmul peak (bench.py's ``matmul_peak``) are measured in the same invocation.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from bench import SETTINGS, build_assets, matmul_peak  # noqa: E402  (bench.py also sets quiet env defaults)


def _cpu() -> str:
    try:
        name = next(ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name"))
    except (OSError, StopIteration):
        import platform

        name = platform.processor() or platform.machine()
    return f"{name} ({os.cpu_count()} cpus)"


def _best(fns: list, reps: int) -> list[float]:
    """Best wall time of each function over ``reps`` rounds, run interleaved (a, b, a, b, ...) after one warm-up
    each, so a burst of load from other processes hits both sides alike and the minimum filters it out."""
    for fn in fns:
        fn()  # warm-up: allocator, kernels, first-call overheads
    best = [float("inf")] * len(fns)
    for _ in range(reps):
        for i, fn in enumerate(fns):
            t = time.perf_counter()
            fn()
            best[i] = min(best[i], time.perf_counter() - t)
    return best


def main(argv: list[str] | None = None) -> dict:
    import torch

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--settings", default="standard,long", help=f"comma-separated, of {sorted(SETTINGS)}")
    ap.add_argument("--k", type=int, default=4, help="samples per prompt")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--reps", type=int, default=4)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--out", default="bench_out")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = Path(args.out)
    settings = [x.strip() for x in args.settings.split(",") if x.strip()]
    if not settings or any(x not in SETTINGS for x in settings):
        ap.error(f"--settings takes names from {sorted(SETTINGS)}")
    assets = build_assets(out / "assets", False, 8)
    peaks = matmul_peak(args.threads)
    tok = AutoTokenizer.from_pretrained(assets["model"])
    model = AutoModelForCausalLM.from_pretrained(assets["model"], dtype=torch.float32).eval()
    results = {"cpu": _cpu(), "threads": args.threads, "fp32_matmul_peak_gflops": peaks["fp32"],
               "model_params": assets["params"], "k": args.k, "max_new_tokens": args.max_new_tokens, "settings": {}}
    print(f"cpu: {results['cpu']}, {args.threads} threads, fp32 matmul peak {peaks['fp32']:.1f} GFLOP/s")
    print(f"model: {assets['params'] / 1e6:.1f}M params; K={args.k}, {args.max_new_tokens} new tokens per sample, "
          "temperature 1.0, top_p 0.95")
    for setting in settings:
        results["settings"][setting] = r = _one(model, tok, assets, setting, args)
        print(f"[{setting}] {r['prompts']} prompts, mean {r['mean_prompt_tokens']:.0f} tokens: preftune "
              f"{r['preftune_tokens_per_s']:.1f} tokens/s ({r['preftune_s']:.2f} s), transformers "
              f"num_return_sequences={args.k} {r['transformers_tokens_per_s']:.1f} tokens/s ({r['transformers_s']:.2f} s)"
              f", speedup {r['speedup']:.2f}x", flush=True)
    out.mkdir(parents=True, exist_ok=True)
    (out / "generate.json").write_text(json.dumps(results, indent=2) + "\n")
    return results


def _one(model, tok, assets: dict, setting: str, args: argparse.Namespace) -> dict:
    import torch

    from preftune.data.rows import load_prompts
    from preftune.data.tokenize import encode_prompts
    from preftune.generation.sampler import generate_ids

    prompts_file = next(Path(assets["data"]).glob(f"heldout_{setting}_*.jsonl"))
    rows = load_prompts(str(prompts_file))
    ids = encode_prompts(rows, tok)
    n, k, new = len(ids), args.k, args.max_new_tokens
    pad = tok.pad_token_id

    def ours() -> None:
        got = generate_ids(model, ids, num_samples=k, max_new_tokens=new, temperature=1.0, top_p=0.95, seed=0,
                           batch_size=n, eos_ids=set(), pad_id=pad)
        assert sum(len(c) for s in got for c, _ in s) == n * k * new

    enc = tok([r.prompt for r in rows], return_tensors="pt", padding=True, padding_side="left")

    def theirs() -> None:
        with torch.inference_mode():
            got = model.generate(**enc, do_sample=True, temperature=1.0, top_p=0.95, num_return_sequences=k,
                                 max_new_tokens=new, min_new_tokens=new, pad_token_id=pad)
        assert got.shape == (n * k, enc["input_ids"].shape[1] + new)

    t_ours, t_hf = _best([ours, theirs], args.reps)
    tokens = n * k * new
    return {"prompts": n, "mean_prompt_tokens": sum(map(len, ids)) / n,
            "preftune_tokens_per_s": tokens / t_ours, "transformers_tokens_per_s": tokens / t_hf,
            "speedup": t_hf / t_ours, "preftune_s": t_ours, "transformers_s": t_hf}


if __name__ == "__main__":
    main()
