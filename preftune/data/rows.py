"""Preference data as files hold it: read a JSONL / JSON / Parquet file or a ``datasets`` source, and validate
every row into an :class:`Example` (or a :class:`PromptRow` for generation), naming file, line and field, under
a row policy that stops at the first bad row (the default) or skips, counts and names them.

    examples = load_examples("data/train.jsonl")             # InputError on any bad row
    loaded = read_examples("hh.jsonl", policy=RowPolicy(bad_rows="skip"))   # loaded.skipped: the rows left out
    prompts = load_prompts("heldout.jsonl")                  # the prompt of every row

Row shapes are in shapes.py; the sources and shapes accepted: docs/data.md, Rows. ``iter_rows`` streams a
JSONL file of any size (the audit reads it that way).
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..core.errors import InputError, did_you_mean, one_line
from .shapes import FIELDS, BadRow, Content, Example, as_text, check, example, mapped

__all__ = ["BadRow", "Content", "Example", "Loaded", "PromptRow", "RowPolicy", "as_text", "iter_rows",
           "load_examples", "load_prompts", "read_examples"]
NAMED = 5  # skipped rows named on the console and in summary.json


@dataclass(frozen=True)
class RowPolicy:
    """What to do with a bad row (``--bad-rows``, ``--max-bad-rows``) and the file's column names (``--columns``)."""

    columns: dict[str, str] = field(default_factory=dict)
    bad_rows: str = "error"        # error | skip
    max_bad_rows: float = 0.01     # a count (>= 1) or a share of the rows read (< 1)

    @classmethod
    def of(cls, cfg: Any) -> RowPolicy:
        """The policy a Config (or anything with these three attributes) asks for."""
        return cls(dict(cfg.columns), cfg.bad_rows, cfg.max_bad_rows)

    def check(self) -> None:
        for key in self.columns:
            if key not in FIELDS:
                raise InputError(f"unknown field '{key}'{did_you_mean(key, list(FIELDS))}; --columns maps "
                                 f"{', '.join(FIELDS)} to your file's column names", field="columns")

    def cap(self, rows: int) -> int:
        """The most rows that may be skipped out of ``rows``."""
        share = self.max_bad_rows
        return rows if math.isinf(share) else int(share) if share >= 1 else math.ceil(round(share * rows, 9))


@dataclass
class Loaded:
    """The examples of a source, and the rows the policy skipped (each a BadRow naming file, line and why)."""

    examples: list[Example]
    skipped: list[BadRow]

    def to_dict(self) -> dict[str, Any]:
        """summary.json's record of the skipped rows (empty when none were)."""
        named = [str(b) for b in self.skipped[:NAMED]]
        return {"skipped": len(self.skipped), "skipped_rows": named} if self.skipped else {}

    def note(self, source: str) -> str | None:
        """One console line: how many rows were skipped, of which kinds, and the first few by file and line."""
        if not self.skipped:
            return None
        kinds = Counter(b.kind for b in self.skipped)
        named = ", ".join(f"{b.path}:{b.line}" for b in self.skipped[:NAMED])
        more = f" and {len(self.skipped) - NAMED} more" if len(self.skipped) > NAMED else ""
        return (f"skipped {len(self.skipped)} of {len(self.skipped) + len(self.examples)} rows of {source} ("
                + ", ".join(f"{k}: {n}" for k, n in kinds.items()) + f"): {named}{more}")


def load_examples(source: str, split: str = "train", policy: RowPolicy | None = None) -> list[Example]:
    """Read and validate every row of a ``.jsonl``, ``.json`` or ``.parquet`` file, or a ``datasets`` source."""
    return read_examples(source, split, policy).examples


def read_examples(source: str, split: str = "train", policy: RowPolicy | None = None) -> Loaded:
    """Every row under ``policy``: the examples, and the bad rows it skipped. InputError when a bad row meets
    ``--bad-rows error``, when every row is bad, or when more are bad than ``--max-bad-rows`` allows."""
    policy = policy or RowPolicy()
    out = Loaded([], [])
    for line, ex in iter_rows(source, split, policy):
        if isinstance(ex, BadRow):
            out.skipped.append(ex)
            continue
        if out.examples and (ex.label is None) != (out.examples[0].label is None):  # a file holds one kind
            raise InputError("mixes pairs (chosen/rejected) and unpaired rows (completion/label); use one kind per "
                             "file", path=source, line=line)
        out.examples.append(ex)
    bad, rows = len(out.skipped), len(out.skipped) + len(out.examples)
    if not rows:
        raise InputError("no rows", path=source)
    if not out.examples:
        raise InputError(f"every row is bad ({bad} rows; the first: {out.skipped[0]})", path=source)
    if bad > policy.cap(rows):
        raise InputError(f"{bad} of {rows} rows are bad, more than --max-bad-rows {policy.max_bad_rows:g} allows "
                         f"({policy.cap(rows)}); the first: {out.skipped[0]}", path=source)
    return out


def iter_rows(source: str, split: str = "train",
              policy: RowPolicy | None = None) -> Iterator[tuple[int, Example | BadRow]]:
    """(line or row number, its Example or the BadRow saying what is wrong), one row at a time. Under
    ``--bad-rows error`` the first bad row raises instead, suggesting ``--bad-rows skip``."""
    policy = policy or RowPolicy()
    policy.check()
    name, rows = _read(source, split)
    for line, row in rows:
        try:
            if isinstance(row, BadRow):
                raise row
            yield line, example(mapped(row, policy.columns, source, line), f"{name}:{line}", source, line)
        except BadRow as e:
            if policy.bad_rows != "skip":
                raise InputError(f"{e.what}; --bad-rows skip skips such rows", path=e.path, line=e.line,
                                 field=e.field) from None
            yield line, e


