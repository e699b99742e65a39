"""The training loop: one function, top to bottom, for every objective.

Runs differ only in their loss: tokenization, data order (a function of seed and epoch alone), optimizer,
schedule and evaluation are shared. Reference log-probs are computed once up front (and cached on disk);
reference-free objectives skip them for the training set.

    preftune train --model M --data train.jsonl --eval-data heldout.jsonl --objective dpo --beta 0.1 \\
        --lora-rank 8 --lr 5e-6 --batch-size 8 --max-steps 100 --output runs/x

    >>> import preftune
    >>> summary = preftune.train(preftune.Config(model="M", data="train.jsonl", objective="simpo"))
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import resource
import shutil
import signal
import statistics
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from . import objectives, runtime, stats, trackers
from .behaviour import check_gen_eval, run_gen_eval
from .config import Config, dump_yaml
from .data import (
    DataStats,
    Pair,
    batch_order,
    heldout_pairs,
    load_examples,
    split_by_prompt,
    tokenize_examples,
    unpaired_view,
)
from .errors import InputError, TrainingDiverged
from .evaluate import evaluate, summarize
from .files import (
    FolderLock,
    append_jsonl,
    atomic_dir,
    atomic_write_json,
    atomic_write_text,
    check_writable_dir,
    read_jsonl,
    write_jsonl,
)
from .logprobs import batch_logps, compiled_graphs, make_batch, prefix_sharing_blocker
from .model import (
    Arithmetic,
    add_lora,
    arithmetic,
    checkpoint_layers,
    fingerprint,
    is_peft,
    load_model,
    load_tokenizer,
    resolve_dtype,
)
from .progress import Progress, phase
from .reference import reference_logps


@dataclass
class Prepared:
    """Tokenized train and held-out pairs; the ablation matrix builds this once and hands it to every cell."""

    tokenizer: object
    train: list[Pair]
    eval: list[Pair]
    stats: dict[str, DataStats]


def prepare_data(cfg: Config, tokenizer: object) -> Prepared:
    """Load, validate, split and tokenize. Raises InputError before anything is written."""
    examples = load_examples(cfg.data, cfg.data_split)
    if cfg.eval_data:
        heldout = load_examples(cfg.eval_data, cfg.eval_split)
    elif cfg.eval_fraction > 0:
        examples, heldout = split_by_prompt(examples, cfg.eval_fraction, cfg.split_seed)
    else:
        raise InputError("no held-out pairs: give --eval-data FILE or --eval-fraction > 0", field="eval_data")
    if cfg.max_train_pairs:
        examples = examples[:cfg.max_train_pairs]
    obj = objectives.get(cfg.objective)
    if examples[0].label is not None and obj.data == "paired":
        takes = ", ".join(o.name for o in objectives.REGISTRY.values() if o.data == "unpaired")
        raise InputError(f"unpaired rows (prompt/completion/label) need an objective that takes them ({takes}); "
                         f"'{obj.name}' trains on pairs", path=cfg.data, field="objective")
    heldout = heldout_pairs(heldout, cfg.eval_data or cfg.data)  # every objective is judged on pairs
    if obj.data == "unpaired":
        examples = unpaired_view(examples, cfg.batch_size, cfg.seed)
    kw = dict(max_length=cfg.max_length, max_prompt_length=cfg.prompt_length(),
              apply_chat_template=cfg.apply_chat_template)
    with phase("tokenize", total=len(examples) + len(heldout), quiet=cfg.quiet):
        train, train_stats = tokenize_examples(examples, tokenizer, source=cfg.data, **kw)
        held, held_stats = tokenize_examples(heldout, tokenizer, source=cfg.eval_data or cfg.data, **kw)
    if obj.advice and not cfg.quiet:
        counts = {"desirable": sum(p.label is True for p in train), "undesirable": sum(p.label is False for p in train)}
        for line in obj.advice(counts, cfg.objective_params()):
            print(f"preftune: warning: {line}", file=sys.stderr)
    return Prepared(tokenizer, train, held, {"train": train_stats, "eval": held_stats})


class Schedule:
    """Which training pairs each optimizer step sees: a function of (seed, epoch, lengths) alone, so every
    objective gets the same data order, a resumed run the same batches, and the reference pass knows in
    advance which pairs it must score."""

    def __init__(self, cfg: Config, pairs: list[Pair], world_size: int = 1) -> None:
        # the global batch: under torchrun each of the world_size ranks takes its slice (see rank_slice)
        self.cfg, self.step_pairs = cfg, cfg.batch_size * cfg.grad_accum * world_size
        self.steps_per_epoch = math.ceil(len(pairs) / self.step_pairs)
        self.total = cfg.max_steps or max(1, math.ceil(cfg.epochs * self.steps_per_epoch))
        self.lengths = [len(p.prompt_ids) + len(p.chosen_ids) + len(p.rejected_ids) for p in pairs]
        self._epoch: tuple[int, list[list[int]]] | None = None

    def batch(self, step: int) -> list[int]:
        epoch, i = divmod(step, self.steps_per_epoch)
        if self._epoch is None or self._epoch[0] != epoch:
            self._epoch = (epoch, batch_order(self.lengths, self.step_pairs, seed=self.cfg.seed, epoch=epoch,
                                              group_by_length=self.cfg.group_by_length))
        return self._epoch[1][i]

    def check_world(self, world_size: int) -> None:
        """InputError unless every step's pairs split evenly over ``world_size`` ranks.

        Equal shards keep the ranks in lockstep (the same number of micro-steps, so the same collectives) and
        the global batch the same as one process's. Only a short last batch of an epoch can break it: the
        message names the world sizes and batch sizes that work for this data.
        """
        if world_size <= 1:
            return
        bad = next((s for s in range(self.total) if len(self.batch(s)) % world_size), None)
        if bad is None:
            return
        n, per = len(self.lengths), self.cfg.batch_size * self.cfg.grad_accum

        def fits(w: int, b: int) -> bool:  # the epoch's remainder batch is the only one that can be uneven
            return n % (b * self.cfg.grad_accum * w) % w == 0

        worlds = [w for w in range(1, 17) if fits(w, self.cfg.batch_size)]
        sizes = [b for b in range(1, 65) if fits(world_size, b)][:8]
        raise InputError(f"world size {world_size} doesn't divide the global batch: step {bad + 1} has "
                         f"{len(self.batch(bad))} pairs ({n} train pairs in global batches of {per} x "
                         f"{world_size}); world sizes that work with --batch-size {self.cfg.batch_size}: "
                         f"{', '.join(map(str, worlds))}; batch sizes that work with {world_size} processes: "
                         f"{', '.join(map(str, sizes)) or 'none'} (or change --max-train-pairs)",
                         field="batch_size")

    @functools.cached_property
    def visited(self) -> list[int]:
        """Indices of every training pair some step will use, sorted."""
        return sorted({i for step in range(self.total) for i in self.batch(step)})


@dataclass
class CompileClock:
    """``--compile``'s one-off cost, apart from its steady state (``summary.json`` → ``timing.compile``).

    A step in which dynamo compiled a graph (its own counter rose) paid for compiling it, forward and
    backward; every other step is the steady state. ``compile_s`` is what the compiling steps took beyond
    the steady mean. Run: ``c = CompileClock(); c.add(9.1, 1); c.add(0.8, 0); c.summary()``.
    """

    graphs: int = 0
    compile_steps: int = 0
    compile_steps_s: float = 0.0
    steady_steps: int = 0
    steady_s: float = 0.0

    def add(self, dt: float, new_graphs: int) -> None:
        if new_graphs:
            self.graphs += new_graphs
            self.compile_steps += 1
            self.compile_steps_s += dt
        else:
            self.steady_steps += 1
            self.steady_s += dt

    def summary(self) -> dict:
        steady = self.steady_s / self.steady_steps if self.steady_steps else None
        return {"graphs": self.graphs, "compile_s": self.compile_steps_s - self.compile_steps * (steady or 0.0),
                "steady_step_s": steady}


class Request(NamedTuple):
    """One reference log-prob set: its pairs, batch size in pairs, in padded tokens (or None), arithmetic."""

    pairs: list[Pair]
    batch_size: int
    tokens: int | None
    arith: Arithmetic


def reference_requests(cfg: Config, data: Prepared, schedule: Schedule) -> dict[str, Request]:
    """The reference log-prob sets a run asks for, with their batch sizes and arithmetic.

    Held-out always (both yardsticks need it), in evaluation's own batch layout and arithmetic so that at step
    0 policy and reference are bit-identical and every reference-relative margin is an exact tie. Training
    pairs only when the objective needs them, and only those the schedule visits, in batches of
    ``cfg.reference_tokens`` padded tokens: a no-grad forward's matmuls run closer to the peak with more rows,
    and a token budget keeps short pairs from making small batches. The ablation matrix warms the cache from
    this same list, so its keys are the ones each cell's run looks up.
    """
    dtype = resolve_dtype(cfg)
    sets = {"eval": Request(data.eval, cfg.eval_batch_size, None, arithmetic(cfg, dtype, held_out=True))}
    if objectives.get(cfg.objective).needs_reference:
        sets["train"] = Request([data.train[i] for i in schedule.visited], max(32, cfg.eval_batch_size),
                                cfg.reference_tokens or None, arithmetic(cfg, dtype))
    return sets


def lr_at(step: int, cfg: Config, total: int) -> float:
    """transformers' schedules (linear/cosine/constant with linear warmup), so runs compare with TRL's."""
    warmup = math.ceil(cfg.warmup_ratio * total)
    if step < warmup:
        return cfg.lr * step / max(1, warmup)
    progress = (step - warmup) / max(1, total - warmup)
    if cfg.scheduler == "linear":
        return cfg.lr * max(0.0, 1.0 - progress)
    if cfg.scheduler == "cosine":
        return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * progress))
    return cfg.lr


def train(cfg: Config, *, prepared: Prepared | None = None, base_model: torch.nn.Module | None = None) -> dict:
    """Train one run and write its folder (see docs/formats.md). Returns the summary dict.

    ``prepared`` and ``base_model`` let the ablation matrix share tokenized data and the loaded base model
    across cells; a LoRA run leaves ``base_model`` as it found it.
    """
    cfg.validate()
    rt = runtime.init()  # under torchrun: this rank; else world size 1 and every collective below is a no-op
    main = rt.is_main    # rank 0 alone writes files, holds the folder lock, logs and prints
    dtype = resolve_dtype(cfg)  # bf16 that the hardware would emulate stops here, before any loading
    t_start = time.perf_counter()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out, cache_dir = Path(cfg.output), cfg.resolved_cache_dir()
    check_writable_dir(out, field="output")  # a file as --output: one line, exit 2, the file untouched
    check_writable_dir(cache_dir, field="cache_dir")
    report_to = trackers.check(cfg.report_to)  # a missing extra stops here, before the output folder is touched
    params = cfg.objective_params()
    # rank 0 looks at the folder and every rank acts on what it saw: all resume from the same checkpoint, and
    # none mistakes a folder that rank 0 has started writing for someone else's
    checkpoint, nonempty, finished = rt.broadcast((
        latest_checkpoint(out) if cfg.resume else None,
        out.exists() and any(p.name != ".lock" for p in out.iterdir()),
        cfg.resume and (out / "summary.json").exists() and _status(out) == "finished") if main else None)
    if nonempty and not cfg.resume:
        raise InputError("output folder is not empty: pass --resume to continue it, or choose another --output",
                         path=str(out))
    if finished:
        return json.loads((out / "summary.json").read_text())

    # 1. Everything that can reject the input happens before the output folder is touched.
    tok = prepared.tokenizer if prepared else load_tokenizer(cfg)
    data = prepared or prepare_data(cfg, tok)
    gen_judge = check_gen_eval(cfg)  # a bad judge spec fails here, before the output folder is touched
    schedule = Schedule(cfg, data.train, rt.world_size)
    schedule.check_world(rt.world_size)  # a world size that can't split the global batch: before any writing
    model = base_model if base_model is not None else load_model(cfg)
    model_fp = fingerprint(cfg.model, cache_dir)
    torch.manual_seed(cfg.seed)  # LoRA init and dropout: same seed, same adapter at step 0 for every objective
    model = add_lora(model, cfg)  # every rank seeds alike, so every rank starts from the same adapter
    fsdp = _maybe_fsdp(model, cfg, rt)
    # reference pass and evaluation split the pairs over ranks; under FSDP every forward is a collective that
    # needs all ranks in step, and shards of unequal batch counts would hang, so each rank scores them all
    score_rt = runtime.Runtime() if fsdp else rt
    if fsdp and gen_judge:  # generation on rank 0 alone would wait forever for the other ranks' shards
        raise InputError("the behavioural evaluation does not run under FSDP yet: set gen_eval_prompts 0",
                         field="gen_eval_prompts")
    eval_arith = arithmetic(cfg, dtype, held_out=True)
    if fsdp and eval_arith.upcast:  # FSDP2 owns the sharded weights' storage: no in-place upcast under it
        raise InputError("eval_fp32 does not run under FSDP yet: score afterwards with `preftune eval "
                         "--dtype float32`", field="eval_fp32")
    pad_id = tok.pad_token_id
    blocker = prefix_sharing_blocker(model) if cfg.share_prompt else None
    share = cfg.share_prompt and blocker is None  # else the plain layout: same numbers, prompt run twice
    fast = dict(share_prompt=share, chunk=cfg.logit_chunk)
    lm = model.get_base_model() if is_peft(model) else model
    model_info = {"attn_implementation": lm.config._attn_implementation, "dtype": dtype,
                  "eval_arithmetic": eval_arith.compute,
                  "share_prompt": share, "share_prompt_blocker": blocker}

    with contextlib.ExitStack() as stack:
        if base_model is not None and is_peft(model):
            stack.callback(model.unload)  # hand the shared base model back without adapters, even on error
        if cfg.gradient_checkpointing:  # each layer keeps only its input and is recomputed in backward
            stack.callback(checkpoint_layers(lm))  # a shared base model goes back as it came
        quiet = cfg.quiet or not main
        if main:
            stack.enter_context(FolderLock(out))
            atomic_write_text(out / "config.yaml", dump_yaml(cfg))
        tracker = trackers.Trackers(report_to if main else [], cfg, out, resume_step=_checkpoint_step(checkpoint))
        stack.callback(tracker.close)
        timing = {"reference_s": 0.0, "train_s": 0.0, "eval_s": 0.0, "train_pairs": 0, "train_tokens": 0,
                  "real_train_tokens": 0, "reference_tokens": 0, "eval_tokens": 0}

        # 2. Reference log-probs, once, before any update (which sets, and how: see reference_requests).
        total, steps_per_epoch = schedule.total, schedule.steps_per_epoch
        t = time.perf_counter()
        refs, cached = {}, {"train": True, "eval": True}
        for name, req in reference_requests(cfg, data, schedule).items():
            with phase(f"reference pass ({name})", total=len(req.pairs), quiet=quiet):
                refs[name], cached[name] = reference_logps(
                    model, req.pairs, fingerprint=model_fp, arith=req.arith, cache_dir=cache_dir, pad_id=pad_id,
                    batch_size=req.batch_size, tokens=req.tokens, rt=score_rt, **fast)
            if not cached[name]:
                timing["reference_tokens"] += sum(len(p.prompt_ids) + len(p.chosen_ids) + len(p.rejected_ids)
                                                  for p in req.pairs)
        ref_eval, ref_train = refs["eval"], None
        if "train" in refs:  # full-size, NaN where the schedule never goes
            ref_train = torch.full((len(data.train), 2), float("nan"))
            ref_train[schedule.visited] = refs["train"]
        timing["reference_s"] = time.perf_counter() - t
        timing["reference_cached"] = cached

        # 3. Optimizer; resume restores it with the RNG and the step.
        trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        opt = torch.optim.AdamW([p for _, p in trainable], lr=cfg.lr, weight_decay=cfg.weight_decay)
        metrics_path = out / "metrics.jsonl"
        eval_kw = dict(pad_id=pad_id, batch_size=cfg.eval_batch_size, rt=score_rt,
                       arith=eval_arith, **fast)

        def run_eval(step: int) -> tuple[dict, list[dict]]:
            t = time.perf_counter()
            with phase(f"eval @ step {step}", total=len(data.eval), quiet=quiet):
                m, rows, processed = evaluate(model, data.eval, ref_eval, cfg.objective, params, **eval_kw)
            timing["eval_s"] += time.perf_counter() - t
            timing["eval_tokens"] += processed
            m = {"step": step, "epoch": step / steps_per_epoch, **m}
            if main:
                append_jsonl(metrics_path, m)
                tracker.log(m)
            return m, rows

        start, last_eval = 0, None
        if checkpoint is not None:
            start = load_checkpoint(checkpoint, trainable, opt)
            if main:
                write_jsonl(metrics_path, [r for r in read_jsonl(metrics_path) if r["step"] <= start])
                last_eval = next((r for r in reversed(read_jsonl(metrics_path)) if "eval_loss" in r), None)
        else:
            if main:
                metrics_path.unlink(missing_ok=True)
            step0, _ = run_eval(0)
        progress = Progress(total, quiet=quiet, name=f"{cfg.objective} r={cfg.lora_rank}", start=start)
        stack.callback(progress.close)
        if checkpoint is not None:  # not the step-0 line: it would read as a restart from scratch
            progress.resumed(start, checkpoint, last_eval)
        else:
            progress.eval(step0)

        # 4. The loop.
        model.train()
        clock = CompileClock() if cfg.compile else None
        for step in range(start, total):
            t = time.perf_counter()
            graphs = compiled_graphs() if clock else 0
            idx = schedule.batch(step)     # the global batch, the same on every rank
            lo, hi = rt.shard(len(idx))    # this rank's contiguous slice of it (equal sizes: check_world)
            lr = lr_at(step, cfg, total)
            for g in opt.param_groups:
                g["lr"] = lr
            opt.zero_grad(set_to_none=True)
            parts, step_tokens = [], 0
            for j in range(lo, hi, cfg.batch_size):
                mb = idx[j:min(j + cfg.batch_size, hi)]
                sub = [data.train[k] for k in mb]
                batch = make_batch([p.prompt_ids for p in sub], [p.chosen_ids for p in sub],
                                   [p.rejected_ids for p in sub], pad_id, share)
                s, c = batch_logps(model, batch, chunk=cfg.logit_chunk, autocast_bf16=cfg.autocast_bf16,
                                   compile=cfg.compile)                                                  # (2k,)
                k = len(mb)
                ref = ref_train[mb].to(s.device) if ref_train is not None else None                      # (k, 2)
                labels = None if sub[0].label is None else torch.tensor([p.label for p in sub], device=s.device)
                lp = objectives.SeqLogps(chosen=s[:k], rejected=s[k:], chosen_tokens=c[:k], rejected_tokens=c[k:],
                                         ref_chosen=None if ref is None else ref[:, 0],
                                         ref_rejected=None if ref is None else ref[:, 1], label=labels)
                res = objectives.compute(cfg.objective, lp, params)
                # mean over the step's global pairs, however it is split into micro-batches and ranks: the
                # all-reduced SUM below then is exactly the one-process gradient (FSDP averages: undo it)
                (res.loss.sum() / len(idx) * (rt.world_size if fsdp else 1)).backward()
                parts.append((torch.stack([s[:k], s[k:]], 1).detach(), res))
                timing["train_tokens"] += batch.padded_tokens
                timing["real_train_tokens"] += batch.real_tokens
                step_tokens += batch.real_tokens
            if rt.distributed and not fsdp:
                _all_reduce_grads(rt, [p for _, p in trainable])
            clip = cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf")  # inf: measure, don't clip
            grad_norm = torch.nn.utils.clip_grad_norm_([p for _, p in trainable], clip)  # global: grads agree
            if hasattr(grad_norm, "full_tensor"):  # FSDP2: a DTensor over the shards
                grad_norm = grad_norm.full_tensor()
            if rt.distributed:  # metrics and the divergence check see the whole global batch, in its order
                parts, step_tokens = _gather_parts(rt, parts, step_tokens)
            logps = torch.cat([p[0] for p in parts])
            res = _cat_outputs([p[1] for p in parts])
            loss = res.loss.detach()
            if not (torch.isfinite(loss).all() and torch.isfinite(grad_norm)):
                return _diverged(out, cfg, step + 1, float(loss.mean()), float(grad_norm), timing, t_start,
                                 model_info, write=main)
            opt.step()
            dt = time.perf_counter() - t
            timing["train_s"] += dt
            timing["train_pairs"] += len(idx)
            if clock:
                clock.add(dt, compiled_graphs() - graphs)
                timing["compile"] = clock.summary()
            row = {"step": step + 1, "epoch": (step + 1) / steps_per_epoch,
                   **summarize(logps, res, loss), "grad_norm": float(grad_norm), "learning_rate": lr,
                   "pairs_per_second": len(idx) / dt, "tokens_per_second": step_tokens / dt}
            last = step + 1 == total
            if main and ((step + 1) % cfg.log_every == 0 or last):
                append_jsonl(metrics_path, row)
                tracker.log(row)
            progress.step(step + 1, row)
            if cfg.eval_every and (step + 1) % cfg.eval_every == 0 and not last:
                progress.eval(run_eval(step + 1)[0])
            if cfg.save_every and (step + 1) % cfg.save_every == 0 and not last and main and not fsdp:
                save_checkpoint(out, step + 1, trainable, opt)  # every rank holds the same state: one copy
                _crash_hook()

        # 5. Final eval, per-pair rows, weights, summary.
        final, rows = run_eval(total)
        progress.eval(final)
        if rt.distributed:  # throughput in summary.json counts every rank's tokens
            for k in ("train_tokens", "real_train_tokens"):
                timing[k] = sum(rt.gather(timing[k]))
        state = _full_state_dict(model) if fsdp else None  # a collective: every rank hands in its shard
        if not main:  # the other ranks end here with rank 0's summary, once it has written everything
            return rt.broadcast(None)
        write_jsonl(out / "eval_pairs.jsonl", rows)
        save_weights(out, model, tok, state)
        # behaviour: a judge failure raises before summary.json exists, so a matrix records this cell as failed
        gen_eval = run_gen_eval(cfg, model, tok, data.eval, out, gen_judge) if gen_judge else None
        summary = _summary(cfg, out, total, "finished", data, timing, t_start, model_info,
                           {"gen_eval": gen_eval} if gen_eval is not None else None)
        shutil.rmtree(out / "checkpoints", ignore_errors=True)  # finished: optimizer state is dead weight
        progress.done(summary, out)
        return rt.broadcast(summary)


def _cat_outputs(outs: list[objectives.Output], fn: Callable[[Tensor], Tensor] = lambda t: t) -> objectives.Output:
    """The micro-batches' outputs as one: each tensor concatenated, then passed through ``fn``."""
    def cat(tensors: Iterable[Tensor]) -> Tensor:
        return fn(torch.cat(list(tensors)))

    return objectives.Output(cat(o.loss for o in outs), cat(o.chosen_rewards for o in outs),
                             cat(o.rejected_rewards for o in outs),
                             {k: cat(o.extras[k] for o in outs) for k in outs[0].extras})


