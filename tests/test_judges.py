"""Judges: the python judge, a tiny reward model built here, the HTTP judge against a local server."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from preftune.commands.cli import main
from preftune.core.config import Config
from preftune.core.errors import InputError
from preftune.generation.judges import JUDGE_PROMPT, PairwiseJudge, PointwiseJudge, parse_judge
from preftune.tinyworld import judge as tiny_judge

KEY = "sk-test-NEVER-WRITE-ME-4242"


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PREFTUNE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("PREFTUNE_JUDGE_BACKOFF", "0")
    monkeypatch.setenv("PREFTUNE_JUDGE_TIMEOUT", "5")
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("PREFTUNE_JUDGE_API_KEY", raising=False)


# --- python and the tiny world's ground truth ---------------------------------------------------------------

def test_tiny_world_judge_is_graded():
    assert tiny_judge("sort: 7 3 9 1 =", " 1 3 7 9") == 1.0
    assert tiny_judge("sort: 7 3 9 1 =", " 1 3 7 9 there you go") == 1.0  # filler is neutral
    assert tiny_judge("sort: 7 3 9 1 =", " 1 3 9 7") == 0.5              # 2 of 4 positions
    assert tiny_judge("sort: 7 3 9 1 =", " 1 3 7") == 0.75               # 3 right of max(4, 3)
    assert tiny_judge("sort: 7 3 9 1 =", " 1 3 7 9 9") == 0.8            # 4 right of max(4, 5)
    assert tiny_judge("sort: 7 3 9 1 =", " ok") == 0.0
    assert tiny_judge("user:\nsort: 2 1 =</s>\nassistant:\n", "1 2") == 1.0  # chat-rendered prompt
    with pytest.raises(ValueError):
        tiny_judge("what is the sky?", " blue")


def test_python_judge_scores_and_spec_errors():
    j = parse_judge("python:preftune.tinyworld:judge")
    assert isinstance(j, PointwiseJudge) and j.spec == "python:preftune.tinyworld:judge"
    assert j.score(["sort: 3 1 2 =", "sort: 3 1 2 ="], [" 1 2 3", " 3 2 1"]) == [1.0, 1 / 3]
    assert j.score([[{"role": "user", "content": "sort: 2 1 ="}]], [" 1 2"]) == [1.0]  # messages as text
    for spec, msg in [("", "empty judge spec"), ("magic:x", "cannot parse 'magic:x'"), ("nonsense", "cannot parse"),
                      ("pyhton:a:b", "unknown judge kind 'pyhton' (did you mean 'python'?)"),
                      ("reward-modle:x", "(did you mean 'reward-model'?)"), ("reward-model:", "expected reward-model:PATH"),
                      ("os:path:x", "module 'os' registers no judge kind 'path'"),
                      ("python:onlyone", "expected python:module:function"),
                      ("python:no_such_mod_q:f", "cannot import module 'no_such_mod_q'"),
                      ("python:preftune.tinyworld:VARIANTS", "has no function 'VARIANTS'"),
                      ("openai:gpt", "expected openai:MODEL@http"), ("openai:@http://h/v1", "expected openai:MODEL"),
                      ("openai:m@ftp://h/v1", "expected openai:MODEL"), ("reward-model:/no/such/dir", "config.json")]:
        with pytest.raises(InputError, match="field 'judge'") as e:
            parse_judge(spec)
        assert msg in str(e.value)
    with pytest.raises(InputError, match="raised ValueError: not a tiny-world sorting prompt"):
        j.score(["hello"], [" 1"])


def test_one_interface_written_once_per_mode():
    """prefer and score_groups: a pointwise judge ties equal scores, a pairwise one scores K by round robin."""
    j = parse_judge("python:preftune.tinyworld:judge")
    assert j.prefer(["sort: 2 1 ="] * 3, [" 1 2", " 2 1", " 1 2"], [" 2 1", " 1 2", " 1 2"]) == \
        ([1.0, 0.0, 0.5], [1.0, 0.0, 1.0], [0.0, 1.0, 1.0])
    assert j.score_groups(["sort: 2 1 =", "sort: 3 ="], [[" 1 2", " 2 1"], [" 3"]]) == [[1.0, 0.0], [1.0]]

    class Longer(PairwiseJudge):
        def compare(self, prompts, a, b):
            return [1.0 if len(x) > len(y) else 0.0 if len(x) < len(y) else 0.7 for x, y in zip(a, b)]

    assert Longer().prefer([[{"role": "user", "content": "q"}]], ["aa"], ["b"]) == ([1.0], None, None)
    assert Longer().score_groups(["q"], [["a", "bbb", "cc"]]) == [[0.0, 1.0, 0.5]]  # mean over the other two
    with pytest.raises(InputError, match=r"returned 0.7; 1, 0.5 or 0 is needed"):
        Longer().prefer(["q"], ["a"], ["b"])


# --- reward-model -------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def reward_model_dir(tiny_world, tmp_path_factory):
    from transformers import AutoTokenizer, LlamaConfig, LlamaForSequenceClassification

    tok = AutoTokenizer.from_pretrained(tiny_world.model_dir)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256, num_labels=1,
                      pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("rm")
    LlamaForSequenceClassification(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def test_reward_model_judge_uses_the_chat_template_batches_and_caches(reward_model_dir, tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    prompts = ["sort: 3 1 2 =", "sort: 9 8 =", "sort: 5 =", "sort: 3 1 2 ="]
    comps = [" 1 2 3", " 8 9 ok", " 5 there you go", " 3 2 1"]
    j = parse_judge(f"reward-model:{reward_model_dir}")
    got = j.score(prompts, comps)
    # by hand: template with user/assistant turns, tokenized without extra BOS, the last token's score, one by one
    tok = AutoTokenizer.from_pretrained(reward_model_dir)
    rm = AutoModelForSequenceClassification.from_pretrained(reward_model_dir).eval()
    want = []
    for p, c in zip(prompts, comps):
        text = tok.apply_chat_template([{"role": "user", "content": p}, {"role": "assistant", "content": c}],
                                       tokenize=False)
        ids = tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
        assert ids[0, 0].item() == tok.bos_token_id and (ids == tok.bos_token_id).sum() == 1
        with torch.no_grad():
            want.append(rm(input_ids=ids).logits[0, 0].item())
    assert got == pytest.approx(want, abs=1e-5)
    assert len(set(got)) == 4
    # a re-run is served from the disk cache: a fresh judge, the model never called
    again = parse_judge(f"reward-model:{reward_model_dir}")
    again._load()
    calls = []
    again._model.register_forward_pre_hook(lambda *a: calls.append(1))
    assert again.score(prompts, comps) == got
    assert calls == []
    assert list((tmp_path / "cache" / "judges").glob("rm-*.jsonl"))
    # the config's cache folder holds the scores and the weights' fingerprint memo
    own = parse_judge(f"reward-model:{reward_model_dir}", Config(cache_dir=str(tmp_path / "own"), device="cpu"))
    assert own.score(prompts, comps) == got
    assert list((tmp_path / "own" / "judges").glob("rm-*.jsonl")) and (tmp_path / "own" / "fingerprints.json").exists()


def test_reward_model_with_two_outputs_is_rejected(reward_model_dir, tmp_path):
    from transformers import AutoConfig, AutoTokenizer, LlamaForSequenceClassification

    cfg = AutoConfig.from_pretrained(reward_model_dir)
    cfg.num_labels = 2
    LlamaForSequenceClassification(cfg).save_pretrained(tmp_path / "rm2")
    AutoTokenizer.from_pretrained(reward_model_dir).save_pretrained(tmp_path / "rm2")
    with pytest.raises(InputError, match="reward model gives 2 scores per sequence; one is needed"):
        parse_judge(f"reward-model:{tmp_path / 'rm2'}").score(["sort: 1 ="], [" 1"])


# --- openai: a local OpenAI-compatible server ---------------------------------------------------------------

class _Server:
    """A chat-completions endpoint on 127.0.0.1 whose answers the test scripts with ``behaviour``."""

    def __init__(self, behaviour):
        self.behaviour, self.requests, self.auth = behaviour, [], []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 (http.server's name)
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                server.requests.append(body)
                server.auth.append(self.headers.get("Authorization"))
                status, payload = server.behaviour(body, len(server.requests))
                if status == "sleep":
                    time.sleep(1.0)
                    status, payload = 200, "1"
                raw = payload if isinstance(payload, bytes) else json.dumps(
                    {"choices": [{"message": {"role": "assistant", "content": payload}}]}).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(raw)))
                    self.end_headers()
                    self.wfile.write(raw)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client timed out and left

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


def _longer_wins(body, _n):
    """Prefers the longer response: a consistent judge, whichever order it is shown."""
    text = body["messages"][0]["content"]
    r1 = text.split("## Response 1\n")[1].split("\n\n## Response 2")[0]
    r2 = text.split("## Response 2\n")[1].split("\n\nAnswer with")[0]
    return 200, "1" if len(r1) >= len(r2) else "2"


def test_openai_judge_swaps_order_and_always_1_gives_only_ties(tmp_path, monkeypatch):
    monkeypatch.setenv("PREFTUNE_JUDGE_API_KEY", KEY)
    with _Server(lambda body, n: (200, "1")) as srv:
        j = parse_judge(f"openai:judge-model@{srv.url}")
        assert isinstance(j, PairwiseJudge)
        assert j.compare(["q1", "q2"], ["a", "long answer"], ["bb", "x"]) == [0.5, 0.5]
        assert len(srv.requests) == 4 and set(srv.auth) == {f"Bearer {KEY}"}
        assert srv.requests[0]["model"] == "judge-model"
        shown = {r["messages"][0]["content"] for r in srv.requests}  # concurrent: any arrival order
        assert shown == {JUDGE_PROMPT.format(instruction=q, response_1=x, response_2=y)
                         for q, x, y in [("q1", "a", "bb"), ("q1", "bb", "a"),
                                         ("q2", "long answer", "x"), ("q2", "x", "long answer")]}
    with _Server(_longer_wins) as srv:
        j = parse_judge(f"openai:judge-model@{srv.url}")
        assert j.compare(["q1", "q2", "q3"], ["a", "long answer", "same"], ["bb", "x", "same"]) == [0.0, 1.0, 0.5]
        assert len(srv.requests) == 4  # "same" vs "same" is a tie without asking
        # a re-run pays nothing: every answer is in the disk cache
        j2 = parse_judge(f"openai:judge-model@{srv.url}")
        assert j2.compare(["q1", "q2", "q3"], ["a", "long answer", "same"], ["bb", "x", "same"]) == [0.0, 1.0, 0.5]
        assert j2.calls == 0 and len(srv.requests) == 4
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert written and all(KEY not in p.read_text(errors="replace") for p in written)


def test_openai_judge_retries_500_then_succeeds(monkeypatch):
    monkeypatch.setenv("PREFTUNE_JUDGE_CONCURRENCY", "1")
    with _Server(lambda body, n: (500, b"oops") if n <= 2 else (200, "2")) as srv:
        j = parse_judge(f"openai:m@{srv.url}")
        assert j.compare(["q"], ["a"], ["b"]) == [0.5]  # "2" in both orders: position bias, a tie
        assert len(srv.requests) == 4  # 2 failures + the 2 asks
        assert srv.auth == [None] * 4  # no key in the environment: no Authorization header


def test_openai_judge_failures_are_one_line_input_errors(monkeypatch):
    monkeypatch.setenv("PREFTUNE_JUDGE_RETRIES", "2")
    with _Server(lambda body, n: (401, b'{"error": "bad key"}')) as srv:
        with pytest.raises(InputError, match=r"HTTP 401") as e:
            parse_judge(f"openai:m@{srv.url}").compare(["q"], ["a"], ["b"])
        assert len(srv.requests) == 2  # 401 is final: no retries, one per order
        assert "\n" not in str(e.value)
    with _Server(lambda body, n: (500, b"down")) as srv:
        with pytest.raises(InputError, match=r"no usable answer after 3 tries \(HTTP 500"):
            parse_judge(f"openai:m@{srv.url}").compare(["q"], ["a"], ["b"])
        assert len(srv.requests) == 6
    with _Server(lambda body, n: (200, b"<html>not json</html>")) as srv:
        with pytest.raises(InputError, match=r"not a chat-completions answer"):
            parse_judge(f"openai:m@{srv.url}").compare(["q"], ["a"], ["b"])
    with _Server(lambda body, n: (200, "Response 1 is clearly better")) as srv:
        with pytest.raises(InputError, match=r"is neither '1' nor '2'"):
            parse_judge(f"openai:m@{srv.url}").compare(["q"], ["a"], ["b"])
    monkeypatch.setenv("PREFTUNE_JUDGE_TIMEOUT", "0.2")
    monkeypatch.setenv("PREFTUNE_JUDGE_RETRIES", "1")
    with _Server(lambda body, n: ("sleep", None)) as srv:
        with pytest.raises(InputError, match=r"no usable answer after 2 tries \(.*timed out"):
            parse_judge(f"openai:m@{srv.url}").compare(["q"], ["a"], ["b"])


def test_openai_judge_in_generate_cli_fails_cleanly_and_never_writes_the_key(tiny_world, tmp_path, capsys,
                                                                               monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": "sort: 2 1 ="}) + "\n")
    base = ["generate", "--model", str(tiny_world.model_dir), "--prompts", str(prompts), "--device", "cpu",
            "--num-samples", "2", "--max-new-tokens", "4", "--temperature", "1", "--cache-dir", str(tmp_path / "own")]
    with _Server(lambda body, n: (401, b"no")) as srv:
        rc = main(base + ["--judge", f"openai:m@{srv.url}", "--output", str(tmp_path / "out.jsonl")])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "HTTP 401" in err and KEY not in err
    assert not (tmp_path / "out.jsonl").exists()
    with _Server(_longer_wins) as srv:
        rc = main(base + ["--judge", f"openai:m@{srv.url}", "--output", str(tmp_path / "out.jsonl"),
                          "--pairs", str(tmp_path / "pairs.jsonl")])
    assert rc == 0
    row = json.loads((tmp_path / "out.jsonl").read_text())
    a, b = row["completions"]
    # round robin of 2: the longer completion scores 1, the other 0 (equal length: both 0.5)
    assert row["scores"] == ([1.0, 0.0] if len(a) > len(b) else [0.0, 1.0] if len(a) < len(b) else [0.5, 0.5])
    assert all(KEY not in p.read_text(errors="replace") for p in tmp_path.rglob("*") if p.is_file())
    assert KEY not in capsys.readouterr().out
    # --cache-dir holds the judge's answers too, not $PREFTUNE_CACHE
    assert list((tmp_path / "own" / "judges").glob("openai-*.jsonl")) and not (tmp_path / "cache").exists()