FILE_SUFFIXES = (".jsonl", ".json", ".parquet")  # read as files; any other source goes to datasets.load_dataset


def is_file_source(source: str) -> bool:
    """Whether ``source`` names a data file (by its suffix) rather than a ``datasets`` source."""
    return Path(source).suffix.lower() in FILE_SUFFIXES


def _read(source: str, split: str) -> tuple[str, Iterable[tuple[int, Any]]]:
    """(the name row ids start with, rows) of a data file or a ``datasets`` source."""
    path = Path(source)
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return path.name, _read_jsonl(path, source)
    if suffix in (".json", ".parquet"):
        return path.name, _read_file(path, source, split)
    return source.rstrip("/").rsplit("/", 1)[-1], _read_dataset(source, split)


def _read_jsonl(path: Path, source: str) -> Iterator[tuple[int, Any]]:
    """(1-based line, parsed row) of every non-blank line, streamed; an unparsable line comes as a BadRow.
    Lines are split on ``\\n`` only: U+2028 may sit inside a JSON string."""
    try:
        f = open(path, "rb")  # noqa: SIM115  (a generator: closed when the iteration ends)
    except OSError as e:
        raise InputError(f"cannot read file: {e.strerror or one_line(e)}", path=source) from None
    offset = 0
    with f:
        for number, raw in enumerate(f, 1):
            text = _decode(raw, source, number, offset)
            offset += len(raw)
            if not text.strip():
                continue
            try:
                yield number, json.loads(text)
            except json.JSONDecodeError as e:
                yield number, BadRow(f"invalid JSON: {e.msg} (column {e.colno})", kind="not_json", path=source,
                                     line=number)


def _read_file(path: Path, source: str, split: str) -> list[tuple[int, Any]]:
    """(row number, raw row) pairs of a Parquet or JSON file, 0-based."""
    if path.suffix.lower() == ".parquet":
        import pyarrow.parquet as pq

        try:
            return list(enumerate(pq.read_table(path).to_pylist()))
        except Exception as e:  # pyarrow raises its own types for missing or corrupt files
            raise InputError(f"cannot read Parquet: {one_line(e)}", path=source) from None
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise InputError(f"cannot read file: {e.strerror or one_line(e)}", path=source) from None
    try:
        obj = json.loads(_decode(raw, source))
    except json.JSONDecodeError as e:
        raise InputError(f"invalid JSON: {e.msg} (column {e.colno})", path=source, line=e.lineno) from None
    if isinstance(obj, dict):  # {"train": [...], "test": [...]} or {"data": [...]}
        obj = obj.get(split, obj.get("data"))
    if not isinstance(obj, list):
        raise InputError(f'expected a list of objects, {{"{split}": [...]}} or {{"data": [...]}}', path=source)
    return list(enumerate(obj))


def _decode(raw: bytes, source: str, line: int = 1, offset: int = 0) -> str:
    """``raw`` (from byte ``offset``, line ``line`` of the file) as UTF-8 text; InputError naming the line and
    the byte offset of a bad byte otherwise, so `xxd -s` finds it."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line += raw.count(b"\n", 0, e.start)
        column = e.start - (raw.rfind(b"\n", 0, e.start) + 1)
        raise InputError(f"not UTF-8 text: byte 0x{raw[e.start]:02x} at byte offset {offset + e.start} "
                         f"(byte {column} of the line)", path=source, line=line) from None


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
        raise InputError(f"cannot load dataset (split '{split}'): {one_line(e)}", path=source) from None
    return enumerate(ds)


@dataclass(frozen=True)
class PromptRow:
    """One prompt to generate from, with where it came from (for one-line errors)."""

    id: str            # "<file name>:<line>" like Example.id
    prompt: Content
    source: str        # the file or dataset given
    line: int          # JSONL line (1-based) or row (0-based)


def load_prompts(source: str, split: str = "train", policy: RowPolicy | None = None) -> list[PromptRow]:
    """Prompts of any data file preftune reads: rows with a ``prompt`` (string or messages), or pairs.

    Rows need no chosen/rejected; pairs without a ``prompt`` give their implicit one (shapes.implicit_prompt).

        rows = load_prompts("heldout.jsonl")          # InputError "<file>:<line>: field 'prompt': missing"
    """
    policy = policy or RowPolicy()
    policy.check()
    name, rows = _read(source, split)
    out = []
    for line, row in rows:
        try:
            if isinstance(row, BadRow):
                raise row
            row = mapped(row, policy.columns, source, line)
            prompt = row.get("prompt")
            if prompt is not None:
                check(prompt, "prompt", source, line)
            elif "chosen" in row and "rejected" in row:
                prompt = example(row, f"{name}:{line}", source, line).prompt  # implicit prompt of a pair
            else:
                raise BadRow("missing", kind="missing", path=source, line=line, field="prompt")
        except BadRow as e:  # a prompt file is small and hand-made: the first bad row stops it
            raise InputError(e.what, path=e.path, line=e.line, field=e.field) from None
        out.append(PromptRow(f"{name}:{line}", prompt, source, line))
    if not out:
        raise InputError("no rows", path=source)
    return out
