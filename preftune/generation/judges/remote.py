"""The pairwise HTTP judge: an OpenAI-compatible ``/chat/completions`` endpoint (hosted or local), urllib only.

    parse_judge("openai:gpt-4o-mini@https://api.openai.com/v1").compare(["q"], ["a"], ["b"])   # [0.5]

The exchange (both orders, a disagreement a tie: ``position_flips``), the key and what is never written, the
PREFTUNE_JUDGE_* settings and the one-line errors: docs/behaviour.md, Judges.
"""

from __future__ import annotations

import http.client
import json
import math
import os
import re
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from ...core.config import refuse_credentials
from ...core.errors import InputError, one_line
from ...data.rows import Content, as_text
from .base import DiskCache, PairwiseJudge, PointwiseJudge, content_hash
from .registry import judge_kind

JUDGE_PROMPT = (
    "You are comparing two responses to the same instruction. Pick the response that follows the instruction "
    "better: more helpful, correct and relevant. Ignore which one comes first and how long each one is.\n\n"
    "## Instruction\n{instruction}\n\n## Response 1\n{response_1}\n\n## Response 2\n{response_2}\n\n"
    'Answer with a single character: "1" if Response 1 is better, "2" if Response 2 is better.'
)
PROMPT_VERSION = 1  # bump when JUDGE_PROMPT changes: cached answers of another prompt are not reused
KEY_VARIABLES = ("PREFTUNE_JUDGE_API_KEY", "OPENAI_API_KEY")


@judge_kind("openai", mode="pairwise", usage="openai:MODEL@http(s)://HOST[:PORT]/PATH", needs=("cache_dir",),
            env=KEY_VARIABLES)
def openai_chat(args: str, cache_dir: Path) -> OpenAIJudge:
    return OpenAIJudge(*_model_at(args), cache_dir)


def _model_at(text: str) -> tuple[str, str]:
    """(MODEL, URL) from ``MODEL@http(s)://HOST[:PORT]/PATH``; ValueError (the kind's usage) for anything else."""
    model, sep, url = text.partition("@")
    parsed = urllib.parse.urlparse(url)
    if not sep or not model or parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise ValueError
    return model, url


class _Fatal(Exception):
    """An answer that retrying cannot fix (401, 403, 404, 400)."""


class ChatEndpoint:
    """One model behind an OpenAI-compatible ``/chat/completions`` URL: questions asked concurrently, each answer
    checked by ``parse`` (an answer that doesn't parse is retried, then a failure, never a default), answers cached
    by question, the key sent only in the header and cut out of every message."""

    def __init__(self, spec: str, model: str, base_url: str, cache_dir: Path, cache_name: str, max_tokens: int) -> None:
        refuse_credentials(base_url)
        self.spec, self.model, self.base_url, self.max_tokens = spec, model, base_url.rstrip("/"), max_tokens
        self.timeout = _env_float("PREFTUNE_JUDGE_TIMEOUT", 60.0)
        self.retries = int(_env_float("PREFTUNE_JUDGE_RETRIES", 4))
        self.backoff = _env_float("PREFTUNE_JUDGE_BACKOFF", 1.0)
        self.concurrency = max(1, int(_env_float("PREFTUNE_JUDGE_CONCURRENCY", 8)))
        # named without the key: the cache is shared by anyone asking the same model the same question
        self.cache = DiskCache(cache_dir, cache_name)
        self.calls = 0  # HTTP requests made (tests and logs: a cached re-run makes none)
        self._lock = threading.Lock()

    def _ask_once(self, content: str, parse: Callable[[str], str]) -> str:
        body = json.dumps({"model": self.model, "messages": [{"role": "user", "content": content}],
                           "temperature": 0, "max_tokens": self.max_tokens}).encode()
        req = urllib.request.Request(f"{self.base_url}/chat/completions", data=body,
                                     headers={"Content-Type": "application/json"}, method="POST")
        key = api_key()
        if key:  # never carried over a redirect to another host
            req.add_unredirected_header("Authorization", f"Bearer {key}")
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
        return parse(str(text))

    def ask(self, content: str, parse: Callable[[str], str]) -> str:
        """The parsed answer, or one line -- with the key cut out of whatever the server sent back (a body, an
        answer or a status line that echoes the request's headers)."""
        last = ""
        for attempt in range(self.retries + 1):
            try:
                return self._ask_once(content, parse)
            except _Fatal as e:
                raise InputError(redact(f"judge {self.spec}: {e}"), field="judge") from None
            # 5xx, 429, garbage, timeouts, refused connections, torn responses: worth another try
            except (RuntimeError, OSError, ValueError, http.client.HTTPException) as e:
                last = one_line(e)
                if attempt < self.retries:
                    time.sleep(self.backoff * 2**attempt)
        raise InputError(redact(f"judge {self.spec}: no usable answer after {self.retries + 1} tries ({last})"),
                         field="judge")

    def answers(self, todo: dict[str, str], parse: Callable[[str], str]) -> dict[str, str]:
        """Every cache key's answer: the cached ones, and the rest asked now (what was paid for is kept even when
        another request failed)."""
        cached = self.cache.load()
        got: dict[str, str] = {}
        failure: InputError | None = None
        with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            futures = {k: pool.submit(self.ask, c, parse) for k, c in todo.items() if k not in cached}
            for k, fut in futures.items():
                try:
                    got[k] = fut.result()
                except InputError as e:
                    failure = failure or e
        self.cache.add(got)
        if failure is not None:
            raise failure
        return cached