def _summary(cfg: Config, out: Path, steps: int, status: str, data: Prepared | None, timing: dict,
             t_start: float, model_info: dict | None = None, extra: dict | None = None) -> dict:
    rows = read_jsonl(out / "metrics.jsonl") if (out / "metrics.jsonl").exists() else []
    evals = [r for r in rows if "eval_loss" in r]
    tail = stats.tail([r for r in rows if "loss" in r])  # the same "last 10% of training" that review and decide read
    keys = dict.fromkeys(k for r in tail for k in r if k not in ("step", "epoch"))  # a KTO row may lack a label's
    train_last = {k: statistics.fmean(r[k] for r in tail if k in r) for k in keys}
    loop_s = timing["train_s"] + timing["reference_s"]  # reference work counts against throughput
    timing = {**timing, "total_s": time.perf_counter() - t_start,
              "pairs_per_second": timing["train_pairs"] / loop_s if loop_s else 0.0,
              "tokens_per_second": timing["train_tokens"] / timing["train_s"] if timing["train_s"] else 0.0,
              "processed_tokens": timing["train_tokens"] + timing["reference_tokens"],
              "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
              **({"peak_gpu_mb": torch.cuda.max_memory_allocated() / 2**20} if torch.cuda.is_available() else {})}
    summary = {
        "objective": cfg.objective, "lora_rank": cfg.lora_rank, "seed": cfg.seed, "steps": steps, "status": status,
        "params": cfg.objective_params(), "final_eval": evals[-1] if evals else None,
        "step0_eval": evals[0] if evals else None, "train_last": train_last,
        "data": {k: v.to_dict() for k, v in data.stats.items()} if data else None,
        "length_bias": stats.length_bias([len(p.chosen_ids) for p in data.eval],
                                         [len(p.rejected_ids) for p in data.eval]) if data else None,
        "timing": timing, "model": model_info, **(extra or {})}
    atomic_write_json(out / "summary.json", summary)
    return summary


