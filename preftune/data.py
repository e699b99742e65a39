"""Preference data: load, validate, tokenize (exactly as TRL's DPOTrainer), split by prompt, batch.

    from preftune import data
    examples = data.load_examples("data/train.jsonl")             # InputError on any bad row
    train, held = data.split_by_prompt(examples, fraction=0.1, seed=42)
    pairs, stats = data.tokenize_examples(train, tokenizer, max_length=512, max_prompt_length=256)
    for batch in data.batch_order([len(p.prompt_ids) + len(p.chosen_ids) for p in pairs], 8, seed=42, epoch=0):
        ...

Rows hold ``prompt``, ``chosen`` and ``rejected``, either strings (standard) or lists of ``{role, content}``
messages (conversational). Whole conversations without a ``prompt`` are split at their longest common
message prefix, as ``trl.data_utils.extract_prompt`` does. Extra columns are ignored.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .errors import InputError
from .files import parse_jsonl

Content = str | list  # a string, or a list of {role, content} messages
BAD_VALUE = "must be a non-empty string or a list of messages"


@dataclass(frozen=True)
class Example:
    """One validated pair before tokenization."""

    id: str  # "<file name>:<line>" (JSONL, 1-based) or "<file or dataset name>:<row>" (0-based)
    prompt: Content
    chosen: Content
    rejected: Content
    label: bool | None = None  # unpaired rows: chosen is the completion, True = thumbs up (see unpaired_view)

    def prompt_key(self) -> str:
        """Canonical text of the prompt: pairs sharing it land on the same side of a split."""
        return as_text(self.prompt)


@dataclass(frozen=True)
class Pair:
    """A tokenized pair. Completion ids include EOS unless truncation removed it."""

    id: str
    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    prompt: str
    chosen: str
    rejected: str
    label: bool | None = None  # unpaired rows: chosen_ids is the completion, rejected_ids the KL completion


@dataclass
class DataStats:
    rows: int = 0
    kept: int = 0
    truncated: int = 0  # kept pairs where the prompt or a completion was cut
    dropped: int = 0    # pairs with nothing left to compare after truncation

    def to_dict(self) -> dict:
        return asdict(self)


# --- loading -----------------------------------------------------------------------------------------------

def load_examples(source: str, split: str = "train") -> list[Example]:
    """Read and validate every row of a ``.jsonl``, ``.json`` or ``.parquet`` file, or a ``datasets`` source."""
    name, rows = _read(source, split)
    examples = [(line, _example(row, f"{name}:{line}", source, line)) for line, row in rows]
    if not examples:
        raise InputError("no rows", path=source)
    odd = next((line for line, ex in examples if (ex.label is None) != (examples[0][1].label is None)), None)
    if odd is not None:
        raise InputError("mixes pairs (chosen/rejected) and unpaired rows (completion/label); use one kind per file",
                         path=source, line=odd)
    return [ex for _, ex in examples]


def _read(source: str, split: str) -> tuple[str, Iterable[tuple[int, Any]]]:
    """(the name row ids start with, rows) of a data file or a ``datasets`` source."""
    path = Path(source)
    if path.suffix.lower() in (".jsonl", ".json", ".parquet"):
        return path.name, _read_file(path, source, split)
    return source.rstrip("/").rsplit("/", 1)[-1], _read_dataset(source, split)


def _read_file(path: Path, source: str, split: str) -> list[tuple[int, Any]]:
    """(line or row number, raw row) pairs; JSONL lines are 1-based, rows of other formats 0-based."""
    if path.suffix.lower() == ".parquet":
        import pyarrow.parquet as pq

        try:
            return list(enumerate(pq.read_table(path).to_pylist()))
        except Exception as e:  # pyarrow raises its own types for missing or corrupt files
            raise InputError(f"cannot read Parquet: {_one_line(e)}", path=source) from None
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise InputError(f"cannot read file: {e.strerror or _one_line(e)}", path=source) from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        # Name the line like every other bad row does, and the byte offset, so `xxd -s` finds it.
        line = raw.count(b"\n", 0, e.start) + 1
        column = e.start - (raw.rfind(b"\n", 0, e.start) + 1)
        raise InputError(f"not UTF-8 text: byte 0x{raw[e.start]:02x} at byte offset {e.start} "
                         f"(byte {column} of the line)", path=source, line=line) from None
    if path.suffix.lower() == ".jsonl":
        return parse_jsonl(text, source, skip_torn=False)
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise InputError(f"invalid JSON: {e.msg} (column {e.colno})", path=source, line=e.lineno) from None
    if isinstance(obj, dict):  # {"train": [...], "test": [...]} or {"data": [...]}
        obj = obj.get(split, obj.get("data"))
    if not isinstance(obj, list):
        raise InputError(f'expected a list of objects, {{"{split}": [...]}} or {{"data": [...]}}', path=source)
    return list(enumerate(obj))


def _read_dataset(source: str, split: str) -> Iterable[tuple[int, Any]]:
    import datasets

    path = Path(source)
    # Only "name" or "org/name" can be a hub id; anything else that is missing is a local typo, and asking
    # the hub about it would spend half a minute in retries when offline.
    if not path.exists() and (path.is_absolute() or source.startswith((".", "~")) or source.count("/") > 1
                              or path.suffix.lower() in (".csv", ".tsv", ".txt", ".arrow")):
        raise InputError("no such file or folder", path=source)
    try:
        if (path / "dataset_dict.json").exists() or (path / "state.json").exists():  # save_to_disk folder
            ds = datasets.load_from_disk(source)
            ds = ds[split] if isinstance(ds, datasets.DatasetDict) else ds
        else:
            ds = datasets.load_dataset(source, split=split)
    except Exception as e:  # datasets raises many types (hub, network, format, missing split): report one line
        raise InputError(f"cannot load dataset (split '{split}'): {_one_line(e)}", path=source) from None
    return enumerate(ds)


def _one_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__


def _example(row: Any, id: str, source: str, line: int) -> Example:
    if not isinstance(row, dict):
        raise InputError(f"row must be an object, got {type(row).__name__}", path=source, line=line)
    if "completion" in row or "label" in row:
        return _unpaired(row, id, source, line)
    for field in ("chosen", "rejected"):
        if field not in row:
            raise InputError("missing", path=source, line=line, field=field)
        _check(row[field], field, source, line)
    chosen, rejected = row["chosen"], row["rejected"]
    conversational = isinstance(chosen, list)
    if isinstance(rejected, list) != conversational:
        raise InputError("chosen and rejected must both be strings or both message lists",
                         path=source, line=line, field="rejected")
    if chosen == rejected:
        raise InputError("identical to chosen", path=source, line=line, field="rejected")
    if "prompt" not in row or row["prompt"] is None:
        if not conversational:
            raise InputError("missing", path=source, line=line, field="prompt")
        prompt, chosen, rejected = _extract_prompt(chosen, rejected)
        if not prompt:
            raise InputError("missing, and chosen and rejected share no leading messages to take it from",
                             path=source, line=line, field="prompt")
    else:
        prompt = row["prompt"]
        _check(prompt, "prompt", source, line)
        if isinstance(prompt, list) != conversational:
            kind = "a list of messages" if conversational else "a string"
            raise InputError(f"must be {kind}, like chosen and rejected", path=source, line=line, field="prompt")
    return Example(id, prompt, chosen, rejected)


def _unpaired(row: dict, id: str, source: str, line: int) -> Example:
    """A thumbs-up/down row: ``{"prompt", "completion", "label": true|false}`` (text or messages), as TRL's KTO."""
    for field in ("prompt", "completion"):
        if row.get(field) is None:
            raise InputError("missing (an unpaired row has prompt, completion and label)", path=source, line=line,
                             field=field)
        _check(row[field], field, source, line)
    if not isinstance(row.get("label"), bool):
        got = "missing" if "label" not in row else f"{row['label']!r} is not true/false"
        raise InputError(f"{got}: an unpaired row's label says thumbs up (true) or down (false)", path=source,
                         line=line, field="label")
    if isinstance(row["prompt"], list) != isinstance(row["completion"], list):
        raise InputError("prompt and completion must both be strings or both message lists", path=source,
                         line=line, field="completion")
    return Example(id, row["prompt"], row["completion"], row["completion"], row["label"])


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
    out = []
    for s in range(0, len(rows), batch_size):
        chunk = rows[s:s + batch_size]
        kl = [chunk[-1].chosen] + [ex.chosen for ex in chunk[:-1]]
        out += [Example(ex.id, ex.prompt, ex.chosen, k, ex.label) for ex, k in zip(chunk, kl)]
    return out


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


