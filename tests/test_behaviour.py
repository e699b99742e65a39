"""Behavioural evaluation: LC win rate, win-rate interval, degeneration, gen_eval recomputed from its file, train wiring."""

from __future__ import annotations

import json
import math

import pytest

from preftune.core import config
from preftune.core.errors import InputError
from preftune.core.files import read_jsonl
from preftune.data.rows import load_prompts
from preftune.evaluation.behaviour import behaviour_eval, degeneration, win_rate
from preftune.evaluation.stats import lc_win_rate, wilson_interval
from preftune.generation.judges import PairwiseJudge, PythonJudge, parse_judge


def _distinct_words(prompt: str, completion: str) -> float:
    return float(len(set(completion.split())))


def test_lc_win_rate_removes_a_pure_length_effect():
    # 40 prompts where the policy is longer (+20 chars) and wins 36, 10 where it is shorter (-20) and wins 1:
    # P(win) depends on the sign of the length difference only, logit(0.9) = -logit(0.1), so θ = 0 and LC = 1/2
    prefs = [1] * 36 + [0] * 4 + [1] * 1 + [0] * 9
    lp, lr = [120] * 40 + [80] * 10, [100] * 50
    assert sum(prefs) / 50 == 0.74
    lc, se = lc_win_rate(prefs, lp, lr)
    assert lc == pytest.approx(0.5, abs=1e-3)
    assert 0.05 < se < 0.3
    # the sign convention (AlpacaEval's Δ is baseline - model) does not change LC
    assert lc_win_rate([1 - p for p in prefs], lr, lp)[0] == pytest.approx(1 - lc, abs=1e-9)


def test_lc_win_rate_equals_raw_without_a_length_effect():
    # 7 of 10 wins whether longer or shorter: φ = 0, θ = logit(0.7), LC = 0.7; sandwich SE = sqrt(0.21 / 20)
    prefs = [1] * 7 + [0] * 3 + [1] * 7 + [0] * 3
    lc, se = lc_win_rate(prefs, [120] * 10 + [80] * 10, [100] * 20)
    assert lc == pytest.approx(0.7, abs=1e-4)
    assert se == pytest.approx(math.sqrt(0.21 / 20), abs=1e-4)
    # no length difference at all: the length column is 0, LC is the raw rate with ties as 1/2
    lc, se = lc_win_rate([1, 0.5, 0, 1], [3, 3, 3, 3], [3, 3, 3, 3])
    assert lc == pytest.approx(0.625, abs=1e-4)
    # sandwich with x = 1: Var θ = Σ(y - p)² / (n p(1-p))², SE(LC) = p(1-p)·sqrt(Var θ) = sqrt(Σ(y - p)²) / n
    assert se == pytest.approx(math.sqrt(0.375**2 * 2 + 0.125**2 + 0.625**2) / 4, abs=1e-4)
    with pytest.raises(ValueError):
        lc_win_rate([1.5], [1], [1])


def test_win_rate_and_degeneration_by_hand():
    w = win_rate([1, 1, 0.5, 0])
    assert {k: w[k] for k in ("n", "win_rate", "wins", "ties", "losses", "tie_rate")} == \
        {"n": 4, "win_rate": 0.625, "wins": 2, "ties": 1, "losses": 1, "tie_rate": 0.25}
    assert w["win_rate_ci"] == list(wilson_interval(2.5, 4))
    d = degeneration(["a b c a b c", "x y"])
    # 3-grams of the first: abc bca cab abc -> 1 repeat of 4; unigrams 5 distinct of 8; bigrams 4 of 6
    assert d == {"repeated_3gram_share": 0.25, "distinct_1": 5 / 8, "distinct_2": 4 / 6}


def test_gen_eval_is_recomputed_from_gen_eval_jsonl(tiny_world, policy, tmp_path):
    model, tok = policy
    prompts = load_prompts(str(tiny_world.eval_path))
    # a judge that tells these random-model completions apart: distinct words (the ground truth ties them all)
    judge = PythonJudge("python:test:distinct_words", _distinct_words)
    gen = behaviour_eval(model, tok, prompts, judge, n_prompts=12, max_new_tokens=10, temperature=0.0, seed=3,
                         out_dir=tmp_path)
    rows = read_jsonl(tmp_path / "gen_eval.jsonl")
    assert [r["id"] for r in rows] == [p.id for p in prompts[:12]]
    prefs = []
    for r in rows:
        assert r["policy_score"] == _distinct_words(r["prompt"], r["policy"])
        assert r["reference_score"] == _distinct_words(r["prompt"], r["reference"])
        s, t = r["policy_score"], r["reference_score"]
        assert r["preference"] == (1.0 if s > t else 0.0 if s < t else 0.5)
        assert (r["policy_finish"] == "length") == (r["policy_tokens"] == 10)
        prefs.append(r["preference"])
    assert 0 < prefs.count(1.0) < 12 and 0 < prefs.count(0.0)  # real wins and losses, not all ties
    assert gen["prompts"] == 12 and gen["judge"] == "python:test:distinct_words"
    assert gen["win_rate"] == sum(prefs) / 12
    assert gen["ties"] == prefs.count(0.5) and gen["tie_rate"] == prefs.count(0.5) / 12
    assert gen["win_rate_ci"] == list(wilson_interval(sum(prefs), 12))
    lc, se = lc_win_rate(prefs, [len(r["policy"]) for r in rows], [len(r["reference"]) for r in rows])
    assert (gen["lc_win_rate"], gen["lc_win_rate_se"]) == (lc, se)
    for side in ("policy", "reference"):
        assert gen[side]["mean_len"] == sum(r[f"{side}_tokens"] for r in rows) / 12
        assert gen[side]["hit_max_share"] == sum(r[f"{side}_finish"] == "length" for r in rows) / 12
        assert gen[side]["repeated_3gram_share"] == degeneration([r[side] for r in rows])["repeated_3gram_share"]
    assert gen["len_ratio"] == gen["policy"]["mean_len"] / gen["reference"]["mean_len"]
    # the reference really is the base model: its greedy completions equal the adapter-free model's
    from preftune.generation.sampler import generate

    with model.disable_adapter():
        base_rows = generate(model, tok, prompts[:12], max_new_tokens=10, temperature=0.0)
    assert [r["completions"][0] for r in base_rows] == [r["reference"] for r in rows]


