"""The reference log-probs a run trains and is judged against.

Held-out pairs: against the base model (the adapter disabled), once, before any update. TR-DPO runs too, so that
the yardsticks of every cell of a matrix, and of ``preftune eval``, measure from the same model.

Training pairs, for an objective that needs a reference: those its steps visit, scored before the first step
that needs them. The run is one period, or with TR-DPO (``--ref-sync-steps N``) each N steps are one, scored
against the reference adapter as the last sync left it (modeling/ref_adapter.py). A period's cache key holds
that adapter's hash and every checkpoint holds the adapter, so a run resumed after kill -9 reads or recomputes
the very numbers an uninterrupted run trained against.

    ref_eval, train_ref = prepare_reference(run, checkpoint)      # training/loop.py
    row = train_step(run, step, opt, train_ref.at(step)); train_ref.after(step + 1)
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..core.errors import InputError
from ..core.progress import phase
from ..modeling.ref_adapter import ReferenceAdapter
from ..modeling.reference import reference_logps
from .checkpoints import checkpoint_step, read_reference
from .prepare import Request, reference_requests
from .state import Run


class TrainReference:
    """The training pairs' reference log-probs step by step, and TR-DPO's reference adapter if the run has one."""

    def __init__(self, r: Run, adapter: ReferenceAdapter | None) -> None:
        self.r, self.adapter = r, adapter
        self.span: tuple[int, int] | None = None  # the steps [lo, hi) that ``logps`` serves
        self.logps: Tensor | None = None

    def at(self, step: int) -> Tensor | None:
        """(N, 2) reference log-probs of the training set for ``step``, NaN where its period never goes; None
        for an objective without a reference. A new period is scored (or read from the cache) here. An objective
        that needs the shared-part sums (LD-DPO) gets them as columns 2-3: (N, 4)."""
        r = self.r
        span = r.schedule.period(step)
        if span != self.span:
            self.span = span
            reqs = reference_requests(r.cfg, r.data, r.schedule, step)
            if "train" in reqs:
                name = f"train, steps {span[0] + 1}-{span[1]}" if self.adapter else "train"
                sets = [score(r, "train", reqs[k], self.adapter, label=name + suffix)
                        for k, suffix in (("train", ""), ("train_shared", ", shared parts")) if k in reqs]
                self.logps = torch.full((len(r.data.train), 2 * len(sets)), float("nan"))
                self.logps[r.schedule.visited_in(*span)] = torch.cat(sets, 1)
        return self.logps

    def after(self, done: int) -> None:
        """TR-DPO: sync the reference to the policy once every ``ref_sync_steps`` steps are done (TRL's
        ``SyncRefModelCallback.on_step_end``), before a checkpoint of this step holds it; not after the last."""
        if self.adapter and done % self.r.cfg.ref_sync_steps == 0 and done < self.r.schedule.total:
            self.adapter.sync()

    def state(self) -> dict[str, Tensor] | None:
        """What a checkpoint keeps: the reference adapter's factors (None without TR-DPO or before a sync)."""
        return self.adapter.factors() if self.adapter else None

    def finish(self) -> dict[str, Any] | None:
        """summary.json's ``ref_sync`` (None without TR-DPO); drops the adapter so only the policy is saved."""
        if not self.adapter:
            return None
        out = {"steps": self.r.cfg.ref_sync_steps, "alpha": self.adapter.alpha, "syncs": self.adapter.syncs,
               "rank": self.adapter.rank}
        self.adapter.close()
        return out


def prepare_reference(r: Run, checkpoint: Path | None) -> tuple[Tensor, TrainReference]:
    """(held-out reference (N, 2), the training reference), the first period scored now: before any update,
    with a resumed TR-DPO run's reference adapter restored from its checkpoint first."""
    start = checkpoint_step(checkpoint) or 0
    adapter = ReferenceAdapter(r.model, r.cfg.ref_sync_alpha) if r.cfg.ref_sync_steps else None
    if adapter and checkpoint is not None:
        factors, syncs = read_reference(checkpoint), start // r.cfg.ref_sync_steps
        if bool(factors) != bool(syncs):
            raise InputError(f"this checkpoint's reference adapter doesn't fit ref_sync_steps {r.cfg.ref_sync_steps}: "
                             "resume with the run's own settings", path=str(checkpoint), field="ref_sync_steps")
        adapter.load(factors, syncs)
    r.timing["reference_cached"] = {"train": True, "eval": True}
    ref_eval = score(r, "eval", reference_requests(r.cfg, r.data, r.schedule)["eval"], None)
    train = TrainReference(r, adapter)
    train.at(start)
    return ref_eval, train


def score(r: Run, name: str, req: Request, adapter: ReferenceAdapter | None, *, label: str | None = None) -> Tensor:
    """One reference pass (or cache read), counted in the run's timing: against the base model, or against
    TR-DPO's reference adapter, whose hash then joins the cache key."""
    t = time.perf_counter()
    key = f"{r.fingerprint}+reference:{adapter.digest()}" if adapter and adapter.syncs else r.fingerprint
    with phase(f"reference pass ({label or name})", total=len(req.pairs), quiet=r.quiet):
        logps, cached = reference_logps(
            r.model, req.pairs, fingerprint=key, arith=req.arith, cache_dir=r.cfg.resolved_cache_dir(),
            pad_id=r.tok.pad_token_id, batch_size=req.batch_size, tokens=req.tokens, rt=r.score_rt,
            share_prompt=r.share, chunk=r.cfg.logit_chunk, under=adapter.active() if adapter else None)
    if not cached:
        r.timing["reference_tokens"] += sum(len(p.prompt_ids) + len(p.chosen_ids) + len(p.rejected_ids)
                                            for p in req.pairs)
    r.timing["reference_cached"][name] &= cached
    r.timing["reference_s"] += time.perf_counter() - t
    return logps
