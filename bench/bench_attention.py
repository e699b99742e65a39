"""Attention for prefix sharing: SDPA with the 4D bool mask vs FlexAttention with a BlockMask vs no sharing.

    .venv/bin/python bench/bench_attention.py                      # CPU here: fp32, both settings, ~5 min
    .venv/bin/python bench/bench_attention.py --threads 1          # a shared 2-core machine: steadier ratios
    python bench/bench_attention.py                                # on a GPU: device auto -> cuda, bf16

Shapes are the benchmark model's (bench/bench.py: 8 heads of 64, 8 layers, batch of 8 pairs); pair lengths are
drawn from bench.SETTINGS (standard ~65-token prompts, long ~200) plus the "Q:" / "\\nA:" / "." framing.
Work is counted per pair: one shared row (prompt + chosen + rejected) against two plain rows.

Part 1, the attention op alone (q, k, v leaves, forward and forward + backward with a random upstream gradient):

* ``sdpa-shared``: ``scaled_dot_product_attention`` with preftune's (R, 1, L, L) bool sharing mask, one row per
  pair (what preftune runs by default);
* ``flex-shared``: ``torch.compile(flex_attention)`` with the same mask as a BlockMask (preftune's
  ``_block_mask``). Compile time and BlockMask build time are reported apart. torch 2.13 has no FlexAttention
  backward on CPU (it raises NotImplementedError), so on CPU only its forward is timed;
* ``sdpa-plain-causal``: no sharing, two rows per pair, ``is_causal=True`` and no mask (right padding never
  reaches a real query): FlashAttention's path on CUDA.

Each variant's outputs (and q/k/v gradients, mapped back to the shared layout) are compared with
``sdpa-shared`` at every real position: max abs diff printed.

Part 2, the whole model through preftune's real path (``batch_logps`` on the 29.5M Llama with LoRA r8 on
q,k,v,o): ``attn_implementation`` sdpa (shared and plain layouts) vs flex_attention (shared). Forward
(reference pass, evaluation) and forward + backward (training step); flex's first call (transformers
compiles flex_attention) is reported apart. ``--no-model`` skips it.

Timings: median of interleaved rounds after a warm-up, ms per pair. The matmul peak is measured in the same
invocation; ratios are only comparable within one invocation.
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import bench  # noqa: E402  (bench/bench.py: model shape, settings, assets)
from preftune.modeling.logprobs import _block_mask, make_batch  # noqa: E402

N_PAIRS = bench.BATCH
HEADS = bench.FULL_MODEL["num_attention_heads"]
HEAD_DIM = bench.FULL_MODEL["hidden_size"] // HEADS


def cpu_name() -> str:
    try:
        cpu = next(ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name"))
        return f"{cpu} ({os.cpu_count()} cpus)"
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def matmul_peak(device: torch.device, dtype: torch.dtype, n: int, reps: int = 5) -> float:
    a, b = torch.randn(n, n, device=device).to(dtype), torch.randn(n, n, device=device).to(dtype)
    a @ b
    sync(device)
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        a @ b
        sync(device)
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best / 1e9


def pair_lengths(setting: str, seed: int) -> list[tuple[int, int, int]]:
    """(prompt, chosen, rejected) token counts of one batch, from the benchmark's ranges plus framing."""
    (p_lo, p_hi), (c_lo, c_hi), _, _ = bench.SETTINGS[setting]
    r = random.Random(f"{setting}-{seed}")
    return [(r.randint(p_lo, p_hi) + 3, r.randint(c_lo, c_hi) + 1, r.randint(c_lo, c_hi) + 1) for _ in range(N_PAIRS)]


def layouts(lengths: list[tuple[int, int, int]]):
    """The shared batch (mask from make_batch) and, per plain row, the shared positions it copies."""
    ids = [([5] * P, [6] * C, [7] * R) for P, C, R in lengths]
    shared = make_batch(*zip(*ids), pad_id=0)
    L = shared.input_ids.shape[1]
    rows = [list(range(P + C)) for P, C, _ in lengths] + \
           [list(range(P)) + list(range(P + C, P + C + R)) for P, C, R in lengths]
    Lp = max(len(x) for x in rows)
    # gather index into the flattened (R * L) shared positions; -1 = padding
    index = torch.full((2 * N_PAIRS, Lp), -1, dtype=torch.long)
    for s, x in enumerate(rows):
        index[s, :len(x)] = torch.tensor(x) + (s % N_PAIRS) * L
    real = torch.zeros(N_PAIRS * L, dtype=torch.bool)
    for i, (P, C, R) in enumerate(lengths):
        real[i * L:i * L + P + C + R] = True
    return shared, index, real


