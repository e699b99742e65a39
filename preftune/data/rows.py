"""Preference data as files hold it: read a JSONL / JSON / Parquet file or a ``datasets`` source, and validate
every row into an :class:`Example` (or a :class:`PromptRow` for generation), naming file, line and field.

    examples = load_examples("data/train.jsonl")             # InputError on any bad row
    prompts = load_prompts("heldout.jsonl")                  # the prompt of every row

Rows hold ``prompt``, ``chosen`` and ``rejected``, either strings (standard) or lists of ``{role, content}``
messages (conversational). Whole conversations without a ``prompt`` are split at their longest common
message prefix, as ``trl.data_utils.extract_prompt`` does. Extra columns are ignored.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..core.errors import InputError
from ..core.files import parse_jsonl

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


