"""preftune vs TRL benchmark: one invocation builds the assets, measures the matmul peak, runs every case in
its own subprocess (peak RSS per run) and prints/writes the comparison table.

    .venv/bin/python bench/bench.py [--steps 30] [--only dpo,simpo,orpo] [--skip-trl] [--skip-preftune]
                                    [--long-prompt | --long-only] [--matrix] [--lr 5e-6] [--out bench_out] [--tiny]

Development (seconds, tiny model): ``.venv/bin/python bench/bench.py --tiny --steps 2 --skip-preftune``.
Children: bench/trl_run.py (TRL trainers) and bench/preftune_run.py (preftune.training.loop / ablate).
Outputs: <out>/results.json, <out>/results.md, per-run logs under <out>/runs/<setting>/<case>/.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

for _k, _v in (("TQDM_DISABLE", "1"), ("HF_HUB_DISABLE_PROGRESS_BARS", "1"), ("TRANSFORMERS_VERBOSITY", "error"),
               ("HF_HUB_OFFLINE", "1"), ("TOKENIZERS_PARALLELISM", "false")):
    os.environ.setdefault(_k, _v)
HERE = Path(__file__).resolve().parent
BATCH = 8
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
FULL_MODEL = dict(hidden_size=512, num_hidden_layers=8, num_attention_heads=8, intermediate_size=1376)
TINY_MODEL = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=172)
VOCAB = 4096
# setting -> (prompt token range, completion token range, max_length, max_prompt_length)
SETTINGS: dict[str, tuple[tuple[int, int], tuple[int, int], int, int]] = {
    "standard": ((50, 70), (39, 59), 256, 128),  # ~65 / ~50 tokens incl. the "Q:" / "\nA:" / "." framing
    "long": ((175, 215), (39, 59), 512, 384),  # ~200 / ~50
}
DATA_VERSION = 2  # bump when the generator changes (files are reused by name)
HELDOUT_PAIRS = 8  # preftune evaluates at step 0 and at the end: keep it cheap
OBJECTIVE_PARAMS = {  # same hyperparameters on both sides; TRL simpo_gamma is SimPO's absolute gamma
    "dpo": {"beta": 0.1},
    "simpo": {"beta": 2.0, "gamma": 0.5},
    "orpo": {"beta": 0.1},
}


# ------------------------------------------------------------------------------------------------ assets
def _words(rng: random.Random, n: int) -> list[str]:
    syl = [c + v for c in "bcdfghjklmnprstvwz" for v in ("a", "e", "i", "o", "u", "ai", "ou")]
    out: set[str] = set()
    while len(out) < n:
        out.add("".join(rng.choice(syl) for _ in range(rng.choice((1, 2, 2, 3, 3, 4)))))
    return sorted(out)


def build_assets(root: Path, tiny: bool, n_train: int) -> dict[str, Any]:
    """Tokenizer (byte-level BPE, vocab 4096), random Llama, synthetic pairs; deterministic, reused if present."""
    root.mkdir(parents=True, exist_ok=True)
    rng = random.Random(1234)
    words = _words(rng, 6000)
    weights = [1.0 / (i + 10) for i in range(len(words))]  # Zipf-like
    tok_dir = root / "tokenizer"
    if not (tok_dir / "tokenizer.json").exists():
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
        from transformers import PreTrainedTokenizerFast

        corpus = [" ".join(rng.choices(words, weights, k=60)) + "." for _ in range(20000)]
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<pad>", "<s>", "</s>"],
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
        tok.train_from_iterator(corpus, trainer)
        fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
        fast.save_pretrained(tok_dir)

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    n_tok = {w: len(tokenizer(" " + w, add_special_tokens=False)["input_ids"]) for w in words}

    def text(lo_hi: tuple[int, int], pool: list[str], r: random.Random) -> str:
        target, out, n = r.randint(*lo_hi), [], 0
        while n < target:
            w = r.choice(pool)
            out.append(w)
            n += n_tok[w]
        return " " + " ".join(out)

    data_dir = root / "data"
    data_dir.mkdir(exist_ok=True)
    for setting, (p_rng, c_rng, _, _) in SETTINGS.items():
        for split, n in (("train", n_train), ("heldout", HELDOUT_PAIRS)):
            path = data_dir / f"{split}_{setting}_{n}_v{DATA_VERSION}.jsonl"
            if path.exists():
                continue
            r = random.Random(f"{setting}-{split}-{n}")
            rows = []
            for _ in range(n):
                topic = r.sample(words[:2000], 40)  # chosen stays on the prompt's topic, rejected drifts
                rows.append({"prompt": "Q:" + text(p_rng, topic, r) + "\nA:",
                             "chosen": text(c_rng, topic, r) + ".", "rejected": text(c_rng, words, r) + "."})
            tmp = path.with_suffix(".tmp")
            tmp.write_text("".join(json.dumps(x) + "\n" for x in rows))
            tmp.replace(path)

    model_dir = root / ("model_tiny" if tiny else "model")
    if not (model_dir / "config.json").exists():
        import torch
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        cfg = LlamaConfig(vocab_size=VOCAB, max_position_embeddings=1024, tie_word_embeddings=False,
                          bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                          pad_token_id=tokenizer.pad_token_id, **(TINY_MODEL if tiny else FULL_MODEL))
        model = LlamaForCausalLM(cfg).to(torch.float32)
        tmp = model_dir.with_name(model_dir.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        tmp.replace(model_dir)
    meta_path = model_dir / "bench_meta.json"
    if not meta_path.exists():
        import torch
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        meta = {"params": sum(p.numel() for p in model.parameters()),
                "matmul_weights": sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))}
        meta_path.write_text(json.dumps(meta))
    meta = json.loads(meta_path.read_text())
    return {"model": str(model_dir), "data": str(data_dir), **meta}


# ------------------------------------------------------------------------------------------------ peak
def matmul_peak(threads: int, n: int = 2048, reps: int = 5) -> dict[str, float]:
    """Best-of-`reps` GFLOP/s of an n x n matmul, fp32 and bf16, at the runs' thread count."""
    import torch

    torch.set_num_threads(threads)
    out = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
        a @ b  # warm-up
        best = float("inf")
        for _ in range(reps):
            t = time.perf_counter()
            a @ b
            best = min(best, time.perf_counter() - t)
        out[name] = 2 * n**3 / best / 1e9
    return out