def _check(value: Any, field: str, source: str, line: int) -> None:
    if isinstance(value, str):
        if value.strip():
            return
    elif isinstance(value, list) and value:
        for i, m in enumerate(value):
            ok = isinstance(m, dict) and isinstance(m.get("role"), str) and m["role"].strip()
            if not ok or not isinstance(m.get("content"), str) or not m["content"].strip():
                raise InputError("each message needs a non-empty string 'role' and 'content'",
                                 path=source, line=line, field=f"{field}[{i}]")
        return
    raise InputError(BAD_VALUE, path=source, line=line, field=field)


def _extract_prompt(chosen: list, rejected: list) -> tuple[list, list, list]:
    """Longest common message prefix as prompt; mirrors trl.data_utils.extract_prompt.

    Like TRL, when one conversation is a prefix of the other, the shorter one keeps its last turn as completion.
    """
    n = min(len(chosen), len(rejected))
    idx = next((i for i in range(n) if chosen[i] != rejected[i]), n - 1)
    return chosen[:idx], chosen[idx:], rejected[idx:]


def as_text(content: Content) -> str:
    """A prompt or completion as plain text: a string as is, chat messages as "role: content" lines."""
    if isinstance(content, str):
        return content
    return "\n".join(f"{m['role']}: {m['content']}" for m in content)


