"""preftune iterate: pair rules, the round layout, continuing the adapter, decide/report over rounds, bad input,
and kill -9 during generation, judging and training ending identical to an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
from safetensors.torch import load_file

import preftune
from preftune.commands.cli import main
from preftune.core import config
from preftune.core.layout import read_audit, write_audit
from preftune.generation.pairs import make_pairs
from preftune.tinyworld import build_world
from preftune.training.loop import train

JUDGE = "python:preftune.tinyworld:judge"


@pytest.fixture(scope="module")
def sft_world(tmp_path_factory):
    """The tiny world with a briefly supervised model, so that samples are sorting attempts worth judging."""
    root = tmp_path_factory.mktemp("iter_world")
    w = build_world(root / "world", n_train=128, n_eval=48)
    train(config.build({}, dict(model=str(w.model_dir), data=str(w.train_path), eval_data=str(w.eval_path),
                                objective="sft", lora_rank=0, lr=3e-3, max_steps=40, batch_size=16, eval_every=0,
                                save_every=0, warmup_ratio=0.05, quiet=True, output=str(root / "sft"),
                                cache_dir=str(root / "cache"), max_length=64)))
    return w, root / "sft" / "model", root / "cache"


def base(world, out: Path, **kw) -> config.Config:
    w, model, cache = world
    d = dict(model=str(model), eval_data=str(w.eval_path), objective="dpo", lr=1e-3, max_steps=6, batch_size=8,
             eval_every=0, save_every=2, warmup_ratio=0.0, lora_rank=8, quiet=True, output=str(out),
             cache_dir=str(cache), max_length=64)
    return config.build({}, {**d, **kw})


def test_pair_rules_and_drops():
    rows = [{"prompt": "p", "completions": ["a", "b", "c", "d"], "scores": [0.2, 0.9, 0.5, 0.1]},
            {"prompt": "q", "completions": ["x", "x", "x", "x"], "scores": [1, 1, 1, 1]},
            {"prompt": "r", "completions": ["", " ", "y", ""], "scores": [1, 0, 0.5, 0]},
            {"prompt": "s", "completions": ["u", "v", "w", "z"], "scores": [0.5, 0.5, 0.5, 0.5]}]
    pairs, stats = make_pairs(rows, rule="max_min")
    assert [(p["chosen"], p["rejected"]) for p in pairs] == [("b", "d")]
    assert stats["dropped"] == {"identical": 1, "empty": 1, "gap": 1}
    assert [(p["chosen"], p["rejected"]) for p in make_pairs(rows, rule="best_vs_second")[0]] == [("b", "c")]
    chosen = {p["chosen"] for seed in range(8) for p in make_pairs(rows[:1], rule="max_random", seed=seed)[0]}
    assert chosen == {"b"}  # max_random: the best against a random other
    assert make_pairs(rows[:1], rule="max_min", min_gap=0.9)[1]["dropped"]["gap"] == 1


def test_two_rounds_layout_continuation_decide_and_report(sft_world, tmp_path):
    w, _, _ = sft_world
    out = tmp_path / "iter"
    res = preftune.core.objectives and __import__("preftune.training.rounds", fromlist=["iterate"]).iterate(
        base(sft_world, out), prompts=str(w.train_path), judge_spec=JUDGE, rounds=2, num_samples=4, max_new_tokens=10,
        gen_eval_prompts=16, temperature=1.0)
    assert [r["round"] for r in res["rounds"]] == [1, 2]
    for r in (1, 2):
        folder = out / f"round-{r}"
        assert {"samples.jsonl", "pairs.jsonl", "pairs.stats.json", "gen_eval.jsonl", "summary.json", "config.yaml",
                "adapter"} <= {p.name for p in folder.iterdir()}
        samples = [json.loads(line) for line in (folder / "samples.jsonl").read_text().splitlines()]
        assert len(samples) == 128 and all(len(s["completions"]) == len(s["scores"]) == 4 for s in samples)
        stats = json.loads((folder / "pairs.stats.json").read_text())
        assert stats["pairs"] + sum(stats["dropped"].values()) == 128 == stats["prompts"]
        assert json.loads((folder / "summary.json").read_text())["gen_eval"]["prompts"] == 16
    # round 2 starts from round 1's policy: its step-0 held-out numbers are round 1's final ones
    evals = [[json.loads(line) for line in (out / f"round-{r}" / "metrics.jsonl").read_text().splitlines()
              if "eval_loss" in line] for r in (1, 2)]
    assert evals[1][0]["eval_rewards/margins"] == pytest.approx(evals[0][-1]["eval_rewards/margins"], abs=1e-5)
    assert evals[1][0]["eval_logps/chosen"] == pytest.approx(evals[0][-1]["eval_logps/chosen"], abs=1e-4)
    # the reference stays the starting model: both rounds' references equal the SFT model's
    cfg2 = config.from_file(out / "round-2" / "config.yaml")
    assert cfg2.init_adapter == str(out / "round-1" / "adapter") and cfg2.model == str(sft_world[1])
    d = preftune.decide(str(out))
    assert d.verdict in ("continue", "stop") and [r["code"] for r in d.reasons] == ["round_comparison"]
    assert d.basis["code"] in ("round_gain", "round_no_gain") and (out / "decision.json").exists()
    assert set(d.reasons[0]["compared"]) == {"behaviour", "refrel", "lennorm"}
    md, html = preftune.report(str(out))
    assert "| 2 | " in md.read_text() and "win rate" in html.read_text()
    # the preflight: the prompts against the held-out pairs once, and each round's own pairs
    audit = read_audit(out)
    assert audit.counts["rows"] == 128 and audit.find("heldout_leak")["exact"] == 0
    assert all((out / f"round-{r}" / "audit.json").is_file() for r in (1, 2))
    leak = {**audit.find("heldout_leak"), "exact": 5, "leaked_pairs": 5, "severity": "warn"}
    write_audit(out, replace(audit, findings=[leak]))  # had 5 held-out prompts been among the prompts
    d = preftune.decide(str(out))
    assert [r["code"] for r in d.reasons] == ["heldout_leak", "round_comparison"]
    assert d.basis["data"][0]["exact"] == 5 and "Data: 5 of 48 held-out prompts" in d.summary


def test_round_two_beats_round_one_against_the_original(tmp_path):
    """Issue 9's "done when": on the tiny world with its ground-truth judge, round 2's held-out win rate against
    the original (SFT) model is higher than round 1's, and decide says the gain is significant.

    What makes a round learn something here (README, "Does a round help?"): an SFT model that sorts only
    partly (512 pairs; greedy judge score 0.72 on the held-out prompts), 2048 *other* prompts to sample from (on
    its own SFT prompts the model has memorized the answers, so its samples teach nothing), 512 held-out
    prompts (64 leave a ±0.12 interval), and DPO with the chosen NLL (RPO): DPO alone lowers the greedy score
    here. 13 runs (seeds 0-5 and 42, a second held-out set, world seeds 1 and 2) all passed every assert below,
    round 2 ahead by +0.029..+0.062 (McNemar p <= 0.009). 25-45 s on 2 shared cores."""
    from preftune.training.rounds import iterate

    w = build_world(tmp_path / "world", n_train=2560, n_eval=512)
    lines = w.train_path.read_text().splitlines()
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(lines[512:]) + "\n")
    common = dict(eval_data=str(w.eval_path), cache_dir=str(tmp_path / "cache"), max_length=64, eval_every=0,
                  save_every=0, quiet=True, threads=1)
    train(config.build({}, dict(model=str(w.model_dir), data=str(w.train_path), max_train_pairs=512, objective="sft",
                                lora_rank=0, lr=3e-3, max_steps=400, batch_size=16, warmup_ratio=0.05, seed=0,
                                output=str(tmp_path / "sft"), **common)))
    out = tmp_path / "iter"
    cfg = config.build({}, dict(model=str(tmp_path / "sft" / "model"), objective="dpo", nll_weight=1.0, lr=2e-3,
                                epochs=2, batch_size=8, warmup_ratio=0.0, lora_rank=8, seed=42, output=str(out), **common))
    res = iterate(cfg, prompts=str(prompts), judge_spec=JUDGE, rounds=2, num_samples=4, temperature=1.0,
                  max_new_tokens=12, gen_eval_prompts=512)
    r1, r2 = res["rounds"]
    assert r1["pairs"] > 1500 and r2["pairs"] > 1500  # the samples differ and the judge tells them apart
    assert r2["win_rate"] >= r1["win_rate"] + 0.02, (r1["win_rate"], r2["win_rate"])  # seen: 0.577 -> 0.616
    assert r2["win_rate_ci"][0] > 0.5 and r2["lc_win_rate"] > r1["lc_win_rate"]
    d = preftune.decide(str(out))
    beh = next(c for c in d.comparisons if c["yardstick"] == "behaviour")
    assert (beh["a"], beh["b"], beh["n"]) == ("round-2", "round-1", 512)
    assert beh["diff"] > 0 and beh["mcnemar_p"] < 0.05, beh  # the paired test over the same 512 prompts
    assert d.verdict == "continue" and d.last_beats_first is True


@pytest.mark.parametrize("args,words", [
    (["--rounds", "0"], "field 'rounds'"),
    (["--objective", "kto"], "makes pairs"),
    (["--num-samples", "1"], "field 'num_samples'"),
])
def test_bad_input_is_one_line(sft_world, tmp_path, capsys, args, words):
    w, model, cache = sft_world
    code = main(["iterate", "--model", str(model), "--prompts", str(w.train_path), "--eval-data", str(w.eval_path),
                 "--judge", JUDGE, "--cache-dir", str(cache), "--output", str(tmp_path / "it"), *args])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and words in err[0] and not (tmp_path / "it").exists()


def test_no_prompts_and_no_pairs_are_one_line(sft_world, tmp_path, capsys):
    w, model, cache = sft_world
    empty = tmp_path / "empty.jsonl"
    empty.write_text('{"text": "no prompt here"}\n')
    common = ["--model", str(model), "--eval-data", str(w.eval_path), "--cache-dir", str(cache), "--max-new-tokens", "4"]
    assert main(["iterate", "--prompts", str(empty), "--judge", JUDGE, "--output", str(tmp_path / "a"), *common]) == 2
    assert "field 'prompt'" in capsys.readouterr().err
    (tmp_path / "flat.py").write_text("def judge(prompt, completion):\n    return 0.5\n")
    sys.path.insert(0, str(tmp_path))
    try:
        assert main(["iterate", "--prompts", str(w.train_path), "--judge", "python:flat:judge", "--output",
                     str(tmp_path / "b"), *common]) == 2
    finally:
        sys.path.remove(str(tmp_path))
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "round 1 produced no pairs: judge python:flat:judge, min_gap 0.0" in err[0]
    assert not (tmp_path / "b" / "round-1" / "pairs.jsonl").exists()


SLOW_JUDGE = '''
import os, time
from preftune.tinyworld import judge as truth

def judge(prompt, completion):
    marker = os.environ["JUDGE_MARKER"]
    if not os.path.exists(marker):  # the first call of a run that hasn't been killed while judging yet
        open(marker, "w").close()
        time.sleep(30)
    return truth(prompt, completion)
'''


def _run(args: list[str], cwd: Path, env: dict, kill_when=None) -> int:
    """The iterate command in a child; with ``kill_when``, kill -9 it as soon as that condition holds."""
    proc = subprocess.Popen([sys.executable, "-m", "preftune.commands.cli", "iterate", *args], cwd=cwd, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 600
    while proc.poll() is None and time.time() < deadline:
        if kill_when and kill_when():
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            return -9
        time.sleep(0.02)
    assert proc.returncode == 0, proc.stderr.read()
    return 0


def test_kill_9_during_generation_judging_and_training_ends_identical(sft_world, tmp_path):
    w, model, cache = sft_world
    (tmp_path / "slowjudge.py").write_text(SLOW_JUDGE)
    env = {**os.environ, "PYTHONPATH": str(tmp_path), "OMP_NUM_THREADS": "1"}
    args = ["--model", str(model), "--prompts", str(w.train_path), "--eval-data", str(w.eval_path), "--cache-dir",
            str(cache), "--judge", "python:slowjudge:judge", "--rounds", "1", "--num-samples", "3",
            "--max-new-tokens", "8", "--gen-eval-prompts", "8", "--max-steps", "6", "--save-every", "2",
            "--batch-size", "8", "--lr", "1e-3", "--max-length", "64", "--quiet", "--threads", "1"]
    (tmp_path / "judged").touch()  # the uninterrupted run's judge doesn't sleep
    _run(args + ["--output", str(tmp_path / "full")], tmp_path, {**env, "JUDGE_MARKER": str(tmp_path / "judged")})
    out, marker = tmp_path / "killed", tmp_path / "marker"
    env = {**env, "JUDGE_MARKER": str(marker)}
    partial = out / "round-1" / "samples.partial.jsonl"
    lines = lambda p: len(p.read_text().splitlines()) if p.exists() else 0  # noqa: E731
    assert _run(args + ["--output", str(out)], tmp_path, env, lambda: lines(partial) >= 16) == -9      # generating
    assert not (out / "round-1" / "samples.jsonl").exists() and 16 <= lines(partial) < 128
    assert _run(args + ["--output", str(out)], tmp_path, env, marker.exists) == -9                   # judging
    assert not (out / "round-1" / "samples.jsonl").exists()
    ckpt = out / "round-1" / "checkpoints"
    assert _run(args + ["--output", str(out)], tmp_path, env,
                lambda: ckpt.exists() and any((c / "state.json").exists() for c in ckpt.iterdir())) == -9  # training
    assert not (out / "round-1" / "adapter").exists()
    _run(args + ["--output", str(out)], tmp_path, env)                                                # finishes
    for name in ("samples.jsonl", "pairs.jsonl", "eval_pairs.jsonl", "gen_eval.jsonl"):
        assert (out / "round-1" / name).read_text() == (tmp_path / "full" / "round-1" / name).read_text(), name
    a = load_file(out / "round-1" / "adapter" / "adapter_model.safetensors")
    b = load_file(tmp_path / "full" / "round-1" / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)
