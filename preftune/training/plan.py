"""``preftune plan``: will a run fit, and what does each objective cost? Answered from the model config alone.

    preftune plan --model M --objective dpo,simpo,orpo --lora-rank 16,8 --batch-size 8 --max-length 1024 \\
        --dtype bfloat16 --gpu-memory 24GiB [--gradient-checkpointing] [--eval-fp32] [--json]

The model is built on the meta device (no weights are read) to count parameters and find the linear layers LoRA
wraps. Every term below is in bytes and has its basis written next to it; the README's "Will it fit?" section
has the formula and its sources (Korthikanti et al. 2022, "Reducing Activation Recomputation in Large
Transformer Models", and the measurements in bench/bench_plan.py).

What one training step holds, for a Llama-style decoder (pre-norm, RoPE, gated MLP) in preftune's layout:

* one row ``prompt + chosen + rejected`` per pair (logprobs.make_batch), T = P + 2C tokens;
* per layer, the tensors autograd saves for backward (counted op by op on Llama: 8 hidden-sized, 4
  intermediate-sized, one r-sized per LoRA-wrapped linear, the (B, 1, T, T) float copy SDPA makes of the 4D
  mask, and SDPA's log-sum-exp);
* the LM head only on the 2C completion positions per pair, in chunks of ``logit_chunk`` rows; a chunk whose
  logits exceed 2^25 values is recomputed in backward (logprobs.token_logps);
* the forward's temporaries (base output, LoRA B output and its scaled copy per wrapped linear, RMSNorm and
  RoPE intermediates: 30 hidden- and 6 intermediate-sized per token and layer for all-linear LoRA).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass, field, replace
from typing import Any

from ..core.errors import InputError

GIB = 1 << 30
MIB = 1 << 20
# logprobs._CHECKPOINT_LOGITS: above this many logits per chunk the chunk is recomputed in backward.
CHECKPOINT_LOGITS = 1 << 25
# glibc's dynamic mmap threshold never rises above 32 MiB (DEFAULT_MMAP_THRESHOLD_MAX on 64-bit): a freed tensor
# below it goes back to the heap, where it stays resident; a larger one is unmapped and leaves RSS at once.
GLIBC_MMAP_MAX = 32 * MIB
# Adam with fp32 master weights: weight 4 + gradient 4 + exp_avg 4 + exp_avg_sq 4 bytes per trainable value.
ADAM_BYTES = 16
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
# Batch sizes of the no-grad passes: the reference over training pairs takes Config.reference_tokens padded
# tokens per forward (train.reference_requests), held-out evaluation Config.eval_batch_size pairs.
REF_TOKENS = 4096
EVAL_BATCH = 16


# ------------------------------------------------------------------------------------------------ the model
@dataclass
class Arch:
    """What the formula needs from a model config: sizes, parameter count and the linears of one layer."""

    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    params: int                 # every parameter, tied weights once
    matmul_params: int          # weights of every Linear incl. the LM head: 2 FLOPs per token each in a forward
    linears: list[tuple[str, str, int, int]] = field(default_factory=list)  # one layer: (name, parent, in, out)
    head_name: str = "lm_head"

    def lora_params(self, rank: int, targets: list[str]) -> int:
        """r·(d_in + d_out) per wrapped linear (A is r×d_in, B is d_out×r), every layer."""
        return self.layers * sum(rank * (i + o) for n, _, i, o in self.wrapped(targets))

    def wrapped(self, targets: list[str]) -> list[tuple[str, str, int, int]]:
        if targets == ["all-linear"]:  # peft: every Linear but the output layer (the head is outside the layers)
            return list(self.linears)
        return [x for x in self.linears if x[0].split(".")[-1] in targets or x[0] in targets]


def read_arch(model: str, *, trust_remote_code: bool = False) -> Arch:
    """Config only: ``AutoConfig.from_pretrained`` and a model built on the meta device (no weights read)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    if not os.path.exists(model) and (os.path.isabs(model) or model.startswith(".") or model.count("/") > 1):
        raise InputError("no such model folder", path=model, field="model")  # not a hub id either
    if os.path.isdir(model) and not os.path.exists(os.path.join(model, "config.json")):
        raise InputError("no config.json in the model folder", path=model, field="model")
    try:
        cfg = AutoConfig.from_pretrained(model, trust_remote_code=trust_remote_code)
    except Exception as e:  # transformers raises many types; one line for the user
        raise InputError(f"cannot read model config: {str(e).strip().splitlines()[0]}", path=model,
                         field="model") from None
    try:
        with torch.device("meta"):
            lm = AutoModelForCausalLM.from_config(cfg, trust_remote_code=trust_remote_code)
    except Exception as e:
        raise InputError(f"cannot build a causal LM from this config: {str(e).strip().splitlines()[0]}",
                         path=model, field="model") from None
    text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    head = lm.get_output_embeddings()
    names = {id(m): n for n, m in lm.named_modules()}
    decoder_layers = _layers(lm)
    linears = []
    for name, mod in decoder_layers[0].named_modules():
        if isinstance(mod, torch.nn.Linear) and mod is not head:
            linears.append((name, name.rpartition(".")[0], mod.in_features, mod.out_features))
    heads = text.num_attention_heads
    hidden = text.hidden_size
    mlp_outs = [o for n, p, i, o in linears if i == hidden and o != hidden and "attn" not in p]
    return Arch(layers=len(decoder_layers), hidden=hidden,
                intermediate=getattr(text, "intermediate_size", None) or max(mlp_outs or [4 * hidden]),
                heads=heads, kv_heads=getattr(text, "num_key_value_heads", None) or heads,
                head_dim=getattr(text, "head_dim", None) or hidden // heads, vocab=text.vocab_size,
                params=sum(p.numel() for p in lm.parameters()),
                matmul_params=sum(m.weight.numel() for m in lm.modules() if isinstance(m, torch.nn.Linear)),
                linears=linears, head_name=names.get(id(head), "lm_head"))


