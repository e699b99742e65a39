"""Tokenization exactly as TRL's DPOTrainer does it, then truncation: prompt from the left, completions from the
right. A pair whose completions end up empty or identical is dropped and counted; every pair's untruncated
lengths are kept, so a run can say what truncation cost and which ``--max-length`` would keep its pairs whole.

    pairs, stats = tokenize_examples(examples, tokenizer, max_length=512, max_prompt_length=256)
    print(stats.line("train", 512))                   # rows, kept, truncated, dropped, length percentiles
    ids = encode_prompts(prompt_rows, tokenizer)      # prompts for generation, encoded as training encodes them
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..core.errors import InputError, one_line
from .rows import Example, PromptRow, as_text

Encoded = tuple[list[int], list[int], list[int]]  # (prompt, chosen, rejected) ids, untruncated


class _NoLengthWarning(logging.Filter):
    """transformers warns "Token indices sequence length is longer than the specified maximum sequence length
    ... will result in indexing errors" whenever a text is longer than ``model_max_length``. preftune never feeds
    such a sequence to the model (it truncates to ``--max-length``, and says so on one line per split), so the
    warning only misleads."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Token indices sequence length is longer")


logging.getLogger("transformers.tokenization_utils_base").addFilter(_NoLengthWarning())


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
    skipped: dict[str, Any] = field(default_factory=dict)  # rows the row policy skipped (rows.Loaded.to_dict)
    max_length: int | None = None  # what ``--max-length auto`` resolved to
    lengths: list[tuple[int, int, int]] = field(default_factory=list, repr=False)  # untruncated (prompt, c, r)

    def to_dict(self) -> dict:
        auto = {"max_length": self.max_length} if self.max_length is not None else {}
        return {"rows": self.rows, "kept": self.kept, "truncated": self.truncated, "dropped": self.dropped,
                **self.skipped, **auto}

    def percentiles(self) -> dict[str, dict[str, int]]:
        """Token-length percentiles (nearest rank) of the prompts and of the completions, before truncation."""
        prompts = sorted(p for p, _, _ in self.lengths)
        completions = sorted(x for _, c, r in self.lengths for x in (c, r))
        return {name: {"p50": _rank(xs, 0.5), "p95": _rank(xs, 0.95), "max": xs[-1] if xs else 0}
                for name, xs in (("prompt", prompts), ("completion", completions))}

    def whole_at(self, share: float = 0.95, max_prompt_length: int | None = None) -> int:
        """The smallest ``--max-length`` that keeps ``share`` of the pairs whole (nothing cut). With the prompt
        limit at its default (half of max_length) a pair needs max(prompt + longer completion, 2 x prompt)."""
        limit = max_prompt_length
        need = sorted(max(p + max(c, r), 2 * p) if limit is None else min(p, limit) + max(c, r)
                      for p, c, r in self.lengths)
        return max(2, _rank(need, share))

    def line(self, split: str, max_length: int, max_prompt_length: int | None = None) -> str:
        """One console line: what truncation at ``max_length`` did to this split, and what would keep 95% whole."""
        q = self.percentiles()
        lens = "; ".join(f"{k} tokens p50 {v['p50']} / p95 {v['p95']} / max {v['max']}" for k, v in q.items())
        whole = self.whole_at(0.95, max_prompt_length)
        return (f"data {split}: {self.rows} rows, {self.kept} kept, {self.truncated} truncated, {self.dropped} "
                f"dropped at --max-length {max_length}; {lens}; --max-length {whole} keeps 95% of pairs whole")


def _rank(xs: list[int], q: float) -> int:
    return xs[max(0, math.ceil(q * len(xs)) - 1)] if xs else 0


def tokenize_examples(examples: Sequence[Example], tokenizer: Any, *, max_length: int, max_prompt_length: int,
                      apply_chat_template: bool = False, source: str = "") -> tuple[list[Pair], DataStats]:
    """Tokenize as TRL 1.16's DPOTrainer (``encode_examples``), then ``truncate``; InputError for no rows."""
    if not examples:
        raise InputError("no rows", path=source or None)
    encoded = encode_examples(examples, tokenizer, apply_chat_template=apply_chat_template, source=source)
    return truncate(examples, encoded, max_length=max_length, max_prompt_length=max_prompt_length, source=source)


