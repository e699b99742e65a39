"""What a run settles before its first step: the tokenized pairs, which pairs each step sees, the learning rate
at each step, and which reference log-prob sets it needs. All of it is a function of the config and the data,
so every objective, every rank and a resumed run agree on it.

    data = prepare_data(cfg, tokenizer)          # InputError before anything is written
    schedule = Schedule(cfg, data.train)
    schedule.batch(0)                            # indices of the first step's pairs
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from ..core import objectives
from ..core.config import Config
from ..core.errors import InputError
from ..core.layout import Audit, write_audit
from ..core.progress import phase
from ..data.audit import audit_examples, headline, truncation
from ..data.rows import Example, Loaded, RowPolicy, read_examples
from ..data.split import batch_order, heldout_pairs, split_by_prompt, unpaired_view
from ..data.tokenize import DataStats, Encoded, Pair, encode_examples, truncate
from ..modeling.logprobs import cut_to_shared, with_shared_cuts
from ..modeling.precision import Arithmetic, arithmetic, resolve_dtype


@dataclass
class Prepared:
    """Tokenized train and held-out pairs; the ablation matrix builds this once and hands it to every cell."""

    tokenizer: Any
    train: list[Pair]
    eval: list[Pair]
    stats: dict[str, DataStats]
    notes: list[str] = field(default_factory=list)  # console lines, said once every check has passed (announce)
    audit: Audit | None = None                      # the preflight's audit (cfg.audit), written by announce


def prepare_data(cfg: Config, tokenizer: Any) -> Prepared:
    """Load, validate, split and tokenize, and audit the data. Raises InputError before anything is written."""
    policy = RowPolicy.of(cfg)
    loaded = read_examples(cfg.data, cfg.data_split, policy)
    held_loaded = Loaded([], [])
    examples = loaded.examples
    if cfg.eval_data:
        held_loaded = read_examples(cfg.eval_data, cfg.eval_split, policy)
        heldout = held_loaded.examples
    elif cfg.eval_fraction > 0:
        examples, heldout = split_by_prompt(examples, cfg.eval_fraction, cfg.split_seed)
        if not heldout:  # one distinct prompt: the split keeps it for training
            raise InputError("one distinct prompt: holding it out for evaluation (--eval-fraction) would leave no "
                             "training pairs; give held-out pairs with --eval-data FILE", path=cfg.data,
                             field="eval_data")
    else:
        raise InputError("no held-out pairs: give --eval-data FILE or --eval-fraction > 0", field="eval_data")
    if cfg.max_train_pairs:
        examples = examples[:cfg.max_train_pairs]
    obj = objectives.get(cfg.objective)
    if examples[0].label is not None and obj.data == "paired":
        takes = ", ".join(o.name for o in objectives.REGISTRY.values() if o.data == "unpaired")
        raise InputError(f"unpaired rows (prompt/completion/label) need an objective that takes them ({takes}); "
                         f"'{obj.name}' trains on pairs", path=cfg.data, field="objective")
    audited = (examples, heldout)
    heldout = heldout_pairs(heldout, cfg.eval_data or cfg.data)  # every objective is judged on pairs
    if obj.data == "unpaired":
        examples = unpaired_view(examples, cfg.batch_size, cfg.seed)
    with phase("tokenize", total=len(examples) + len(heldout), quiet=cfg.quiet):
        kw = dict(apply_chat_template=cfg.apply_chat_template)
        encoded = encode_examples(examples, tokenizer, source=cfg.data, **kw)
        held_encoded = encode_examples(heldout, tokenizer, source=cfg.eval_data or cfg.data, **kw)
    length = max_length(cfg, tokenizer, encoded)
    cut = dict(max_length=length, max_prompt_length=cfg.prompt_length(length))
    train, train_stats = truncate(examples, encoded, source=cfg.data, **cut)
    held, held_stats = truncate(heldout, held_encoded, source=cfg.eval_data or cfg.data, **cut)
    stats = {"train": train_stats, "eval": held_stats}
    for s, source in ((train_stats, loaded), (held_stats, held_loaded)):
        s.skipped, s.max_length = source.to_dict(), None if isinstance(cfg.max_length, int) else length
    if obj.advice and not cfg.quiet:
        counts = {"desirable": sum(p.label is True for p in train), "undesirable": sum(p.label is False for p in train)}
        for line in obj.advice(counts, cfg.objective_params()):
            print(f"preftune: warning: {line}", file=sys.stderr)
    notes = [n for n in (loaded.note(cfg.data), held_loaded.note(cfg.eval_data or "")) if n]
    notes += [s.line(name, length, cfg.max_prompt_length) for name, s in stats.items()]
    audit = _preflight(cfg, loaded, held_loaded, audited, stats, length) if cfg.audit else None
    return Prepared(tokenizer, train, held, stats, notes, audit)


def max_length(cfg: Config, tokenizer: Any, encoded: list[Encoded]) -> int:
    """``--max-length``, or for ``auto`` the smallest that keeps 95% of the training pairs whole, capped by the
    model's context (the tokenizer's ``model_max_length`` and the model's ``max_position_embeddings``)."""
    if isinstance(cfg.max_length, int):
        return cfg.max_length
    need = DataStats(lengths=[(len(p), len(c), len(r)) for p, c, r in encoded]).whole_at(0.95, cfg.max_prompt_length)
    limits = [n for n in (getattr(tokenizer, "model_max_length", None), _positions(cfg)) if n and n < 10**7]
    length = min([need, *limits])
    if cfg.max_prompt_length is not None and cfg.max_prompt_length >= length:
        raise InputError(f"{cfg.max_prompt_length} leaves no room for completions in --max-length auto ({length}, "
                         f"the model's context {min(limits)})", field="max_prompt_length")
    return length