def to_plain(x: torch.Tensor, index: torch.Tensor, zero_rejected_prompt: list[int] | None = None) -> torch.Tensor:
    """(R, H, L, d) shared layout -> (2R, H, Lp, d) plain rows (pads zero); optionally zero the rejected rows'
    prompt positions (for an upstream gradient that counts the prompt once, like the shared layout)."""
    R, H, L, d = x.shape
    flat = x.permute(0, 2, 1, 3).reshape(R * L, H, d)
    out = flat[index.clamp(min=0)] * (index >= 0).to(x.dtype)[..., None, None]     # (2R, Lp, H, d)
    if zero_rejected_prompt is not None:
        out = out.clone()
        for i, P in enumerate(zero_rejected_prompt):
            out[N_PAIRS + i, :P] = 0
    return out.permute(0, 2, 1, 3).contiguous()


def from_plain(y: torch.Tensor, index: torch.Tensor, shape: tuple[int, ...], lengths) -> torch.Tensor:
    """Plain-row outputs back to the shared layout (the rejected rows' prompt copies are dropped)."""
    R, H, L, d = shape
    flat = torch.zeros(R * L, H, d, dtype=y.dtype, device=y.device)
    yt = y.permute(0, 2, 1, 3)                                                     # (2R, Lp, H, d)
    for s in range(2 * N_PAIRS):
        P = lengths[s % N_PAIRS][0]
        start = 0 if s < N_PAIRS else P
        keep = index[s, start:] >= 0
        flat[index[s, start:][keep]] = yt[s, start:][keep]
    return flat.reshape(R, L, H, d).permute(0, 2, 1, 3)


def timed(fn, device: torch.device) -> float:
    sync(device)
    t = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t


