"""Judges behind one interface, chosen by a SPEC string.

    reward-model:PATH            pointwise: an AutoModelForSequenceClassification reward model, batched, its own
                                 chat template applied when it has one; scores cached on disk by content
    python:module:function       pointwise: fn(prompt: str, completion: str) -> float (module from cwd/PYTHONPATH),
                                 e.g. python:preftune.tinyworld:judge, the tiny world's ground truth
    openai:MODEL@BASE_URL        pairwise: an OpenAI-compatible /chat/completions endpoint (hosted or local),
                                 key from $PREFTUNE_JUDGE_API_KEY or $OPENAI_API_KEY, never written anywhere

    judge = parse_judge("python:preftune.tinyworld:judge")
    judge.score(["sort: 3 1 2 ="], [" 1 2 3"])          # [1.0]

A pointwise judge has ``kind == "pointwise"`` and ``score(prompts, completions) -> list[float]``. The pairwise
judge has ``kind == "pairwise"`` and ``compare(prompts, a, b) -> list[float]``: 1 if a is better, 0 if b is,
0.5 for a tie. Each comparison is asked twice with the order swapped; disagreement is a tie, so position bias
(a judge that always answers "1") shows up as ties, never as wins.

HTTP judge settings come from the environment: PREFTUNE_JUDGE_TIMEOUT (s, 60), PREFTUNE_JUDGE_RETRIES (4),
PREFTUNE_JUDGE_BACKOFF (s, 1.0; doubled per retry), PREFTUNE_JUDGE_CONCURRENCY (8). Any failure is an
InputError: one line, exit code 2 from the CLI.
"""

from __future__ import annotations

import hashlib
import http.client
import importlib
import json
import math
import os
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from ..core.errors import InputError
from ..data.rows import as_text

KINDS = ("reward-model", "python", "openai")
JUDGE_PROMPT = (
    "You are comparing two responses to the same instruction. Pick the response that follows the instruction "
    "better: more helpful, correct and relevant. Ignore which one comes first and how long each one is.\n\n"
    "## Instruction\n{instruction}\n\n## Response 1\n{response_1}\n\n## Response 2\n{response_2}\n\n"
    'Answer with a single character: "1" if Response 1 is better, "2" if Response 2 is better.'
)
PROMPT_VERSION = 1  # bump when JUDGE_PROMPT changes: cached answers of another prompt are not reused


def cache_root() -> Path:
    """Where judge caches live: $PREFTUNE_CACHE or ~/.cache/preftune, under ``judges/``."""
    return Path(os.environ.get("PREFTUNE_CACHE") or Path.home() / ".cache" / "preftune") / "judges"


def _hash(*parts: Any) -> str:
    return hashlib.blake2b(json.dumps(parts, ensure_ascii=False).encode(), digest_size=16).hexdigest()


def _one_line(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0]


class _DiskCache:
    """Append-only JSONL of {key: value}: a re-run pays nothing twice; a torn last line is ignored."""

    def __init__(self, identity: str, root: Path | None = None) -> None:
        self.path = (root or cache_root()) / f"{identity}.jsonl"
        self._mem: dict[str, Any] | None = None

    def load(self) -> dict[str, Any]:
        if self._mem is None:
            self._mem = {}
            if self.path.exists():
                from ..core.files import read_jsonl

                for row in read_jsonl(self.path):
                    self._mem[row["k"]] = row["v"]
        return self._mem

    def add(self, items: dict[str, Any]) -> None:
        if not items:
            return
        self.load().update(items)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as f:  # one write of whole lines, then fsync
            f.write("".join(json.dumps({"k": k, "v": v}) + "\n" for k, v in items.items()))
            f.flush()
            os.fsync(f.fileno())


def _check_scores(spec: str, scores: Sequence[Any], n: int) -> list[float]:
    if len(scores) != n:
        raise InputError(f"judge returned {len(scores)} scores for {n} completions", field="judge")
    out = []
    for s in scores:
        if isinstance(s, bool) or not isinstance(s, (int, float)) or not math.isfinite(float(s)):
            raise InputError(f"judge {spec} returned {s!r}; a finite number is needed", field="judge")
        out.append(float(s))
    return out


# --- python:module:function ---------------------------------------------------------------------------------

class PythonJudge:
    """``fn(prompt: str, completion: str) -> float``; message-list prompts are passed as ``role: content`` text."""

    kind = "pointwise"

    def __init__(self, spec: str, fn: Callable[[str, str], float]) -> None:
        self.spec, self.fn = spec, fn

    def score(self, prompts: Sequence[Any], completions: Sequence[str]) -> list[float]:
        if len(prompts) != len(completions):
            raise ValueError("prompts and completions differ in length")
        out = []
        for p, c in zip(prompts, completions):
            try:
                s = self.fn(as_text(p), c)
            except Exception as e:  # the user's function failed: report it as bad input, one line
                raise InputError(f"judge {self.spec} raised {type(e).__name__}: {_one_line(e)}",
                                 field="judge") from None
            out.append(s)
        return _check_scores(self.spec, out, len(completions))