def _diverged(out, cfg, step, loss, grad_norm, timing, t_start, model_info=None, write=True):
    if write:
        _summary(cfg, out, step, "diverged", None, timing, t_start, model_info)
    last = latest_checkpoint(out)
    keep = f"; the last good checkpoint is {last}" if last else ""
    raise TrainingDiverged(f"loss or gradient became non-finite at step {step} (loss={loss}, grad_norm={grad_norm})"
                           f"{keep}. Lower --lr or --beta, or try --objective orpo.")


def _crash_hook() -> None:
    """Tests of kill -9 + resume (torchrun, Ray retries) need a death right after a checkpoint, every time:
    PREFTUNE_TEST_KILL_AFTER_CHECKPOINT=MARKER makes the first process that gets here (the one that creates
    MARKER) SIGKILL itself. Unset, this does nothing."""
    marker = os.environ.get("PREFTUNE_TEST_KILL_AFTER_CHECKPOINT")
    if not marker:
        return
    try:
        os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return
    os.kill(os.getpid(), signal.SIGKILL)


def _all_reduce_grads(rt: runtime.Runtime, params: list[Tensor]) -> None:
    """Sum every trainable gradient over ranks, in one flat all-reduce.

    Not DDP: the prefix-shared forward calls the decoder and the LM head itself (logprobs.batch_logps), so a
    DDP wrapper's forward, which arms its gradient hooks, would never run. One SUM after the last micro-step
    is what DDP with ``no_sync`` on the others does, and exact: each rank's loss is already divided by the
    global batch, so the sum is the one-process gradient. For LoRA it is a few MB per step.
    """
    for p in params:  # a rank whose slice gave a parameter no gradient still takes part in the collective
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    flat = torch.cat([p.grad.reshape(-1) for p in params])                   # (sum of numels,)
    rt.all_reduce(flat)
    for p, g in zip(params, flat.split([p.numel() for p in params])):
        p.grad.copy_(g.view_as(p.grad))


