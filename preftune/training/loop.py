"""The training loop: one function, top to bottom, for every objective.

Runs differ only in their loss: tokenization, data order (a function of seed and epoch alone), optimizer,
schedule and evaluation are shared. Reference log-probs are computed once up front (and cached on disk), or
with TR-DPO once per sync period (training/reference.py); reference-free objectives skip them for the training
set.

    preftune train --model M --data train.jsonl --eval-data heldout.jsonl --objective dpo --beta 0.1 \\
        --lora-rank 8 --lr 5e-6 --batch-size 8 --max-steps 100 --output runs/x

    >>> import preftune
    >>> summary = preftune.train(preftune.Config(model="M", data="train.jsonl", objective="simpo"))
"""

from __future__ import annotations

import contextlib
import os
import shutil
import time
from pathlib import Path

import torch
from torch import Tensor

from ..core import runtime, trackers
from ..core.config import Config, dump_yaml
from ..core.cpus import allowed_cpus
from ..core.errors import InputError
from ..core.files import (
    FolderLock,
    append_jsonl,
    atomic_write_text,
    check_writable_dir,
    read_jsonl,
    write_jsonl,
)
from ..core.layout import RunDir, RunSummary
from ..core.progress import Progress, phase
from ..core.runtime import Runtime
from ..evaluation.behaviour import check_gen_eval, run_gen_eval
from ..evaluation.heldout import evaluate
from ..modeling.logprobs import prefix_sharing_blocker
from ..modeling.model import add_lora, checkpoint_layers, fingerprint, is_peft, load_model, load_tokenizer
from ..modeling.precision import arithmetic, resolve_dtype
from .checkpoints import checkpoint_step, latest_checkpoint, load_checkpoint, save_checkpoint, save_weights
from .distributed import full_state_dict, maybe_fsdp
from .prepare import Prepared, Schedule, announce, prepare_data
from .reference import TrainReference, prepare_reference
from .state import Evaluate, Run
from .step import train_step
from .summary import CompileClock, write_summary


def train(cfg: Config, *, prepared: Prepared | None = None, base_model: torch.nn.Module | None = None) -> RunSummary:
    """Train one run and write its folder (see docs/formats.md). Returns its summary.

    ``prepared`` and ``base_model`` let the ablation matrix share tokenized data and the loaded base model
    across cells; a LoRA run leaves ``base_model`` as it found it.
    """
    cfg.validate()
    rt = runtime.init()  # under torchrun: this rank; else world size 1 and every collective below is a no-op
    t_start = time.perf_counter()
    checkpoint, finished = _open(cfg, rt)   # 0. the folder: new, resumable, or already finished
    if finished is not None:
        return finished
    r = _load(cfg, rt, prepared, base_model, t_start)  # 1. everything that can reject the input, before writing
    with contextlib.ExitStack() as stack:
        _hold(r, stack, checkpoint, shared=base_model is not None)  # lock, config.yaml, trackers; shared model back
        ref_eval, train_ref = prepare_reference(r, checkpoint)  # 2. reference log-probs, before any update
        r.trainable = [(n, p) for n, p in r.model.named_parameters() if p.requires_grad]
        opt = torch.optim.AdamW([p for _, p in r.trainable], lr=cfg.lr, weight_decay=cfg.weight_decay)

        def evaluate_at(step: int) -> tuple[dict, list[dict]]:
            return _evaluate(r, ref_eval, step)

        start, progress = _start(r, stack, checkpoint, opt, evaluate_at)  # 3. resume, or score step 0
        r.model.train()
        r.clock = CompileClock() if cfg.compile else None
        total = r.schedule.total
        for step in range(start, total):                                  # 4. the loop
            row = train_step(r, step, opt, train_ref.at(step))
            done = step + 1
            train_ref.after(done)  # TR-DPO: the reference adapter syncs to the policy, before a checkpoint holds it
            if r.rt.is_main and (done % cfg.log_every == 0 or done == total):
                _log(r, row)
            progress.step(done, row)
            if cfg.eval_every and done % cfg.eval_every == 0 and done < total:
                progress.eval(evaluate_at(done)[0])
            if cfg.save_every and done % cfg.save_every == 0 and done < total and r.rt.is_main and not r.fsdp:
                save_checkpoint(r.dir, done, r.trainable, opt, train_ref.state())  # every rank alike: one copy
                runtime.crash_hook(f"checkpoint {r.dir.path}")
        return _finish(r, evaluate_at, progress, train_ref)                # 5. final eval, weights, summary


