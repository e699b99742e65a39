"""Will a run fit, and what does each objective cost? Answered from the model config (and the data's lengths).

    p = preftune.plan(Config(model=M, batch_size=8, max_length=1024, dtype="bfloat16"),
                      {"objective": ["dpo", "simpo", "orpo"], "lora_rank": [16, 8]}, device="cuda", budget=24 << 30)
    [(c.objective, c.lora_rank, c.peak_bytes, c.fits) for c in p.cells]

The model is built on the meta device (no weights are read) to count parameters and find the linear layers LoRA
wraps. Every term below is in bytes and has its basis written next to it, for a Llama-style decoder
(pre-norm, RoPE, gated MLP) in preftune's layout; docs/plan.md ("Will it fit?") has the formula term by term
and its sources (Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer Models", and
the measurements in bench/bench_plan.py).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from ..core.config import Config
from ..core.errors import InputError
from .plan_arch import Arch, data_lengths, measure_baseline, read_arch

if TYPE_CHECKING:
    from ..modeling.precision import Hardware

GIB = 1 << 30
MIB = 1 << 20
# logprobs._CHECKPOINT_LOGITS: above this many logits per chunk the chunk is recomputed in backward.
CHECKPOINT_LOGITS = 1 << 25
# glibc's dynamic mmap threshold never rises above 32 MiB (DEFAULT_MMAP_THRESHOLD_MAX on 64-bit): a freed tensor
# below it goes back to the heap, where it stays resident; a larger one is unmapped and leaves RSS at once.
GLIBC_MMAP_MAX = 32 * MIB
# Adam with fp32 master weights: weight 4 + gradient 4 + exp_avg 4 + exp_avg_sq 4 bytes per trainable value.
ADAM_BYTES = 16
DTYPE_BYTES = {"float32": 4, "bfloat16": 2}


# ------------------------------------------------------------------------------------------------ the estimate
@dataclass(frozen=True)
class Setting:
    """One cell and the run settings the plan assumes (``Setting.of`` reads them from a Config)."""

    objective: str
    lora_rank: int
    batch_size: int
    grad_accum: int
    prompt_len: int
    completion_len: int
    dtype: str
    device: str                       # "cpu" or "cuda"
    gradient_checkpointing: bool
    logit_chunk: int
    lora_targets: tuple[str, ...]
    reference_cached: bool            # the training pairs' reference log-probs are in the cache already
    eval_fp32: bool                   # Config.eval_fp32: held-out scoring upcasts bf16 weights
    eval_batch: int                   # Config.eval_batch_size: pairs per held-out forward
    reference_tokens: int             # Config.reference_tokens: padded tokens per training-set reference forward

    @classmethod
    def of(cls, cfg: Config, *, device: str, prompt_len: int, completion_len: int,
           reference_cached: bool = False) -> Setting:
        return cls(objective=cfg.objective, lora_rank=cfg.lora_rank, batch_size=cfg.batch_size,
                   grad_accum=cfg.grad_accum, prompt_len=prompt_len, completion_len=completion_len, dtype=cfg.dtype,
                   device=device, gradient_checkpointing=cfg.gradient_checkpointing, logit_chunk=cfg.logit_chunk,
                   lora_targets=tuple(cfg.lora_target_modules), reference_cached=reference_cached,
                   eval_fp32=cfg.eval_fp32, eval_batch=cfg.eval_batch_size, reference_tokens=cfg.reference_tokens)

    @property
    def row_len(self) -> int:       # prompt once, then chosen, then rejected (logprobs.make_batch)
        return self.prompt_len + 2 * self.completion_len


@dataclass(frozen=True)
class Reference:
    """The reference model's cost: a no-grad forward over the training pairs unless cached or not needed."""

    needed: bool
    kind: str                         # "forward" | "cache" | "none"
    forward_bytes: int
    cache_disk_bytes_per_pair: int


