"""The judge API key never appears, whatever the server sends back, and credentials in a judge URL are refused.

Each failure mode of the OpenAI-compatible judge runs against a local server that echoes the request's
Authorization header into its status line, its reason phrase, its body or its answer. Neither the key nor any
prefix of it longer than 4 characters may appear in stdout, stderr or any file written.
"""

from __future__ import annotations

import json
import socketserver
import threading
from pathlib import Path

import pytest

from preftune.commands.cli import main
from preftune.core.errors import InputError
from preftune.generation.judges import parse_judge

KEY = "sk-Zq9vX-NEVER-WRITE-4242-abcdef"
PASSWORD = "s3cretPW"


@pytest.fixture(autouse=True)
def _env(tmp_path, monkeypatch):
    monkeypatch.setenv("PREFTUNE_JUDGE_API_KEY", KEY)
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.setenv("PREFTUNE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("PREFTUNE_JUDGE_BACKOFF", "0")
    monkeypatch.setenv("PREFTUNE_JUDGE_RETRIES", "1")
    monkeypatch.setenv("PREFTUNE_JUDGE_TIMEOUT", "5")


def _response(mode: str, auth: str) -> bytes:
    """What a hostile (or merely echoing) server answers, the request's Authorization header inside."""
    def http(status: str, body: bytes) -> bytes:
        return (f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n"
                "Connection: close\r\n\r\n").encode() + body

    chat = lambda text: json.dumps({"choices": [{"message": {"content": text}}]}).encode()  # noqa: E731
    return {
        "reason_401": lambda: http(f"401 Unauthorized {auth}", b"{}"),
        "reason_500": lambda: http(f"500 Down {auth}", b"{}"),
        "reason_429": lambda: http(f"429 {auth}", b"{}"),
        "body_not_json": lambda: http("200 OK", f"<html>echo: {auth}</html>".encode()),
        "body_wrong_shape": lambda: http("200 OK", json.dumps({"echo": auth}).encode()),
        "answer": lambda: http("200 OK", chat(f"I refuse. {auth}")),
        "answer_key_first": lambda: http("200 OK", chat(auth.removeprefix("Bearer "))),
        "status_line": lambda: f"HTTP/1.1 2x0 {auth}\r\n\r\n".encode(),
        "garbage": lambda: f"{auth}\r\n\r\n".encode(),
        "torn": lambda: http("200 OK", chat("1"))[:-3] + auth.encode()[:9],
    }[mode]()


class EchoServer:
    """A raw TCP server on 127.0.0.1 that answers every request as ``mode`` says, echoing its Authorization."""

    def __init__(self, mode: str) -> None:
        self.auth: list[str] = []
        outer = self

        class Handler(socketserver.StreamRequestHandler):
            def handle(self) -> None:
                headers, length = {}, 0
                while (line := self.rfile.readline().decode("latin-1").strip()):
                    name, _, value = line.partition(":")
                    headers[name.strip().lower()] = value.strip()
                length = int(headers.get("content-length", 0))
                self.rfile.read(length)
                outer.auth.append(headers.get("authorization", ""))
                self.wfile.write(_response(mode, headers.get("authorization", "")))

        self.server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> EchoServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


def leaked(text: str) -> bool:
    """Whether ``text`` shows the key or a prefix of it longer than 4 characters (every such prefix starts with
    the first 5 characters)."""
    return KEY[:5] in text


def files_leak(root: Path) -> list[str]:
    return [str(p) for p in root.rglob("*") if p.is_file() and leaked(p.read_bytes().decode("latin-1"))]


MODES = ["reason_401", "reason_500", "reason_429", "body_not_json", "body_wrong_shape", "answer", "answer_key_first",
         "status_line", "garbage", "torn"]


@pytest.mark.parametrize("mode", MODES)
def test_no_failure_mode_shows_the_key(mode, tmp_path):
    with EchoServer(mode) as srv:
        with pytest.raises(InputError) as e:
            parse_judge(f"openai:m@{srv.url}").compare(["q"], ["a"], ["b"])
    assert srv.auth and set(srv.auth) == {f"Bearer {KEY}"}  # the server did see the key
    message = str(e.value)
    assert "\n" not in message and not leaked(message), message
    if mode != "torn":  # the server's echo reached the message, with the key cut out
        assert "[key]" in message, message
    assert not files_leak(tmp_path)


@pytest.mark.parametrize("mode", ["reason_401", "body_not_json", "answer", "status_line"])
def test_generate_cli_never_shows_the_key(mode, tiny_world, tmp_path, capfd):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": "sort: 2 1 ="}) + "\n")
    with EchoServer(mode) as srv:
        rc = main(["generate", "--model", str(tiny_world.model_dir), "--prompts", str(prompts), "--device", "cpu",
                   "--num-samples", "2", "--max-new-tokens", "4", "--temperature", "1", "--judge",
                   f"openai:m@{srv.url}", "--output", str(tmp_path / "out.jsonl")])
    out, err = capfd.readouterr()
    assert rc == 2 and err.count("\n") == 1 and "judge openai:m@" in err
    assert not leaked(out) and not leaked(err), err
    assert not files_leak(tmp_path) and not (tmp_path / "out.jsonl").exists()


def test_a_run_and_a_matrix_cell_never_write_the_key(tiny_world, tmp_path, capfd):
    """The key-echoing answer fails a run's behavioural evaluation (stderr) and a matrix cell (matrix.json holds
    its error): neither, nor any file of the run, shows the key."""
    common = ["--model", str(tiny_world.model_dir), "--data", str(tiny_world.train_path), "--eval-data",
              str(tiny_world.eval_path), "--max-steps", "1", "--batch-size", "4", "--max-train-pairs", "8",
              "--eval-every", "0", "--save-every", "0", "--gen-eval-prompts", "8", "--gen-max-new-tokens", "8",
              "--gen-temperature", "1.0", "--lr", "0.1", "--warmup-ratio", "0", "--lora-rank", "2", "--quiet", "--cache-dir",
              str(tmp_path / "cache")]  # a large step: the policy writes something else than the reference
    with EchoServer("answer") as srv:
        judge = ["--judge", f"openai:m@{srv.url}"]
        rc = main(["train", *common, *judge, "--output", str(tmp_path / "run")])
        out, err = capfd.readouterr()
        assert rc == 2 and "[key]" in err and not leaked(out + err), err
        main(["ablate", *common, *judge, "--grid", "objective=dpo", "--output", str(tmp_path / "m")])
    out, err = capfd.readouterr()
    assert not leaked(out + err)
    cells = json.loads((tmp_path / "m" / "matrix.json").read_text())["cells"]
    assert cells[0]["status"] == "failed" and "[key]" in cells[0]["error"]
    assert (tmp_path / "run" / "config.yaml").exists() or (tmp_path / "run" / "metrics.jsonl").exists()
    assert not files_leak(tmp_path)


def test_credentials_in_a_judge_url_are_one_line_and_never_written(tiny_world, tmp_path, capfd):
    spec = f"openai:m@http://alice:{PASSWORD}@127.0.0.1:9/v1"
    with pytest.raises(InputError, match="credentials") as e:
        parse_judge(spec)
    assert PASSWORD not in str(e.value) and "alice" not in str(e.value)
    (tmp_path / "c.yaml").write_text(f"judge:\n- python:preftune.tinyworld:judge\n- {spec}\n")
    data = ["--data", str(tiny_world.train_path), "--eval-data", str(tiny_world.eval_path), "--gen-eval-prompts", "2"]
    prompts = ["--prompts", str(tiny_world.eval_path)]
    model = ["--model", str(tiny_world.model_dir)]
    for args in (["train", *model, *data, "--judge", spec, "--output", str(tmp_path / "out")],
                 ["train", *model, *data, "--config", str(tmp_path / "c.yaml"), "--output", str(tmp_path / "out")],
                 ["eval", *model, *data, "--judge", spec, "--output", str(tmp_path / "out")],
                 ["ablate", *model, *data, "--judge", spec, "--output", str(tmp_path / "out")],
                 ["generate", *model, *prompts, "--judge", spec, "--output", str(tmp_path / "out")],
                 ["iterate", *model, *prompts, "--eval-data", str(tiny_world.eval_path), "--judge", spec,
                  "--output", str(tmp_path / "out")]):
        assert main(args) == 2, args
        out, err = capfd.readouterr()
        assert err.count("\n") == 1 and "credentials" in err, (args, err)
        assert PASSWORD not in out + err and not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.rglob("*") if p.is_file() and p.name != "c.yaml"
                and PASSWORD in p.read_bytes().decode("latin-1")]