def test_behaviour_eval_needs_a_reference(tiny_world):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_world.model_dir)
    with pytest.raises(InputError, match="needs a reference"):
        behaviour_eval(model, AutoTokenizer.from_pretrained(tiny_world.model_dir), ["sort: 1 ="],
                       parse_judge("python:preftune.tinyworld:judge"), n_prompts=1)


def _cfg(world, tmp_path, name, **kw):
    base = dict(model=str(world.model_dir), data=str(world.train_path), eval_data=str(world.eval_path),
                lr=2e-3, batch_size=8, max_steps=2, eval_every=0, save_every=0, warmup_ratio=0.0, lora_rank=4,
                output=str(tmp_path / name), cache_dir=str(tmp_path / "cache"), quiet=True, max_train_pairs=16,
                gen_eval_prompts=6, gen_max_new_tokens=8, judge="python:preftune.tinyworld:judge")
    base.update(kw)
    return config.build(base)


def test_train_writes_gen_eval_and_rejects_bad_judges_early(tiny_world, tmp_path, monkeypatch):
    from preftune.training.loop import train

    summary = train(_cfg(tiny_world, tmp_path, "run"))
    gen = summary.gen_eval
    rows = read_jsonl(tmp_path / "run" / "gen_eval.jsonl")
    assert gen["prompts"] == len(rows) == 6 and gen["max_new_tokens"] == 8 and gen["temperature"] == 0.0
    assert gen["win_rate"] == sum(r["preference"] for r in rows) / 6
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["gen_eval"] == gen
    # a spec that does not parse: refused before the output folder exists
    with pytest.raises(InputError, match="field 'judge': cannot parse 'bogus'"):
        train(_cfg(tiny_world, tmp_path, "bad", judge="bogus"))
    assert not (tmp_path / "bad").exists()
    with pytest.raises(InputError, match="field 'gen_max_new_tokens': invalid value 0"):
        train(_cfg(tiny_world, tmp_path, "bad", gen_max_new_tokens=0))
    # a judge that fails at the end fails the run: no summary.json, so a matrix records the cell as failed
    (tmp_path / "failing_judge_mod.py").write_text("def j(p, c):\n    raise KeyError('nope')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(InputError, match="raised KeyError"):
        train(_cfg(tiny_world, tmp_path, "fails", judge="python:failing_judge_mod:j"))
    assert not (tmp_path / "fails" / "summary.json").exists()


def test_pairwise_judge_is_asked_policy_first(tiny_world, policy, tmp_path):
    model, tok = policy
    asked = []

    class LongerWins(PairwiseJudge):
        spec = "test:longer"

        def compare(self, prompts, a, b):
            asked.extend(zip(prompts, a, b))
            return [1.0 if len(x) > len(y) else 0.0 if len(x) < len(y) else 0.5 for x, y in zip(a, b)]

    gen = behaviour_eval(model, tok, load_prompts(str(tiny_world.eval_path)), LongerWins(), n_prompts=6,
                         max_new_tokens=6, seed=0, out_dir=tmp_path)
    rows = read_jsonl(tmp_path / "gen_eval.jsonl")
    assert asked == [(r["prompt"], r["policy"], r["reference"]) for r in rows]
    assert all(r["policy_score"] is None and r["reference_score"] is None for r in rows)
    want = [1.0 if len(r["policy"]) > len(r["reference"]) else 0.0 if len(r["policy"]) < len(r["reference"]) else 0.5
            for r in rows]
    assert [r["preference"] for r in rows] == want and gen["win_rate"] == sum(want) / 6


def test_preftune_eval_judges_behaviour_like_the_run(tiny_world, tmp_path):
    """`preftune eval --adapter A --judge ... --gen-eval-prompts N` gives the run's own gen_eval (greedy, same seed)."""
    from preftune.commands.cli import main
    from preftune.training.loop import train

    gen = {"judge": "python:preftune.tinyworld:judge", "gen_eval_prompts": 6, "gen_max_new_tokens": 8}
    run = train(config.build({}, dict(model=str(tiny_world.model_dir), data=str(tiny_world.train_path),
                                      eval_data=str(tiny_world.eval_path), lr=2e-3, max_steps=3, batch_size=8,
                                      eval_every=0, save_every=0, max_train_pairs=24, quiet=True,
                                      output=str(tmp_path / "run"), cache_dir=str(tmp_path / "cache"), **gen)))
    assert main(["eval", "--model", str(tiny_world.model_dir), "--adapter", str(tmp_path / "run" / "adapter"),
                 "--eval-data", str(tiny_world.eval_path), "--output", str(tmp_path / "ev"), "--cache-dir",
                 str(tmp_path / "cache"), "--judge", gen["judge"], "--gen-eval-prompts", "6",
                 "--gen-max-new-tokens", "8", "--quiet"]) == 0
    got = json.loads((tmp_path / "ev" / "metrics.json").read_text())["gen_eval"]
    assert got == run.gen_eval
    assert read_jsonl(tmp_path / "ev" / "gen_eval.jsonl") == read_jsonl(tmp_path / "run" / "gen_eval.jsonl")