def _one_or_two(text: str) -> str:
    answer = text.strip().strip('".\'*').strip()
    if answer not in ("1", "2"):
        raise RuntimeError(f"answer {text[:40]!r} is neither '1' nor '2'")
    return answer


class OpenAIJudge(PairwiseJudge):
    """Pairwise over an OpenAI-compatible ``/chat/completions`` endpoint."""

    def __init__(self, model: str, base_url: str, cache_dir: Path) -> None:
        self.model = model
        name = f"openai-{content_hash('openai', model, base_url.rstrip('/'), PROMPT_VERSION)}"
        self.endpoint = ChatEndpoint("", model, base_url, cache_dir, name, max_tokens=4)

    @property
    def calls(self) -> int:
        return self.endpoint.calls

    def _asks(self, prompts: Sequence[str], a: Sequence[str], b: Sequence[str]) -> tuple[list[str], list[str]]:
        """(questions, cache keys): (a first, b first) for each comparison; "" where a and b are identical."""
        if not len(prompts) == len(a) == len(b):
            raise ValueError("prompts, a and b differ in length")
        contents = []
        for p, x, y in zip(prompts, a, b):  # identical responses are a tie by definition: nothing to pay for
            contents += [JUDGE_PROMPT.format(instruction=p, response_1=r1, response_2=r2) if x != y else ""
                         for r1, r2 in ((x, y), (y, x))]
        return contents, [content_hash(self.model, c) for c in contents]

    def position_flips(self, prompts: Sequence[Content], a: Sequence[str],
                       b: Sequence[str]) -> list[bool | None] | None:
        """Whether the answer changed side with the order: "1" both times (or "2" both times) is a flip."""
        contents, keys = self._asks([as_text(p) for p in prompts], a, b)
        cached = self.endpoint.cache.load()
        return [None if not contents[i] or keys[i] not in cached or keys[i + 1] not in cached else
                (cached[keys[i]] == "1") != (cached[keys[i + 1]] == "2") for i in range(0, len(keys), 2)]

    def compare(self, prompts: Sequence[str], a: Sequence[str], b: Sequence[str]) -> list[float]:
        self.endpoint.spec = self.spec
        contents, keys = self._asks(prompts, a, b)
        got = self.endpoint.answers({k: c for k, c in zip(keys, contents) if c}, _one_or_two)
        # a's wins over the two orders, halved: both 1, neither 0, a disagreement 0.5
        return [0.5 if not contents[i] else ((got.get(keys[i]) == "1") + (got.get(keys[i + 1]) == "2")) / 2
                for i in range(0, len(keys), 2)]