def _layers(lm: Any) -> Any:
    decoder = lm.get_decoder() if hasattr(lm, "get_decoder") else lm
    for obj in (decoder, getattr(decoder, "model", None)):
        layers = getattr(obj, "layers", None) or getattr(obj, "h", None)
        if layers is not None and len(layers):
            return layers
    raise InputError("cannot find the decoder layers of this model (plan knows Llama-style decoders)",
                     field="model")


# ------------------------------------------------------------------------------------------------ the estimate
@dataclass(frozen=True)
class Setting:
    """One cell and the run settings the plan assumes."""

    objective: str
    lora_rank: int
    batch_size: int
    grad_accum: int
    prompt_len: int
    completion_len: int
    dtype: str
    device: str                       # "cpu" or "cuda"
    gradient_checkpointing: bool
    logit_chunk: int = 1024
    lora_targets: tuple[str, ...] = ("all-linear",)
    reference_cached: bool = False
    eval_fp32: bool = False           # Config.eval_fp32: held-out scoring upcasts bf16 weights

    @property
    def row_len(self) -> int:       # prompt once, then chosen, then rejected (logprobs.make_batch)
        return self.prompt_len + 2 * self.completion_len


def _act_bytes(s: Setting) -> int:
    return DTYPE_BYTES[s.dtype]