@dataclass(frozen=True)
class Compute:
    """Compute per pair, in forwards of one row (2 FLOPs per weight per token each)."""

    forwards_per_pair: float
    policy_forwards: float
    reference_forwards: float
    flops_per_pair: int


@dataclass(frozen=True)
class Fix:
    """One change that lowers a cell's peak: its name, the flags that make it, the peak with it, and whether
    that peak fits the budget (a cell lists the fixes that fit first)."""

    fix: str
    flags: str
    peak_bytes: int
    fits: bool


@dataclass(frozen=True)
class PlanCell:
    """One objective x rank cell: every term of its peak in bytes (field order = ``preftune plan --json``)."""

    objective: str
    lora_rank: int
    batch_size: int
    grad_accum: int
    dtype: str
    gradient_checkpointing: bool
    row_tokens: int
    peak_bytes: int
    baseline_bytes: int               # CPU: interpreter + imports, resident
    import_peak_bytes: int            # CPU: their peak while importing
    frozen_weights_bytes: int
    trainable_params: int
    trainable_state_bytes: int        # trainable weights, gradients and Adam moments
    activations_bytes: int
    lm_head_bytes: int
    temporaries_bytes: int            # GPU: one layer's temporaries; CPU: the largest one
    allocator_slack_bytes: int        # CPU: freed heap glibc keeps resident
    eval_pass_bytes: int
    reference: Reference
    compute: Compute
    fits: bool = False                # against a budget: set by plan()
    fixes: list[Fix] = field(default_factory=list)


@dataclass(frozen=True)
class ModelFigures:
    """The model's figures the plan read from its config."""

    path: str
    params: int
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    vocab: int


@dataclass(frozen=True)
class Plan:
    """What ``preftune plan`` answers (``dataclasses.asdict`` = its ``--json``)."""

    model: ModelFigures
    device: str
    native_bf16: bool                 # the device planned for runs bf16 natively (what --dtype auto decides on)
    dtype_requested: str              # --dtype as given; every cell's ``dtype`` is what it resolves to there
    budget_bytes: int
    prompt_tokens: int
    completion_tokens: int
    lengths: str                      # "caps": every pair at the truncation caps | "data": --data's longest row
                                      # after truncation | "given": --prompt-length and --completion-length
    cells: list[PlanCell]


def _layer_tensors(a: Arch, s: Setting, pairs: int, *, grad: bool) -> tuple[int, int, list[int]]:
    """(saved bytes, temporary bytes, sizes of the temporaries) of one decoder layer for ``pairs`` rows.

    Counted op by op on transformers' Llama with peft LoRA (bench/bench_plan.py --probe checks it against
    autograd's saved-tensor hooks). Saved (backward needs them): both RMSNorm inputs (2h); q and k after RoPE,
    v, the attention output (4h, k and v repeated to every head: SDPA gets an explicit mask, so transformers
    repeats them); gate output, SiLU output and up output (3i); the input of each group of wrapped linears
    that shares one (y1 for q/k/v, y2 for gate/up, the product for down); r per wrapped linear (A's output);
    the (B, 1, T, T) float mask SDPA converts preftune's bool mask into; SDPA's log-sum-exp (heads).
    """
    b, r = DTYPE_BYTES[s.dtype], s.lora_rank
    tokens = pairs * s.row_len
    h, i = a.hidden, a.intermediate
    wrapped = a.wrapped(list(s.lora_targets)) if r else list(a.linears)
    # Inputs saved for LoRA A (or for the weight gradient in full fine-tuning): one per group of linears that
    # read the same tensor, (parent module, d_in); the attention output projection reads SDPA's output, which
    # is saved anyway. In 16-bit, peft casts the input to the fp32 LoRA weights once per wrapped linear.
    if r and b < 4:
        inputs_bytes = sum(d_in for _, _, d_in, _ in wrapped) * 4
    else:
        groups = {(p, d_in) for n, p, d_in, _ in wrapped if not re.search(r"(o_proj|out_proj|wo|dense)$", n)}
        inputs_bytes = sum(d for _, d in groups) * b
    saved_per_token = (6 * h + 3 * i) * b + inputs_bytes + len(wrapped) * r * 4 + a.heads * 4
    if s.device == "cpu" and b < 4:  # preftune's SDPA_FP32: on CPU, bf16 q/k/v are upcast and those copies saved
        saved_per_token += 3 * h * (4 - b)
    mask = pairs * s.row_len ** 2 * b  # SDPA's float copy of the bool mask, one per layer
    # Temporaries: RMSNorm pow and x_hat (2 x 2h); each LoRA-wrapped linear's base output, B output and scaled copy;
    # the q, k, o and down sums that nothing saves (4h); RoPE's q*cos, -x2, cat and *sin for q and k (7h).
    per_linear = 3 if r else 0  # full fine-tuning: a linear's output is the tensor itself
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