# --- tokenization ------------------------------------------------------------------------------------------

def tokenize_examples(examples: Sequence[Example], tokenizer: Any, *, max_length: int, max_prompt_length: int,
                      apply_chat_template: bool = False, source: str = "") -> tuple[list[Pair], DataStats]:
    """Tokenize as TRL 1.16's DPOTrainer, then truncate: prompt from the left, completions from the right.

    A pair is dropped when a completion ends up empty, or both end up identical (nothing to compare).
    """
    if not examples:
        raise InputError("no rows", path=source or None)
    stats = DataStats(rows=len(examples))
    pairs = []
    for ex, (p, c, r) in zip(examples, _encode(examples, tokenizer, apply_chat_template, source)):
        # TRL: the completion starts where prompt and prompt+completion diverge (chat templates, merges).
        n = min(_common_prefix(p, c), _common_prefix(p, r))
        p, c, r = p[:n], c[n:], r[n:]
        cut_p = p[-max_prompt_length:] if len(p) > max_prompt_length else p
        budget = max(max_length - len(cut_p), 0)  # a negative slice bound would count from the end
        cut_c, cut_r = c[:budget], r[:budget]
        if not cut_c or not cut_r or (cut_c == cut_r and ex.label is None):  # a KL completion may equal it
            stats.dropped += 1
            continue
        stats.truncated += (len(cut_p), len(cut_c), len(cut_r)) != (len(p), len(c), len(r))
        pairs.append(Pair(ex.id, cut_p, cut_c, cut_r, ex.prompt_key(), as_text(ex.chosen), as_text(ex.rejected),
                          ex.label))
    stats.kept = len(pairs)
    if not pairs:
        raise InputError(f"no pairs left after truncation to max_length={max_length}, "
                         f"max_prompt_length={max_prompt_length} ({stats.dropped} dropped)", path=source or None)
    return pairs, stats


def _encode(examples: Sequence[Example], tok: Any, apply_chat_template: bool,
            source: str) -> list[tuple[list[int], list[int], list[int]]]:
    """(prompt, prompt+chosen, prompt+rejected) ids per example, built the way TRL's ``tokenize_fn`` does."""
    out: list[Any] = [None] * len(examples)
    plain = [i for i, ex in enumerate(examples) if isinstance(ex.chosen, str) and not apply_chat_template]
    if plain:
        eos = tok.eos_token
        if eos is None:
            raise InputError("the tokenizer has no eos_token", path=source or None)
        # TRL appends the EOS text to standard completions, then tokenizes with the tokenizer's default
        # add_special_tokens (BOS where the tokenizer adds one) -- batched here, same ids.
        def enc(texts: list[str]) -> list[list[int]]:
            return list(tok(text=texts)["input_ids"])

        exs = [examples[i] for i in plain]
        prompts = enc([ex.prompt for ex in exs])
        chosen = enc([ex.prompt + _with_eos(ex.chosen, eos) for ex in exs])
        rejected = enc([ex.prompt + _with_eos(ex.rejected, eos) for ex in exs])
        for i, p, c, r in zip(plain, prompts, chosen, rejected):
            out[i] = (list(p), list(c), list(r))
    for i, ex in enumerate(examples):
        if out[i] is None:
            out[i] = _encode_chat(ex, tok, apply_chat_template, source)
    return out


def _with_eos(text: str, eos: str) -> str:
    return text if text.endswith(eos) else text + eos