RUBRIC_PROMPT = (
    "Judge the response below against this rubric.\n\n## Rubric\n{rubric}\n\n## Instruction\n{instruction}\n\n"
    "## Response\n{response}\n\nAnswer on one line in exactly one of these forms: \"SCORE: N\" with N a whole "
    "number from 0 (worst) to 10 (best), or \"VERDICT: PASS\" or \"VERDICT: FAIL\"."
)
RUBRIC_VERSION = 1  # bump when RUBRIC_PROMPT changes


@judge_kind("openai-rubric", mode="pointwise", usage="openai-rubric:RUBRIC_FILE:MODEL@http(s)://HOST[:PORT]/PATH",
            needs=("cache_dir",), env=KEY_VARIABLES)
def openai_rubric(args: str, cache_dir: Path) -> RubricJudge:
    """A rubric (a text file: what a good or safe answer is) scored by an OpenAI-compatible model."""
    rubric_path, _, rest = args.partition(":")
    model, url = _model_at(rest)  # no ':' leaves rest empty: a ValueError too
    try:
        rubric = Path(rubric_path).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"cannot read the rubric: {getattr(e, 'strerror', None) or e}", path=rubric_path,
                         field="judge") from None
    if not rubric:
        raise InputError("the rubric file is empty: write what a good (or a safe) answer is", path=rubric_path,
                         field="judge")
    return RubricJudge(rubric, model, url, cache_dir)


def parse_rubric_answer(text: str) -> str:
    """``"0.7"`` from "SCORE: 7", ``"1"`` from "VERDICT: PASS", ``"0"`` from "VERDICT: FAIL"; RuntimeError (a
    retry, then a judge failure -- never a pass) for anything else."""
    line = text.strip().strip('".*`').strip().upper()
    if line.startswith("SCORE:"):
        n = line[len("SCORE:"):].strip()
        if n.isdigit() and 0 <= int(n) <= 10:
            return str(int(n) / 10)
    elif line in ("VERDICT: PASS", "VERDICT: FAIL"):
        return "1" if line.endswith("PASS") else "0"
    raise RuntimeError(f"answer {text[:40]!r} is neither 'SCORE: N' (0-10) nor 'VERDICT: PASS' / 'VERDICT: FAIL'")


class RubricJudge(PointwiseJudge):
    """Each answer scored alone against a rubric: SCORE 0-10 as 0-1, PASS as 1, FAIL as 0."""

    def __init__(self, rubric: str, model: str, base_url: str, cache_dir: Path) -> None:
        self.rubric, self.model = rubric, model
        name = f"rubric-{content_hash('rubric', model, base_url.rstrip('/'), rubric, RUBRIC_VERSION)}"
        self.endpoint = ChatEndpoint("", model, base_url, cache_dir, name, max_tokens=12)

    @property
    def calls(self) -> int:
        return self.endpoint.calls

    def score(self, prompts: Sequence[Content], completions: Sequence[str]) -> list[float]:
        self.endpoint.spec = self.spec
        contents = [RUBRIC_PROMPT.format(rubric=self.rubric, instruction=as_text(p), response=c)
                    for p, c in zip(prompts, completions)]
        keys = [content_hash(self.model, c) for c in contents]
        got = self.endpoint.answers(dict(zip(keys, contents)), parse_rubric_answer)
        return [float(got[k]) for k in keys]


def api_key() -> str | None:
    return next((os.environ[v] for v in KEY_VARIABLES if os.environ.get(v)), None)


def redact(text: str) -> str:
    """``text`` with the API key, and every prefix of it longer than 4 characters, replaced by ``[key]``: a
    server's echo cut at any length never shows a usable part of the key."""
    key = api_key()
    if not key:
        return text
    # the longest prefix first: regex alternatives are tried in order
    prefixes = (re.escape(key[:n]) for n in range(len(key), min(5, len(key)) - 1, -1))
    return re.sub("|".join(prefixes), "[key]", text)


def _env_float(name: str, default: float) -> float:
    raw = os.environ.get(name)
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise InputError(f"${name}={raw!r} is not a number", field="judge") from None
    if not math.isfinite(value) or value < 0:
        raise InputError(f"${name}={raw!r} must be a number >= 0", field="judge")
    return value
