"""Verdicts that survive a change of judge and of seed: several judges at once (generated once, judged by each),
their agreement (Cohen's kappa) and position bias, judge_robust / judge_dependent, within_seed_spread, the
prompts a behavioural comparison would need, the report's judges section, and bad judge lists."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml
from test_decide import cell, split, why, with_yardsticks, write_matrix
from test_review import write_run

from preftune.commands.cli import main
from preftune.core import config
from preftune.core.errors import InputError
from preftune.core.files import read_jsonl
from preftune.evaluation.behaviour import behaviour_eval, summarize
from preftune.evaluation.stats import agreement
from preftune.generation.judges import PythonJudge, parse_judge, parse_judges
from preftune.verdict.decide import decide
from preftune.verdict.report import write_report

A, B = "python:a:j", "python:b:j"


# --- constructed folders with several judges ------------------------------------------------------------------

def with_judges(folder: Path, prefs: dict[str, list[float]], length: int = 20) -> None:
    """Give a written run folder a behavioural evaluation by several judges: gen_eval.jsonl rows (every judge's
    verdict under ``judges``, the first judge's at the top) and summary.json -> gen_eval."""
    specs = list(prefs)
    rows = []
    for i in range(len(prefs[specs[0]])):
        verdicts = {s: {"policy_score": None, "reference_score": None, "preference": prefs[s][i]} for s in specs}
        rows.append({"id": f"heldout.jsonl:{i + 1}", "prompt": f"p{i}", "policy": " ".join(["w"] * length),
                     "reference": " ".join(["v"] * length), "policy_tokens": length, "reference_tokens": length,
                     "policy_finish": "eos", "reference_finish": "eos", **verdicts[specs[0]], "judges": verdicts})
    (folder / "gen_eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary = json.loads((folder / "summary.json").read_text())
    summary["gen_eval"] = summarize(rows, judge_spec=specs, max_new_tokens=32, temperature=0.0, seed=0)
    (folder / "summary.json").write_text(json.dumps(summary))


def wins(n_win: int, n: int = 100) -> list[float]:
    return [1.0] * n_win + [0.0] * (n - n_win)


def pairs_up_matrix(root: Path, simpo_b: list[float], dpo_b: list[float]) -> Path:
    """SimPO ranks 70 more of 400 held-out pairs than DPO; judge A finds what SimPO writes worse (30 vs 70 wins
    against the reference); judge B says what ``simpo_b``/``dpo_b`` say."""
    dpo, simpo = split(400, 220, 10, 80)
    root = write_matrix(root, [cell("dpo", 8, dpo), cell("simpo", 8, simpo, train_top=0.9, held=1.0)])
    with_judges(root / "cells" / "objective=dpo,lora_rank=8", {A: wins(70), B: dpo_b})
    with_judges(root / "cells" / "objective=simpo,lora_rank=8", {A: wins(30), B: simpo_b})
    return root


def test_two_agreeing_judges_are_judge_robust(tmp_path):
    d = decide(pairs_up_matrix(tmp_path / "m", simpo_b=wins(32), dpo_b=wins(68)), n_boot=300)
    robust = why(d, "judge_robust")
    assert not why(d, "judge_dependent")
    ref = {r["cell"]: r for r in robust if r["against"] == "reference"}
    assert ref["objective=dpo,lora_rank=8"]["direction"] == "better"
    assert ref["objective=simpo,lora_rank=8"]["direction"] == "worse"
    a, b = ref["objective=simpo,lora_rank=8"]["judges"]
    assert (a["judge"], a["wins"], a["losses"], a["n"], a["win_rate"]) == (A, 30, 70, 100, 0.3)
    assert (b["judge"], b["wins"], b["losses"], b["win_rate"]) == (B, 32, 68, 0.32)
    assert b["mcnemar_p"] < 0.001
    [pair] = [r for r in robust if r["against"] == "objective=dpo,lora_rank=8"]
    assert pair["direction"] == "worse" and [j["judge"] for j in pair["judges"]] == [A, B]
    assert [(j["a_only"], j["b_only"]) for j in pair["judges"]] == [(0, 40), (0, 36)]
    # every judge finds SimPO writing worse: the switch is blocked on behaviour, as with one judge
    assert d.verdict == "not_decisive"
    [w] = why(d, "worse_other_yardstick")
    assert [x["yardstick"] for x in w["worse"]] == ["behaviour"] and d.basis["blocked"] == [w]
    # each judge's comparison is in decision.json under its own yardstick
    assert {c["yardstick"] for c in d.comparisons} >= {f"behaviour[{A}]", f"behaviour[{B}]"}


def test_an_opposite_judge_makes_behaviour_judge_dependent(tmp_path):
    """Judge B prefers SimPO's writing: the behaviour evidence depends on the judge, and the blocked switch now
    rests on a judge_dependent reason naming B, not on behaviour alone."""
    d = decide(pairs_up_matrix(tmp_path / "m", simpo_b=wins(70), dpo_b=wins(30)), n_boot=300)
    dep = why(d, "judge_dependent")
    pair = [r for r in dep if r["against"] == "objective=dpo,lora_rank=8"]
    assert pair and pair[0]["disagreeing"] == [B]
    a, b = pair[0]["judges"]
    assert (a["direction"], b["direction"]) == ("worse", "better")
    assert (a["acc_a"], a["acc_b"], b["acc_a"], b["acc_b"]) == (0.3, 0.7, 0.7, 0.3)
    assert a["prompts_needed"] is None and b["prompts_needed"] is None  # both significant
    ref = {r["cell"]: r for r in dep if r["against"] == "reference"}
    assert ref["objective=simpo,lora_rank=8"]["disagreeing"] == [B]
    assert not why(d, "worse_other_yardstick") and d.verdict == "not_decisive"
    [blocked] = d.basis["blocked"]
    assert blocked["code"] == "judge_dependent" and blocked["disagreeing"] == [B]
    assert blocked["mcnemar_p"] < 0.05 and blocked["yardstick"] in ("refrel", "lennorm")  # the pairs' lift
    assert "judges disagree" in d.summary and B in d.summary
    # a judge that finds no difference while A finds SimPO worse: judge_dependent too
    d = decide(pairs_up_matrix(tmp_path / "n", simpo_b=wins(50), dpo_b=wins(50)), n_boot=300)
    [blocked] = d.basis["blocked"]
    assert blocked["code"] == "judge_dependent" and [j["direction"] for j in blocked["judges"]] == \
        ["worse", "not_significant"]
    assert blocked["judges"][1]["prompts_needed"] is None  # 50 vs 50: no difference to detect


def rounds_folder(root: Path, second: dict[str, list[float]]) -> Path:
    """Two rounds with the same held-out pairs; round 1 wins 50 of 100 prompts under both judges, round 2
    wins what ``second`` says."""
    root.mkdir(parents=True)
    (root / "iterate.json").write_text(json.dumps({"settings": {"reference": "initial"}}))
    same = split(300, 200, 0, 0)[0]
    for r, prefs in enumerate([{A: wins(50), B: wins(50)}, second], 1):
        c = with_yardsticks(cell("dpo", 8, same), same, same)
        run = write_run(root / f"round-{r}", c["lines"], c["rows"])
        with_judges(run, prefs)
        summary = json.loads((run / "summary.json").read_text())
        (run / "summary.json").write_text(json.dumps({"steps": 40, "params": {}, **summary}))
    return root


def test_a_round_gain_on_behaviour_alone_needs_every_judge(tmp_path):
    up = decide(rounds_folder(tmp_path / "agree", {A: wins(75), B: wins(72)}), n_boot=200)
    assert (up.verdict, up.basis["code"], up.basis["yardsticks"]) == ("continue", "round_gain", ["behaviour"])
    assert [r["direction"] for r in why(up, "judge_robust")] == ["better", "better"]  # vs round 1, vs reference
    down = decide(rounds_folder(tmp_path / "disagree", {A: wins(75), B: wins(30)}), n_boot=200)
    assert down.verdict == "stop" and not down.last_beats_first
    assert down.basis["code"] == "round_judge_dependent" and down.basis["disagreeing"] == [B]
    a, b = down.basis["judges"]
    assert (a["judge"], a["direction"], a["a_only"], a["b_only"]) == (A, "better", 25, 0)
    assert (b["judge"], b["direction"], b["a_only"], b["b_only"]) == (B, "worse", 0, 20)
    assert "judges disagree" in down.summary and B in down.summary
    [gains] = why(down, "round_comparison")  # the first judge's gain is still reported, not acted on
    assert [g["yardstick"] for g in gains["gains"]] == ["behaviour"]


def test_behaviour_not_significant_gives_the_prompts_needed(tmp_path):
    same = split(300, 200, 0, 0)[0]
    root = write_matrix(tmp_path / "m", [cell("dpo", 8, same), cell("simpo", 8, same)])
    with_judges(root / "cells" / "objective=dpo,lora_rank=8", {A: wins(50), B: wins(50)})
    with_judges(root / "cells" / "objective=simpo,lora_rank=8", {A: wins(55), B: wins(50)})
    d = decide(root, n_boot=200)
    [b] = why(d, "behaviour_comparison")
    assert (b["a_only"], b["b_only"], b["diff"]) == (5, 0, pytest.approx(0.05)) and b["mcnemar_p"] == 0.0625
    # Connor: discordant share 0.05, difference 0.05 -> (1.96 sqrt(.05) + 0.84 sqrt(.05 - .0025))^2 / .0025
    want = math.ceil((1.959964 * math.sqrt(0.05) + 0.841621 * math.sqrt(0.05 - 0.0025)) ** 2 / 0.0025)
    assert b["prompts_needed"] == want == 155
    assert "about 155 prompts would detect the observed difference +0.050" in " ".join(d.explanation)
    [pair] = [r for r in why(d, "judge_robust") if r["against"] != "reference"]
    assert pair["direction"] == "not_significant"
    assert [j["prompts_needed"] for j in pair["judges"]] == [155, None]  # B: no difference to detect


# --- seeds ------------------------------------------------------------------------------------------------------

def seed_grid(root: Path, dpo_right: tuple[int, ...], simpo_right: tuple[int, ...]) -> Path:
    """dpo and simpo at rank 8 over seeds 1..k; each seed ranks the first N of 400 held-out pairs right."""
    clean = {"train_top": 0.9, "held": 1.0}
    cells = [cell("dpo", 8, [i < k for i in range(400)], seed=s) for s, k in enumerate(dpo_right, 1)]
    cells += [cell("simpo", 8, [i < k for i in range(400)], seed=s, **clean) for s, k in enumerate(simpo_right, 1)]
    seeds = list(range(1, len(dpo_right) + 1))
    return write_matrix(root, cells, {"objective": ["dpo", "simpo"], "lora_rank": [8], "seed": seeds})


def test_a_difference_inside_the_seed_spread_is_not_decisive(tmp_path):
    """SimPO is 28 pairs (0.07) ahead in every seed, pooled over pairs very significant, but DPO's seeds alone
    spread by a std of 0.1: within_seed_spread, with the seeds that would settle it."""
    d = decide(seed_grid(tmp_path / "m", (220, 300, 260), (248, 328, 288)), n_boot=300)
    assert d.verdict == "not_decisive", d.reasons
    [r] = why(d, "within_seed_spread")
    assert r["seed_accuracies_a"] == pytest.approx([0.62, 0.82, 0.72])
    assert r["seed_accuracies_b"] == pytest.approx([0.55, 0.75, 0.65])
    assert r["seed_diff"] == pytest.approx(0.07) and r["seed_sd_a"] == pytest.approx(0.1)
    assert (r["seeds_a"], r["seeds_b"]) == (3, 3) and r["mcnemar_p"] < 1e-6
    assert r["seeds_needed"] == math.ceil(2 * ((1.959964 + 0.841621) * 0.1 / 0.07) ** 2) == 33
    assert d.basis["blocked"] == [r] and "33 seeds" in d.summary
    # the same lead with seeds that agree (std 0.005) is a switch
    d = decide(seed_grid(tmp_path / "n", (258, 262, 260), (286, 290, 288)), n_boot=300)
    assert d.verdict == "switch" and not why(d, "within_seed_spread")


def test_a_baseline_lead_inside_the_seed_spread_is_no_keep(tmp_path):
    d = decide(seed_grid(tmp_path / "m", (248, 328, 288), (220, 300, 260)), n_boot=300)
    [r] = why(d, "within_seed_spread")
    assert r["seed_diff"] == pytest.approx(-0.07) and not why(d, "baseline_better")
    assert d.verdict == "not_decisive" and d.basis["blocked"] == [r]


def test_a_real_gap_over_seeds_is_still_a_switch(tmp_path):
    """SFT vs DPO on the tiny world over two seeds each: DPO's lead is far outside the seed spread."""
    from preftune.tinyworld import build_world
    from preftune.training.matrix import run_matrix

    world = build_world(tmp_path / "world", n_train=256, n_eval=200)
    base = config.Config(model=str(world.model_dir), data=str(world.train_path), eval_data=str(world.eval_path),
                         lr=2e-3, max_steps=24, eval_every=8, save_every=0, warmup_ratio=0.0, lora_rank=8, quiet=True,
                         output=str(tmp_path / "m"), cache_dir=str(tmp_path / "cache"))
    run_matrix(base, {"objective": ["sft", "dpo"], "seed": [1, 2]})
    d = decide(tmp_path / "m", n_boot=500)
    assert (d.verdict, d.objective) == ("switch", "dpo"), d.explanation
    assert not why(d, "within_seed_spread") and len(d.groups) == 2
    dpo = next(g for g in d.groups if g["objective"] == "dpo")
    assert dpo["seeds"] == [1, 2]


# --- several judges in a run: generated once, judged by each --------------------------------------------------

def distinct(prompt: str, completion: str) -> float:
    return float(len(set(completion.split())))


def shorter(prompt: str, completion: str) -> float:
    return -float(len(completion))


def checksum(prompt: str, completion: str) -> float:
    """An arbitrary judge that still tells completions apart: a character checksum mod 7."""
    return float(sum(map(ord, completion)) % 7)


def _kappa_by_hand(x: list[float], y: list[float]) -> tuple[float, float]:
    """(share agreeing, Cohen's kappa) of two judges' outcomes, by the textbook formula."""
    n = len(x)
    p_o = sum(a == b for a, b in zip(x, y)) / n
    p_e = sum((x.count(k) / n) * (y.count(k) / n) for k in (0.0, 0.5, 1.0))
    return p_o, (p_o - p_e) / (1 - p_e)


def test_generations_are_made_once_and_judged_by_each_judge(tiny_world, policy, tmp_path, monkeypatch):
    """The counter: a second python judge costs its judging alone (no second generation pass); the gen_eval
    numbers of each judge and each two judges' agreement are recomputed from gen_eval.jsonl by hand."""
    import preftune.generation.sampler as sampler
    from preftune.data.rows import load_prompts

    model, tok = policy
    calls = {"generate": 0, "distinct": 0, "checksum": 0}
    real = sampler.generate

    def counting(*args, **kw):
        calls["generate"] += 1
        return real(*args, **kw)

    def judge(name, fn):
        def counted(p, c):
            calls[name] += 1
            return fn(p, c)
        return PythonJudge(f"python:test:{name}", counted)

    monkeypatch.setattr(sampler, "generate", counting)
    prompts = load_prompts(str(tiny_world.eval_path))
    kw = dict(n_prompts=12, max_new_tokens=10, temperature=0.0, seed=3)
    one = behaviour_eval(model, tok, prompts, judge("distinct", distinct), out_dir=tmp_path / "one", **kw)
    assert calls == {"generate": 2, "distinct": 24, "checksum": 0}  # policy + reference; 12 prompts x 2 sides
    two = behaviour_eval(model, tok, prompts, [judge("distinct", distinct), judge("checksum", checksum)],
                         out_dir=tmp_path / "two", **kw)
    assert calls == {"generate": 4, "distinct": 48, "checksum": 24}  # the second judge: judging only
    # the first judge's numbers stay at the top level, as with one judge
    assert {k: v for k, v in two.items() if k not in ("judges", "agreement")} == one
    rows = read_jsonl(tmp_path / "two" / "gen_eval.jsonl")
    assert [{k: v for k, v in r.items() if k != "judges"} for r in rows] == read_jsonl(tmp_path / "one" /
                                                                                         "gen_eval.jsonl")
    x = [r["judges"]["python:test:distinct"]["preference"] for r in rows]
    y = [r["judges"]["python:test:checksum"]["preference"] for r in rows]
    for r in rows:
        assert r["judges"]["python:test:checksum"]["policy_score"] == checksum("", r["policy"])
        assert r["judges"]["python:test:distinct"]["preference"] == r["preference"]
    assert two["judges"]["python:test:checksum"]["win_rate"] == sum(y) / 12
    assert two["judges"]["python:test:distinct"]["win_rate"] == two["win_rate"]
    [agree] = two["agreement"]
    p_o, kappa = _kappa_by_hand(x, y)
    assert (agree["a"], agree["b"], agree["n"]) == ("python:test:distinct", "python:test:checksum", 12)
    assert agree["agree"] == pytest.approx(p_o) and agree["kappa"] == pytest.approx(kappa)
    assert agree["kappa_ci"][0] <= agree["kappa"] <= agree["kappa_ci"][1]
    assert len(set(x)) > 1 and len(set(y)) > 1  # both judges tell these completions apart


def test_kappa_and_agreement_by_hand():
    g = agreement([1, 1, 0, 0.5], [1, 0, 0, 0.5])
    # p_o = 3/4; p_e = (2/4)(1/4) + (1/4)(2/4) + (1/4)(1/4) = 5/16; kappa = (3/4 - 5/16) / (11/16) = 7/11
    assert (g["n"], g["agree"]) == (4, 0.75) and g["kappa"] == pytest.approx(7 / 11)
    assert agreement([1, 0] * 20, [0, 1] * 20)["kappa"] == -1.0
    same = agreement([1.0] * 5, [1.0] * 5)  # every outcome a win for both: chance agreement is total
    assert same["agree"] == 1.0 and same["kappa"] is None and same["kappa_ci"] == [None, None]
    with pytest.raises(ValueError):
        agreement([0.7], [1.0])


def test_always_1_pairwise_judge_has_position_bias_1(tiny_world, policy, tmp_path, monkeypatch):
    from test_judges import _longer_wins, _Server

    from preftune.data.rows import load_prompts

    monkeypatch.setenv("PREFTUNE_JUDGE_BACKOFF", "0")
    model, tok = policy
    prompts = load_prompts(str(tiny_world.eval_path))
    cfg = config.Config(device="cpu", cache_dir=str(tmp_path / "cache"))
    kw = dict(n_prompts=6, max_new_tokens=6, seed=0)
    with _Server(lambda body, n: (200, "1")) as always_1, _Server(_longer_wins) as fair:
        judges = [parse_judge(f"openai:m@{always_1.url}", cfg), parse_judge(f"openai:fair@{fair.url}", cfg),
                  parse_judge("python:preftune.tinyworld:judge", cfg)]
        gen = behaviour_eval(model, tok, prompts, judges, out_dir=tmp_path, **kw)
    rows = read_jsonl(tmp_path / "gen_eval.jsonl")
    asked = sum(r["policy"] != r["reference"] for r in rows)
    assert asked > 0
    first = gen["judges"][judges[0].spec]
    assert (first["position_bias"], first["position_flips"], first["position_compared"]) == (1.0, asked, asked)
    assert (gen["position_bias"], first["ties"]) == (1.0, 6)  # the top level is the first judge's
    assert gen["judges"][judges[1].spec]["position_bias"] == 0.0
    assert "position_bias" not in gen["judges"]["python:preftune.tinyworld:judge"]  # pointwise: no order
    assert all(r["position_flip"] is (r["policy"] != r["reference"] or None) for r in rows)


# --- a run with several judges, and bad judge lists -----------------------------------------------------------

FAILS_ON_SOME = "def j(prompt, completion):\n    if '9' in prompt:\n        raise KeyError('no nines')\n    return 1.0\n"


def _cfg(world, tmp_path, name, **kw):
    base = dict(model=str(world.model_dir), data=str(world.train_path), eval_data=str(world.eval_path),
                lr=2e-3, batch_size=8, max_steps=2, eval_every=0, save_every=0, warmup_ratio=0.0, lora_rank=4,
                output=str(tmp_path / name), cache_dir=str(tmp_path / "cache"), quiet=True, max_train_pairs=16,
                gen_eval_prompts=8, gen_max_new_tokens=6)
    base.update(kw)
    return config.build(base)


def test_judge_lists_in_yaml_and_on_the_command_line(tmp_path):
    import argparse

    from preftune.commands.options import add_config_flags, config_from

    p = argparse.ArgumentParser()
    add_config_flags(p)
    args = p.parse_args(["--model", "m", "--judge", "python:a:j", "--judge", "mymod:kw:x,y"])
    assert config_from(args).judge == ["python:a:j", "mymod:kw:x,y"]  # never split at commas
    assert config_from(p.parse_args(["--judge", "python:a:j"])).judge == "python:a:j"  # one: as before
    (tmp_path / "c.yaml").write_text("judge:\n- python:a:j\n- python:b:j\n")
    cfg = config.from_file(tmp_path / "c.yaml", model="m", data="d")
    assert cfg.judges() == ["python:a:j", "python:b:j"]
    assert yaml.safe_load(config.dump_yaml(cfg))["judge"] == ["python:a:j", "python:b:j"]
    for old in ("judge: python:a:j\n", "judge: null\n"):  # config.yaml of earlier versions
        (tmp_path / "old.yaml").write_text(old)
        assert config.from_file(tmp_path / "old.yaml").judges() == ([] if "null" in old else ["python:a:j"])


def test_a_run_with_two_judges_and_its_bad_input(tiny_world, tmp_path, monkeypatch):
    from preftune.training.loop import train

    summary = train(_cfg(tiny_world, tmp_path, "run", judge=["python:preftune.tinyworld:judge",
                                                              "python:test_robust:shorter"]))
    gen = summary.gen_eval
    assert list(gen["judges"]) == ["python:preftune.tinyworld:judge", "python:test_robust:shorter"]
    assert gen["judge"] == "python:preftune.tinyworld:judge" and len(gen["agreement"]) == 1
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["judge"] == list(gen["judges"])
    # two judges with the same name; a list with one bad spec: one line naming it, nothing written
    for judges, words in [(["python:preftune.tinyworld:judge"] * 2, "is given twice"),
                          (["python:preftune.tinyworld:judge", "bogus:x"], "cannot parse 'bogus:x'"),
                          (["python:preftune.tinyworld:judge", "python:preftune.tinyworld:nope"],
                           "judge python:preftune.tinyworld:nope: module")]:
        with pytest.raises(InputError, match=words) as e:
            train(_cfg(tiny_world, tmp_path, "bad", judge=judges))
        assert "\n" not in str(e.value) and not (tmp_path / "bad").exists()
    # a judge that fails on some prompts while the other succeeds: the run fails naming it, no summary.json
    (tmp_path / "some_fail_mod.py").write_text(FAILS_ON_SOME)
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(InputError, match="judge python:some_fail_mod:j raised KeyError"):
        train(_cfg(tiny_world, tmp_path, "fails", judge=["python:preftune.tinyworld:judge",
                                                          "python:some_fail_mod:j"]))
    assert not (tmp_path / "fails" / "summary.json").exists()


def test_ablate_refuses_a_bad_judge_list_before_writing(tiny_world, tmp_path, capsys):
    args = ["ablate", "--model", str(tiny_world.model_dir), "--data", str(tiny_world.train_path), "--eval-data",
            str(tiny_world.eval_path), "--gen-eval-prompts", "4", "--judge", "python:preftune.tinyworld:judge",
            "--judge", "pyhton:preftune.tinyworld:judge", "--output", str(tmp_path / "m")]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown judge kind 'pyhton'" in err and not (tmp_path / "m").exists()


def test_generate_and_iterate_take_several_judges(tiny_world, tmp_path, capsys):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"sort: {i} 2 1 ="}) + "\n" for i in range(3)))
    base = ["generate", "--model", str(tiny_world.model_dir), "--prompts", str(prompts), "--device", "cpu",
            "--num-samples", "3", "--max-new-tokens", "6", "--output", str(tmp_path / "s.jsonl")]
    both = ["--judge", "python:preftune.tinyworld:judge", "--judge", "python:test_robust:shorter"]
    assert main(base + both + ["--pairs", str(tmp_path / "pairs.jsonl")]) == 0
    for r in read_jsonl(tmp_path / "s.jsonl"):
        assert r["judges"]["python:test_robust:shorter"] == [-len(c) for c in r["completions"]]
        assert r["scores"] == r["judges"]["python:preftune.tinyworld:judge"]  # the first ranks the pairs
    capsys.readouterr()
    assert main(base[:-1] + [str(tmp_path / "t.jsonl")] + both[:2] * 2) == 2
    assert "is given twice" in capsys.readouterr().err and not (tmp_path / "t.jsonl").exists()
    it = ["iterate", "--model", str(tiny_world.model_dir), "--prompts", str(prompts), "--eval-data",
          str(tiny_world.eval_path), "--output", str(tmp_path / "it"), "--judge", "python:preftune.tinyworld:judge",
          "--judge", "nonsense"]
    assert main(it) == 2
    assert "cannot parse 'nonsense'" in capsys.readouterr().err and not (tmp_path / "it").exists()