def interleaved(fns: dict[str, object], device: torch.device, rounds: int) -> dict[str, float]:
    """Median seconds per call of each fn, rounds interleaved so that load changes hit all alike."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            times[k].append(timed(fn, device))
    return {k: statistics.median(v) for k, v in times.items()}


# ------------------------------------------------------------------------------------------------ part 1
def attention_op(setting: str, device: torch.device, dtype: torch.dtype, rounds: int, seed: int) -> dict:
    from torch.nn.attention.flex_attention import flex_attention

    lengths = pair_lengths(setting, seed)
    shared, index, real = layouts(lengths)
    mask = shared.attention_mask.to(device)                                       # (R, 1, L, L)
    R, L = shared.input_ids.shape
    g = torch.Generator().manual_seed(seed)
    q, k, v, up = (torch.randn(R, HEADS, L, HEAD_DIM, generator=g).to(device, dtype) for _ in range(4))
    real_dev = real.to(device)
    up = up * real_dev.reshape(R, 1, L, 1)                                         # no gradient from pads
    qp, kp, vp = (to_plain(x, index.to(device)) for x in (q, k, v))
    upp = to_plain(up, index.to(device), [P for P, _, _ in lengths])
    Lp = qp.shape[2]
    leaves = {name: [t.detach().clone().requires_grad_(True) for t in ts]
              for name, ts in (("shared", (q, k, v)), ("plain", (qp, kp, vp)))}

    t = time.perf_counter()
    block = _block_mask(mask)
    sync(device)
    mask_s = time.perf_counter() - t
    mask_s = min(mask_s, *(timed(lambda: _block_mask(mask), device) for _ in range(3)))
    flex = torch.compile(flex_attention, dynamic=False)
    flex_bwd = device.type != "cpu"  # torch 2.13: "FlexAttention does not support backward on CPU"

    def case(attend, layout: str, inputs: tuple, grad_out):
        """attention(grad): forward on ``inputs`` (no grad) or on the layout's leaves, then backward."""
        def run(grad: bool):
            out = attend(*(leaves[layout] if grad else inputs))
            if grad:
                out.backward(grad_out)
            return out
        return run

    sdpa_shared = case(lambda a, b, c: F.scaled_dot_product_attention(a, b, c, attn_mask=mask), "shared", (q, k, v), up)
    sdpa_plain = case(lambda a, b, c: F.scaled_dot_product_attention(a, b, c, is_causal=True), "plain", (qp, kp, vp),
                      upp)
    flex_shared = case(lambda a, b, c: flex(a, b, c, block_mask=block), "shared", (q, k, v), up)

    compile_s = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with torch.no_grad():
            compile_s["fwd"] = timed(lambda: flex_shared(False), device)
        if flex_bwd:
            compile_s["fwd+bwd"] = timed(lambda: flex_shared(True), device)

        # agreement with sdpa-shared at real positions: outputs, then q/k/v gradients (plain ones mapped back)
        def grads(fn, name):
            for t_ in leaves[name]:
                t_.grad = None
            out = fn(True)
            gs = [t_.grad for t_ in leaves[name]]
            return out, gs

        with torch.no_grad():
            ref = sdpa_shared(False)
            diffs = {"flex-shared": (flex_shared(False) - ref).float()[real_dev.reshape(R, L)[:, None].expand(
                R, HEADS, L)].abs().max().item()}
            plain_out = from_plain(sdpa_plain(False), index.to(device), (R, HEADS, L, HEAD_DIM), lengths)
        sel = real_dev.reshape(R, L)[:, None].expand(R, HEADS, L)
        diffs["sdpa-plain-causal"] = (plain_out - ref).float()[sel].abs().max().item()
        gdiffs = {}
        ref_out, ref_g = grads(sdpa_shared, "shared")
        _, gp = grads(sdpa_plain, "plain")
        # plain grads: each shared position's gradient is the sum over its copies (the prompt is in two rows)
        back = []
        for gx in gp:
            flat = torch.zeros(R * L, HEADS, HEAD_DIM, dtype=gx.dtype, device=device)
            gt = gx.permute(0, 2, 1, 3)
            keep = index.to(device) >= 0
            flat.index_add_(0, index.to(device)[keep], gt[keep])
            back.append(flat.reshape(R, L, HEADS, HEAD_DIM).permute(0, 2, 1, 3))
        gdiffs["sdpa-plain-causal"] = max((a - b).float()[sel].abs().max().item() for a, b in zip(back, ref_g))
        if flex_bwd:
            _, gf = grads(flex_shared, "shared")
            gdiffs["flex-shared"] = max((a - b).float()[sel].abs().max().item() for a, b in zip(gf, ref_g))

        fwd = {"sdpa-shared": lambda: sdpa_shared(False), "flex-shared": lambda: flex_shared(False),
               "sdpa-plain-causal": lambda: sdpa_plain(False)}
        with torch.no_grad():
            t_fwd = interleaved(fwd, device, rounds)
        bwd = {"sdpa-shared": lambda: sdpa_shared(True), "sdpa-plain-causal": lambda: sdpa_plain(True)}
        if flex_bwd:
            bwd["flex-shared"] = lambda: flex_shared(True)
        t_bwd = interleaved(bwd, device, rounds)

    real_tokens = sum(P + C + R_ for P, C, R_ in lengths)
    dense = {"sdpa-shared": R * L * L, "flex-shared": R * L * L, "sdpa-plain-causal": 2 * R * Lp * Lp}
    return {"setting": setting, "lengths": lengths, "rows": {"shared": (R, L), "plain": (2 * R, Lp)},
            "real_tokens": real_tokens, "mask_density": mask.float().mean().item(),
            "block_mask_s": mask_s, "compile_s": compile_s,
            "fwd_s": t_fwd, "fwdbwd_s": t_bwd, "out_diff": diffs, "grad_diff": gdiffs, "score_entries": dense}


# ------------------------------------------------------------------------------------------------ part 2
def _load(cfg):
    """preftune's load_model; flex is let through on CPU (preftune refuses it there: no backward in torch
    2.13) so that its forward can be measured."""
    from unittest import mock

    from preftune.modeling import model as model_mod

    with mock.patch.object(model_mod, "flex_backward", lambda device: True):
        return model_mod.load_model(cfg)


