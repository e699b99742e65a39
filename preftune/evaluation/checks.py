"""A gate check's evidence: the candidate and the model it would replace each answer the check's prompts once
(greedy), and every judge scores both answers of every prompt. The rows are written once, whole; a re-run reads
them back instead of generating again.

    rows = answer_and_judge(model, tok, prompts, judges, max_new_tokens=32, out=Path("gate/safety.jsonl"))

The row format: docs/formats.md, Pipeline folder (``<check>.jsonl``); scores only from pointwise judges.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..core.errors import InputError
from ..core.files import read_jsonl, write_jsonl
from ..data.rows import PromptRow
from ..generation.judges import Judge
from ..generation.sampler import generate


def answer_and_judge(model: Any, tokenizer: Any, prompts: Sequence[PromptRow], judges: Sequence[Judge], *,
                     max_new_tokens: int, out: Path, reference_model: Any = None, seed: int = 0,
                     batch_size: int = 8) -> list[dict[str, Any]]:
    """Rows of one check (see the module docstring); ``out`` holds them once every judge has answered.

    The candidate is ``model``; the replaced model is ``reference_model``, or ``model`` with its adapter
    disabled (a LoRA candidate on the model it would replace). A judge that fails is one line naming it.
    """
    if out.exists():
        rows = read_jsonl(out)
        if len(rows) == len(prompts) and all(set(r["judges"]) == {j.spec for j in judges} for r in rows):
            return rows
    kw = dict(num_samples=1, max_new_tokens=max_new_tokens, temperature=0.0, seed=seed, batch_size=batch_size)
    candidate = [r["completions"][0] for r in generate(model, tokenizer, prompts, **kw)]
    if reference_model is None and not hasattr(model, "disable_adapter"):
        raise InputError("a gate check needs the model to replace: a LoRA candidate or a reference model",
                         field="gate")
    with model.disable_adapter() if reference_model is None else contextlib.nullcontext():
        replaced = [r["completions"][0] for r in generate(reference_model or model, tokenizer, prompts, **kw)]
    texts = [p.prompt for p in prompts]
    verdicts = {j.spec: j.prefer(texts, candidate, replaced) for j in judges}  # a judge failure raises here
    rows = [{"id": p.id, "prompt": p.prompt, "candidate": candidate[i], "replaced": replaced[i],
             "judges": {spec: {"candidate": sa[i] if sa else None, "replaced": sb[i] if sb else None,
                               "preference": prefs[i]} for spec, (prefs, sa, sb) in verdicts.items()}}
            for i, p in enumerate(prompts)]
    write_jsonl(out, rows)
    return rows