# --- the report -------------------------------------------------------------------------------------------------

def test_report_shows_agreement_win_rates_per_judge_and_position_bias(tmp_path):
    root = pairs_up_matrix(tmp_path / "m", simpo_b=wins(70), dpo_b=wins(30))
    rows = read_jsonl(root / "cells" / "objective=dpo,lora_rank=8" / "gen_eval.jsonl")
    for i, r in enumerate(rows):  # B asked both orders and flipped on a quarter of them
        r["judges"][B]["position_flip"] = i % 4 == 0
    (root / "cells" / "objective=dpo,lora_rank=8" / "gen_eval.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in rows))
    md_path, html_path = write_report(root)
    md, page = md_path.read_text(), html_path.read_text()
    assert "## Judges" in md and "<h2>Judges</h2>" in page and "Position bias" in page
    # pooled over both cells: A and B agree on 60 of 200 prompts
    x = [1.0] * 70 + [0.0] * 30 + [1.0] * 30 + [0.0] * 70
    y = [1.0] * 30 + [0.0] * 70 + [1.0] * 70 + [0.0] * 30
    p_o, kappa = _kappa_by_hand(x, y)
    assert (p_o, kappa) == (0.6, pytest.approx(0.2)) and "| python:a:j | – | agree 0.60 · κ 0.20 [" in md
    assert "| objective=simpo,lora_rank=8 | 0.300 [" in md and "| python:b:j | 0.25 | 25 / 100 |" in md
    assert "depends on the judge" in md
    assert "judges: a behavioural result" in md  # the robustness rules, where they apply


def test_single_judge_folders_have_no_judges_section(tmp_path):
    same = split(100, 60, 0, 0)[0]
    root = write_matrix(tmp_path / "m", [cell("dpo", 8, same), cell("simpo", 8, same)])
    md, page = (p.read_text() for p in write_report(root))
    assert "## Judges" not in md and "<h2>Judges</h2>" not in page and "judges: a behavioural" not in md


def test_parse_judges_names_the_bad_one():
    with pytest.raises(InputError, match="judge python:preftune.tinyworld:nope: module 'preftune.tinyworld' has "
                                         "no function 'nope'"):
        parse_judges(["python:preftune.tinyworld:judge", "python:preftune.tinyworld:nope"])
    assert [j.spec for j in parse_judges(["python:preftune.tinyworld:judge"])] == ["python:preftune.tinyworld:judge"]