def whole_model(setting: str, device: torch.device, dtype: torch.dtype, rounds: int, seed: int,
                out_dir: Path) -> dict:
    from preftune.core.config import Config
    from preftune.modeling.logprobs import batch_logps
    from preftune.modeling.model import add_lora

    assets = bench.build_assets(out_dir / "assets", False, 30 * bench.BATCH)
    lengths = pair_lengths(setting, seed)
    r = random.Random(seed)

    def ids(n: int) -> list[int]:
        return [r.randrange(3, bench.VOCAB) for _ in range(n)]

    toks = [(ids(P), ids(C), ids(R)) for P, C, R in lengths]
    batches = {"shared": make_batch(*zip(*toks), pad_id=0), "plain": make_batch(*zip(*toks), pad_id=0,
                                                                                share_prompt=False)}
    dtype_name = "bfloat16" if dtype == torch.bfloat16 else "float32"
    models, compile_s, sums = {}, {}, {}
    fwd, bwd = {}, {}
    for impl in ("sdpa", "flex_attention"):
        cfg = Config(model=assets["model"], data="unused", device=str(device), dtype=dtype_name,
                     attn_implementation=impl, lora_rank=8, lora_alpha=16.0, lora_dropout=0.0,
                     lora_target_modules=list(bench.LORA_TARGETS))
        torch.manual_seed(0)
        model = add_lora(_load(cfg), cfg)
        with torch.no_grad():  # LoRA B = 0 at init: give the adapter a value so its gradients are all live
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 1e-3, generator=torch.Generator().manual_seed(1)) if device.type == "cpu" \
                        else p.normal_(0, 1e-3)
        models[impl] = model
    runs = {"sdpa-shared": ("sdpa", "shared"), "sdpa-plain": ("sdpa", "plain"), "flex-shared": ("flex_attention",
                                                                                                 "shared")}
    flex_bwd = device.type != "cpu"

    def step(name: str, grad: bool):
        impl, lay = runs[name]
        model = models[impl]
        model.zero_grad(set_to_none=True)
        if grad:
            s, _ = batch_logps(model, batches[lay])
            s.sum().backward()
        else:
            with torch.no_grad():
                s, _ = batch_logps(model, batches[lay])
        return s

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        compile_s["fwd"] = timed(lambda: step("flex-shared", False), device)
        if flex_bwd:
            compile_s["fwd+bwd"] = timed(lambda: step("flex-shared", True), device)
        for name in runs:
            sums[name] = step(name, False).detach().float().cpu()
        for name in runs:
            models[runs[name][0]].train()
        fwd = interleaved({k: (lambda k=k: step(k, False)) for k in runs}, device, rounds)
        bwd = interleaved({k: (lambda k=k: step(k, True)) for k in runs if flex_bwd or not k.startswith("flex")},
                          device, rounds)
    ref = sums["sdpa-shared"]
    return {"setting": setting, "fwd_s": fwd, "fwdbwd_s": bwd, "compile_s": compile_s,
            "logp_diff": {k: (v - ref).abs().max().item() for k, v in sums.items() if k != "sdpa-shared"},
            "logp_scale": ref.abs().max().item(),
            "tokens": {k: b.padded_tokens for k, b in batches.items()}, "real_tokens": batches["shared"].real_tokens}


def reference_pass(setting: str, device: torch.device, dtype: torch.dtype, out_dir: Path) -> dict:
    """The no-grad workload flex can run on CPU: preftune's reference pass (``score_pairs``, 4096-token
    batches, prompt shared) over the benchmark's 240 training pairs, sdpa vs flex_attention; run twice, the
    first run including flex's compilations (one per new shape until dynamo goes dynamic)."""
    from preftune.core.config import Config
    from preftune.data.rows import load_examples
    from preftune.data.tokenize import tokenize_examples
    from preftune.modeling.logprobs import score_pairs
    from preftune.modeling.model import load_tokenizer

    assets = bench.build_assets(out_dir / "assets", False, 30 * bench.BATCH)
    _, _, max_len, max_prompt = bench.SETTINGS[setting]
    data = f"{assets['data']}/train_{setting}_{30 * bench.BATCH}_v{bench.DATA_VERSION}.jsonl"
    dtype_name = "bfloat16" if dtype == torch.bfloat16 else "float32"
    out: dict = {"setting": setting, "runs_s": {}}
    logps = {}
    variants = {"sdpa": ("sdpa", {}), "flex_attention": ("flex_attention", {}),
                # transformers compiles flex with dynamo's default automatic dynamic shapes; static = one
                # compilation per row length (recompile limit raised so none falls back to eager flex)
                "flex_attention static": ("flex_attention", {"automatic_dynamic_shapes": False,
                                                             "recompile_limit": 256})}
    for name, (impl, dynamo) in variants.items():
        cfg = Config(model=assets["model"], data=data, device=str(device), dtype=dtype_name, attn_implementation=impl)
        tok = load_tokenizer(cfg)
        pairs, _ = tokenize_examples(load_examples(data), tok, max_length=max_len, max_prompt_length=max_prompt)
        model = _load(cfg)
        torch._dynamo.reset()  # each variant compiles from scratch (inductor's on-disk cache may still hit)
        runs = []
        try:
            with warnings.catch_warnings(), torch._dynamo.config.patch(**dynamo):
                warnings.simplefilter("ignore")
                for _ in range(2):
                    sync(device)
                    t = time.perf_counter()
                    lp, _, padded = score_pairs(model, pairs, pad_id=tok.pad_token_id, tokens=4096)
                    sync(device)
                    runs.append(time.perf_counter() - t)
        except Exception as e:  # torch 2.13 CPU: the dynamic-shape flex kernel fails to compile
            line = next((ln.split("error:", 1)[1].strip() for ln in str(e).splitlines() if "error:" in ln),
                        str(e).splitlines()[0])
            out.setdefault("errors", {})[name] = f"{type(e).__name__}: {line[:120]}"
            continue
        out["runs_s"][name] = runs
        logps[name] = lp
        out["pairs"], out["padded_tokens"] = len(pairs), padded
        out["shapes"] = len({b for b in _row_lengths(pairs)})
        out["real_tokens"] = sum(len(p.prompt_ids) + len(p.chosen_ids) + len(p.rejected_ids) for p in pairs)
    out["logp_diff"] = {k: (v - logps["sdpa"]).abs().max().item() for k, v in logps.items() if k != "sdpa"}
    out["logp_scale"] = logps["sdpa"].abs().max().item()
    return out