def _gather_parts(rt: runtime.Runtime, parts: list, tokens: int) -> tuple[list, int]:
    """Every rank's (logps (k, 2), Output) micro-batch results in rank order (= the global batch's order, since
    each rank holds a contiguous slice), and the real tokens summed over ranks."""
    mine = [(lp.cpu(), _cat_outputs([o], lambda t: t.detach().cpu())) for lp, o in parts]
    everyone = rt.gather((mine, tokens))
    return [part for rank_parts, _ in everyone for part in rank_parts], sum(t for _, t in everyone)


def _maybe_fsdp(model: torch.nn.Module, cfg: Config, rt: runtime.Runtime) -> bool:
    """Full fine-tuning over several GPUs: shard weights, grads and Adam state with torch FSDP2.

    On CPUs full fine-tuning uses the manual all-reduce unless PREFTUNE_FSDP=1, which is how the suite (no
    GPU) checks this path with gloo; with nccl on GPUs it is untested. Each decoder layer, the decoder, the
    LM head and the root get their own ``fully_shard``: batch_logps calls the decoder and the head directly,
    and FSDP2 gathers a module's weights in that module's own forward hook, so each one that is called must
    be a unit. LoRA runs keep the manual all-reduce: their trainable weights are small and the frozen ones
    need no sharding.
    """
    wanted = torch.cuda.is_available() or os.environ.get("PREFTUNE_FSDP") == "1"
    if not (rt.distributed and cfg.lora_rank == 0 and wanted):
        return False
    from torch.distributed.fsdp import fully_shard

    decoder, head = model.get_decoder(), model.get_output_embeddings()
    for layer in getattr(decoder, "layers", []):
        fully_shard(layer)
    fully_shard(decoder)
    if head.weight is not decoder.get_input_embeddings().weight:  # a tied head is gathered with the decoder
        fully_shard(head)
    fully_shard(model)
    return True


