"""The data audit without a model: one streaming pass over the rows that counts what quietly spoils preference
training, each finding a code with its numbers (and up to three examples), in audit.json.

    audit = audit_source("train.jsonl", "heldout.jsonl", RowPolicy(bad_rows="skip"))   # preftune audit ...
    print(headline(audit))               # "300 rows; 3 duplicate pairs, 2 contradictions, ..."

The codes and what each counts, and its memory (one record per distinct prompt, one hash per distinct pair):
docs/data.md, The audit.
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections import Counter
from collections.abc import Iterable
from typing import Any

from ..core.intervals import wilson_interval
from ..core.layout import Audit
from .rows import RowPolicy, iter_rows
from .shapes import BadRow, Example, as_text
from .split import held_out_keys
from .tokenize import DataStats

EXAMPLES = 3          # examples kept per finding
EXCERPT = 300         # characters of each text in an example
BIN = 0.5             # length-bias histogram: bins of log2((chosen + 1) / (rejected + 1)), clipped to +-4
PRIOR = 0.6           # a length rule right this often (and significantly above chance) teaches a length prior
_PUNCT = re.compile(r"[\W_]+")


def normalized(text: str) -> str:
    """What makes two prompts near-duplicates: equal after Unicode NFKC, case folding, and dropping punctuation
    and spacing differences."""
    return " ".join(_PUNCT.sub(" ", unicodedata.normalize("NFKC", text).casefold()).split())


def _excerpt(ex: Example, *keys: str) -> dict[str, str]:
    return {k: as_text(getattr(ex, k))[:EXCERPT] for k in keys}


class Auditor:
    """Feed it rows (``add``) and held-out rows (``add_heldout``, after every training row), then ``findings``."""

    def __init__(self, keep_keys: bool = False) -> None:
        self.rows, self.pairs, self.heldout_pairs = 0, 0, 0
        self.bad: Counter[str] = Counter()
        self.counts: Counter[str] = Counter()    # duplicate_pairs, contradictions, chosen_equals_rejected, ...
        self.examples: dict[str, list[dict]] = {}
        self.prompts: dict[int, list] = {}       # hash(prompt) -> [hash(normalized), rows, first id]
        self.first_norm: dict[int, tuple[int, str]] = {}  # hash(normalized) -> (hash(prompt), first id)
        self.near_groups: set[int] = set()
        self.seen: dict[int, str] = {}           # hash(prompt, chosen, rejected) -> first id
        self.answers: dict[int, int] = {}        # hash(chosen, rejected) -> hash(its first prompt)
        self.held: dict[int, list] = {}          # held-out prompts: hash -> [rows, leak: "exact" | "near" | None]
        self.lengths = [0, 0, 0]                 # chosen shorter, longer, equal (characters)
        self.hist = [0] * int(8 / BIN)
        self.keys: set[str] | None = set() if keep_keys else None  # prompt texts, for the split train would make

    def _note(self, code: str, example: dict, count: int = 1) -> None:
        self.counts[code] += count
        kept = self.examples.setdefault(code, [])
        if len(kept) < EXAMPLES:
            kept.append(example)

    def add(self, item: Example | BadRow) -> None:
        """One training row (or the bad row it was)."""
        self.rows += 1
        if isinstance(item, BadRow):
            if item.kind == "identical":  # chosen == rejected exactly: a bad row to training, a finding here
                self._note("chosen_equals_rejected", {"ids": [f"{item.path}:{item.line}"]})
            else:
                self.bad[item.kind] += 1
                self._note("bad_rows", {"ids": [f"{item.path}:{item.line}"], "why": item.what}, count=0)
            return
        self.pairs += 1
        p, _ = self._prompt(item)
        c, r = as_text(item.chosen), as_text(item.rejected)
        paired = item.label is None
        key, swapped = (hash((p, c, r)), hash((p, r, c))) if paired else (hash((p, c, item.label)),
                                                                          hash((p, c, not item.label)))
        if key in self.seen:
            return self._note("duplicate_pairs", {"ids": [self.seen[key], item.id], **_excerpt(item, *_TEXT)})
        self.seen[key] = item.id
        if swapped in self.seen:
            self._note("contradictions", {"ids": [self.seen[swapped], item.id], **_excerpt(item, *_TEXT)})
        if paired:
            self._pair(p, c, r, item)

    def _prompt(self, item: Example) -> tuple[int, bool]:
        """(hash of the row's prompt, whether it is new); a new prompt is recorded, a near-duplicate noted."""
        text = item.prompt_key()
        p = hash(text)
        new = p not in self.prompts
        if new:
            norm = hash(normalized(text))
            self.prompts[p] = [norm, 0, item.id]
            if self.keys is not None:
                self.keys.add(text)
            first = self.first_norm.setdefault(norm, (p, item.id))
            if first[0] != p:
                self.near_groups.add(norm)
                self._note("near_duplicate_prompts", {"ids": [first[1], item.id], **_excerpt(item, "prompt")})
        self.prompts[p][1] += 1
        return p, new

    def _pair(self, p: int, c: str, r: str, item: Example) -> None:
        if " ".join(c.split()) == " ".join(r.split()):
            self._note("chosen_equals_rejected", {"ids": [item.id], **_excerpt(item, *_TEXT)})
        answers = hash((c, r))
        if self.answers.setdefault(answers, p) != p:
            self._note("same_answers", {"ids": [item.id], **_excerpt(item, *_TEXT)})
        self.lengths[0 if len(c) < len(r) else 1 if len(c) > len(r) else 2] += 1
        ratio = math.log2((len(c) + 1) / (len(r) + 1))
        self.hist[min(len(self.hist) - 1, max(0, int((ratio + 4) // BIN)))] += 1

    def add_prompt(self, item: Example) -> None:
        """A prompt to sample from (iterate's ``--prompts``): only the prompt checks apply; a repeated prompt counts
        as a duplicate."""
        self.rows += 1
        p, new = self._prompt(item)
        if not new:
            self._note("duplicate_pairs", {"ids": [self.prompts[p][2], item.id], **_excerpt(item, "prompt")})

    def add_heldout(self, item: Example | BadRow) -> None:
        """One held-out row: is its prompt (exactly or nearly) one of the training prompts?"""
        if isinstance(item, BadRow):
            self.bad[item.kind] += 1
            return
        self.heldout_pairs += 1
        text = item.prompt_key()
        p = hash(text)
        if p not in self.held:
            near = self.first_norm.get(hash(normalized(text)))  # (hash(prompt), first id) of a near one
            leak = "exact" if p in self.prompts else "near" if near else None
            self.held[p] = [0, leak]
            if leak:
                other = self.prompts[p][2] if leak == "exact" else near[1]
                example = {"ids": [item.id, other], "leak": leak, **_excerpt(item, "prompt")}
                self._note("heldout_leak", example, count=0)
        self.held[p][0] += 1

    def split(self, fraction: float, seed: int) -> None:
        """No held-out file: hold out the prompts train's ``--eval-fraction`` split would, and look for leaks
        across it (only near ones: the split keeps each exact prompt on one side)."""
        held = held_out_keys(self.keys or set(), fraction, seed)
        groups: dict[int, list[int]] = {}
        for p, (norm, _, _) in self.prompts.items():
            groups.setdefault(norm, []).append(p)
        hashes = {hash(k): k for k in held}
        for p, text in hashes.items():
            norm, rows, first = self.prompts[p]
            others = [self.prompts[q][2] for q in groups[norm] if q not in hashes]
            self.held[p] = [rows, "near" if others else None]
            self.heldout_pairs += rows
            if others:
                example = {"ids": [first, others[0]], "leak": "near", "prompt": text[:EXCERPT]}
                self._note("heldout_leak", example, count=0)

    def findings(self) -> list[dict[str, Any]]:
        c, bad = self.counts, sum(self.bad.values())
        out = [{"code": "bad_rows", "rows": self.rows, "bad": bad, "kinds": dict(self.bad)},
               {"code": "duplicate_pairs", "rows": c["duplicate_pairs"], "pairs": self.pairs},
               {"code": "near_duplicate_prompts", "prompts": c["near_duplicate_prompts"],
                "groups": len(self.near_groups), "distinct_prompts": len(self.prompts)},
               *({"code": code, "rows": c[code], "pairs": self.pairs}
                 for code in ("contradictions", "chosen_equals_rejected", "same_answers"))]
        for f, count in zip(out, (bad, *(c[f["code"]] for f in out[1:]))):
            f["severity"] = "warn" if count else "info"
        if self.held:
            out.append(self._leak())
        if sum(self.lengths[:2]):
            out.append(self._length_bias())
        return [{**f, "examples": self.examples.get(f["code"], [])} for f in out]

    def _leak(self) -> dict[str, Any]:
        leaks = Counter(leak for _, leak in self.held.values())
        exact, near = leaks["exact"], leaks["near"]
        pairs = sum(rows for rows, leak in self.held.values() if leak)
        return {"code": "heldout_leak", "severity": "warn" if exact + near else "info",
                "heldout_prompts": len(self.held), "exact": exact, "near": near,
                "share": (exact + near) / len(self.held), "heldout_pairs": self.heldout_pairs, "leaked_pairs": pairs}

    def _length_bias(self) -> dict[str, Any]:
        return length_bias(*self.lengths, unit="characters", histogram={
            "edges": [-4 + BIN * i for i in range(len(self.hist) + 1)], "counts": list(self.hist),
            "of": "log2((chosen + 1) / (rejected + 1))"})

    def audit(self, sources: dict[str, Any]) -> Audit:
        """audit.json's record: where the rows came from, the counts, the findings."""
        return Audit(sources, {"rows": self.rows, "pairs": self.pairs, "prompts": len(self.prompts),
                               "bad_rows": sum(self.bad.values()), "heldout_pairs": self.heldout_pairs,
                               "heldout_prompts": len(self.held)}, self.findings())


_TEXT = ("prompt", "chosen", "rejected")


def length_bias(shorter: int, longer: int, equal: int, *, unit: str, **extra: Any) -> dict[str, Any]:
    """What a pure length rule ("prefer the shorter" or "the longer", whichever fits) gets right, ties one half,
    with its 95% Wilson interval, and the prior training will teach when it is right often: brevity or verbosity."""
    n = shorter + longer + equal
    rule = "shorter" if shorter >= longer else "longer"
    right = max(shorter, longer) + equal / 2
    lo, hi = wilson_interval(right, n)
    teaches = ("brevity" if rule == "shorter" else "verbosity") if right / n >= PRIOR and lo > 0.5 else None
    return {"code": "length_bias", "severity": "warn" if teaches else "info", "pairs": n, "unit": unit,
            "chosen_shorter": shorter / n, "chosen_longer": longer / n, "equal": equal / n, "rule": rule,
            "rule_accuracy": right / n, "ci": [lo, hi], "teaches": teaches, **extra}


def truncation(stats: dict[str, DataStats], max_length: int, max_prompt_length: int | None) -> dict[str, Any]:
    """What truncation at the configured lengths does to each split, and the length that keeps 95% whole."""
    splits = {name: {**{k: v for k, v in s.to_dict().items() if k in ("rows", "kept", "truncated", "dropped")},
                     **s.percentiles()} for name, s in stats.items()}
    cut = max((s["truncated"] + s["dropped"]) / max(1, s["rows"]) for s in splits.values())
    return {"code": "truncation", "severity": "warn" if cut >= 0.05 else "info", "max_length": max_length,
            "max_prompt_length": max_prompt_length, "splits": splits,
            "whole_at": stats["train"].whole_at(0.95, max_prompt_length) if "train" in stats else None}


def audit_source(data: str, eval_data: str | None = None, policy: RowPolicy | None = None, *, split: str = "train",
                 eval_split: str = "test", eval_fraction: float = 0.1, split_seed: int = 0) -> Audit:
    """Stream ``data`` (and ``eval_data``) through the model-free checks; without ``eval_data`` the held-out side
    is the split train would make (``eval_fraction``, ``split_seed``). Never stops at a bad row: it counts it."""
    policy = RowPolicy(policy.columns if policy else {}, "skip", math.inf)
    auditor = Auditor(keep_keys=not eval_data)
    for _, item in iter_rows(data, split, policy):
        auditor.add(item)
    if eval_data:
        for _, item in iter_rows(eval_data, eval_split, policy):
            auditor.add_heldout(item)
    elif eval_fraction > 0:
        auditor.split(eval_fraction, split_seed)
    return auditor.audit({"data": data, "eval_data": eval_data} if eval_data else
                         {"data": data, "eval_fraction": eval_fraction, "split_seed": split_seed})


def audit_examples(train: Iterable[Example | BadRow], heldout: Iterable[Example | BadRow],
                   sources: dict[str, Any]) -> Audit:
    """The same checks on rows already loaded (train's preflight): the training rows, then the held-out ones."""
    auditor = Auditor()
    for item in train:
        auditor.add(item)
    for item in heldout:
        auditor.add_heldout(item)
    return auditor.audit(sources)


def audit_prompts(prompts: Iterable[Example], eval_data: str, eval_split: str, columns: dict[str, str]) -> Audit:
    """iterate's preflight: its training prompts (repeats, near-duplicates) against the held-out pairs (leaks)."""
    auditor = Auditor()
    for item in prompts:
        auditor.add_prompt(item)
    for _, held in iter_rows(eval_data, eval_split, RowPolicy(columns, "skip", math.inf)):
        auditor.add_heldout(held)
    return auditor.audit({"prompts": "iterate --prompts", "eval_data": eval_data})


# Short words per finding for the one console line (full sentences: verdict/reasons.py).
_SHORT = {"duplicate_pairs": lambda f: f"{f['rows']} duplicate pairs",
          "near_duplicate_prompts": lambda f: f"{f['prompts']} near-duplicate prompts",
          "contradictions": lambda f: f"{f['rows']} contradictions",
          "chosen_equals_rejected": lambda f: f"{f['rows']} chosen=rejected",
          "same_answers": lambda f: f"{f['rows']} pairs differing only in the prompt",
          "heldout_leak": lambda f: f"{f['exact'] + f['near']} of {f['heldout_prompts']} held-out prompts also in "
                                    f"training (held-out accuracy inflated)",
          "length_bias": lambda f: f"a {f['teaches']} prior (chosen {f['rule']} in {f['rule_accuracy']:.0%})",
          "truncation": lambda f: f"truncation cuts pairs (--max-length {f['whole_at']} keeps 95% whole)",
          "bad_rows": lambda f: f"{f['bad']} bad rows"}


def headline(audit: Audit) -> str:
    """The preflight's one line: the counts, and every finding that warns."""
    found = [_SHORT[f["code"]](f) for f in audit.findings if f.get("severity") == "warn" and f["code"] in _SHORT]
    return f"{audit.counts.get('rows', 0)} rows; " + (", ".join(found) if found else "no problems found")