def _row_lengths(pairs) -> list[int]:
    """The row length of each 4096-token batch of score_pairs (its number of distinct compiled shapes)."""
    from preftune.modeling.logprobs import token_batches

    order = sorted(range(len(pairs)), key=lambda i: -(len(pairs[i].prompt_ids) + len(pairs[i].chosen_ids)
                                                       + len(pairs[i].rejected_ids)))
    return [max(len(pairs[i].prompt_ids) + len(pairs[i].chosen_ids) + len(pairs[i].rejected_ids) for i in b)
            for b in token_batches(pairs, order, 4096, True)]


# ------------------------------------------------------------------------------------------------ report
def _ms(x: float | None) -> str:
    return "-" if x is None else f"{1e3 * x / N_PAIRS:.3f}"


def render_op(res: dict, device: torch.device) -> list[str]:
    R, L = res["rows"]["shared"]
    R2, Lp = res["rows"]["plain"]
    na = "n/a (no CPU backward)" if device.type == "cpu" else "-"
    lines = [f"### attention op, {res['setting']}: {N_PAIRS} pairs, {res['real_tokens']} real tokens; shared "
             f"{R} x {L} (mask density {res['mask_density']:.2f}), "
             f"plain {R2} x {Lp}",
             "| variant | fwd ms/pair | fwd+bwd ms/pair | vs sdpa-shared (fwd+bwd) | score entries/pair | max abs diff out "
             "| max abs diff dq,dk,dv |", "|---|---|---|---|---|---|---|"]
    base = res["fwdbwd_s"]["sdpa-shared"]
    for name in ("sdpa-shared", "flex-shared", "sdpa-plain-causal"):
        fb = res["fwdbwd_s"].get(name)
        gd = res["grad_diff"].get(name, 0.0 if name == "sdpa-shared" else None)
        lines.append(f"| {name} | {_ms(res['fwd_s'][name])} | {_ms(fb) if fb else na} | "
                     f"{'-' if not fb else f'{base / fb:.2f}x'} | {res['score_entries'][name] // N_PAIRS} | "
                     f"{res['out_diff'].get(name, 0.0):.1e} | {'-' if gd is None else f'{gd:.1e}'} |")
    fwd_ratio = res["fwd_s"]["sdpa-shared"] / res["fwd_s"]["flex-shared"]
    lines.append(f"- flex-shared forward vs sdpa-shared: {fwd_ratio:.2f}x; BlockMask build (preftune `_block_mask`) "
                 f"{1e3 * res['block_mask_s']:.1f} ms per batch; flex compile "
                 + ", ".join(f"{k} {v:.1f} s" for k, v in res["compile_s"].items()))
    return lines


