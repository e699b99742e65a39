"""Which pairs go where: the held-out split by prompt, the order of training batches (a function of seed and
epoch alone), the unpaired view of pairs for KTO-like objectives, and held-out pairs from unpaired rows.

    train, held = split_by_prompt(examples, fraction=0.1, seed=0)
    for batch in batch_order(lengths, 8, seed=42, epoch=0): ...
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

import numpy as np

from ..core.errors import InputError
from .rows import Example


def unpaired_view(examples: Sequence[Example], batch_size: int, seed: int) -> list[Example]:
    """Training rows of an unpaired objective (KTO): each with its KL completion in ``rejected``.

    Pairs are unpaired first, as ``trl.data_utils.unpair_preference_dataset``: chosen -> True, rejected -> False,
    then shuffled (seeded), since unpairing puts every chosen row first. The KL completion of a row is the
    completion of the row before it inside its chunk of ``batch_size`` rows (the first takes the last), as
    TRL's KTOTrainer builds ``KL_completion_ids`` when it prepares the data.
    """
    rows = list(examples)
    if rows and rows[0].label is None:
        rows = [Example(f"{ex.id}/{side}", ex.prompt, text, text, side == "chosen")
                for ex in rows for side, text in (("chosen", ex.chosen), ("rejected", ex.rejected))]
        random.Random(seed).shuffle(rows)
    return [Example(ex.id, ex.prompt, ex.chosen, chunk[j - 1].chosen, ex.label)
            for chunk in _chunks(rows, batch_size) for j, ex in enumerate(chunk)]


def heldout_pairs(examples: Sequence[Example], source: str) -> list[Example]:
    """Held-out pairs from unpaired rows: per prompt, its first thumbs-up completion against its first thumbs-down
    one (every objective is judged on pairs). Pairs pass through unchanged."""
    if not examples or examples[0].label is None:
        return list(examples)
    first: dict[str, dict[bool, Example]] = {}
    for ex in examples:
        first.setdefault(ex.prompt_key(), {}).setdefault(bool(ex.label), ex)
    pairs = [Example(sides[True].id, sides[True].prompt, sides[True].chosen, sides[False].chosen)
             for sides in first.values() if len(sides) == 2 and sides[True].chosen != sides[False].chosen]
    if not pairs:
        raise InputError("no held-out pairs: no held-out prompt has both a thumbs-up and a thumbs-down completion; "
                         "give --eval-data with prompt/chosen/rejected rows", path=source)
    return pairs


def split_by_prompt(examples: list[Example], fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """(train, held-out): ``ceil(fraction * prompts)`` prompts held out, a prompt never on both sides.

    Keys are sorted before the seeded shuffle, so the split does not depend on row order.
    """
    held = held_out_keys({ex.prompt_key() for ex in examples}, fraction, seed)
    return ([ex for ex in examples if ex.prompt_key() not in held],
            [ex for ex in examples if ex.prompt_key() in held])


def held_out_keys(keys: set[str], fraction: float, seed: int) -> set[str]:
    """The prompts (keys) the split holds out; the audit uses it to see the split train will make."""
    order = sorted(keys)
    random.Random(seed).shuffle(order)
    n_eval = 0
    if fraction > 0 and len(order) >= 2:
        # round() first: 0.1 * 30 is 3.0000000000000004 in floating point, whose ceil is 4
        n_eval = min(math.ceil(round(fraction * len(order), 9)), len(order) - 1)  # keep a training prompt
    return set(order[:n_eval])


def batch_order(lengths: list[int], batch_size: int, *, seed: int, epoch: int,
                group_by_length: bool = True) -> list[list[int]]:
    """Batches of indices for one epoch; depends only on (lengths, batch_size, seed, epoch, group_by_length).

    Grouping sorts each window of 32 batches by length (less padding) and then shuffles the batches, so
    batch composition stays random at the scale of the epoch.
    """
    rng = np.random.default_rng([seed, epoch])
    perm = [int(i) for i in rng.permutation(len(lengths))]
    if not group_by_length:
        return _chunks(perm, batch_size)
    batches = [b for window in _chunks(perm, 32 * batch_size)
               for b in _chunks(sorted(window, key=lambda i: -lengths[i]), batch_size)]
    return [batches[int(i)] for i in rng.permutation(len(batches))]


def _chunks(items: list, size: int) -> list[list]:
    return [items[i:i + size] for i in range(0, len(items), size)]
