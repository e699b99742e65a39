"""decide: each verdict from constructed matrices, paired statistics joined by id, seeds, bad input."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from test_review import metrics, pairs, ramp, write_run

from preftune.core.errors import InputError
from preftune.core.layout import Decision, write_decision
from preftune.verdict.decide import decide


def split(n: int, both: int, only_a: int, only_b: int) -> tuple[list[bool], list[bool]]:
    """Correctness of two runs on n pairs: ``both`` right in both, then only-a, only-b, the rest wrong in both."""
    a = [True] * both + [True] * only_a + [False] * only_b
    b = [True] * both + [False] * only_a + [True] * only_b
    rest = n - len(a)
    return a + [False] * rest, b + [False] * rest


def cell(objective: str, rank: int, correct: list[bool], *, train_top: float = 1.0, held: float = 0.8,
         seed: int = 42, status: str = "finished", error: str | None = None, **run: object) -> dict:
    """A matrix cell whose training margin ramps to ``train_top`` and held-out margin to ``held``."""
    acc = sum(correct) / len(correct)
    lines = run.pop("lines", None) or metrics(ramp(0.0, train_top, 40), ramp(0.0, held, 5), ramp(0.5, acc, 5))
    return {"values": {"objective": objective, "lora_rank": rank, "seed": seed}, "status": status,
            "error": error, "lines": lines, "rows": pairs(correct, seed=rank + seed, **run)}


def write_matrix(root: Path, cells: list[dict], factors: dict | None = None) -> Path:
    entries = []
    for c in cells:
        values = c["values"]
        name = ",".join(f"{k}={v}" for k, v in values.items() if k != "seed" or "seed" in (factors or {}))
        name = c.get("name", name)
        entries.append({"name": name, "values": values, "status": c["status"], "error": c["error"]})
        if c["status"] == "finished":
            write_run(root / "cells" / name, c["lines"], c["rows"], objective=values["objective"],
                      lora_rank=values["lora_rank"], seed=values["seed"])
    factors = factors or {k: list(dict.fromkeys(c["values"][k] for c in cells)) for k in ("objective", "lora_rank")}
    root.mkdir(parents=True, exist_ok=True)
    (root / "matrix.json").write_text(json.dumps({"factors": factors, "cells": entries}))
    return root


def switch_matrix(root: Path) -> Path:
    """SimPO ranks 70 more of 400 pairs than DPO at rank 16, with cleaner margins; rank 8 is as good as 16."""
    dpo, simpo = split(400, 220, 10, 80)
    simpo8 = simpo[:]
    simpo8[0] = simpo8[1] = False  # 2 pairs fewer: not significantly different
    return write_matrix(root, [
        cell("dpo", 16, dpo, train_top=3.0, held=0.3),
        cell("dpo", 8, dpo, train_top=2.0, held=0.3),
        cell("simpo", 16, simpo, train_top=1.2, held=1.0),
        cell("simpo", 8, simpo8, train_top=0.9, held=0.9),
    ])


def why(d: Decision, code: str) -> list[dict]:
    """The reasons of ``d`` with ``code`` (decision.json's machine-readable reasons)."""
    return [r for r in d.reasons if r["code"] == code]


def comparison(d: Decision, a: str, b: str, yardstick: str = "own") -> dict:
    return next(c for c in d.comparisons if c["a"] == a and c["b"] == b and c["yardstick"] == yardstick)


def test_switch(tmp_path):
    d = decide(switch_matrix(tmp_path / "m"), n_boot=2000)
    assert d.verdict == "switch", d.reasons
    assert (d.objective, d.lora_rank) == ("simpo", 8)  # rule 2: lower rank, not different
    assert d.baseline == {"objective": "dpo", "lora_rank": 16}
    c = comparison(d, "objective=simpo,lora_rank=16", "objective=dpo,lora_rank=16")
    assert (c["a_only"], c["b_only"], c["n"]) == (80, 10, 400)
    assert c["acc_a"] == pytest.approx(0.75) and c["acc_b"] == pytest.approx(0.575)
    assert c["diff"] == pytest.approx(0.175) and c["ci"][0] < 0.175 < c["ci"][1] and c["ci"][0] > 0.1
    assert c["mcnemar_p"] < 1e-10 and c["pairs_needed"] < 400
    assert {x["yardstick"] for x in d.comparisons} == {"own", "refrel", "lennorm"}
    [lower] = why(d, "lower_rank_equivalent")
    assert (lower["objective"], lower["lora_rank"], lower["best_rank"]) == ("simpo", 8, 16) and lower["mcnemar_p"] > 0.05
    basis = d.basis
    assert (basis["code"], basis["from"], basis["to"], basis["lora_rank"]) == ("switch", "dpo", "simpo", 8)
    assert (basis["a_only"] - basis["b_only"], basis["n"]) == (70, 400) and basis["yardstick"] in ("refrel", "lennorm")
    assert len(d.explanation) == len(d.reasons) and d.summary.startswith("Switch from dpo to simpo")
    assert len(d.cells) == 4 and all(c.findings for c in d.cells)
    cell16 = next(c for c in d.cells if c.name == "objective=dpo,lora_rank=16")
    assert cell16.accuracy == pytest.approx(0.575) and cell16.ci[0] < 0.575 < cell16.ci[1]
    assert cell16.margin_gap == pytest.approx(sum(ramp(0.0, 3.0, 40)[-4:]) / 4 - 0.3)


def test_significant_lift_with_inflated_margins_is_not_a_switch(tmp_path):
    dpo, simpo = split(400, 220, 10, 80)
    root = write_matrix(tmp_path / "m", [cell("dpo", 8, dpo, train_top=1.0, held=0.8),
                                         cell("simpo", 8, simpo, train_top=5.0, held=0.2)])
    d = decide(root, n_boot=500)
    assert d.verdict == "not_decisive"
    [r] = why(d, "margins_not_cleaner")
    assert r["gap_share"] > r["baseline_gap_share"] and r["gap_share"] > 0.25
    assert d.basis["blocked"] == [r]


def test_no_share_of_a_training_margin_indistinguishable_from_zero(tmp_path):
    """A training margin of 0.0002 gives no '1104%' (issue 24, item 18): its share is unknown (inf, 'n/a')."""
    import math
    from types import SimpleNamespace

    from preftune.verdict.comparisons import Group

    def g(train: float, gap: float) -> Group:
        return Group("x", "dpo", 8, cells=[SimpleNamespace(train_margin=train, margin_gap=gap)])

    assert math.isinf(g(0.0002, 0.0022).gap_share()) and math.isinf(g(0.01, 0.005).gap_share())
    assert g(0.5, 0.2).gap_share() == pytest.approx(0.4)
    dpo, simpo = split(400, 220, 10, 80)
    root = write_matrix(tmp_path / "m", [cell("dpo", 8, dpo, train_top=0.0002, held=0.0001),
                                         cell("simpo", 8, simpo, train_top=1.0, held=0.4)])
    d = decide(root, n_boot=200)
    shares = [r.get("baseline_gap_share") for r in d.reasons if "baseline_gap_share" in r]
    assert shares and all(s is None or math.isinf(s) for s in shares)  # never 1104%



def test_own_reward_lift_absent_on_both_yardsticks_is_not_a_switch(tmp_path):
    dpo, simpo = split(400, 220, 10, 80)
    cells = [cell("dpo", 8, dpo), cell("simpo", 8, simpo, train_top=0.9, held=1.0)]
    for c in cells:  # both policies rank every pair the same under the common yardsticks
        for row in c["rows"]:
            row["refrel_margin"], row["lennorm_margin"] = 1.0, 0.1
    d = decide(write_matrix(tmp_path / "m", cells), n_boot=500)
    assert d.verdict == "not_decisive", d.reasons
    [r] = why(d, "own_reward_only")
    assert r["own"]["mcnemar_p"] < 0.05 and r["own"]["diff"] > 0
    assert (r["best"]["yardstick"], r["best"]["diff"], r["best"]["mcnemar_p"]) == ("refrel", 0.0, 1.0)


def test_keep_when_baseline_significantly_better(tmp_path):
    dpo, simpo = split(400, 220, 80, 10)
    d = decide(write_matrix(tmp_path / "m", [cell("dpo", 8, dpo), cell("simpo", 8, simpo)]), n_boot=500)
    assert d.verdict == "keep" and d.objective == "dpo", d.reasons
    [r] = why(d, "baseline_better")
    assert r["a"] == "objective=simpo,lora_rank=8" and r["diff"] < 0 and r["mcnemar_p"] < 0.05


def test_keep_when_equal_and_enough_pairs(tmp_path):
    dpo, simpo = split(1000, 700, 20, 20)
    d = decide(write_matrix(tmp_path / "m", [cell("dpo", 8, dpo, train_top=1.0, held=0.8),
                                             cell("simpo", 8, simpo, train_top=2.0, held=0.5)]), n_boot=500)
    assert d.verdict == "keep", d.reasons
    [r] = why(d, "no_difference")
    assert r["mcnemar_p"] == 1.0 and r["n"] == 1000 and r["pairs_to_detect"] <= 1000


def test_not_decisive_on_a_small_heldout_set(tmp_path):
    dpo, simpo = split(40, 22, 2, 5)
    d = decide(write_matrix(tmp_path / "m", [cell("dpo", 8, dpo), cell("simpo", 8, simpo, train_top=0.8)]),
               n_boot=500)
    assert d.verdict == "not_decisive" and d.objective == "dpo"
    c = comparison(d, "objective=simpo,lora_rank=8", "objective=dpo,lora_rank=8")
    assert c["mcnemar_p"] > 0.05 and c["pairs_needed"] > 40
    [r] = why(d, "not_significant")
    assert (r["pairs_needed"], r["seeds"], r["powered"]) == (c["pairs_needed"], 1, False)
    assert d.basis["pairs_needed"] == c["pairs_needed"]


def test_fallback_orpo(tmp_path):
    nan_lines = metrics(ramp(0.0, 1.0, 40), [0.0, 0.1], [0.5, 0.6])
    nan_lines[20]["loss"] = float("nan")
    good, chance = split(200, 140, 0, 0)[0], [i % 2 == 0 for i in range(200)]
    root = write_matrix(tmp_path / "m", [
        cell("dpo", 8, good, lines=nan_lines),
        cell("ipo", 8, good, status="failed", error="TrainingDiverged: loss is nan at step 12"),
        cell("simpo", 8, chance),
        cell("orpo", 8, good),
        cell("orpo", 4, good),
    ])
    d = decide(root, n_boot=500)
    assert d.verdict == "fallback_orpo", d.reasons
    assert (d.objective, d.lora_rank) == ("orpo", 4)
    assert why(d, "cell_not_finished") == [{"code": "cell_not_finished", "cell": "objective=ipo,lora_rank=8",
                                            "status": "failed", "error": "TrainingDiverged: loss is nan at step 12"}]
    [r] = why(d, "all_unstable")
    assert {c["cell"]: c["problems"] for c in r["cells"]} == {"objective=dpo,lora_rank=8": ["nonfinite"],
                                                            "objective=simpo,lora_rank=8": ["at_chance"]}
    assert r["failed"] == [{"cell": "objective=ipo,lora_rank=8", "error": "TrainingDiverged: loss is nan at step 12"}]
    assert d.basis == {"code": "fallback", "objective": "orpo", "lora_rank": 4, "accuracy": 0.7, "behaviour": []}
    failed = next(c for c in d.cells if c.status == "failed")
    assert failed.error.startswith("TrainingDiverged") and "accuracy" not in failed.to_dict()


def test_everything_unstable_is_not_decisive(tmp_path):
    chance = [i % 2 == 0 for i in range(200)]
    d = decide(write_matrix(tmp_path / "m", [cell("dpo", 8, chance), cell("orpo", 8, chance)]), n_boot=200)
    assert d.verdict == "not_decisive" and d.objective == "dpo"
    assert d.basis["code"] == "all_at_chance" and [c["cell"] for c in d.basis["cells"]] == \
        ["objective=dpo,lora_rank=8"]  # the fallback objective is not judged


@pytest.mark.parametrize("seed", range(12))
def test_flipped_labels_never_switch(tmp_path, seed):
    """No learnable preference: every cell is a coin flip per pair, training margins still rise."""
    rng = random.Random(seed)
    n = 200
    cells = [cell(obj, rank, [rng.random() < 0.5 for _ in range(n)], train_top=rng.uniform(0.5, 3), held=0.01)
             for obj in ("dpo", "simpo") for rank in (16, 8)]
    d = decide(write_matrix(tmp_path / "m", cells), n_boot=200)
    assert d.verdict == "not_decisive", d.reasons  # at chance without divergence: a data problem


def test_winner_must_beat_chance(tmp_path):
    """A challenger significantly better than a below-chance baseline, but itself not above chance, loses."""
    dpo, simpo = split(400, 80, 0, 60)   # dpo 0.2
    simpo[300:376] = [True] * 76         # simpo 0.54, interval reaches below 0.5
    d = decide(write_matrix(tmp_path / "m", [cell("dpo", 8, dpo), cell("simpo", 8, simpo, train_top=0.5)]),
               n_boot=200)
    assert d.verdict == "not_decisive", d.reasons
    [r] = why(d, "not_above_chance")
    assert r["acc_a"] == pytest.approx(0.54) and r["ci_low"] < 0.5


def test_pairs_are_joined_by_id(tmp_path):
    dpo, simpo = split(100, 50, 5, 30)
    ids = [f"h:{i}" for i in range(100)]
    order = list(range(100))
    random.Random(1).shuffle(order)
    cells = [cell("dpo", 8, dpo, ids=ids),
             cell("simpo", 8, [simpo[i] for i in order], ids=[ids[i] for i in order])]
    cells[1]["rows"].append(pairs([True], ids=["only-in-simpo"])[0])
    d = decide(write_matrix(tmp_path / "m", cells), n_boot=200)
    c = comparison(d, "objective=simpo,lora_rank=8", "objective=dpo,lora_rank=8")
    assert (c["n"], c["a_only"], c["b_only"]) == (100, 30, 5)


def test_seeds_are_pooled_per_pair(tmp_path):
    n = 300
    a1, b1 = split(n, 150, 20, 60)
    a2, b2 = split(n, 150, 30, 50)
    factors = {"objective": ["dpo", "simpo"], "lora_rank": [8], "seed": [1, 2]}
    clean = {"train_top": 0.9, "held": 1.0}
    cells = [cell("dpo", 8, a1, seed=1), cell("dpo", 8, a2, seed=2),
             cell("simpo", 8, b1, seed=1, **clean), cell("simpo", 8, b2, seed=2, **clean)]
    d = decide(write_matrix(tmp_path / "m", cells, factors), n_boot=500)
    groups = {g["name"]: g for g in d.groups}
    dpo = groups["objective=dpo,lora_rank=8"]
    assert dpo["seeds"] == [1, 2] and dpo["accuracy"] == pytest.approx((170 / n + 180 / n) / 2)
    assert dpo["seed_accuracies"] == pytest.approx([170 / n, 180 / n])
    c = comparison(d, "objective=simpo,lora_rank=8", "objective=dpo,lora_rank=8")
    # per pair over seeds: dpo right on 20 pairs in both seeds, simpo on 50; 10 pairs split one each (a tie)
    assert c["n"] == n and (c["a_only"], c["b_only"]) == (50, 20)
    assert d.verdict == "switch", d.reasons
    assert len(d.cells) == 4


def test_baseline_argument_and_failed_baseline(tmp_path):
    root = switch_matrix(tmp_path / "m")
    d = decide(root, baseline={"objective": "simpo", "lora_rank": 16}, n_boot=200)
    assert d.baseline == {"objective": "simpo", "lora_rank": 16} and d.verdict != "switch"
    with pytest.raises(InputError, match="baseline"):
        decide(root, baseline={"objective": "kto", "lora_rank": 16})
    dpo, simpo = split(100, 50, 5, 30)
    failed = write_matrix(tmp_path / "f", [cell("dpo", 8, dpo, status="failed", error="OOM"),
                                           cell("simpo", 8, simpo)])
    d = decide(failed, n_boot=200)
    assert d.verdict == "not_decisive" and d.basis == {"code": "baseline_missing", "objective": "dpo",
                                                             "lora_rank": 8, "behaviour": []}
    assert (d.objective, d.lora_rank) == ("dpo", 8)


def test_write_decision_is_strict_json(tmp_path):
    root = switch_matrix(tmp_path / "m")
    d = decide(root, n_boot=200)
    d.cells[0].margin = float("nan")
    path = write_decision(root, d)
    loaded = json.loads(path.read_text(), parse_constant=lambda c: pytest.fail(f"non-strict JSON: {c}"))
    assert path == root / "decision.json" and loaded["verdict"] == "switch" and loaded["cells"][0]["margin"] is None


def test_bad_matrix(tmp_path):
    with pytest.raises(InputError, match="not a matrix .* no matrix.json, iterate.json or pipeline.json"):
        decide(tmp_path)
    with pytest.raises(InputError, match="no such folder"):
        decide(tmp_path / "nope")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.jsonl").write_text("")
    with pytest.raises(InputError, match="a run folder: .*preftune review"):
        decide(tmp_path / "run")
    (tmp_path / "loop").mkdir()
    (tmp_path / "loop" / "pipeline.json").write_text("{}")
    with pytest.raises(InputError, match="a pipeline folder: its matrix is .*loop/matrix"):
        decide(tmp_path / "loop")
    (tmp_path / "matrix.json").write_text('{"cells": [{"status": "finished"}]}')
    with pytest.raises(InputError, match="'cells'"):
        decide(tmp_path)
    (tmp_path / "matrix.json").write_text('{"cells": [{"name": "x", "status": "finished"}]}')
    with pytest.raises(InputError, match="config.yaml"):
        decide(tmp_path)


def with_yardsticks(c: dict, refrel: list[bool], lennorm: list[bool]) -> dict:
    """Set the cell's per-pair yardstick margins: positive exactly where the list says the pair is ranked right."""
    for row, r, n in zip(c["rows"], refrel, lennorm):
        row["refrel_margin"], row["lennorm_margin"] = (1.0 if r else -1.0), (0.1 if n else -0.1)
    return c


def test_significantly_worse_on_the_other_yardstick_is_not_a_switch(tmp_path):
    dpo, simpo = split(400, 220, 10, 80)
    worse_len, base_len = split(400, 220, 0, 60)  # simpo right on 220 pairs under lennorm, dpo on 280
    cells = [with_yardsticks(cell("dpo", 8, dpo), dpo, base_len),
             with_yardsticks(cell("simpo", 8, simpo, train_top=0.9, held=1.0), simpo, worse_len)]
    d = decide(write_matrix(tmp_path / "m", cells), n_boot=300)
    assert d.verdict == "not_decisive"
    [r] = why(d, "worse_other_yardstick")
    assert r["yardstick"] == "refrel" and [(w["yardstick"], w["a_only"], w["b_only"]) for w in r["worse"]] == \
        [("lennorm", 0, 60)]


def test_stand_in_rank_and_single_objective(tmp_path):
    dpo, simpo = split(200, 120, 5, 10)
    d = decide(write_matrix(tmp_path / "a", [cell("dpo", 16, dpo), cell("simpo", 8, simpo)]), n_boot=200)
    assert why(d, "stand_in") == [{"code": "stand_in", "objective": "simpo", "lora_rank": 16,
                                   "cell": "objective=simpo,lora_rank=8"}]
    d = decide(write_matrix(tmp_path / "b", [cell("dpo", 16, simpo), cell("dpo", 8, dpo)]), n_boot=200)
    assert d.verdict == "not_decisive" and why(d, "single_objective") == [{"code": "single_objective",
                                                                              "objective": "dpo"}]
    assert d.basis == {"code": "single_objective", "objective": "dpo", "lora_rank": 8, "behaviour": []}
    [r] = why(d, "lower_rank_equivalent")  # 5 more of 200 at rank 8 is no difference: the lower rank
    assert (r["lora_rank"], r["best_rank"]) == (8, 16)


def _nan_lines() -> list[dict]:
    lines = metrics(ramp(0.0, 1.0, 40), [0.0, 0.1], [0.5, 0.6])
    lines[20]["loss"] = float("nan")
    return lines


def test_fallback_without_orpo_cells_and_orpo_unstable_too(tmp_path):
    good, chance = split(200, 140, 0, 0)[0], [i % 2 == 0 for i in range(200)]
    d = decide(write_matrix(tmp_path / "a", [cell("dpo", 8, good, lines=_nan_lines()), cell("ipo", 8, chance)]),
               n_boot=200)
    assert d.verdict == "fallback_orpo" and d.objective == "orpo"
    assert d.basis == {"code": "fallback_not_run", "objective": "orpo", "behaviour": []}
    assert why(d, "family_not_tried") == [{"code": "family_not_tried", "family": "reference-free"}]
    d = decide(write_matrix(tmp_path / "b", [cell("dpo", 8, good, lines=_nan_lines()), cell("orpo", 8, chance)]),
               n_boot=200)
    assert d.verdict == "not_decisive" and d.basis["code"] == "fallback_unstable"
    assert d.basis["cells"] == [{"cell": "objective=orpo,lora_rank=8", "problems": ["at_chance"]}]


def test_identical_cells_are_equal_not_cleaner_and_never_print_none(tmp_path):
    """dpo vs cdpo with label_smoothing 0 are the same run; both at accuracy 1.0 leave no room for a difference."""
    perfect = [True] * 200
    d = decide(write_matrix(tmp_path / "m", [cell("dpo", 8, perfect), cell("cdpo", 8, perfect)]), n_boot=200)
    [r] = why(d, "not_significant")
    assert (r["margins"], r["power_unknown"], r["pairs_to_detect"]) == ("equal", "ceiling", None)
    text = " ".join(d.explanation) + d.summary
    assert "None" not in text and "nan" not in text and "cleaner (" not in text


def test_learning_is_judged_on_yardsticks_against_step_0(tmp_path):
    """A SimPO cell whose length prior ranks 90% of pairs at step 0 and still does at the end learned nothing,
    however high its own-reward accuracy; a DPO cell that rose from the exact tie learned."""
    n = 200
    right = [i < 180 for i in range(n)]

    def lines(step0: dict, final: dict) -> list[dict]:
        out = metrics(ramp(0.0, 1.0, 40), [0.0, 0.5], [0.9, 0.9])
        out[0].update(step0)   # the first line is the step-0 eval
        out[-1].update(final)
        return out

    simpo = cell("simpo", 8, right, lines=lines({"eval_refrel/accuracy": 0.5, "eval_lennorm/accuracy": 0.9},
                                                {"eval_refrel/accuracy": 0.5, "eval_lennorm/accuracy": 0.9}))
    with_yardsticks(simpo, [i % 2 == 0 for i in range(n)], right)    # refrel 0.5, lennorm 0.9: as at step 0
    dpo = cell("dpo", 8, right, lines=lines({"eval_refrel/accuracy": 0.5, "eval_lennorm/accuracy": 0.6},
                                            {"eval_refrel/accuracy": 0.9, "eval_lennorm/accuracy": 0.9}))
    d = decide(write_matrix(tmp_path / "m", [dpo, simpo]), n_boot=200)
    found = {c.name: {f["code"]: f["data"] for f in c.findings} for c in d.cells}
    gains = found["objective=simpo,lora_rank=8"]["not_learned"]["yardsticks"]
    assert gains["lennorm"]["step0"] == 0.9 and gains["lennorm"]["final"] == 0.9 and not gains["lennorm"]["learned"]
    assert gains["refrel"]["final"] == 0.5 and not gains["refrel"]["learned"]
    assert "not_learned" not in found["objective=dpo,lora_rank=8"]
    [r] = why(d, "challenger_not_learned")
    assert r["cell"] == "objective=simpo,lora_rank=8" and r["problems"] == ["not_learned"]


def test_significant_alone_but_not_over_two_challengers(tmp_path):
    """4 vs 15 discordant pairs: adjusted p 0.038 < 0.05, but not below 0.05 / 2 challengers."""
    dpo, simpo = split(300, 200, 4, 15)
    ipo = split(300, 200, 4, 4)[1]
    cells = [cell("dpo", 8, dpo), cell("simpo", 8, simpo, train_top=0.9, held=1.0), cell("ipo", 8, ipo)]
    d = decide(write_matrix(tmp_path / "m", cells), n_boot=200)
    [r] = why(d, "not_significant_adjusted")
    assert r["cell"] == "objective=simpo,lora_rank=8" and r["challengers"] == 2 and r["level"] == 0.025
    assert r["mcnemar_p"] == pytest.approx(2 * 0.019210815429688, rel=1e-6)  # two yardsticks, raw p 0.0192
    assert d.verdict == "not_decisive" and d.basis["blocked"] == [r]


def with_generations(root: Path, name: str, prefs: list[float], policy_len: list[int], ref_len: list[int],
                     repeat: bool = False) -> None:
    """Give a written cell (``root/cells/name``, or the run folder ``root`` when name is "") a behavioural
    evaluation: gen_eval.jsonl rows and summary.json -> gen_eval."""
    from preftune.evaluation.behaviour import summarize

    folder = root / "cells" / name if name else root
    rows = [{"id": f"heldout.jsonl:{i + 1}", "prompt": f"p{i}",
             "policy": " ".join(["a b c"] * (n // 3) if repeat else [f"w{j}" for j in range(n)]),
             "reference": " ".join(f"w{j}" for j in range(m)), "policy_tokens": n, "reference_tokens": m,
             "policy_finish": "length" if repeat else "eos", "reference_finish": "eos", "policy_score": None,
             "reference_score": None, "preference": p} for i, (p, n, m) in enumerate(zip(prefs, policy_len, ref_len))]
    (folder / "gen_eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary = json.loads((folder / "summary.json").read_text())
    summary["gen_eval"] = summarize(rows, judge_spec="python:t:j", max_new_tokens=32, temperature=0.0, seed=0)
    (folder / "summary.json").write_text(json.dumps(summary))


def test_pairs_up_behaviour_down_blocks_the_switch(tmp_path):
    dpo, simpo = split(400, 220, 10, 80)
    root = write_matrix(tmp_path / "m", [cell("dpo", 8, dpo), cell("simpo", 8, simpo, train_top=0.9, held=1.0)])
    n = 100
    lens = [20] * n
    with_generations(root, "objective=dpo,lora_rank=8", [1.0] * 70 + [0.0] * 30, lens, lens)
    with_generations(root, "objective=simpo,lora_rank=8", [1.0] * 30 + [0.0] * 70, lens, lens)
    d = decide(root, n_boot=300)
    assert d.verdict == "not_decisive"
    [b] = why(d, "behaviour_comparison")
    assert (b["yardstick"], b["n"], b["a_only"], b["b_only"]) == ("behaviour", 100, 0, 40)
    assert (b["win_rate_a"], b["win_rate_b"]) == (0.3, 0.7)
    [dis] = why(d, "pairs_behaviour_disagree")
    assert dis["pairs"]["diff"] > 0 and dis["behaviour"]["diff"] == pytest.approx(-0.4)
    [w] = why(d, "worse_other_yardstick")
    assert [x["yardstick"] for x in w["worse"]] == ["behaviour"]
    assert d.basis["behaviour"] == [dis] and "Behaviour:" in d.summary


def test_a_behaviour_win_that_is_only_length(tmp_path):
    """The challenger wins exactly where its answer is longer than the reference's: LC erases the win."""
    same = split(300, 200, 0, 0)[0]
    root = write_matrix(tmp_path / "m", [cell("dpo", 8, same), cell("simpo", 8, same)])
    n = 120
    ref = [20] * n
    longer = [40 if i % 5 else 10 for i in range(n)]           # 4 of 5 answers twice as long, the rest half
    prefs = [1.0 if n_ > 20 else 0.0 for n_ in longer]          # wins exactly where it is longer
    with_generations(root, "objective=dpo,lora_rank=8", [1.0 if i % 2 else 0.0 for i in range(n)],
                     [20 + (i % 3) for i in range(n)], ref)
    with_generations(root, "objective=simpo,lora_rank=8", prefs, longer, ref)
    d = decide(root, n_boot=300)
    [lc] = why(d, "lc_erases_win")
    assert lc["win_rate_a"] == pytest.approx(0.8) and lc["win_rate_b"] == pytest.approx(0.5)
    assert lc["lc_win_rate_a"] - lc["lc_win_rate_b"] < 0.15
    [shift] = why(d, "win_with_length_shift")
    assert shift["len_change"] == pytest.approx(34 / 21 - 1)
    found = {c.name: {f["code"] for f in c.findings} for c in d.cells}
    assert "length_exploitation" in found["objective=simpo,lora_rank=8"]
    assert "length_exploitation" not in found["objective=dpo,lora_rank=8"]


def test_degenerate_generations_are_a_finding(tmp_path):
    from preftune.evaluation.review import review

    same = split(100, 60, 0, 0)[0]
    root = write_matrix(tmp_path / "m", [cell("dpo", 8, same)])
    with_generations(root, "objective=dpo,lora_rank=8", [0.5] * 50, [30] * 50, [30] * 50, repeat=True)
    f = {x.code: x.data for x in review(root / "cells" / "objective=dpo,lora_rank=8").findings}
    assert f["degenerate_generations"]["hit_max_rise"] == 1.0 and f["degenerate_generations"]["repeat_rise"] > 0.8
    assert f["behaviour"]["win_rate"] == 0.5 and f["behaviour"]["tie_rate"] == 1.0


def iterate_folder(root: Path, rounds: list[tuple[list[bool], list[float], list[int]]]) -> Path:
    """An iterate folder whose round r ranks held-out pairs as ``correct`` (on every yardstick) and wins
    ``prefs`` against the original reference with generations of ``lengths`` (the reference's: 20 tokens)."""
    root.mkdir(parents=True)
    (root / "iterate.json").write_text(json.dumps({"settings": {"reference": "initial"}}))
    for r, (correct, prefs, lengths) in enumerate(rounds, 1):
        c = with_yardsticks(cell("dpo", 8, correct), correct, correct)
        run = write_run(root / f"round-{r}", c["lines"], c["rows"])
        with_generations(run, "", prefs, lengths, [20] * len(prefs))
        summary = json.loads((run / "summary.json").read_text())  # a whole one: a round counts once it finished
        (run / "summary.json").write_text(json.dumps({"steps": 40, "params": {}, **summary}))
    return root


def test_rounds_gain_pairs_only_and_length_only(tmp_path):
    """decide over iterate rounds: a gain on pairs and behaviour continues; a log-prob gain while the win rate
    falls, or a win-rate gain that is only length, stops (and does not count as beating the first round)."""
    before, after = split(300, 150, 5, 40)  # round 2 ranks 35 more held-out pairs right: significant
    n, same = 100, [20] * 100
    up = decide(iterate_folder(tmp_path / "up", [(before, [0.5] * n, same),
                                                 (after, [1.0] * 70 + [0.0] * 30, same)]), n_boot=200)
    assert (up.verdict, up.last_beats_first, up.basis["code"]) == ("continue", True, "round_gain")
    assert set(up.basis["yardsticks"]) == {"behaviour", "refrel", "lennorm"} and not why(up, "round_pairs_only")

    down = decide(iterate_folder(tmp_path / "down", [(before, [1.0] * 50 + [0.0] * 50, same),
                                                     (after, [1.0] * 46 + [0.0] * 54, same)]), n_boot=200)
    assert (down.verdict, down.last_beats_first, down.basis["pairs_only"]) == ("stop", False, True)
    [r] = why(down, "round_pairs_only")
    assert (r["round"], r["b"], r["yardsticks"]) == ("round-2", "round-1", ["refrel", "lennorm"])
    assert (r["acc_a"], r["acc_b"], r["a_only"], r["b_only"]) == (0.46, 0.5, 0, 4) and r["mcnemar_p"] > 0.05
    assert "got worse" in down.summary

    longer = [40 if i % 5 else 10 for i in range(n)]  # wins exactly where it writes twice as long
    length = decide(iterate_folder(tmp_path / "len", [
        (before, [1.0 if i % 2 else 0.0 for i in range(n)], [20 + i % 3 for i in range(n)]),
        (before, [1.0 if x > 20 else 0.0 for x in longer], longer)]), n_boot=200)
    assert (length.verdict, length.basis["length_only"], length.basis["yardsticks"]) == \
        ("stop", True, ["behaviour"])
    [lo] = why(length, "round_length_only")
    assert lo["win_rate_a"] == pytest.approx(0.8) and lo["lc_win_rate_a"] - lo["lc_win_rate_b"] < 0.15


def _learning_cell(objective: str, rank: int, learned: bool, n: int = 200) -> dict:
    """A cell whose yardsticks rose from the step-0 tie (``learned``) or stayed at it."""
    right = [i < (150 if learned else 100) for i in range(n)]
    final = 0.75 if learned else 0.5
    out = metrics(ramp(0.0, 1.0, 40), [0.0, 0.5], [0.5, final])
    out[0].update({"eval_refrel/accuracy": 0.5, "eval_lennorm/accuracy": 0.5})
    out[-1].update({"eval_refrel/accuracy": final, "eval_lennorm/accuracy": final})
    c = cell(objective, rank, right, lines=out)
    return with_yardsticks(c, right, right)


def test_learned_nothing_is_not_called_unstable_and_favours_no_one(tmp_path):
    """Issue 24 item 12: a cell that learned nothing is `not_learned`, not `unstable`; when the baseline learned
    nothing too, its trouble favours no one."""
    cells = [_learning_cell("dpo", 8, False), _learning_cell("simpo", 8, False), _learning_cell("ipo", 8, True)]
    d = decide(write_matrix(tmp_path / "m", cells), n_boot=200)
    [b] = why(d, "baseline_not_learned")
    [c] = [r for r in why(d, "challenger_not_learned") if "simpo" in r["cell"]]
    assert b["problems"] == ["not_learned"] and c["favours"] is None and c["baseline_state"] == "not_learned"
    assert not why(d, "challenger_unstable") and not why(d, "baseline_unstable")
    text = " ".join(d.explanation) + d.summary
    assert "unstable" not in text and "favours the baseline" not in text and "learned nothing" in text


def test_a_diverged_challenger_favours_a_baseline_that_learned(tmp_path):
    diverged = _learning_cell("simpo", 8, False)
    diverged["lines"] = metrics(ramp(0.0, 1.0, 40), [0.0, 0.5], [0.5, 0.5], loss=[0.7] * 30 + [9.0] * 10)
    d = decide(write_matrix(tmp_path / "m", [_learning_cell("dpo", 8, True), diverged]), n_boot=200)
    [c] = why(d, "challenger_diverged")
    assert c["favours"] == "baseline" and "divergence" in c["problems"]


def test_the_one_cell_that_learned_is_named(tmp_path):
    """Issue 24 item 13: only simpo at rank 4 rose above step 0 while the verdict compares the rank-8 cells:
    the verdict names it, with its numbers and the run that would test it."""
    cells = [_learning_cell("dpo", 8, False), _learning_cell("dpo", 4, False), _learning_cell("simpo", 8, False),
             _learning_cell("simpo", 4, True)]
    d = decide(write_matrix(tmp_path / "m", cells), n_boot=200)
    assert d.verdict == "not_decisive"
    [r] = why(d, "learned_elsewhere")
    assert (r["cell"], r["objective"], r["lora_rank"]) == ("objective=simpo,lora_rank=4", "simpo", 4)
    assert r["step0"] == 0.5 and r["final"] == 0.75 and r["ci_low"] > 0.5
    assert "objective=simpo,lora_rank=4" in d.summary and "--baseline objective=simpo,lora_rank=4" in d.summary


def test_a_damaged_cell_summary_is_reported_by_name(tmp_path):
    from preftune.core.layout import RunDir, RunSummary

    root = switch_matrix(tmp_path / "m")
    run = RunDir(root / "cells" / "objective=simpo,lora_rank=8")
    run.write_summary(RunSummary("simpo", 8, 42, 40, "finished", {"beta": 2.0}))
    run.summary.write_text(run.summary.read_text().replace('"steps": 40', '"steps": 41'))
    d = decide(root, n_boot=200)
    [r] = why(d, "cell_not_finished")
    assert r["cell"] == "objective=simpo,lora_rank=8" and r["status"] == "damaged" and "damaged" in r["error"]
    assert all("lora_rank=8" not in c["a"] or "simpo" not in c["a"] for c in d.comparisons)