def render_model(res: dict, device: torch.device) -> list[str]:
    na = "n/a (no CPU backward)" if device.type == "cpu" else "-"
    lines = [f"### whole model (batch_logps, LoRA r8 q,k,v,o), {res['setting']}: padded tokens shared "
             f"{res['tokens']['shared']}, plain {res['tokens']['plain']} (real {res['real_tokens']} shared)",
             "| path | fwd ms/pair | fwd+bwd ms/pair | vs sdpa-shared (fwd+bwd) | max abs diff of log-prob sums |",
             "|---|---|---|---|---|"]
    base = res["fwdbwd_s"]["sdpa-shared"]
    for name in ("sdpa-shared", "flex-shared", "sdpa-plain"):
        fb = res["fwdbwd_s"].get(name)
        lines.append(f"| {name} | {_ms(res['fwd_s'][name])} | {_ms(fb) if fb else na} | "
                     f"{'-' if not fb else f'{base / fb:.2f}x'} | "
                     f"{res['logp_diff'].get(name, 0.0):.1e} (sums ~{res['logp_scale']:.0f}) |")
    lines.append(f"- flex-shared forward vs sdpa-shared: {res['fwd_s']['sdpa-shared'] / res['fwd_s']['flex-shared']:.2f}x;"
                 " flex first call (transformers compiles flex_attention) "
                 + ", ".join(f"{k} {v:.1f} s" for k, v in res["compile_s"].items()))
    return lines


def render_reference(res: dict) -> list[str]:
    sd = res["runs_s"]["sdpa"]
    lines = [f"### reference pass (score_pairs, 4096-token batches), {res['setting']}: {res['pairs']} pairs, "
             f"{res['padded_tokens']} padded / {res['real_tokens']} real tokens, {res['shapes']} row lengths",
             "| attention | first run s (compiles; inductor's disk cache may be warm) | second run s | vs sdpa (first, "
             "second) | max abs diff of log-prob sums |",
             "|---|---|---|---|---|"]
    for name, runs in res["runs_s"].items():
        diff = res["logp_diff"].get(name)
        lines.append(f"| {name} | {runs[0]:.2f} | {runs[1]:.2f} | {sd[0] / runs[0]:.2f}x, {sd[1] / runs[1]:.2f}x | "
                     f"{'-' if diff is None else f'{diff:.1e}'} (sums ~{res['logp_scale']:.0f}) |")
    for name, err in res.get("errors", {}).items():
        lines.append(f"| {name} | failed: {err} | | | |")
    return lines


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="auto", help="auto = cuda if available, else cpu")
    ap.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16"),
                    help="auto = bfloat16 on cuda, float32 on cpu (preftune runs CPU attention in fp32 anyway)")
    ap.add_argument("--settings", default="standard,long")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--rounds", type=int, default=20, help="interleaved timing rounds (attention op)")
    ap.add_argument("--model-rounds", type=int, default=5, help="interleaved timing rounds (whole model)")
    ap.add_argument("--no-model", action="store_true", help="skip parts 2 and 3 (whole model, reference pass)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="bench_out")
    args = ap.parse_args(argv)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}.get(
        args.dtype, torch.bfloat16 if device.type == "cuda" else torch.float32)
    torch.set_num_threads(args.threads)
    what = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{args.threads} threads"
    peak = matmul_peak(device, dtype, 4096 if device.type == "cuda" else 2048)
    head = (f"attention for prefix sharing -- {cpu_name()}, {device} ({what}), torch {torch.__version__}, "
            f"dtype {str(dtype).removeprefix('torch.')}; matmul peak {peak:.1f} GFLOP/s; heads {HEADS} x {HEAD_DIM}")
    print(head, flush=True)
    lines = [head, ""]
    for setting in args.settings.split(","):
        res = attention_op(setting, device, dtype, args.rounds, args.seed)
        part = render_op(res, device)
        print("\n".join(part) + "\n", flush=True)
        lines += part + [""]
    if not args.no_model:
        for setting in args.settings.split(","):
            res = whole_model(setting, device, dtype, args.model_rounds, args.seed, Path(args.out))
            part = render_model(res, device)
            print("\n".join(part) + "\n", flush=True)
            lines += part + [""]
        for setting in args.settings.split(","):
            part = render_reference(reference_pass(setting, device, dtype, Path(args.out)))
            print("\n".join(part) + "\n", flush=True)
            lines += part + [""]
    again = matmul_peak(device, dtype, 4096 if device.type == "cuda" else 2048)
    tail = f"matmul peak again at the end: {again:.1f} GFLOP/s. ms/pair = median seconds per batch / {N_PAIRS} pairs."
    print(tail)
    lines.append(tail)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"attention_{device.type}.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
