"""Every row shape TRL's DPOTrainer and KTOTrainer accept, validated into an :class:`Example`; a row that is wrong
raises :class:`BadRow`, which says what is wrong in words ("whitespace only") and which kind of bad it is, so the
row policy (rows.py) can stop on it or skip and count it.

    example("train.jsonl:3", {"chosen": "\\n\\nHuman: hi\\n\\nAssistant: hello", "rejected": "..."}, "train.jsonl", 3)

The shapes: docs/data.md, Rows. For plain strings an implicit prompt ends at the last turn boundary both
sides share (:data:`TURN`), never inside a word: docs/data.md, "Implicit prompts".
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from ..core.errors import InputError

Content = str | list  # a string, or a list of {role, content} messages
FIELDS = ("prompt", "chosen", "rejected", "completion", "label")  # what --columns may map
# Where an assistant turn starts in a plain-string dialogue; the prompt ends right after the last one both
# sides share: a line starting with "Assistant:" (or "### Assistant:", "### Response:"), or the chat markers
# "<|assistant|>", "<|im_start|>assistant" and "[/INST]".
TURN = re.compile(r"(?:^|\n)[ \t]*(?:#+[ \t]*)?(?:assistant|response)[ \t]*:"
                  r"|<\|assistant\|>|<\|im_start\|>assistant\n?|\[/INST\]", re.IGNORECASE)


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


class BadRow(InputError):
    """A row the row policy may skip. ``kind``: empty, whitespace, missing, not_json, not_object, wrong_type,
    bad_message, identical, mixed_forms, no_turn_boundary; ``what``: the message without file and line."""

    def __init__(self, what: str, *, kind: str, path: str, line: int, field: str | None = None) -> None:
        super().__init__(what, path=path, line=line, field=field)
        self.what, self.kind = what, kind


def as_text(content: Content) -> str:
    """A prompt or completion as plain text: a string as is, chat messages as "role: content" lines."""
    if isinstance(content, str):
        return content
    return "\n".join(f"{m['role']}: {m['content']}" for m in content)


def mapped(row: Any, columns: dict[str, str], source: str, line: int) -> dict:
    """The row with the file's column names mapped to preftune's (``--columns prompt=question``)."""
    if not isinstance(row, dict):
        raise BadRow(f"row must be an object, got {type(row).__name__}", kind="not_object", path=source, line=line)
    if not columns:
        return row
    missing = [f"'{col}'" for col in columns.values() if col not in row]
    if missing:
        raise BadRow(f"column {', '.join(missing)} (--columns) not found; the row has columns: "
                     f"{', '.join(map(str, row)) or 'none'}", kind="missing", path=source, line=line)
    return {**{k: v for k, v in row.items() if k not in columns}, **{k: row[col] for k, col in columns.items()}}


def example(row: dict, id: str, source: str, line: int) -> Example:
    """The Example a row holds, in whichever shape; BadRow naming file, line and field otherwise."""
    if "completion" in row or "label" in row:
        return _unpaired(row, id, source, line)
    for field in ("chosen", "rejected"):
        if field not in row:
            raise BadRow(f"missing (the row has columns: {', '.join(map(str, row)) or 'none'}; --columns "
                         f"{field}=NAME maps yours)", kind="missing", path=source, line=line, field=field)
        check(row[field], field, source, line)
    chosen, rejected = row["chosen"], row["rejected"]
    conversational = isinstance(chosen, list)
    if isinstance(rejected, list) != conversational:
        raise BadRow("chosen and rejected must both be strings or both message lists", kind="mixed_forms",
                     path=source, line=line, field="rejected")
    if chosen == rejected:
        raise BadRow("identical to chosen", kind="identical", path=source, line=line, field="rejected")
    if row.get("prompt") is None:
        prompt, chosen, rejected = implicit_prompt(chosen, rejected, source, line)
        for field, value in (("chosen", chosen), ("rejected", rejected)):
            check(value, field, source, line)
    else:
        prompt = row["prompt"]
        check(prompt, "prompt", source, line)
        if isinstance(prompt, list) != conversational:
            kind = "a list of messages" if conversational else "a string"
            raise BadRow(f"must be {kind}, like chosen and rejected", kind="mixed_forms", path=source, line=line,
                         field="prompt")
    return Example(id, prompt, chosen, rejected)


def _unpaired(row: dict, id: str, source: str, line: int) -> Example:
    """A thumbs-up/down row: ``{"prompt", "completion", "label": true|false}`` (text or messages), as TRL's KTO."""
    for field in ("prompt", "completion"):
        if row.get(field) is None:
            raise BadRow("missing (an unpaired row has prompt, completion and label)", kind="missing", path=source,
                         line=line, field=field)
        check(row[field], field, source, line)
    if not isinstance(row.get("label"), bool):
        got = "missing" if "label" not in row else f"{row['label']!r} is not true/false"
        raise BadRow(f"{got}: an unpaired row's label says thumbs up (true) or down (false)",
                     kind="missing" if "label" not in row else "wrong_type", path=source, line=line, field="label")
    if isinstance(row["prompt"], list) != isinstance(row["completion"], list):
        raise BadRow("prompt and completion must both be strings or both message lists", kind="mixed_forms",
                     path=source, line=line, field="completion")
    return Example(id, row["prompt"], row["completion"], row["completion"], row["label"])