def _python_judge(spec: str, rest: str) -> PythonJudge:
    module_name, sep, fn_name = rest.rpartition(":")
    if not sep or not module_name or not fn_name:
        raise InputError(f"cannot parse {spec!r}: expected python:module:function", field="judge")
    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # "module from the working directory", as `python -m` would find it
    try:
        module = importlib.import_module(module_name)
    except Exception as e:  # ModuleNotFoundError, or the module itself failing on import
        raise InputError(f"cannot import module {module_name!r}: {_one_line(e)}", field="judge") from None
    fn = getattr(module, fn_name, None)
    if not callable(fn):
        raise InputError(f"module {module_name!r} has no function {fn_name!r}", field="judge")
    return PythonJudge(spec, fn)


# --- reward-model:PATH --------------------------------------------------------------------------------------

class RewardModelJudge:
    """A sequence-classification reward model with one output per sequence; loaded on first use."""

    kind = "pointwise"

    def __init__(self, spec: str, path: str, *, device: str = "cpu", batch_size: int = 8) -> None:
        self.spec, self.path, self.device, self.batch_size = spec, path, device, batch_size
        self._model: Any = None
        self._tok: Any = None
        self._cache: _DiskCache | None = None

    def _load(self) -> None:
        if self._model is not None:
            return
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        from ..modeling.model import fingerprint

        try:
            tok = AutoTokenizer.from_pretrained(self.path)
            model = AutoModelForSequenceClassification.from_pretrained(self.path, use_safetensors=True,
                                                                       dtype=torch.float32)
        except Exception as e:
            raise InputError(f"cannot load reward model: {_one_line(e)}", path=self.path, field="judge") from None
        if model.config.num_labels != 1:
            raise InputError(f"reward model gives {model.config.num_labels} scores per sequence; one is needed",
                             path=self.path, field="judge")
        if tok.pad_token_id is None:
            tok.pad_token = tok.eos_token
        if model.config.pad_token_id is None:  # the classifier reads the last non-pad token
            model.config.pad_token_id = tok.pad_token_id
        self._model, self._tok = model.to(self.device).eval(), tok
        # content of the weights, not their path: a retrained model saved over the folder gets a new cache
        identity = _hash("reward-model", fingerprint(self.path, cache_root().parent), bool(tok.chat_template))
        self._cache = _DiskCache(f"rm-{identity}")

    def _text(self, prompt: Any, completion: str) -> tuple[str, bool]:
        """(text, has_special_tokens): through the RM's chat template when it has one."""
        if getattr(self._tok, "chat_template", None):
            messages = list(prompt) if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
            messages.append({"role": "assistant", "content": completion})
            return self._tok.apply_chat_template(messages, tokenize=False), True
        return as_text(prompt) + completion, False

    def score(self, prompts: Sequence[Any], completions: Sequence[str]) -> list[float]:
        import torch

        self._load()
        assert self._cache is not None
        texts = [self._text(p, c) for p, c in zip(prompts, completions)]
        keys = [_hash(t) for t in texts]
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
        _check_scores(self.spec, list(new.values()), len(new))  # NaN scores never reach the cache
        self._cache.add(new)
        return _check_scores(self.spec, [cached.get(k, new.get(k)) for k in keys], len(completions))


def _reward_model_judge(spec: str, rest: str, device: str) -> RewardModelJudge:
    if not rest:
        raise InputError(f"cannot parse {spec!r}: expected reward-model:PATH", field="judge")
    if not (Path(rest) / "config.json").exists():
        raise InputError("no reward model here (config.json missing)", path=rest, field="judge")
    return RewardModelJudge(spec, rest, device=device)


# --- openai:MODEL@BASE_URL ----------------------------------------------------------------------------------

class _Fatal(Exception):
    """An answer that retrying cannot fix (401, 403, 404, 400)."""