def _open(cfg: Config, rt: Runtime) -> tuple[Path | None, RunSummary | None]:
    """(checkpoint to resume from, the summary of a run already finished). Paths and trackers are checked
    here, before anything is loaded: a bad one is one line and nothing is written."""
    run = RunDir(Path(cfg.output))
    check_writable_dir(run.path, field="output")  # a file as --output: one line, exit 2, the file untouched
    check_writable_dir(cfg.resolved_cache_dir(), field="cache_dir")
    trackers.check(cfg.report_to)  # a missing extra stops here, before the output folder is touched
    # rank 0 looks at the folder and every rank acts on what it saw: all resume from the same checkpoint, and
    # none mistakes a folder that rank 0 has started writing for someone else's
    checkpoint, nonempty, finished = rt.broadcast((
        latest_checkpoint(run) if cfg.resume else None,
        run.path.exists() and any(p.name != ".lock" for p in run.path.iterdir()),
        cfg.resume and run.finished()) if rt.is_main else None)
    if nonempty and not cfg.resume:
        raise InputError("output folder is not empty: pass --resume to continue it, or choose another --output",
                         path=str(run.path))
    return checkpoint, run.read_summary() if finished else None


def _load(cfg: Config, rt: Runtime, prepared: Prepared | None, base_model: torch.nn.Module | None,
          t_start: float) -> Run:
    """Data, schedule, judge, model and its fresh LoRA: every check that can reject the input."""
    dtype = resolve_dtype(cfg)  # bf16 that the hardware would emulate stops here, before any loading
    if cfg.threads or "OMP_NUM_THREADS" not in os.environ:  # torch's default counts the machine's cores, not the
        torch.set_num_threads(cfg.threads or allowed_cpus())  # CPUs this process may use (taskset, a CPU quota)
    tok = prepared.tokenizer if prepared else load_tokenizer(cfg)
    data = prepared or prepare_data(cfg, tok)
    judge = check_gen_eval(cfg)  # a bad judge spec fails here, before the output folder is touched
    schedule = Schedule(cfg, data.train, rt.world_size)
    schedule.check_world(rt.world_size)  # a world size that can't split the global batch: before any writing
    model = base_model if base_model is not None else load_model(cfg)
    torch.manual_seed(cfg.seed)  # LoRA init and dropout: same seed, same adapter at step 0 for every objective
    model = add_lora(model, cfg)  # every rank seeds alike, so every rank starts from the same adapter
    fsdp = maybe_fsdp(model, cfg, rt)
    if fsdp and judge:  # generation on rank 0 alone would wait forever for the other ranks' shards
        raise InputError("the behavioural evaluation does not run under FSDP yet: set gen_eval_prompts 0",
                         field="gen_eval_prompts")
    eval_arith = arithmetic(cfg, dtype, held_out=True)
    if fsdp and eval_arith.upcast:  # FSDP2 owns the sharded weights' storage: no in-place upcast under it
        raise InputError("eval_fp32 does not run under FSDP yet: score afterwards with `preftune eval "
                         "--dtype float32`", field="eval_fp32")
    blocker = prefix_sharing_blocker(model) if cfg.share_prompt else None
    share = cfg.share_prompt and blocker is None  # else the plain layout: same numbers, prompt run twice
    lm = model.get_base_model() if is_peft(model) else model
    fp = fingerprint(cfg.model, cfg.resolved_cache_dir())
    # the model card says where the base came from: a local folder is no hub id (export.py), whatever its name
    info = {"attn_implementation": lm.config._attn_implementation, "dtype": dtype,
            "eval_arithmetic": eval_arith.compute, "share_prompt": share, "share_prompt_blocker": blocker,
            "base_local": os.path.isdir(cfg.model), "base_fingerprint": fp}
    # reference pass and evaluation split the pairs over ranks; under FSDP every forward is a collective that
    # needs all ranks in step, and shards of unequal batch counts would hang, so each rank scores them all
    return Run(cfg, rt, RunDir(Path(cfg.output)), data, schedule, model, tok, judge, fsdp,
               runtime.Runtime() if fsdp else rt, eval_arith, share, fp, info, cfg.objective_params(), t_start)