def _encode_chat(ex: Example, tok: Any, wrapped: bool, source: str) -> tuple[list[int], list[int], list[int]]:
    prompt, chosen, rejected = ex.prompt, ex.chosen, ex.rejected
    if isinstance(prompt, str):  # apply_chat_template=True on standard data
        prompt = [{"role": "user", "content": prompt}]
        chosen = [{"role": "assistant", "content": chosen}]
        rejected = [{"role": "assistant", "content": rejected}]
    if not getattr(tok, "chat_template", None):
        raise InputError("the tokenizer has no chat template, which conversational data needs",
                         path=source or None, field="apply_chat_template" if wrapped else None)
    name, _, line = ex.id.rpartition(":")
    where = (source or name, int(line) if line.isdigit() else None)
    return (_chat_ids(tok, prompt, True, *where), _chat_ids(tok, prompt + chosen, False, *where),
            _chat_ids(tok, prompt + rejected, False, *where))


def _chat_ids(tok: Any, messages: list, generation_prompt: bool, path: str, line: int | None) -> list[int]:
    try:
        ids = tok.apply_chat_template(messages, tokenize=True, return_dict=True,
                                      add_generation_prompt=generation_prompt)["input_ids"]
    except Exception as e:  # jinja errors from the template itself, e.g. "roles must alternate"
        raise InputError(f"chat template failed: {_one_line(e)}", path=path, line=line) from None
    return list(ids)


@dataclass(frozen=True)
class PromptRow:
    """One prompt to generate from, with where it came from (for one-line errors)."""

    id: str            # "<file name>:<line>" like Example.id
    prompt: Content
    source: str        # the file or dataset given
    line: int          # JSONL line (1-based) or row (0-based)


def load_prompts(source: str, split: str = "train") -> list[PromptRow]:
    """Prompts of any data file preftune reads: rows with a ``prompt`` (string or messages), or pairs.

    Rows need no chosen/rejected; conversational pairs without a ``prompt`` give their common message prefix.

        rows = load_prompts("heldout.jsonl")          # InputError "<file>:<line>: field 'prompt': missing"
    """
    name, rows = _read(source, split)
    out = []
    for line, row in rows:
        if not isinstance(row, dict):
            raise InputError(f"row must be an object, got {type(row).__name__}", path=source, line=line)
        if row.get("prompt") is None and "chosen" in row and "rejected" in row:
            prompt = _example(row, f"{name}:{line}", source, line).prompt  # implicit prompt of a pair
        elif row.get("prompt") is None:
            raise InputError("missing", path=source, line=line, field="prompt")
        else:
            prompt = row["prompt"]
            _check(prompt, "prompt", source, line)
        out.append(PromptRow(f"{name}:{line}", prompt, source, line))
    if not out:
        raise InputError("no rows", path=source)
    return out


def encode_prompts(rows: Sequence[PromptRow], tokenizer: Any, *, apply_chat_template: bool = False) -> list[list[int]]:
    """Prompt ids exactly as training encodes them: plain strings with the tokenizer's default special tokens,
    message lists (or wrapped strings) through the chat template with ``add_generation_prompt=True``."""
    out: list[list[int]] = []
    for r in rows:
        if isinstance(r.prompt, str) and not apply_chat_template:
            out.append(list(tokenizer(text=r.prompt)["input_ids"]))
            continue
        if not getattr(tokenizer, "chat_template", None):
            raise InputError("the tokenizer has no chat template, which conversational prompts need",
                             path=r.source, line=r.line)
        prompt = [{"role": "user", "content": r.prompt}] if isinstance(r.prompt, str) else r.prompt
        out.append(_chat_ids(tokenizer, prompt, True, r.source, r.line))
    return out


def _common_prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


# --- split, batches, length bias ---------------------------------------------------------------------------

def split_by_prompt(examples: list[Example], fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """(train, held-out): ``ceil(fraction * prompts)`` prompts held out, a prompt never on both sides.

    Keys are sorted before the seeded shuffle, so the split does not depend on row order.
    """
    keys = sorted({ex.prompt_key() for ex in examples})
    random.Random(seed).shuffle(keys)
    n_eval = 0
    if fraction > 0 and len(keys) >= 2:
        # round() first: 0.1 * 30 is 3.0000000000000004 in floating point, whose ceil is 4
        n_eval = min(math.ceil(round(fraction * len(keys), 9)), len(keys) - 1)  # keep a training prompt
    held = set(keys[:n_eval])
    return ([ex for ex in examples if ex.prompt_key() not in held],
            [ex for ex in examples if ex.prompt_key() in held])


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
    window = 32 * batch_size
    batches = []
    for s in range(0, len(perm), window):
        batches += _chunks(sorted(perm[s:s + window], key=lambda i: -lengths[i]), batch_size)
    return [batches[int(i)] for i in rng.permutation(len(batches))]


def _chunks(items: list[int], size: int) -> list[list[int]]:
    return [items[i:i + size] for i in range(0, len(items), size)]