def _heap(a: Arch, s: Setting, saved: int, temps: int, temp_sizes: list[int]) -> tuple[int, int]:
    """(allocator slack, transient temporaries) of one training step.

    On a GPU the caching allocator reuses freed blocks, so one layer's temporaries are alive at most.
    On the CPU, glibc serves every block below its 32 MiB mmap threshold from the heap and keeps freed ones
    resident; saved tensors allocated between the temporaries pin the holes, and the smaller blocks that
    follow split them (malloc_info: ~2,500 free pieces of 0.4 MiB on average after 3 steps), so a later
    hidden-sized temporary rarely finds a hole it fits. Measured (mallinfo2, bench/bench_plan.py --probe):
    the free heap grows by about the hidden-sized temporaries of every layer (30 x h per token for
    all-linear LoRA; 0.83-1.1 GiB at the peak of 3-step runs of the 29.5M model against 0.88 GiB here).
    With checkpointing nothing saved sits between one layer's blocks and the next's, so they are reused from
    layer to layer: the heap keeps about one layer's whole allocation (saved + temporaries) from the forward
    and one from the recomputation in backward (measured: 0.55 GiB free after 3 steps against 0.48 here).
    """
    if s.device != "cpu":
        return 0, temps
    hidden_temp = a.hidden * s.batch_size * s.row_len * DTYPE_BYTES[s.dtype]
    small = [t for t in temp_sizes if t < GLIBC_MMAP_MAX]
    if s.gradient_checkpointing:
        return 2 * (saved + sum(small)), max(temp_sizes)
    return a.layers * sum(t for t in small if t == hidden_temp), max(temp_sizes)