def _hold(r: Run, stack: contextlib.ExitStack, checkpoint: Path | None, *, shared: bool) -> None:
    """What the run holds until it ends, released even on error: the folder lock, the trackers, and a shared
    base model handed back without its adapter and checkpointing."""
    lm = r.model.get_base_model() if is_peft(r.model) else r.model
    if shared and is_peft(r.model):
        stack.callback(r.model.unload)
    if r.cfg.gradient_checkpointing:  # each layer keeps only its input and is recomputed in backward
        stack.callback(checkpoint_layers(lm))
    if r.rt.is_main:
        stack.enter_context(FolderLock(r.dir.path))
        atomic_write_text(r.dir.config, dump_yaml(r.cfg))
        if checkpoint is None:  # the data's lines and audit.json, once every check passed (a resumed run has them)
            announce(r.data, r.dir.path, quiet=r.quiet)
    r.tracker = trackers.Trackers(trackers.check(r.cfg.report_to) if r.rt.is_main else [], r.cfg, r.dir.path,
                                  resume_step=checkpoint_step(checkpoint))
    stack.callback(r.tracker.close)


def _evaluate(r: Run, ref_eval: Tensor, step: int) -> tuple[dict, list[dict]]:
    """Held-out metrics at ``step`` (logged) and the per-pair rows."""
    t = time.perf_counter()
    with phase(f"eval @ step {step}", total=len(r.data.eval), quiet=r.quiet):
        m, rows, processed = evaluate(r.model, r.data.eval, ref_eval, r.cfg.objective, r.params,
                                      pad_id=r.tok.pad_token_id, batch_size=r.cfg.eval_batch_size, rt=r.score_rt,
                                      arith=r.eval_arith, share_prompt=r.share, chunk=r.cfg.logit_chunk)
    r.timing["eval_s"] += time.perf_counter() - t
    r.timing["eval_tokens"] += processed
    m = {"step": step, "epoch": step / r.schedule.steps_per_epoch, **m}
    if r.rt.is_main:
        _log(r, m)
    return m, rows


def _log(r: Run, row: dict) -> None:
    append_jsonl(r.dir.metrics, row)
    assert r.tracker is not None
    r.tracker.log(row)


def _start(r: Run, stack: contextlib.ExitStack, checkpoint: Path | None, opt: torch.optim.Optimizer,
           evaluate_at: Evaluate) -> tuple[int, Progress]:
    """The first step to take and the progress display: a checkpoint restored (optimizer, RNG, metrics cut to
    its step), or a fresh metrics.jsonl with the step-0 evaluation."""
    start, last_eval, step0 = 0, None, None
    if checkpoint is not None:
        start = load_checkpoint(checkpoint, r.trainable, opt)
        if r.rt.is_main:
            write_jsonl(r.dir.metrics, [row for row in read_jsonl(r.dir.metrics) if row["step"] <= start])
            last_eval = next((row for row in reversed(read_jsonl(r.dir.metrics)) if "eval_loss" in row), None)
    else:
        if r.rt.is_main:
            r.dir.metrics.unlink(missing_ok=True)
        step0, _ = evaluate_at(0)
    progress = Progress(r.schedule.total, quiet=r.quiet, name=f"{r.cfg.objective} r={r.cfg.lora_rank}", start=start)
    stack.callback(progress.close)
    if checkpoint is not None:  # not the step-0 line: it would read as a restart from scratch
        progress.resumed(start, checkpoint, last_eval)
    else:
        progress.eval(step0)
    return start, progress


def _finish(r: Run, evaluate_at: Evaluate, progress: Progress, train_ref: TrainReference) -> RunSummary:
    """Final eval, per-pair rows, weights, behaviour, summary; every rank returns rank 0's summary."""
    total = r.schedule.total
    ref_sync = train_ref.finish()  # TR-DPO's adapter dropped: only the policy is saved
    final, rows = evaluate_at(total)
    progress.eval(final)
    if r.rt.distributed:  # throughput in summary.json counts every rank's tokens
        for k in ("train_tokens", "real_train_tokens"):
            r.timing[k] = sum(r.rt.gather(r.timing[k]))
    state = full_state_dict(r.model) if r.fsdp else None  # a collective: every rank hands in its shard
    if not r.rt.is_main:  # the other ranks end here with rank 0's summary, once it has written everything
        return r.rt.broadcast(None)
    write_jsonl(r.dir.eval_pairs, rows)
    save_weights(r.dir, r.model, r.tok, state)
    # behaviour: a judge failure raises before summary.json exists, so a matrix records this cell as failed
    gen_eval = run_gen_eval(r.cfg, r.model, r.tok, r.data.eval, r.dir.path, r.judge) if r.judge else None
    summary = write_summary(r.cfg, r.dir, steps=total, status="finished", data=r.data, timing=r.timing,
                            t_start=r.t_start, model_info=r.model_info, gen_eval=gen_eval, ref_sync=ref_sync)
    shutil.rmtree(r.dir.checkpoints, ignore_errors=True)  # finished: optimizer state is dead weight
    progress.done(summary.timing, r.dir.path)
    return r.rt.broadcast(summary)