def _layer_tensors(a: Arch, s: Setting, pairs: int, *, grad: bool) -> tuple[int, int, list[int]]:
    """(saved bytes, temporary bytes, sizes of the temporaries) of one decoder layer for ``pairs`` rows.

    Counted op by op on transformers' Llama with peft LoRA (bench/bench_plan.py --probe checks it against
    autograd's saved-tensor hooks). Saved (backward needs them): both RMSNorm inputs (2h); q and k after RoPE,
    v, the attention output (4h, k and v repeated to every head: SDPA gets an explicit mask, so transformers
    repeats them); gate output, SiLU output and up output (3i); the input of each group of wrapped linears
    that shares one (y1 for q/k/v, y2 for gate/up, the product for down); r per wrapped linear (A's output);
    the (B, 1, T, T) float mask SDPA converts preftune's bool mask into; SDPA's log-sum-exp (heads).
    """
    b = _act_bytes(s)
    tokens = pairs * s.row_len
    h, i = a.hidden, a.intermediate
    wrapped = a.wrapped(list(s.lora_targets)) if s.lora_rank else list(a.linears)
    r = s.lora_rank
    # Inputs saved for LoRA A (or for the weight gradient in full fine-tuning): one per group of linears that
    # read the same tensor, (parent module, d_in); the attention output projection reads SDPA's output, which
    # is saved anyway. In 16-bit, peft casts the input to the fp32 LoRA weights once per wrapped linear.
    def attn_out(name: str) -> bool:
        return re.search(r"(o_proj|out_proj|wo|dense)$", name) is not None

    if s.lora_rank and b < 4:
        inputs_bytes = sum(d_in for _, _, d_in, _ in wrapped) * 4
    else:
        inputs_bytes = sum(d for _, d in {(p, d_in) for n, p, d_in, _ in wrapped if not attn_out(n)}) * b
    saved_per_token = (6 * h + 3 * i) * b + inputs_bytes + len(wrapped) * r * 4 + a.heads * 4
    if s.device == "cpu" and b < 4:  # preftune's SDPA_FP32: on CPU, bf16 q/k/v are upcast and those copies saved
        saved_per_token += 3 * h * (4 - b)
    mask = pairs * s.row_len ** 2 * b  # SDPA's float copy of the bool mask, one per layer
    # Temporaries: RMSNorm pow and x_hat (2 x 2h); each LoRA-wrapped linear's base output, B output and scaled copy;
    # the q, k, o and down sums that nothing saves (4h); RoPE's q*cos, -x2, cat and *sin for q and k (7h).
    per_linear = 3 if s.lora_rank else 0  # full fine-tuning: a linear's output is the tensor itself
    temp_sizes = [h] * 4 + [o for _, _, _, o in wrapped for _ in range(per_linear)] + [h] * 4 + [h] * 7
    if a.kv_heads != a.heads:  # k after RoPE and v before repeat_kv's copy
        temp_sizes += [a.kv_heads * a.head_dim] * 2
    if not grad:
        # No-grad: each tensor dies with its last use. Alive at once: the residual stream (h) and either the
        # attention block (norm output, q, k and v repeated to every head, output: 5h, + k, v before the repeat
        # under GQA) with the float mask, or the MLP (norm output h, SiLU output, up output and product: 3i).
        kv = 2 * a.kv_heads * a.head_dim if a.kv_heads != a.heads else 0
        live = h + max(5 * h + kv, h + 3 * i)
        return 0, live * tokens * b + mask, [live * tokens * b + mask]
    temps = [x * tokens * b for x in temp_sizes]
    return saved_per_token * tokens + mask, sum(temps), temps


def _lm_head(a: Arch, s: Setting, pairs: int, *, grad: bool) -> int:
    """LM head on completion positions only: M = 2C targets per pair, chunks of logit_chunk rows, fp32 logits.

    A chunk with more than 2^25 logits is recomputed in backward, so only one chunk (logits, exp, gradient:
    3 x rows x V x 4) is alive; smaller chunks keep every chunk's fp32 logits for backward (M x V x 4) plus
    one chunk's exp and gradient.
    """
    m = pairs * 2 * s.completion_len
    rows = min(s.logit_chunk, m)
    chunk = rows * a.vocab * 4
    if not grad:
        return 2 * chunk
    if rows * a.vocab > CHECKPOINT_LOGITS:
        return 3 * chunk
    return m * a.vocab * 4 + 2 * chunk