def estimate(a: Arch, s: Setting, *, baseline: int = 0, import_peak: int = 0) -> PlanCell:
    """Every term of one cell's peak, in bytes, plus relative compute per pair (``fits`` and ``fixes`` unset).

    ``baseline``: on the CPU, the RSS an interpreter holds after importing what training imports;
    ``import_peak``: its peak while importing. Memory the imports freed is reused by what comes after, so the
    process peaks at the larger of the two: the import peak, or the resident baseline plus training.
    """
    from ..core import objectives

    needs_ref = objectives.get(s.objective).needs_reference
    wb = DTYPE_BYTES[s.dtype]
    weights = a.params * wb
    trainable = a.lora_params(s.lora_rank, list(s.lora_targets)) if s.lora_rank else a.params
    # full fine-tuning: gradient and both Adam moments in the weights' dtype, beside the weights
    train_state = trainable * ADAM_BYTES if s.lora_rank else 3 * a.params * wb
    saved, temps, temp_sizes = _layer_tensors(a, s, s.batch_size, grad=True)
    tokens = s.batch_size * s.row_len
    final_norm = 2 * a.hidden * tokens * DTYPE_BYTES[s.dtype]
    if s.gradient_checkpointing:
        # Korthikanti et al. 2022, full recomputation: each layer keeps only its input; one layer at a time is
        # recomputed in backward with everything it saves.
        activations = a.layers * a.hidden * tokens * DTYPE_BYTES[s.dtype] + saved + final_norm
    else:
        activations = a.layers * saved + final_norm
    lm_head = _lm_head(a, s, s.batch_size, grad=True)
    slack, transient = _heap(a, s, saved, temps, temp_sizes)
    train_peak = activations + lm_head + slack + transient
    # No-grad passes: held-out evaluation (every objective) and the reference over the training pairs (only
    # objectives that need it, and only when not cached). One layer's tensors alive at a time.
    ev = replace(s, dtype="float32") if s.eval_fp32 else s  # upcast: fp32 activations, 4 bytes per weight
    eval_peak = (_layer_tensors(a, ev, s.eval_batch, grad=False)[1] + _lm_head(a, ev, s.eval_batch, grad=False)
                 + a.params * (DTYPE_BYTES[ev.dtype] - wb))
    ref_forward = 0
    if needs_ref and not s.reference_cached:
        # pairs per forward as prepare.reference_requests batches them: rows of this length that fit the token
        # budget, or 32 pairs (at least the held-out batch) when it is 0
        ref_batch = max(1, s.reference_tokens // s.row_len) if s.reference_tokens else max(32, s.eval_batch)
        ref_forward = _layer_tensors(a, s, ref_batch, grad=False)[1] + _lm_head(a, s, ref_batch, grad=False)
    peak = max(import_peak, baseline + weights + train_state + max(train_peak, eval_peak, ref_forward))
    # Compute per pair in forwards of one row: a forward is 2 FLOPs per weight per token; backward through a
    # frozen weight computes only the input gradient (one more), a trainable weight also its own (two more).
    fwd_flops = 2 * a.matmul_params * s.row_len
    policy = (2.0 if s.lora_rank else 3.0) + (1.0 if s.gradient_checkpointing else 0.0)
    reference = 1.0 if needs_ref and not s.reference_cached else 0.0
    return PlanCell(
        objective=s.objective, lora_rank=s.lora_rank, batch_size=s.batch_size, grad_accum=s.grad_accum,
        dtype=s.dtype, gradient_checkpointing=s.gradient_checkpointing, row_tokens=s.row_len, peak_bytes=int(peak),
        baseline_bytes=int(baseline), import_peak_bytes=int(import_peak), frozen_weights_bytes=int(weights),
        trainable_params=int(trainable), trainable_state_bytes=int(train_state),
        activations_bytes=int(activations), lm_head_bytes=int(lm_head), temporaries_bytes=int(transient),
        allocator_slack_bytes=int(slack), eval_pass_bytes=int(eval_peak),
        reference=Reference(needs_ref, ("cache" if s.reference_cached else "forward") if needs_ref else "none",
                            int(ref_forward), 8 if needs_ref else 0),
        compute=Compute(policy + reference, policy, reference, int(fwd_flops * (policy + reference))))


def fixes(a: Arch, s: Setting, budget: int, *, bf16: bool = True, **base: int) -> list[Fix]:
    """Each single change that lowers the peak, with its estimate; plus all of them together when no single one
    fits. Those that fit come first. ``bf16``: the device has native bf16 (else training refuses --dtype
    bfloat16, so it is no fix)."""
    out = []

    def add(name: str, flags: str, new: Setting) -> None:
        peak = estimate(a, new, **base).peak_bytes
        out.append(Fix(name, flags, peak, peak <= budget))

    def first_fit(options: list[Setting]) -> Setting:  # the first that fits the budget, else the last
        return next((o for o in options if estimate(a, o, **base).peak_bytes <= budget), options[-1])

    def batches(t: Setting, largest: int) -> list[Setting]:  # largest, largest/2, ..., 1; same pairs per step
        return [replace(t, batch_size=largest >> k, grad_accum=s.grad_accum * s.batch_size // (largest >> k))
                for k in range(largest.bit_length())]

    if not s.gradient_checkpointing:
        add("gradient checkpointing", "--gradient-checkpointing", replace(s, gradient_checkpointing=True))
    if s.batch_size > 1:
        new = first_fit(batches(s, s.batch_size // 2))
        flags = f"--batch-size {new.batch_size} --grad-accum {new.grad_accum}"
        add("smaller batch + accumulation", flags, new)
    if s.dtype == "float32" and bf16:
        add("bf16 weights", "--dtype bfloat16", replace(s, dtype="bfloat16"))
    elif s.dtype != "float32" and s.eval_fp32:
        add("held-out scoring in bf16", "--no-eval-fp32", replace(s, eval_fp32=False))
    if s.lora_rank > 1:
        new = first_fit([replace(s, lora_rank=s.lora_rank >> k) for k in range(1, s.lora_rank.bit_length())])
        add("lower rank", f"--lora-rank {new.lora_rank}", new)
    if len(out) > 1 and not any(f.fits for f in out):
        # Together: checkpointing and bf16, then the largest batch (same pairs per step) that fits with them.
        to_bf16 = s.dtype == "float32" and bf16
        both = replace(s, gradient_checkpointing=True, dtype="bfloat16" if to_bf16 else s.dtype)
        new = first_fit(batches(both, s.batch_size))
        b = new.batch_size
        parts = ["checkpointing"] + (["bf16"] if to_bf16 else []) + \
            ([f"batch {b} + accumulation"] if b != s.batch_size else [])
        flags = "--gradient-checkpointing" + (" --dtype bfloat16" if to_bf16 else "") + \
            (f" --batch-size {b} --grad-accum {new.grad_accum}" if b != s.batch_size else "")
        add("together: " + ", ".join(parts), flags, new)
    return sorted(out, key=lambda f: not f.fits)  # stable: those that fit first, each group in the order above


# ------------------------------------------------------------------------------------------------ the plan
def plan(cfg: Config, grid: dict[str, list[Any]] | None = None, *, device: str, budget: int | None = None,
         prompt_tokens: int | None = None, completion_tokens: int | None = None, reference_cached: bool = False,
         baseline: tuple[int, int] | None = None, native_bf16: bool | None = None) -> Plan:
    """Every objective x lora_rank cell of ``grid`` (default the matrix's; a key left out takes ``cfg``'s
    value), with ``cfg``'s other settings, trained on ``device`` ("cpu" or "cuda"): its peak term by term,
    whether it fits ``budget`` bytes (default on the CPU: this machine's RAM) and, if not, the fixes.

    ``prompt_tokens`` / ``completion_tokens``: the lengths to plan for (default: with ``cfg.data``, the longest
    training row after truncation (plan_arch.data_lengths); without, every pair at the caps,
    ``cfg.prompt_length()`` and the rest of ``max_length``); ``reference_cached``: the training pairs'
    reference log-probs are in the cache; ``baseline``: on the CPU, (resident, peak) bytes of interpreter +
    imports (default measured in a fresh one); ``native_bf16``: whether the device planned for has native bf16,
    which decides ``--dtype auto`` by training's own rule (default: probed for the CPU, and for "cuda" on this
    machine's GPU, or assumed (Ampere and later) when this machine has none).
    """
    from ..core.config import DEFAULT_GRID

    grid = DEFAULT_GRID if grid is None else grid
    extra = set(grid) - set(DEFAULT_GRID)
    if extra:
        raise InputError(f"plan's grid takes {' and '.join(DEFAULT_GRID)} only", field=min(extra))
    objs, ranks = grid.get("objective", [cfg.objective]), grid.get("lora_rank", [cfg.lora_rank])
    for key, values in (("objective", objs), ("lora_rank", ranks)):
        if not values:
            raise InputError("give one or more values", field=key)
    cells_cfg = [replace(cfg, objective=o, lora_rank=r) for o in objs for r in ranks]
    for c in cells_cfg:  # Config's own rules; the data, if any, is read below
        replace(c, data=c.data or "-").validate()
    if device not in ("cpu", "cuda"):
        raise InputError(f"{device!r} is not cpu or cuda", field="device")
    from ..modeling.precision import dtype_for  # torch: imported when planning, not with the command line

    hw = _hardware(device, native_bf16)
    dtype = dtype_for(cfg.dtype, hw)  # --dtype auto decided for the device planned for, as `train` decides it
    arch = read_arch(cfg.model, trust_remote_code=cfg.trust_remote_code)
    if budget is None and device != "cpu":
        raise InputError("give the GPU's memory, e.g. --gpu-memory 24GiB", field="gpu_memory")
    budget = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") if budget is None else budget
    source = "given" if prompt_tokens is not None and completion_tokens is not None else \
        "data" if cfg.data else "caps"
    if source == "data":
        longest_prompt, longest_completion, length = data_lengths(replace(cfg, objective=objs[0]))
        cfg = replace(cfg, max_length=length)
        prompt_tokens = longest_prompt if prompt_tokens is None else prompt_tokens
        completion_tokens = longest_completion if completion_tokens is None else completion_tokens
    prompt, completion = _lengths(cfg, prompt_tokens, completion_tokens)
    base = {"baseline": 0, "import_peak": 0}
    if device == "cpu":
        base["baseline"], base["import_peak"] = measure_baseline(cfg.model) if baseline is None else baseline
    cells = []
    for c in cells_cfg:
        s = Setting.of(replace(c, dtype=dtype), device=device, prompt_len=prompt, completion_len=completion,
                       reference_cached=reference_cached)
        cell = estimate(arch, s, **base)
        fits = cell.peak_bytes <= budget
        cells.append(replace(cell, fits=fits, fixes=[] if fits else fixes(arch, s, budget, bf16=hw.native_bf16,
                                                                          **base)))
    if any(c.lora_rank for c in cells) and not any(c.trainable_params for c in cells if c.lora_rank):
        raise InputError("no linear layer matches --lora-target-modules", field="lora_target_modules")
    figures = ModelFigures(cfg.model, arch.params, arch.layers, arch.hidden, arch.intermediate, arch.heads,
                           arch.kv_heads, arch.vocab)
    return Plan(figures, device, hw.native_bf16, cfg.dtype, budget, prompt, completion, source, cells)


def _hardware(device: str, native: bool | None) -> Hardware:
    """The device planned for, as training's dtype rule sees it."""
    from ..modeling.precision import Hardware

    if native is not None:
        return Hardware(device, native)
    if device == "cuda":
        import torch

        # a GPU here is the likeliest one to train on; without one, plan for a current GPU (bf16 since Ampere)
        return Hardware.probe(device) if torch.cuda.is_available() else Hardware(device, True)
    return Hardware.probe(device)  # the CPU plan is for this machine: its budget and baseline are too


def _lengths(cfg: Config, prompt: int | None, completion: int | None) -> tuple[int, int]:
    """Prompt and completion tokens to plan for: the prompt Config keeps, the rest of max_length."""
    if prompt is None or completion is None:
        if not isinstance(cfg.max_length, int):
            raise InputError("auto is resolved from the training data: give --data, or a number of tokens",
                             field="max_length")
        prompt = cfg.prompt_length() if prompt is None else prompt
        completion = cfg.max_length - prompt if completion is None else completion
    limit = cfg.max_length if isinstance(cfg.max_length, int) else prompt + completion
    if prompt < 0 or completion < 1 or prompt + completion > limit:
        raise InputError(f"prompt {prompt} + completion {completion} must fit max_length {limit}",
                         field="completion_length")
    return prompt, completion


__all__ = ["Arch", "Plan", "PlanCell", "Setting", "estimate", "fixes", "plan", "read_arch"]
