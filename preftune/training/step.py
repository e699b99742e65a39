"""One optimizer step: the step's pairs through the policy in micro-batches, the objective's loss, one backward
per micro-batch, the gradient all-reduce across ranks, clipping, the update, and the metrics row (TRL names).

    row = train_step(run, step=0, opt=opt, ref_train=ref)     # {"step": 1, "loss": .., "rewards/margins": .., ...}
"""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import Tensor

from ..core import objectives
from ..core.errors import TrainingDiverged
from ..core.files import DamagedFile
from ..evaluation.heldout import summarize
from ..modeling.logprobs import batch_logps, compiled_graphs, make_batch
from .checkpoints import latest_checkpoint
from .distributed import all_reduce_grads, gather_parts
from .prepare import lr_at
from .state import Run
from .summary import write_summary


def train_step(r: Run, step: int, opt: torch.optim.Optimizer, ref_train: Tensor | None) -> dict[str, Any]:
    """Take optimizer step ``step`` (0-based) and return its metrics row; TrainingDiverged on a NaN/inf loss
    or gradient, after writing a ``diverged`` summary."""
    cfg, rt = r.cfg, r.rt
    t = time.perf_counter()
    graphs = compiled_graphs() if r.clock else 0
    idx = r.schedule.batch(step)     # the global batch, the same on every rank
    lo, hi = rt.shard(len(idx))      # this rank's contiguous slice of it (equal sizes: Schedule.check_world)
    lr = lr_at(step, cfg, r.schedule.total)
    for g in opt.param_groups:
        g["lr"] = lr
    opt.zero_grad(set_to_none=True)
    parts, step_tokens = [], 0
    for j in range(lo, hi, cfg.batch_size):
        mb = idx[j:min(j + cfg.batch_size, hi)]
        lp, logps, tokens = _forward(r, mb, ref_train)
        res = objectives.compute(cfg.objective, lp, r.params)  # every term of a mixture reads this one forward
        # mean over the step's global pairs, however it is split into micro-batches and ranks: the all-reduced
        # SUM below then is exactly the one-process gradient (FSDP averages: undo it)
        (res.loss.sum() / len(idx) * (rt.world_size if r.fsdp else 1)).backward()
        parts.append((logps, res))
        step_tokens += tokens
    trainable = [p for _, p in r.trainable]
    if rt.distributed and not r.fsdp:
        all_reduce_grads(rt, trainable)
    clip = cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf")  # inf: measure, don't clip
    grad_norm = torch.nn.utils.clip_grad_norm_(trainable, clip)  # global: every rank's gradients agree
    if hasattr(grad_norm, "full_tensor"):  # FSDP2: a DTensor over the shards
        grad_norm = grad_norm.full_tensor()
    if rt.distributed:  # metrics and the divergence check see the whole global batch, in its order
        parts, step_tokens = gather_parts(rt, parts, step_tokens)
    logps = torch.cat([p[0] for p in parts])                                                          # (B, 2)
    res = objectives.Output.concat([p[1] for p in parts])
    loss = res.loss.detach()
    if not (torch.isfinite(loss).all() and torch.isfinite(grad_norm)):
        _diverged(r, step + 1, float(loss.mean()), float(grad_norm))
    opt.step()
    dt = time.perf_counter() - t
    r.timing["train_s"] += dt
    r.timing["train_pairs"] += len(idx)
    if r.clock:
        r.clock.add(dt, compiled_graphs() - graphs)
        r.timing["compile"] = r.clock.summary()
    return {"step": step + 1, "epoch": (step + 1) / r.schedule.steps_per_epoch, **summarize(logps, res, loss),
            "grad_norm": float(grad_norm), "learning_rate": lr, "pairs_per_second": len(idx) / dt,
            "tokens_per_second": step_tokens / dt}


def _forward(r: Run, mb: list[int], ref_train: Tensor | None) -> tuple[objectives.SeqLogps, Tensor, int]:
    """The policy's log-probs of one micro-batch (with its reference, labels and whatever else the objective
    needs, all from this one forward), its (k, 2) log-probs for the metrics, and the real tokens it ran."""
    sub = [r.data.train[k] for k in mb]
    batch = make_batch([p.prompt_ids for p in sub], [p.chosen_ids for p in sub], [p.rejected_ids for p in sub],
                       r.tok.pad_token_id, r.share)
    needs = objectives.needs(r.cfg.objective, r.params)
    s, c, *extra = batch_logps(r.model, batch, chunk=r.cfg.logit_chunk, autocast_bf16=r.cfg.autocast_bf16,
                               compile=r.cfg.compile, needs=needs)                              # (2k,) each
    k = len(mb)

    def pairs(t: Tensor) -> Tensor:                                                            # (2k,) -> (k, 2)
        return torch.stack([t[:k], t[k:]], 1)

    more = {name: pairs(v) for name, v in (extra or [{}])[0].items()}
    ref = ref_train[mb].to(s.device) if ref_train is not None else None                 # (k, 2), or (k, 4) for LD
    if ref is not None and "shared" in needs:  # the reference's shared-part sums: columns 2-3 (training/reference.py)
        ref, more["ref_shared"] = ref[:, :2], ref[:, 2:]
    labels = None if sub[0].label is None else torch.tensor([p.label for p in sub], device=s.device)
    lp = objectives.SeqLogps.of(pairs(s), pairs(c), ref, labels, more)
    r.timing["train_tokens"] += batch.padded_tokens
    r.timing["real_train_tokens"] += batch.real_tokens
    return lp, pairs(s).detach(), batch.real_tokens


def _diverged(r: Run, step: int, loss: float, grad_norm: float) -> None:
    if r.rt.is_main:
        write_summary(r.cfg, r.dir, steps=step, status="diverged", data=None, timing=r.timing, t_start=r.t_start,
                      model_info=r.model_info)
    try:
        last = latest_checkpoint(r.dir)
    except DamagedFile:
        last = None
    keep = f"; the last good checkpoint is {last}" if last else ""
    raise TrainingDiverged(f"loss or gradient became non-finite at step {step} (loss={loss}, grad_norm={grad_norm})"
                           f"{keep}. Lower --lr or --beta, or try --objective orpo.")