class OpenAIJudge:
    """Pairwise over an OpenAI-compatible ``/chat/completions`` endpoint, with urllib only."""

    kind = "pairwise"

    def __init__(self, spec: str, model: str, base_url: str) -> None:
        self.spec, self.model, self.base_url = spec, model, base_url.rstrip("/")
        self.timeout = _env_float("PREFTUNE_JUDGE_TIMEOUT", 60.0)
        self.retries = int(_env_float("PREFTUNE_JUDGE_RETRIES", 4))
        self.backoff = _env_float("PREFTUNE_JUDGE_BACKOFF", 1.0)
        self.concurrency = max(1, int(_env_float("PREFTUNE_JUDGE_CONCURRENCY", 8)))
        # identity without the key: the cache is shared by anyone asking the same model the same question
        self._cache = _DiskCache(f"openai-{_hash('openai', model, self.base_url, PROMPT_VERSION)}")
        self.calls = 0  # HTTP requests made (tests and logs: a cached re-run makes none)
        self._lock = threading.Lock()

    @staticmethod
    def _key() -> str | None:
        return os.environ.get("PREFTUNE_JUDGE_API_KEY") or os.environ.get("OPENAI_API_KEY") or None

    def _ask_once(self, content: str) -> str:
        body = json.dumps({"model": self.model, "messages": [{"role": "user", "content": content}],
                           "temperature": 0, "max_tokens": 4}).encode()
        headers = {"Content-Type": "application/json"}
        key = self._key()
        if key:
            headers["Authorization"] = f"Bearer {key}"
        req = urllib.request.Request(f"{self.base_url}/chat/completions", data=body, headers=headers, method="POST")
        with self._lock:
            self.calls += 1
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as e:
            if e.code in (400, 401, 403, 404):
                raise _Fatal(f"HTTP {e.code} {e.reason}") from None
            raise RuntimeError(f"HTTP {e.code} {e.reason}") from None
        try:
            text = json.loads(raw)["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError):
            raise RuntimeError(f"not a chat-completions answer: {raw[:60]!r}") from None
        answer = str(text).strip().strip('".\'*').strip()
        if answer not in ("1", "2"):
            raise RuntimeError(f"answer {str(text)[:40]!r} is neither '1' nor '2'")
        return answer

    def _ask(self, content: str) -> str:
        last = ""
        for attempt in range(self.retries + 1):
            try:
                return self._ask_once(content)
            except _Fatal as e:
                raise InputError(f"judge {self.spec}: {e}", field="judge") from None
            # 5xx, 429, garbage, timeouts, refused connections, torn responses: worth another try
            except (RuntimeError, OSError, http.client.HTTPException) as e:
                last = _one_line(e)
                if attempt < self.retries:
                    time.sleep(self.backoff * 2**attempt)
        raise InputError(f"judge {self.spec}: no usable answer after {self.retries + 1} tries ({last})",
                         field="judge")

    def compare(self, prompts: Sequence[str], a: Sequence[str], b: Sequence[str]) -> list[float]:
        if not len(prompts) == len(a) == len(b):
            raise ValueError("prompts, a and b differ in length")
        contents = []
        for p, x, y in zip(prompts, a, b):  # (a first, b first) for each comparison
            if x == y:  # identical responses are a tie by definition: nothing to pay for
                contents += ["", ""]
                continue
            contents.append(JUDGE_PROMPT.format(instruction=p, response_1=x, response_2=y))
            contents.append(JUDGE_PROMPT.format(instruction=p, response_1=y, response_2=x))
        keys = [_hash(self.model, c) for c in contents]
        cached = self._cache.load()
        todo = {k: c for k, c in zip(keys, contents) if c and k not in cached}
        answers: dict[str, str] = {}
        if todo:
            failure: InputError | None = None
            with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
                futures = {k: pool.submit(self._ask, c) for k, c in todo.items()}
                for k, fut in futures.items():
                    try:
                        answers[k] = fut.result()
                    except InputError as e:
                        failure = failure or e
            self._cache.add(answers)  # what was paid for is kept even when another request failed
            if failure is not None:
                raise failure
        out = []
        for i in range(0, len(keys), 2):
            if not contents[i]:
                out.append(0.5)
                continue
            first = cached.get(keys[i], answers.get(keys[i]))
            second = cached.get(keys[i + 1], answers.get(keys[i + 1]))
            a_wins_first, a_wins_second = first == "1", second == "2"
            out.append(1.0 if a_wins_first and a_wins_second else
                       0.0 if not a_wins_first and not a_wins_second else 0.5)
        return out


def _env_float(name: str, default: float) -> float:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise InputError(f"${name}={raw!r} is not a number", field="judge") from None
    if not math.isfinite(value) or value < 0:
        raise InputError(f"${name}={raw!r} must be a number >= 0", field="judge")
    return value


def _openai_judge(spec: str, rest: str) -> OpenAIJudge:
    model, sep, url = rest.partition("@")
    parsed = urllib.parse.urlparse(url)
    if not sep or not model or parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise InputError(f"cannot parse {spec!r}: expected openai:MODEL@http(s)://HOST[:PORT]/PATH", field="judge")
    return OpenAIJudge(spec, model, url)


# --- the registry -------------------------------------------------------------------------------------------

Judge = PythonJudge | RewardModelJudge | OpenAIJudge


def parse_judge(spec: str, *, device: str = "cpu") -> Judge:
    """A judge from its SPEC; bad specs, missing modules or functions and missing model folders raise InputError.

    The reward model itself loads on first use; everything that can be checked without loading it is checked here.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise InputError("empty judge spec", field="judge")
    kind, sep, rest = spec.strip().partition(":")
    if not sep or kind not in KINDS:
        raise InputError(f"cannot parse {spec!r}: expected one of reward-model:PATH, python:module:function, "
                         "openai:MODEL@BASE_URL", field="judge")
    if kind == "python":
        return _python_judge(spec, rest)
    if kind == "reward-model":
        return _reward_model_judge(spec, rest, device)
    return _openai_judge(spec, rest)