def check(value: Any, field: str, source: str, line: int) -> None:
    """A prompt or completion: a string with some text, or a list of messages each with a role and some content."""
    if isinstance(value, str):
        if not value.strip():
            raise BadRow("whitespace only" if value else "empty", kind="whitespace" if value else "empty",
                         path=source, line=line, field=field)
        return
    if not isinstance(value, list):
        raise BadRow(f"must be a string or a list of messages, got {type(value).__name__}", kind="wrong_type",
                     path=source, line=line, field=field)
    if not value:
        raise BadRow("an empty list of messages", kind="empty", path=source, line=line, field=field)
    for i, m in enumerate(value):
        ok = isinstance(m, dict) and isinstance(m.get("role"), str) and m["role"].strip()
        if not ok or not isinstance(m.get("content"), str):
            raise BadRow("each message needs a non-empty string 'role' and 'content'", kind="bad_message",
                         path=source, line=line, field=f"{field}[{i}]")
        if not m["content"].strip():
            raise BadRow("content is whitespace only" if m["content"] else "content is empty",
                         kind="whitespace" if m["content"] else "empty", path=source, line=line, field=f"{field}[{i}]")


def implicit_prompt(chosen: Content, rejected: Content, source: str, line: int) -> tuple[Content, Content, Content]:
    """(prompt, chosen, rejected) of a pair whose prompt is the shared beginning of chosen and rejected."""
    if isinstance(chosen, list):
        prompt, chosen, rejected = _message_prefix(chosen, rejected)
        if not prompt:
            raise BadRow("missing, and chosen and rejected share no leading messages to take it from",
                         kind="missing", path=source, line=line, field="prompt")
        return prompt, chosen, rejected
    end = turn_boundary(chosen, rejected)
    if end is None:
        raise BadRow("missing, and chosen and rejected are plain strings whose shared beginning has no turn boundary "
                     "(a line starting with 'Assistant:') to end a prompt at: add a 'prompt' column (--columns "
                     "prompt=NAME), or give chosen and rejected as message lists", kind="no_turn_boundary",
                     path=source, line=line, field="prompt")
    return chosen[:end], chosen[end:], rejected[end:]


def turn_boundary(a: str, b: str) -> int | None:
    """Where the prompt of two plain-string dialogues ends: just after the last assistant-turn marker inside
    their common prefix; None when there is none. ``trl.data_utils.extract_prompt`` cuts at the first differing
    character instead (one space back), which lands inside a word when the two answers begin alike."""
    lo, hi = 0, min(len(a), len(b))
    while lo < hi:  # the common prefix's length by bisection: each test is one C-level comparison
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if a[:mid] == b[:mid] else (lo, mid - 1)
    ends = [m.end() for m in TURN.finditer(a, 0, lo)]
    return ends[-1] if ends else None


def _message_prefix(chosen: list, rejected: list) -> tuple[list, list, list]:
    """Longest common message prefix as prompt; mirrors trl.data_utils.extract_prompt.

    Like TRL, when one conversation is a prefix of the other, the shorter one keeps its last turn as completion.
    """
    n = min(len(chosen), len(rejected))
    idx = next((i for i in range(n) if chosen[i] != rejected[i]), n - 1)
    return chosen[:idx], chosen[idx:], rejected[idx:]