def _full_state_dict(model: torch.nn.Module) -> dict[str, Tensor]:
    """FSDP: the full state dict gathered to rank 0's CPU, so ``model/`` is saved like a one-process run's."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def _status(out: Path) -> str | None:
    try:
        return json.loads((out / "summary.json").read_text()).get("status")
    except (OSError, ValueError):
        return None


# --- weights and checkpoints (safetensors only) ---------------------------------------------------

def save_weights(out: Path, model: torch.nn.Module, tok: object, state_dict: dict | None = None) -> None:
    """LoRA runs: ``adapter/`` for ``PeftModel.from_pretrained``; full fine-tuning: ``model/`` + tokenizer
    (``state_dict``: FSDP's gathered one)."""
    name = "adapter" if is_peft(model) else "model"
    with atomic_dir(out / name) as d:
        model.save_pretrained(d, state_dict=state_dict, safe_serialization=True)  # None: the model's own
        if name == "model":
            tok.save_pretrained(d)


def save_checkpoint(out: Path, step: int, trainable: list[tuple[str, Tensor]], opt: torch.optim.Optimizer) -> Path:
    folder = out / "checkpoints" / f"step-{step:07d}"
    with atomic_dir(folder) as d:
        save_file({n: p.detach().contiguous() for n, p in trainable}, str(d / "trainable.safetensors"))
        sd = opt.state_dict()
        tensors = {f"{i}.{k}": v.contiguous() for i, st in sd["state"].items() for k, v in st.items()}
        tensors["rng.torch"] = torch.get_rng_state()
        if torch.cuda.is_available():  # dropout on the GPU draws from the CUDA generator
            tensors["rng.cuda"] = torch.cuda.get_rng_state()
        save_file(tensors, str(d / "optimizer.safetensors"))
        atomic_write_json(d / "state.json", {"step": step, "param_groups": sd["param_groups"]})
    for old in (out / "checkpoints").glob("step-*"):  # keep only the newest complete one
        if old != folder:
            shutil.rmtree(old, ignore_errors=True)
    return folder


def _checkpoint_step(folder: Path | None) -> int | None:
    return None if folder is None else int(json.loads((folder / "state.json").read_text())["step"])


def latest_checkpoint(out: Path) -> Path | None:
    done = sorted(p for p in (out / "checkpoints").glob("step-*") if (p / "state.json").exists())
    return done[-1] if done else None


def load_checkpoint(folder: Path, trainable: list[tuple[str, Tensor]], opt: torch.optim.Optimizer) -> int:
    weights = load_file(str(folder / "trainable.safetensors"))
    with torch.no_grad():
        for n, p in trainable:
            p.copy_(weights[n])
    tensors = load_file(str(folder / "optimizer.safetensors"))
    state: dict[int, dict[str, Tensor]] = {}
    for key, v in tensors.items():
        if not key.startswith("rng."):
            i, k = key.split(".", 1)
            state.setdefault(int(i), {})[k] = v
    meta = json.loads((folder / "state.json").read_text())
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    torch.set_rng_state(tensors["rng.torch"])
    if "rng.cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng.cuda"])
    return int(meta["step"])