def _positions(cfg: Config) -> int | None:
    """The model's position limit from its config.json, None when it has none (or can't be read yet: loading the
    model says why)."""
    try:
        from transformers import AutoConfig

        return getattr(AutoConfig.from_pretrained(cfg.model, trust_remote_code=cfg.trust_remote_code),
                       "max_position_embeddings", None)
    except Exception:  # a bad --model is reported by load_model, with its own one line
        return None


def _preflight(cfg: Config, loaded: Loaded, held: Loaded, audited: tuple[list[Example], list[Example]],
               stats: dict[str, DataStats], length: int) -> Audit:
    """The model-free audit of the rows this run trains and is judged on, plus what truncation does to them."""
    sources = {"data": cfg.data, "eval_data": cfg.eval_data} if cfg.eval_data else \
        {"data": cfg.data, "eval_fraction": cfg.eval_fraction, "split_seed": cfg.split_seed}
    audit = audit_examples([*loaded.skipped, *audited[0]], [*held.skipped, *audited[1]], sources)
    audit.findings.append({**truncation(stats, length, cfg.max_prompt_length), "examples": []})
    return audit


def announce(data: Prepared, folder: Path | None, *, quiet: bool) -> None:
    """Say what the data is -- one line per split, the rows skipped, the audit's line -- and write audit.json into
    ``folder``: once a run (or a matrix, for all its cells) has passed every check."""
    path = write_audit(folder, data.audit) if data.audit is not None and folder is not None else None
    if quiet:
        return
    for line in data.notes:
        print(f"preftune: {line}", file=sys.stderr)
    if data.audit is not None:
        print(f"preftune: audit: {headline(data.audit)}" + (f" (details in {path})" if path else ""),
              file=sys.stderr)


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

    An objective that needs the shared-part sums (LD-DPO's ``ld_alpha``) gets them from the same reference by
    scoring each pair cut to its shared part (``cut_to_shared``): held-out, as rows N.. of the held-out set,
    which evaluation scores likewise (``with_shared_cuts``), so the step-0 tie stays exact; training, as the
    set ``train_shared`` of the same pairs, which training/reference.py adds as columns 2-3 of the training
    reference.
    """
    dtype = resolve_dtype(cfg)
    obj, needs = objectives.get(cfg.objective), objectives.needs(cfg.objective, cfg.objective_params())
    held = with_shared_cuts(data.eval, needs)
    sets = {"eval": Request(held, cfg.eval_batch_size, None, arithmetic(cfg, dtype, held_out=True))}
    if obj.needs_reference:
        train = [data.train[i] for i in schedule.visited_in(*schedule.period(step))]
        size, tokens = max(32, cfg.eval_batch_size), cfg.reference_tokens or None
        sets["train"] = Request(train, size, tokens, arithmetic(cfg, dtype))
        if "shared" in needs:
            sets["train_shared"] = Request(cut_to_shared(train), size, tokens, arithmetic(cfg, dtype))
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


