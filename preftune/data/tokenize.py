"""Tokenization exactly as TRL's DPOTrainer does it, then truncation: prompt from the left, completions from the
right. A pair whose completions end up empty or identical is dropped and counted.

    pairs, stats = tokenize_examples(examples, tokenizer, max_length=512, max_prompt_length=256)
    ids = encode_prompts(prompt_rows, tokenizer)      # prompts for generation, encoded as training encodes them
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from ..core.errors import InputError
from .rows import Example, PromptRow, _one_line, as_text


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