# ------------------------------------------------------------------------------------------------ runs
REUSE_TRL = False  # --reuse-trl: a TRL case whose spec is unchanged is read back, not run again


def run_child(script: str, spec: dict[str, Any], run_dir: Path, threads: int) -> dict[str, Any]:
    """Run one case in a fresh interpreter; wall time and peak RSS (os.wait4) are per child."""
    measured = run_dir / "measured.json"
    if REUSE_TRL and script == "trl_run.py" and measured.exists():
        old = json.loads(measured.read_text())
        if old.get("ok") and json.loads((run_dir / "spec.json").read_text()) == json.loads(json.dumps(spec)):
            return {**old, "reused": True}
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    (run_dir / "spec.json").write_text(json.dumps(spec, indent=1))
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error",
           "TQDM_DISABLE": "1", "HF_DATASETS_DISABLE_PROGRESS_BARS": "1", "PYTHONWARNINGS": "ignore",
           "HF_DATASETS_CACHE": str(run_dir / "hf_datasets")}
    t = time.perf_counter()
    with open(run_dir / "log.txt", "w") as log:
        proc = subprocess.Popen([sys.executable, str(HERE / script), str(run_dir / "spec.json"),
                                 str(run_dir / "result.json")], stdout=log, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t
    proc.returncode = os.waitstatus_to_exitcode(status)
    res_path = run_dir / "result.json"
    res = json.loads(res_path.read_text()) if res_path.exists() else {}
    res.update(process_wall_s=wall, peak_rss_mb=usage.ru_maxrss / 1024,
               returncode=proc.returncode)
    if proc.returncode != 0 or not res.get("ok"):
        tail = (run_dir / "log.txt").read_text().strip().splitlines()[-3:]
        res.update(ok=False, error=res.get("error") or " | ".join(tail))
    measured.write_text(json.dumps(res, indent=1))
    return res


def derive(res: dict[str, Any], n_matmul: int, peaks: dict[str, float]) -> dict[str, Any]:
    """pairs/s, tokens/s and share of matmul peak from a child's raw numbers.

    Timed seconds = training loop + reference work done outside it (TRL precompute, preftune reference_s).
    Model FLOPs = 4N per policy token (LoRA: forward + input-gradient backward, no weight gradients of the base)
    + 2N per reference-forward token; N = Linear weights incl. lm_head; attention score FLOPs are ignored.
    """
    if not res.get("ok"):
        return res
    timed = res["loop_s"] + res.get("ref_s", 0.0)
    flops = 4 * n_matmul * res["policy_tokens"] + 2 * n_matmul * res.get("ref_tokens", 0)
    peak = peaks["bf16" if res.get("bf16") else "fp32"]
    # the physical limit: real (unpadded) policy tokens at 4N and reference tokens at 2N, at the matmul peak
    real = res.get("policy_tokens_real")
    limit = None if real is None else (4 * n_matmul * real + 2 * n_matmul * res.get("ref_tokens", 0)) / (peak * 1e9)
    # the training step alone, in its steady state: each step's real tokens at 4N over its own time (median
    # after 5 steps), apart from the reference pass and one-off costs (compilation, first-step allocations)
    steps = list(zip(res.get("step_s") or [], res.get("step_tokens_real") or []))
    step_shares = sorted(4 * n_matmul * tok / dt / (peak * 1e9) for dt, tok in steps[5:] or steps)
    return {**res, "timed_s": timed, "pairs_per_s": res["pairs"] / timed,
            "tokens_per_s": res["policy_tokens"] / timed,
            "peak_share": flops / timed / (peak * 1e9), "limit_share": None if limit is None else limit / timed,
            "step_limit_share": step_shares[len(step_shares) // 2] if step_shares else None}


def base_spec(args: argparse.Namespace, setting: str, assets: dict[str, Any]) -> dict[str, Any]:
    """Settings shared by every run of a setting (both libraries)."""
    _, _, max_len, max_prompt = SETTINGS[setting]
    n_train = args.steps * BATCH
    return {"model": assets["model"], "steps": args.steps, "batch_size": BATCH, "max_length": max_len,
            "max_prompt_length": max_prompt, "threads": args.threads, "lr": args.lr, "seed": 42,
            "lora_rank": 8, "lora_alpha": 16, "lora_targets": LORA_TARGETS,
            "data": f"{assets['data']}/train_{setting}_{n_train}_v{DATA_VERSION}.jsonl",
            "eval_data": f"{assets['data']}/heldout_{setting}_{HELDOUT_PAIRS}_v{DATA_VERSION}.jsonl",
            "trl_gradient_checkpointing": args.trl_grad_ckpt}


def case_specs(args: argparse.Namespace, setting: str, assets: dict[str, Any]) -> dict[str, tuple[str, dict]]:
    """name -> (child script, spec) for one setting."""
    base = base_spec(args, setting, assets)
    out: dict[str, tuple[str, dict]] = {}
    for obj in args.only:
        p = OBJECTIVE_PARAMS[obj]
        if not args.skip_trl:
            kind = {"dpo": "dpo", "simpo": "cpo_simpo", "orpo": "orpo"}[obj]
            out[f"trl-{obj}"] = ("trl_run.py", {**base, "trainer": kind, **p})
            if obj == "dpo":
                out["trl-dpo-precompute"] = ("trl_run.py", {**base, "trainer": "dpo", "precompute": True, **p})
                if args.trl_bf16:
                    out["trl-dpo-bf16"] = ("trl_run.py", {**base, "trainer": "dpo", "bf16": True, **p})
        if not args.skip_preftune:
            out[f"preftune-{obj}"] = ("preftune_run.py", {**base, "objective": obj, **p})
            if obj in args.compile_rows:
                out[f"preftune-{obj}-compile"] = ("preftune_run.py", {**base, "objective": obj, "compile": True, **p})
            if obj in args.bf16_rows and args.native_bf16:
                out[f"preftune-{obj}-bf16"] = ("preftune_run.py", {**base, "objective": obj, "bf16": True, **p})
    return out


RATIOS = [  # (label, preftune case, TRL case)
    ("DPO vs DPOTrainer (ref each step)", "preftune-dpo", "trl-dpo"),
    ("DPO vs DPOTrainer (precompute_ref_log_probs)", "preftune-dpo", "trl-dpo-precompute"),
    ("DPO bf16 vs DPOTrainer fp32", "preftune-dpo-bf16", "trl-dpo"),
    ("DPO bf16 vs preftune DPO fp32", "preftune-dpo-bf16", "preftune-dpo"),
    ("SimPO bf16 vs preftune SimPO fp32", "preftune-simpo-bf16", "preftune-simpo"),
    ("ORPO bf16 vs preftune ORPO fp32", "preftune-orpo-bf16", "preftune-orpo"),
    ("DPO --compile vs eager (compile time included)", "preftune-dpo-compile", "preftune-dpo"),
    ("SimPO --compile vs eager (compile time included)", "preftune-simpo-compile", "preftune-simpo"),
    ("SimPO vs CPOTrainer(loss_type=simpo)", "preftune-simpo", "trl-simpo"),
    ("ORPO vs ORPOTrainer", "preftune-orpo", "trl-orpo"),
]


def ratios(cases: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for label, a, b in RATIOS:
        ra, rb = cases.get(a, {}), cases.get(b, {})
        if ra.get("ok") and rb.get("ok"):
            out.append({"comparison": label, "speedup": ra["pairs_per_s"] / rb["pairs_per_s"], "cases": [a, b],
                        "rss_ratio": rb["peak_rss_mb"] / ra["peak_rss_mb"]})  # the baseline's over this case's
    return out


def run_matrix(args: argparse.Namespace, setting: str, assets: dict[str, Any], cases: dict[str, dict[str, Any]],
               run_root: Path) -> dict[str, Any]:
    """Wall time of `preftune ablate` (dpo/simpo x r16/r8) vs the sum of the four equivalent TRL runs
    (the r8 ones are reused from this invocation's table when present)."""
    base = base_spec(args, setting, assets)
    trl_walls: dict[str, float | None] = {}
    for obj in ("dpo", "simpo"):
        for rank in (16, 8):
            name = f"trl-{obj}" + ("" if rank == 8 else "-r16")
            if name not in cases and not args.skip_trl:
                kind = "dpo" if obj == "dpo" else "cpo_simpo"
                spec = {**base, "trainer": kind, "lora_rank": rank, "lora_alpha": 2 * rank, **OBJECTIVE_PARAMS[obj]}
                cases[name] = run_child("trl_run.py", spec, run_root / name, args.threads)
                _report(name, cases[name])
            trl_walls[name] = cases[name]["process_wall_s"] if cases.get(name, {}).get("ok") else None
    spec = {**base, "matrix": {"objective": ["dpo", "simpo"], "lora_rank": [16, 8]},
            "objectives": {k: OBJECTIVE_PARAMS[k] for k in ("dpo", "simpo")}}
    pt = run_child("preftune_run.py", spec, run_root / "preftune-matrix", args.threads)
    ok = pt.get("ok") and all(v is not None for v in trl_walls.values())
    trl_sum = sum(v for v in trl_walls.values() if v is not None)
    return {"trl_runs_wall_s": trl_walls, "trl_sum_wall_s": trl_sum,
            "preftune_ablate_wall_s": pt["process_wall_s"] if pt.get("ok") else None,
            "speedup": trl_sum / pt["process_wall_s"] if ok else None, "error": pt.get("error")}


# ------------------------------------------------------------------------------------------------ table
def _f(x: Any, fmt: str = "{:.2f}") -> str:
    return "-" if x is None else fmt.format(x)


COLUMNS = ["case", "pairs/s", "tokens/s", "loop s", "ref s", "proc s", "peak RSS MB", "% matmul peak", "% limit",
           "% limit step", "step s", "warm-up s", "last loss", "held-out right"]


def table_rows(cases: dict[str, dict[str, Any]]) -> list[list[str]]:
    rows = []
    for name, r in cases.items():
        if not r.get("ok"):
            rows.append([name, "FAILED", (r.get("error") or "")[:80]] + [""] * (len(COLUMNS) - 3))
            continue
        share = _f(100 * r["peak_share"], "{:.1f}%") + (" bf16" if r.get("bf16") else " fp32")
        rows.append([name, _f(r["pairs_per_s"]), _f(r["tokens_per_s"], "{:.0f}"), _f(r["loop_s"], "{:.1f}"),
                     _f(r.get("ref_s") or None, "{:.1f}"), _f(r["process_wall_s"], "{:.1f}"),
                     _f(r["peak_rss_mb"], "{:.0f}"), share,
                     _f(None if r.get("limit_share") is None else 100 * r["limit_share"], "{:.1f}%"),
                     _f(None if r.get("step_limit_share") is None else 100 * r["step_limit_share"], "{:.1f}%"),
                     _f(r.get("step_s_steady"), "{:.3f}"), _f(r.get("warmup_extra_s"), "{:.1f}"),
                     _f(r.get("last_loss"), "{:.4f}"),
                     str(r.get("final_eval_pairs_right", "")) + (
                         " (fp32 eval)" if r.get("bf16") and r.get("eval_arithmetic") == "float32" else "")])
    return rows


def render(results: dict[str, Any], markdown: bool) -> str:
    m = results["machine"]
    lines = [f"preftune vs TRL -- {m['cpu']}, {m['threads']} threads, torch {m['torch']}, trl {m['trl']}; "
             f"matmul peak fp32 {m['peak_gflops']['fp32']:.1f} GFLOP/s, bf16 {m['peak_gflops']['bf16']:.1f} GFLOP/s; "
             f"model {results['model_params'] / 1e6:.1f}M params, N={results['matmul_weights'] / 1e6:.2f}M matmul "
             f"weights; {results['steps']} steps x {BATCH} pairs, lr {results.get('lr', 5e-6):g}", ""]
    for setting, s in results["settings"].items():
        rows = table_rows(s["cases"])
        lines.append(f"## {setting}: max_length {s['max_length']}" if markdown else f"[{setting}] max_length "
                     f"{s['max_length']}")
        if markdown:
            lines += ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
            lines += ["| " + " | ".join(r) + " |" for r in rows]
        else:
            widths = [max(len(str(x)) for x in col) for col in zip(COLUMNS, *rows)]
            for r in [COLUMNS, *rows]:
                lines.append("  ".join(str(x).ljust(w) if i == 0 else str(x).rjust(w)
                                       for i, (x, w) in enumerate(zip(r, widths))))
        lines.append("")
        for q in s["ratios"]:
            lines.append(f"{'- ' if markdown else '  '}{q['comparison']}: {q['speedup']:.2f}x pairs/s, "
                         f"peak RSS {q['cases'][1]}/{q['cases'][0]} {q['rss_ratio']:.2f}x")
        for name, r in s["cases"].items():  # --compile: steady-state step time apart from compile time
            eager = s["cases"].get(name.removesuffix("-compile"), {})
            if name.endswith("-compile") and r.get("ok") and eager.get("ok"):
                lines.append(f"{'- ' if markdown else '  '}{name}: steady step {r['step_s_steady']:.3f} s vs eager "
                             f"{eager['step_s_steady']:.3f} s -> {eager['step_s_steady'] / r['step_s_steady']:.2f}x; "
                             f"compile (first steps beyond steady) {r['warmup_extra_s']:.1f} s vs eager warm-up "
                             f"{eager['warmup_extra_s']:.1f} s; run's own count: {r.get('compile_graphs')} graph(s), "
                             f"{r.get('compile_s') or 0:.1f} s")
        if results["machine"].get("bf16_note"):
            lines.append(f"{'- ' if markdown else '  '}bf16: {results['machine']['bf16_note']}")
        if s.get("matrix"):
            mx = s["matrix"]
            lines.append(f"{'- ' if markdown else '  '}2x2 ablate (dpo/simpo x r16/r8): preftune "
                         f"{_f(mx['preftune_ablate_wall_s'], '{:.1f}')} s vs TRL 4 runs {mx['trl_sum_wall_s']:.1f} s"
                         f" -> {_f(mx['speedup'], '{:.2f}x')}" + (f" ({mx['error']})" if mx.get("error") else ""))
        lines.append("")
    lines.append("pairs/s = pairs / (loop s + ref s); ref s = TRL's precompute_ref_log_probs pass or preftune's "
                 "reference_s (train + held-out reference; TRL's default DPO does its reference inside the loop). "
                 "tokens/s = policy tokens processed incl. padding. % matmul peak = (4N/policy token + 2N/reference token) / "
                 "time / peak. % limit = the same with real (unpadded) policy tokens: the physical limit's share. "
                 "% limit step = the training step alone: 4N per real token of a step over its time, median after 5 "
                 "(no reference pass, no compile time). step s = median step after 5; warm-up s = the steps' total beyond that median (compile time). "
                 "proc s = whole subprocess wall (imports, load, setup). held-out right (fp32 eval): a bf16 "
                 "row's held-out pairs and their reference scored in fp32 arithmetic (--eval-fp32).")
    return "\n".join(lines) + "\n"


def write_results(out: Path, results: dict[str, Any], n_matmul: int, peaks: dict[str, float]) -> None:
    """(Re)derive every case with the current peaks and write results.json / results.md."""
    for s in results["settings"].values():
        s["cases"] = {k: derive(v, n_matmul, peaks) for k, v in s["cases"].items()}
        s["ratios"] = ratios(s["cases"])
    (out / "results.json").write_text(json.dumps(results, indent=1))
    (out / "results.md").write_text(render(results, markdown=True))


def _report(name: str, r: dict[str, Any]) -> None:
    if r.get("ok"):
        print(f"  {name}: loop {r['loop_s']:.1f}s ref {r.get('ref_s', 0):.1f}s proc {r['process_wall_s']:.1f}s "
              f"rss {r['peak_rss_mb']:.0f}MB", flush=True)
    else:
        print(f"  {name}: FAILED {r.get('error')}", flush=True)


# ------------------------------------------------------------------------------------------------ main
def main(argv: list[str] | None = None) -> dict[str, Any]:
    import torch

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=None, help="optimizer steps per run (30; 2 with --tiny)")
    ap.add_argument("--only", default="dpo,simpo,orpo", help="objectives to run")
    ap.add_argument("--skip-trl", action="store_true")
    ap.add_argument("--skip-preftune", action="store_true")
    ap.add_argument("--long-prompt", action="store_true", help="also run the long-prompt setting (max_length 512)")
    ap.add_argument("--long-only", action="store_true", help="run only the long-prompt setting")
    ap.add_argument("--matrix", action="store_true", help="2x2 ablate wall time vs 4 TRL runs")
    ap.add_argument("--bf16-rows", default="dpo,simpo,orpo",
                    help="objectives with an extra preftune bf16 row (--dtype bfloat16), or none")
    ap.add_argument("--compile-rows", default="dpo",
                    help="objectives with an extra preftune --compile row (torch.compile, inductor), or none")
    ap.add_argument("--trl-bf16", action="store_true", help="add a TRL DPOTrainer bf16=True row")
    ap.add_argument("--trl-grad-ckpt", action="store_true",
                    help="TRL gradient_checkpointing=True (TRL's own default; off = TRL's faster setting)")
    ap.add_argument("--lr", type=float, default=5e-6,
                    help="learning rate of every case, TRL's too (5e-6: the TRL comparison's setting; typical LoRA "
                         "DPO runs use 5e-5..5e-4, where held-out margins are large enough for bf16 to resolve)")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--tiny", action="store_true", help="tiny model for development")
    ap.add_argument("--out", default="bench_out")
    ap.add_argument("--reuse-trl", action="store_true",
                    help="read back TRL cases already measured with the same spec (preftune cases always run)")
    args = ap.parse_args(argv)
    global REUSE_TRL
    REUSE_TRL = args.reuse_trl
    args.steps = args.steps or (2 if args.tiny else 30)
    args.only = [o.strip() for o in args.only.split(",") if o.strip()]
    args.bf16_rows = [] if args.bf16_rows == "none" else args.bf16_rows.split(",")
    args.compile_rows = [] if args.compile_rows == "none" else args.compile_rows.split(",")
    # bf16 rows only where bf16 is native (preftune refuses --dtype bfloat16 elsewhere: emulated, 100s x slower)
    args.native_bf16 = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    bf16_note = ("native (torch.ops.mkldnn._is_mkldnn_bf16_supported() = True)" if args.native_bf16
                 else "not measured: no native bf16")
    print(f"bf16: {bf16_note}", flush=True)
    bad = [o for o in args.only if o not in OBJECTIVE_PARAMS]
    if bad:
        ap.error(f"unknown objective(s) {bad}; choose from {list(OBJECTIVE_PARAMS)}")
    out = Path(args.out)
    assets = build_assets(out / "assets", args.tiny, args.steps * BATCH)
    peaks = matmul_peak(args.threads, n=1024 if args.tiny else 2048)
    print(f"matmul peak ({args.threads} threads): fp32 {peaks['fp32']:.1f} GFLOP/s, bf16 {peaks['bf16']:.1f} GFLOP/s",
          flush=True)
    import trl

    results: dict[str, Any] = {
        "machine": {"cpu": platform.processor() or platform.machine(), "threads": args.threads,
                    "torch": torch.__version__, "trl": trl.__version__, "peak_gflops": peaks,
                    "bf16_note": bf16_note},
        "steps": args.steps, "lr": args.lr, "batch_size": BATCH, "model": assets["model"], "model_params": assets["params"],
        "matmul_weights": assets["matmul_weights"], "trl_gradient_checkpointing": args.trl_grad_ckpt,
        "settings": {}}
    try:
        cpu = next(ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name"))
        results["machine"]["cpu"] = f"{cpu} ({os.cpu_count()} cpus)"
    except (OSError, StopIteration):
        pass
    settings = ["long"] if args.long_only else ["standard"] + (["long"] if args.long_prompt else [])
    for setting in settings:
        print(f"[{setting}]", flush=True)
        specs = case_specs(args, setting, assets)
        run_root = out / "runs" / setting
        cases: dict[str, dict[str, Any]] = {}
        for name, (script, spec) in specs.items():
            cases[name] = run_child(script, spec, run_root / name, args.threads)
            _report(name, cases[name])
        s: dict[str, Any] = {"max_length": SETTINGS[setting][2], "cases": cases}
        if args.matrix and setting == "standard":  # the 2x2 timing is on the standard setting
            s["matrix"] = run_matrix(args, setting, assets, cases, run_root)
        results["settings"][setting] = s
        write_results(out, results, assets["matmul_weights"], peaks)  # partial results survive a crash
    # the machine may have been busier at the start: re-measure and keep the better peak (both recorded)
    again = matmul_peak(args.threads, n=1024 if args.tiny else 2048)
    results["machine"]["peak_gflops_runs"] = [dict(peaks), again]
    for k in peaks:
        peaks[k] = max(peaks[k], again[k])
    write_results(out, results, assets["matmul_weights"], peaks)
    print("\n" + render(results, markdown=False), end="")
    return results


if __name__ == "__main__":
    main()