def estimate(a: Arch, s: Setting, *, baseline: int = 0, import_peak: int = 0) -> dict[str, Any]:
    """Every term of one cell's peak, in bytes, plus relative compute per pair.

    ``baseline``: on the CPU, the RSS an interpreter holds after importing what training imports;
    ``import_peak``: its peak while importing. Memory the imports freed is reused by what comes after, so the
    process peaks at the larger of the two: the import peak, or the resident baseline plus training.
    """
    from ..core import objectives

    needs_ref = objectives.get(s.objective).needs_reference
    wb = DTYPE_BYTES[s.dtype]
    weights = a.params * wb
    if s.lora_rank:
        trainable = a.lora_params(s.lora_rank, list(s.lora_targets))
        train_state = trainable * ADAM_BYTES
    else:  # full fine-tuning: gradient and both Adam moments in the weights' dtype, beside the weights
        trainable = a.params
        train_state = 3 * a.params * wb
    saved, temps, temp_sizes = _layer_tensors(a, s, s.batch_size, grad=True)
    tokens = s.batch_size * s.row_len
    final_norm = 2 * a.hidden * tokens * _act_bytes(s)
    if s.gradient_checkpointing:
        # Korthikanti et al. 2022, full recomputation: each layer keeps only its input; one layer at a time is
        # recomputed in backward with everything it saves.
        activations = a.layers * a.hidden * tokens * _act_bytes(s) + saved + final_norm
    else:
        activations = a.layers * saved + final_norm
    lm_head = _lm_head(a, s, s.batch_size, grad=True)
    # Temporaries: on a GPU the caching allocator reuses freed blocks, so one layer's worth is alive at most.
    # On the CPU, glibc serves every block below its 32 MiB mmap threshold from the heap and keeps freed ones
    # resident; saved tensors allocated between the temporaries pin the holes, and the smaller blocks that
    # follow split them (malloc_info: ~2,500 free pieces of 0.4 MiB on average after 3 steps), so a later
    # hidden-sized temporary rarely finds a hole it fits. Measured (mallinfo2, bench/bench_plan.py --probe):
    # the free heap grows by about the hidden-sized temporaries of every layer (30 x h per token for
    # all-linear LoRA; 0.83-1.1 GiB at the peak of 3-step runs of the 29.5M model against 0.88 GiB here).
    # With checkpointing nothing saved sits between one layer's blocks and the next's, so they are reused from
    # layer to layer: the heap keeps about one layer's whole allocation (saved + temporaries) from the forward
    # and one from the recomputation in backward (measured: 0.55 GiB free after 3 steps against 0.48 here).
    if s.device == "cpu":
        hidden_temp = a.hidden * tokens * _act_bytes(s)
        small = [t for t in temp_sizes if t < GLIBC_MMAP_MAX]
        if s.gradient_checkpointing:
            slack = 2 * (saved + sum(small))
        else:
            slack = a.layers * sum(t for t in small if t == hidden_temp)
        transient = max(temp_sizes)
    else:
        slack, transient = 0, temps
    train_peak = activations + lm_head + slack + transient
    # No-grad passes: held-out evaluation (every objective) and the reference over the training pairs (only
    # objectives that need it, and only when not cached). One layer's tensors alive at a time.
    ev = replace(s, dtype="float32") if s.eval_fp32 else s  # upcast: fp32 activations, 4 bytes per weight
    eval_peak = (_layer_tensors(a, ev, EVAL_BATCH, grad=False)[1] + _lm_head(a, ev, EVAL_BATCH, grad=False)
                 + a.params * (DTYPE_BYTES[ev.dtype] - wb))
    ref_forward = 0
    if needs_ref and not s.reference_cached:
        ref_batch = max(1, REF_TOKENS // s.row_len)  # pairs of this length that fit the token budget
        ref_forward = _layer_tensors(a, s, ref_batch, grad=False)[1] + _lm_head(a, s, ref_batch, grad=False)
    peak = max(import_peak, baseline + weights + train_state + max(train_peak, eval_peak, ref_forward))
    # Compute per pair in forwards of one row: a forward is 2 FLOPs per weight per token; backward through a
    # frozen weight computes only the input gradient (one more), a trainable weight also its own (two more).
    fwd_flops = 2 * a.matmul_params * s.row_len
    policy = (2.0 if s.lora_rank else 3.0) + (1.0 if s.gradient_checkpointing else 0.0)
    reference = 1.0 if needs_ref and not s.reference_cached else 0.0
    return {
        "objective": s.objective, "lora_rank": s.lora_rank, "batch_size": s.batch_size,
        "grad_accum": s.grad_accum, "dtype": s.dtype, "gradient_checkpointing": s.gradient_checkpointing,
        "row_tokens": s.row_len, "peak_bytes": int(peak),
        "baseline_bytes": int(baseline), "import_peak_bytes": int(import_peak), "frozen_weights_bytes": int(weights),
        "trainable_params": int(trainable), "trainable_state_bytes": int(train_state),
        "activations_bytes": int(activations), "lm_head_bytes": int(lm_head),
        "temporaries_bytes": int(transient), "allocator_slack_bytes": int(slack),
        "eval_pass_bytes": int(eval_peak),
        "reference": {"needed": needs_ref, "kind": ("cache" if s.reference_cached else "forward") if needs_ref else "none",
                      "forward_bytes": int(ref_forward), "cache_disk_bytes_per_pair": 8 if needs_ref else 0},
        "compute": {"forwards_per_pair": policy + reference, "policy_forwards": policy,
                    "reference_forwards": reference, "flops_per_pair": int(fwd_flops * (policy + reference))},
    }


def fixes(a: Arch, s: Setting, budget: int, **base: int) -> list[dict[str, Any]]:
    """Each single change that lowers the peak, with its estimate; plus all of them together."""
    out = []

    def add(name: str, flags: str, new: Setting) -> None:
        peak = estimate(a, new, **base)["peak_bytes"]
        out.append({"fix": name, "flags": flags, "peak_bytes": peak, "fits": peak <= budget})

    if not s.gradient_checkpointing:
        add("gradient checkpointing", "--gradient-checkpointing", replace(s, gradient_checkpointing=True))
    b = s.batch_size // 2
    while b >= 1:  # the largest smaller batch that fits, same pairs per step through accumulation
        new = replace(s, batch_size=b, grad_accum=s.grad_accum * s.batch_size // b)
        if estimate(a, new, **base)["peak_bytes"] <= budget or b == 1:
            add("smaller batch + accumulation", f"--batch-size {b} --grad-accum {new.grad_accum}", new)
            break
        b //= 2
    if s.dtype == "float32":
        add("bf16 weights", "--dtype bfloat16", replace(s, dtype="bfloat16"))
    elif s.eval_fp32:
        add("held-out scoring in bf16", "--no-eval-fp32", replace(s, eval_fp32=False))
    r = s.lora_rank // 2
    while r >= 1:
        new = replace(s, lora_rank=r)
        if estimate(a, new, **base)["peak_bytes"] <= budget or r == 1:
            add("lower rank", f"--lora-rank {r}", new)
            break
        r //= 2
    if len(out) > 1 and not any(f["fits"] for f in out):
        # Together: checkpointing and bf16, then the largest batch (same pairs per step) that fits with them.
        both = replace(s, gradient_checkpointing=True, dtype="bfloat16")
        b = s.batch_size
        while b > 1 and estimate(a, replace(both, batch_size=b), **base)["peak_bytes"] > budget:
            b //= 2
        new = replace(both, batch_size=b, grad_accum=s.grad_accum * s.batch_size // b)
        parts = ["checkpointing"] + (["bf16"] if s.dtype == "float32" else []) + \
            ([f"batch {b} + accumulation"] if b != s.batch_size else [])
        flags = "--gradient-checkpointing" + (" --dtype bfloat16" if s.dtype == "float32" else "") + \
            (f" --batch-size {b} --grad-accum {new.grad_accum}" if b != s.batch_size else "")
        add("together: " + ", ".join(parts), flags, new)
    return out


# ------------------------------------------------------------------------------------------------ the CPU baseline
def measure_baseline(model: str) -> tuple[int, int]:
    """(resident, peak) RSS of a fresh interpreter that imports what ``preftune train`` imports and builds the
    model class on the meta device: the part of a run's RSS that does not depend on the model's size (about
    350 MiB with torch 2.13 + transformers 5 on Linux). Resident is read after a garbage collection."""
    code = ("import gc, resource, torch, peft, preftune.training.loop, preftune.commands.cli\n"
            "from transformers import AutoConfig, AutoModelForCausalLM\n"
            f"c = AutoConfig.from_pretrained({model!r})\n"
            "with torch.device('meta'):\n    AutoModelForCausalLM.from_config(c)\n"
            "gc.collect()\n"
            "print(int(open('/proc/self/statm').read().split()[1]) * resource.getpagesize(),"
            " resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)\n")  # ru_maxrss: KiB on Linux
    env = {**os.environ, "TRANSFORMERS_VERBOSITY": "error", "PYTHONWARNINGS": "ignore"}
    try:
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300,
                             check=True).stdout
        resident, peak = (int(x) for x in out.strip().splitlines()[-1].split())
        return resident, peak
    except (subprocess.SubprocessError, ValueError, IndexError):
        return 350 * MIB, 350 * MIB  # the measured value above, when the probe cannot run


# ------------------------------------------------------------------------------------------------ the command
def parse_size(text: str, field: str = "gpu_memory") -> int:
    """``24GiB``, ``24GB``, ``800MiB``, ``1.5TiB`` or a byte count -> bytes."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmgt]?i?b?)?\s*", text.lower())
    if not m:
        raise InputError(f"{text!r} is not a size like 24GiB or 800MB", field=field)
    unit = m.group(2) or ""
    power = " kmgt".index(unit[0]) if unit and unit[0] in "kmgt" else 0
    base = 1024 if "i" in unit or unit in ("k", "m", "g", "t") else 1000
    return int(float(m.group(1)) * base ** power)


def _ints(text: str, field: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise InputError(f"{text!r} is not a comma-separated list of integers", field=field) from None
    if not values or any(v < 0 for v in values):
        raise InputError(f"{text!r}: give one or more integers >= 0", field=field)
    return values


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="model folder (or hub id already downloaded); config only")
    p.add_argument("--objective", default="dpo,simpo", help="comma-separated objectives (default dpo,simpo)")
    p.add_argument("--lora-rank", default="16,8", help="comma-separated ranks; 0 = full fine-tuning")
    p.add_argument("--lora-target-modules", default="all-linear", help="as in train (default all-linear)")
    p.add_argument("--batch-size", type=int, default=8, help="pairs per micro-batch")
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--max-length", type=int, default=512, help="prompt + completion, per side")
    p.add_argument("--max-prompt-length", type=int, help="default max_length / 2, as in train")
    p.add_argument("--prompt-length", type=int, help="prompt tokens to plan for (default: max-prompt-length)")
    p.add_argument("--completion-length", type=int,
                   help="tokens per completion (default: max-length - prompt length)")
    p.add_argument("--logit-chunk", type=int, default=1024)
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPE_BYTES))
    p.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda with --gpu-memory, else cpu")
    p.add_argument("--gpu-memory", help="GPU memory budget, e.g. 24GiB")
    p.add_argument("--memory", help="memory budget for --device cpu (default: this machine's RAM)")
    p.add_argument("--gradient-checkpointing", action="store_true", help="plan with activation checkpointing")
    p.add_argument("--eval-fp32", action="store_true",
                   help="plan for held-out scoring in fp32 arithmetic (as train --eval-fp32)")
    p.add_argument("--reference-cached", action="store_true",
                   help="the training set's reference log-probs are already in the cache (no extra forward)")
    p.add_argument("--baseline-mb", type=float,
                   help="CPU: the interpreter + import RSS in MiB instead of measuring it in a subprocess")
    p.add_argument("--json", action="store_true", help='print {"cells": [...]} instead of the table')


def main(args: argparse.Namespace) -> int:
    """``preftune plan``: print the table (or JSON) and return 0."""
    from ..core import objectives

    objs = [o.strip() for o in args.objective.split(",") if o.strip()]
    for o in objs:
        objectives.get(o)
    ranks = _ints(args.lora_rank, "lora_rank")
    for name in ("batch_size", "grad_accum", "max_length", "logit_chunk"):
        if getattr(args, name) < 1:
            raise InputError(f"invalid value {getattr(args, name)!r}", field=name)
    max_prompt = args.max_prompt_length or max(1, args.max_length // 2)  # as Config.prompt_length()
    if not 1 <= max_prompt < args.max_length:
        raise InputError(f"must be in [1, max_length): {max_prompt}", field="max_prompt_length")
    prompt = args.prompt_length if args.prompt_length is not None else max_prompt
    completion = args.completion_length if args.completion_length is not None else args.max_length - prompt
    if prompt < 0 or completion < 1 or prompt + completion > args.max_length:
        raise InputError(f"prompt {prompt} + completion {completion} must fit max_length {args.max_length}",
                         field="completion_length")
    device = args.device or ("cuda" if args.gpu_memory else "cpu")
    arch = read_arch(args.model)
    if args.gpu_memory or args.memory:
        budget = parse_size(args.gpu_memory or args.memory, "gpu_memory" if args.gpu_memory else "memory")
        budget_src = "given"
    elif device == "cpu":
        budget, budget_src = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "this machine's RAM"
    else:
        raise InputError("give the GPU's memory, e.g. --gpu-memory 24GiB", field="gpu_memory")
    baseline = import_peak = 0
    if device == "cpu":
        if args.baseline_mb is not None:
            baseline = import_peak = int(args.baseline_mb * MIB)
        else:
            baseline, import_peak = measure_baseline(args.model)
    targets = tuple(t.strip() for t in args.lora_target_modules.split(",") if t.strip())
    cells = []
    for o in objs:
        for r in ranks:
            s = Setting(objective=o, lora_rank=r, batch_size=args.batch_size, grad_accum=args.grad_accum,
                        prompt_len=prompt, completion_len=completion, dtype=args.dtype, device=device,
                        gradient_checkpointing=args.gradient_checkpointing, logit_chunk=args.logit_chunk,
                        lora_targets=targets, reference_cached=args.reference_cached, eval_fp32=args.eval_fp32)
            cell = estimate(arch, s, baseline=baseline, import_peak=import_peak)
            cell["fits"] = cell["peak_bytes"] <= budget
            cell["fixes"] = [] if cell["fits"] else fixes(arch, s, budget, baseline=baseline,
                                                          import_peak=import_peak)
            cells.append(cell)
    if not any(c["trainable_params"] for c in cells if c["lora_rank"]) and any(c["lora_rank"] for c in cells):
        raise InputError("no linear layer matches --lora-target-modules", field="lora_target_modules")
    model_info = {"path": args.model, "params": arch.params, "layers": arch.layers, "hidden": arch.hidden,
                  "intermediate": arch.intermediate, "heads": arch.heads, "kv_heads": arch.kv_heads,
                  "vocab": arch.vocab}
    if args.json:
        print(json.dumps({"model": model_info, "device": device, "budget_bytes": budget,
                          "prompt_tokens": prompt, "completion_tokens": completion, "cells": cells}, indent=1))
        return 0
    print(f"{args.model}: {arch.params / 1e6:.1f}M parameters, {arch.layers} layers, hidden {arch.hidden}, "
          f"vocab {arch.vocab}; {device}, budget {_fmt(budget)} ({budget_src})")
    print(f"per pair: one row of {prompt} + 2 x {completion} = {prompt + 2 * completion} tokens; "
          f"batch {args.batch_size} x accumulation {args.grad_accum}; {args.dtype}"
          + ("; gradient checkpointing" if args.gradient_checkpointing else ""))
    if device == "cpu":
        how = "given" if args.baseline_mb is not None else "measured in a fresh interpreter"
        print(f"CPU: peak RSS of the process, incl. {_fmt(baseline)} interpreter + imports ({how}; "
              f"{_fmt(import_peak)} at their peak)")
    cheapest = min(c["compute"]["forwards_per_pair"] for c in cells)
    for c in cells:
        ref = c["reference"]
        ref_txt = ("none (reference-free)" if not ref["needed"] else
                   f"cached on disk ({ref['cache_disk_bytes_per_pair']} B per pair)" if ref["kind"] == "cache" else
                   f"extra no-grad forward ({_fmt(ref['forward_bytes'])} at {REF_TOKENS} tokens); then cached, "
                   f"{ref['cache_disk_bytes_per_pair']} B per pair on disk")
        print(f"\n{c['objective']} r={c['lora_rank']}: peak {_fmt(c['peak_bytes'])} -> "
              + ("fits" if c["fits"] else "does NOT fit"))
        print(f"  frozen weights        {_fmt(c['frozen_weights_bytes'])}")
        print(f"  trainable + Adam      {_fmt(c['trainable_state_bytes'])} ({c['trainable_params']:,} params)")
        print(f"  activations           {_fmt(c['activations_bytes'])}")
        print(f"  LM head chunks        {_fmt(c['lm_head_bytes'])}")
        if device == "cpu":
            print(f"  heap slack (glibc)    {_fmt(c['allocator_slack_bytes'])}")
        else:
            print(f"  layer temporaries     {_fmt(c['temporaries_bytes'])}")
        print(f"  held-out pass         {_fmt(c['eval_pass_bytes'])}" + (" (fp32 upcast)" if args.eval_fp32 and args.dtype != "float32" else ""))
        print(f"  reference             {ref_txt}")
        comp = c["compute"]
        print(f"  compute per pair      {comp['forwards_per_pair']:.0f} forwards "
              f"({comp['forwards_per_pair'] / cheapest:.2f}x the cheapest cell; {comp['flops_per_pair'] / 1e9:.2f} GFLOP)")
        fitting = [f for f in c["fixes"] if f["fits"]]
        for f in c["fixes"]:
            print(f"  fix: {f['fix']} ({f['flags']}): {_fmt(f['peak_bytes'])}" + (", fits" if f["fits"] else ""))
        if c["fixes"] and not fitting:
            print("  no listed fix makes it fit")
    return 0


def _fmt(n: float) -> str:
    return f"{n / GIB:.2f} GiB" if n >= GIB else f"{n / MIB:.0f} MiB"


def plan_cells(model: str, **kwargs: Any) -> list[dict[str, Any]]:
    """Python entry: the cells ``preftune plan --json`` prints (keyword names are the flags')."""
    import contextlib
    import io

    p = argparse.ArgumentParser()
    add_arguments(p)
    argv = ["--model", model, "--json"]
    for k, v in kwargs.items():
        flag = "--" + k.replace("_", "-")
        if v is True:
            argv.append(flag)
        elif v is not None and v is not False:
            argv += [flag, str(v)]
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        main(p.parse_args(argv))
    return json.loads(buf.getvalue())["cells"]


__all__ = ["Arch", "Setting", "add_arguments", "estimate", "fixes", "main", "parse_size", "plan_cells", "read_arch"]
