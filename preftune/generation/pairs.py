"""Preference pairs from scored samples: each prompt's K completions scored by a judge, then best against worst
(or another rule). ``preftune generate --pairs`` and ``preftune iterate`` make their training data here.

    score_rows(rows, judge)                       # adds "scores" to each row
    pairs, stats = make_pairs(rows, min_gap=0.1)  # {"prompt", "chosen", "rejected", "chosen_score", ...}
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence

from .judges import Judge

PAIR_RULES: dict[str, Callable[[list[float], random.Random], tuple[int, int]]] = {
    "max_min": lambda s, rng: (max(range(len(s)), key=s.__getitem__), min(range(len(s)), key=s.__getitem__)),
    "max_random": lambda s, rng: (max(range(len(s)), key=s.__getitem__), rng.randrange(len(s))),
    "best_vs_second": lambda s, rng: tuple(sorted(range(len(s)), key=lambda i: -s[i])[:2]),  # type: ignore[dict-item]
}


def make_pairs(rows: Sequence[dict], *, min_gap: float = 0.0, rule: str = "max_min",
               seed: int = 0) -> tuple[list[dict], dict]:
    """Preference pairs from scored samples: ``max_min`` (best vs worst, SimPO's on-policy recipe and the
    default), ``max_random`` or ``best_vs_second`` (RLHFlow's rules). Returns (pairs, stats).

    Dropped, and counted: prompts whose completions are all identical ("identical"), prompts with fewer than
    two non-blank completions ("empty": an immediate EOS can't be a training completion), and prompts whose
    picked completions tie, are the same text, or differ by less than ``min_gap`` ("gap").
    """
    rng = random.Random(seed)
    pairs, dropped = [], {"identical": 0, "empty": 0, "gap": 0}
    for r in rows:
        if len(set(r["completions"])) <= 1:
            dropped["identical"] += 1
            continue
        usable = [(c, s) for c, s in zip(r["completions"], r["scores"]) if c.strip()]
        if len(usable) < 2:
            dropped["empty"] += 1
            continue
        comps, scores = [c for c, _ in usable], [s for _, s in usable]
        best, worst = PAIR_RULES[rule](scores, rng)  # first of equal scores: stable
        gap = scores[best] - scores[worst]
        if gap <= 0 or gap < min_gap or comps[best] == comps[worst]:
            dropped["gap"] += 1
            continue
        chosen, rejected = comps[best], comps[worst]
        if isinstance(r["prompt"], list):  # conversational prompt: completions as assistant turns
            chosen, rejected = ([{"role": "assistant", "content": c}] for c in (chosen, rejected))
        pairs.append({"prompt": r["prompt"], "chosen": chosen, "rejected": rejected,
                      "chosen_score": scores[best], "rejected_score": scores[worst]})
    stats = {"prompts": len(rows), "pairs": len(pairs), "dropped": dropped, "min_gap": min_gap, "rule": rule}
    return pairs, stats


def score_rows(rows: list[dict], judge: Judge) -> None:
    """Add ``scores`` to each row: the judge's score of each of its completions (``Judge.score_groups``)."""
    for r, scores in zip(rows, judge.score_groups([r["prompt"] for r in rows], [r["completions"] for r in rows])):
        r["scores"] = scores