def encode_examples(examples: Sequence[Example], tokenizer: Any, *, apply_chat_template: bool = False,
                    source: str = "") -> list[Encoded]:
    """Untruncated (prompt, chosen, rejected) ids per example, from prompt, prompt+chosen and prompt+rejected
    encoded as TRL's ``tokenize_fn`` does; the completion starts where prompt and prompt+completion diverge
    (chat templates, merges)."""
    plain = {i: ex for i, ex in enumerate(examples) if isinstance(ex.chosen, str) and not apply_chat_template}
    full = {}
    if plain:
        eos = tokenizer.eos_token
        if eos is None:
            raise InputError("the tokenizer has no eos_token", path=source or None)
        # TRL appends the EOS text to standard completions, then tokenizes with the tokenizer's default
        # add_special_tokens (BOS where the tokenizer adds one) -- batched here, same ids.
        texts = [(ex.prompt, ex.prompt + _with_eos(ex.chosen, eos), ex.prompt + _with_eos(ex.rejected, eos))
                 for ex in plain.values()]
        ids = [tokenizer(text=list(col))["input_ids"] for col in zip(*texts)]  # prompts, chosen, rejected
        full = {i: (list(p), list(c), list(r)) for i, p, c, r in zip(plain, *ids)}
    out = []
    for i, ex in enumerate(examples):
        p, c, r = full[i] if i in full else _encode_chat(ex, tokenizer, apply_chat_template, source)
        n = min(_common_prefix(p, c), _common_prefix(p, r))
        out.append((p[:n], c[n:], r[n:]))
    return out


def truncate(examples: Sequence[Example], encoded: Sequence[Encoded], *, max_length: int, max_prompt_length: int,
             source: str = "") -> tuple[list[Pair], DataStats]:
    """Cut each encoded pair to the lengths: the prompt from the left, completions from the right. A pair is
    dropped when a completion ends up empty, or both end up identical (nothing to compare)."""
    stats = DataStats(rows=len(examples), lengths=[(len(p), len(c), len(r)) for p, c, r in encoded])
    pairs = []
    for ex, (p, c, r) in zip(examples, encoded):
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


def use_chat_template(tok: Any, path: str) -> Any:
    """Give ``tok`` the chat template in ``path`` (``--chat-template``, TRL's ``chat_template_path``): a Jinja
    file, or a tokenizer folder that has one. Returns ``tok``."""
    where = Path(path)
    try:
        if where.is_dir():
            from transformers import AutoTokenizer

            text = AutoTokenizer.from_pretrained(str(where)).chat_template
            if not text:
                raise InputError("this tokenizer folder has no chat template either", path=path, field="chat_template")
        else:
            text = where.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise InputError(f"cannot read chat template: {getattr(e, 'strerror', None) or one_line(e)}",
                         path=path, field="chat_template") from None
    if not text.strip():
        raise InputError("empty chat template", path=path, field="chat_template")
    tok.chat_template = text
    return tok


NO_TEMPLATE = ("the tokenizer has no chat template, which message-list (conversational) rows need: give one with "
               "--chat-template FILE")
NO_TEMPLATE_WRAPPED = ("the tokenizer has no chat template, which --apply-chat-template needs to wrap "
                       "plain-string rows as user/assistant turns: give one with --chat-template FILE, or drop "
                       "--apply-chat-template")


def _with_eos(text: str, eos: str) -> str:
    return text if text.endswith(eos) else text + eos


def _encode_chat(ex: Example, tok: Any, wrapped: bool, source: str) -> tuple[list[int], list[int], list[int]]:
    prompt, chosen, rejected = ex.prompt, ex.chosen, ex.rejected
    if isinstance(prompt, str):  # apply_chat_template=True on standard data
        prompt = [{"role": "user", "content": prompt}]
        chosen = [{"role": "assistant", "content": chosen}]
        rejected = [{"role": "assistant", "content": rejected}]
    if not getattr(tok, "chat_template", None):
        raise InputError(NO_TEMPLATE_WRAPPED if wrapped else NO_TEMPLATE, path=source or None,
                         field="apply_chat_template" if wrapped else None)
    name, _, line = ex.id.rpartition(":")
    where = (source or name, int(line) if line.isdigit() else None)
    return tuple(_chat_ids(tok, prompt + tail, not tail, *where) for tail in ([], chosen, rejected))


def _chat_ids(tok: Any, messages: list, generation_prompt: bool, path: str, line: int | None) -> list[int]:
    try:
        ids = tok.apply_chat_template(messages, tokenize=True, return_dict=True,
                                      add_generation_prompt=generation_prompt)["input_ids"]
    except Exception as e:  # jinja errors from the template itself, e.g. "roles must alternate"
        raise InputError(f"chat template failed: {one_line(e)}", path=path, line=line) from None
    return list(ids)


def encode_prompts(rows: Sequence[PromptRow], tokenizer: Any, *, apply_chat_template: bool = False) -> list[list[int]]:
    """Prompt ids exactly as training encodes them: plain strings with the tokenizer's default special tokens,
    message lists (or wrapped strings) through the chat template with ``add_generation_prompt=True``."""
    out: list[list[int]] = []
    for r in rows:
        if isinstance(r.prompt, str) and not apply_chat_template:
            out.append(list(tokenizer(text=r.prompt)["input_ids"]))
            continue
        if not getattr(tokenizer, "chat_template", None):
            raise InputError(NO_TEMPLATE_WRAPPED if apply_chat_template else NO_TEMPLATE, path=r.source,
                             line=r.line)
        prompt = [{"role": "user", "content": r.prompt}] if isinstance(r.prompt, str) else r.prompt
        out.append(_chat_ids(tokenizer, prompt, True, r.source, r.line))
    return out


def _common_prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
