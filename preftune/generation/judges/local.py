"""Pointwise judges that run in this process: a Python function and a reward model.

    parse_judge("python:preftune.tinyworld:judge").score(["sort: 3 1 2 ="], [" 1 2 3"])   # [1.0]
    parse_judge("reward-model:rm/", cfg).score(prompts, completions)                        # cached on disk
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ...core.errors import InputError, one_line
from ...data.rows import Content, as_text
from .base import DiskCache, PointwiseJudge, check_scores, content_hash
from .registry import import_from_cwd, judge_kind


@judge_kind("python", mode="pointwise", usage="python:module:function")
def python_function(args: str) -> Callable[[str, str], float]:
    """``fn(prompt: str, completion: str) -> float`` from a module in the working directory or PYTHONPATH."""
    module_name, sep, fn_name = args.rpartition(":")
    if not sep or not module_name or not fn_name:
        raise ValueError
    try:
        module = import_from_cwd(module_name)
    except Exception as e:  # ModuleNotFoundError, or the module itself failing on import
        raise InputError(f"cannot import module {module_name!r}: {one_line(e)}", field="judge") from None
    fn = getattr(module, fn_name, None)
    if not callable(fn):
        raise InputError(f"module {module_name!r} has no function {fn_name!r}", field="judge")
    return fn


@judge_kind("reward-model", mode="pointwise", usage="reward-model:PATH", needs=("device", "cache_dir"))
def reward_model(args: str, device: str, cache_dir: Path) -> RewardModelJudge:
    if not args:
        raise ValueError
    if not (Path(args) / "config.json").exists():
        raise InputError("no reward model here (config.json missing)", path=args, field="judge")
    return RewardModelJudge(args, device=device, cache_dir=cache_dir)


class RewardModelJudge(PointwiseJudge):
    """A sequence-classification reward model with one output per sequence; loaded on first use."""

    def __init__(self, path: str, *, device: str, cache_dir: Path, batch_size: int = 8) -> None:
        self.path, self.device, self.cache_dir, self.batch_size = path, device, cache_dir, batch_size
        self._model: Any = None
        self._tok: Any = None
        self._cache: DiskCache | None = None

    def _load(self) -> None:
        if self._model is not None:
            return
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        from ...modeling.folder import check_model_folder
        from ...modeling.model import fingerprint

        check_model_folder(self.path, field="judge")  # what a wrong folder lacks, before transformers' own error
        try:
            tok = AutoTokenizer.from_pretrained(self.path)
            model = AutoModelForSequenceClassification.from_pretrained(self.path, use_safetensors=True,
                                                                       dtype=torch.float32)
        except Exception as e:
            raise InputError(f"cannot load reward model: {one_line(e)}", path=self.path, field="judge") from None
        if model.config.num_labels != 1:
            raise InputError(f"reward model gives {model.config.num_labels} scores per sequence; one is needed",
                             path=self.path, field="judge")
        if tok.pad_token_id is None:
            tok.pad_token = tok.eos_token
        if model.config.pad_token_id is None:  # the classifier reads the last non-pad token
            model.config.pad_token_id = tok.pad_token_id
        self._model, self._tok = model.to(self.device).eval(), tok
        # content of the weights, not their path: a retrained model saved over the folder gets a new cache
        identity = content_hash("reward-model", fingerprint(self.path, self.cache_dir), bool(tok.chat_template))
        self._cache = DiskCache(self.cache_dir, f"rm-{identity}")

    def _text(self, prompt: Content, completion: str) -> tuple[str, bool]:
        """(text, has_special_tokens): through the RM's chat template when it has one."""
        if getattr(self._tok, "chat_template", None):
            messages = list(prompt) if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
            messages.append({"role": "assistant", "content": completion})
            return self._tok.apply_chat_template(messages, tokenize=False), True
        return as_text(prompt) + completion, False

    def score(self, prompts: Sequence[Content], completions: Sequence[str]) -> list[float]:
        import torch

        self._load()
        assert self._cache is not None
        texts = [self._text(p, c) for p, c in zip(prompts, completions)]
        keys = [content_hash(t) for t in texts]
        cached = self._cache.load()
        todo = sorted({k: t for k, t in zip(keys, texts) if k not in cached}.items())
        new: dict[str, float] = {}
        for s in range(0, len(todo), self.batch_size):
            chunk = todo[s:s + self.batch_size]
            special = chunk[0][1][1]
            enc = self._tok([t for _, (t, _) in chunk], return_tensors="pt", padding=True,
                            add_special_tokens=not special).to(self.device)  # the template has its own BOS
            with torch.inference_mode():
                logits = self._model(**enc).logits  # (B, 1)
            if logits.shape != (len(chunk), 1):
                raise InputError(f"reward model returned shape {tuple(logits.shape)} for {len(chunk)} texts",
                                 path=self.path, field="judge")
            new.update({k: float(v) for (k, _), v in zip(chunk, logits[:, 0].tolist())})
        check_scores(self.spec, list(new.values()), len(new))  # NaN scores never reach the cache
        self._cache.add(new)
        return [cached.get(k, new.get(k)) for k in keys]
