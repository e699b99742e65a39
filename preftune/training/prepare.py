"""What a run settles before its first step: the tokenized pairs, which pairs each step sees, the learning rate
at each step, and which reference log-prob sets it needs. All of it is a function of the config and the data,
so every objective, every rank and a resumed run agree on it.

    data = prepare_data(cfg, tokenizer)          # InputError before anything is written
    schedule = Schedule(cfg, data.train)
    schedule.batch(0)                            # indices of the first step's pairs
"""

from __future__ import annotations

import functools
import math
import sys
from dataclasses import dataclass
from typing import Any, NamedTuple

from ..core import objectives
from ..core.config import Config
from ..core.errors import InputError
from ..core.progress import phase
from ..data.rows import load_examples
from ..data.split import batch_order, heldout_pairs, split_by_prompt, unpaired_view
from ..data.tokenize import DataStats, Pair, tokenize_examples
from ..modeling.precision import Arithmetic, arithmetic, resolve_dtype


@dataclass
class Prepared:
    """Tokenized train and held-out pairs; the ablation matrix builds this once and hands it to every cell."""

    tokenizer: Any
    train: list[Pair]
    eval: list[Pair]
    stats: dict[str, DataStats]


def prepare_data(cfg: Config, tokenizer: Any) -> Prepared:
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
        return self.visited_in(0, self.total)

    def visited_in(self, lo: int, hi: int) -> list[int]:
        """Indices of every training pair steps ``lo`` .. ``hi - 1`` use, sorted."""
        return sorted({i for step in range(lo, hi) for i in self.batch(step)})

    def period(self, step: int) -> tuple[int, int]:
        """The steps [lo, hi) that train against the same reference as ``step``: the whole run, or with TR-DPO
        (``ref_sync_steps``) its sync period."""
        lo = step // self.cfg.ref_sync_steps * self.cfg.ref_sync_steps if self.cfg.ref_sync_steps else 0
        return lo, min(lo + (self.cfg.ref_sync_steps or self.total), self.total)


class Request(NamedTuple):
    """One reference log-prob set: its pairs, batch size in pairs, in padded tokens (or None), arithmetic."""

    pairs: list[Pair]
    batch_size: int
    tokens: int | None
    arith: Arithmetic


def reference_requests(cfg: Config, data: Prepared, schedule: Schedule, step: int = 0) -> dict[str, Request]:
    """The reference log-prob sets a run asks for (training pairs: those of ``step``'s period, see
    :meth:`Schedule.period`), with their batch sizes and arithmetic.

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
        sets["train"] = Request([data.train[i] for i in schedule.visited_in(*schedule.period(step))],
                                max(32, cfg.eval_batch_size), cfg.reference_tokens or None, arithmetic(cfg, dtype))
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


