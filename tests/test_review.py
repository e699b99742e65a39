"""review: findings on synthetic logs (run folders, TRL trainer_state.json, JSONL), and bad input."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import yaml

from preftune.commands.cli import main
from preftune.core.errors import InputError
from preftune.evaluation.review import Review, review, write_review

# --- synthetic runs (also used by test_decide and test_report) ----------------------------------------------

def metrics(train_margins: list[float], eval_margins: list[float], eval_accs: list[float], *,
            chosen: list[float] | None = None, eval_chosen: list[float] | None = None,
            loss: list[float] | None = None, n_pairs: int = 200) -> list[dict]:
    """metrics.jsonl lines: one training line per margin, evals spread evenly from step 0 to the end."""
    n = len(train_margins)
    lines = [{"step": i, "epoch": i / n, "loss": loss[i - 1] if loss else math.log1p(math.exp(-m)),
              "rewards/margins": m, "logps/chosen": chosen[i - 1] if chosen else -20.0, "logps/rejected": -25.0}
             for i, m in enumerate(train_margins, 1)]
    k = len(eval_accs)
    for j, (m, a) in enumerate(zip(eval_margins, eval_accs)):
        step = round(j * n / (k - 1)) if k > 1 else n
        lines.append({"step": step, "epoch": step / n, "eval_loss": 0.6, "eval_rewards/margins": m,
                      "eval_accuracy": a, "eval_rewards/accuracies": a, "eval_pairs": n_pairs,
                      "eval_logps/chosen": eval_chosen[j] if eval_chosen else -20.0})
    return sorted(lines, key=lambda r: r["step"])


def pairs(correct: list[bool], *, seed: int = 0, scale: float = 1.0, chosen_tokens: list[int] | None = None,
          rejected_tokens: list[int] | None = None, text: bool = False, ids: list[str] | None = None) -> list[dict]:
    """eval_pairs.jsonl rows: margin of size ~scale, positive exactly when ``correct``."""
    rng = random.Random(seed)
    rows = []
    for i, ok in enumerate(correct):
        m = rng.uniform(0.5, 1.5) * scale * (1 if ok else -1)
        ct = chosen_tokens[i] if chosen_tokens else rng.randint(8, 12)
        rt = rejected_tokens[i] if rejected_tokens else rng.randint(8, 12)
        row = {"id": ids[i] if ids else f"heldout.jsonl:{i + 1}", "chosen_logps": -10.0 + m, "rejected_logps": -10.0,
               "chosen_tokens": ct, "rejected_tokens": rt, "ref_chosen_logps": -10.0, "ref_rejected_logps": -10.0,
               "chosen_reward": m / 2, "rejected_reward": -m / 2, "margin": m, "correct": ok,
               "refrel_margin": m * 10, "lennorm_margin": m / 10}
        if text:
            row.update(prompt=f"sort: {i} 3 1 =", chosen=" 1 3", rejected=" 3 1")
        rows.append(row)
    return rows


def write_run(folder: Path, lines: list[dict], rows: list[dict] | None, *, objective: str = "dpo",
              lora_rank: int = 8, seed: int = 42) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.yaml").write_text(yaml.safe_dump({"objective": objective, "lora_rank": lora_rank,
                                                        "seed": seed}))
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    if rows is not None:
        (folder / "eval_pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "summary.json").write_text(json.dumps({"objective": objective, "lora_rank": lora_rank,
                                                     "seed": seed, "status": "finished"}))
    return folder


def ramp(a: float, b: float, n: int) -> list[float]:
    return [a + (b - a) * i / (n - 1) for i in range(n)]


def inflating_lines() -> list[dict]:
    """Training margin 0.05 -> 2.3, held-out accuracy flat around 0.62, chosen log-probs falling."""
    return metrics(ramp(0.05, 2.31, 60), [0.1, 0.12, 0.1, 0.11, 0.09, 0.1], [0.62, 0.63, 0.61, 0.62, 0.62, 0.61],
                   chosen=ramp(-20, -35, 60), eval_chosen=ramp(-20, -33, 6))


def healthy_lines() -> list[dict]:
    return metrics(ramp(0.0, 0.6, 60), ramp(0.0, 0.5, 6), ramp(0.55, 0.8, 6))


def balanced(n: int, acc: float) -> list[bool]:
    k = round(acc * n)
    return [True] * k + [False] * (n - k)


def codes(r: Review) -> dict[str, str]:
    return {f.code: f.severity for f in r.findings}


# --- tests ---------------------------------------------------------------------------------------------------

def test_inflating_run_flags_overoptimization_with_numbers(tmp_path):
    r = review(write_run(tmp_path / "run", inflating_lines(), pairs(balanced(400, 0.62))))
    found = codes(r)
    assert found["overoptimization"] == "warn" and found["margin_gap"] == "warn"
    assert found["likelihood_displacement"] == "warn"
    assert "healthy" not in found and not r.unstable
    over = next(f for f in r.findings if f.code == "overoptimization")
    assert "over 6 evals" in over.sentence and "inflation, not learning" in over.sentence
    assert "0.62 -> 0.61" in over.sentence
    assert over.data["train_margin_late"] > 1.5 and over.data["train_margin_early"] < 0.7
    gap = next(f for f in r.findings if f.code == "margin_gap")
    assert gap.data["gap"] == pytest.approx(gap.data["train_margin"] - 0.1)
    assert gap.data["train_margin"] == pytest.approx(sum(ramp(0.05, 2.31, 60)[-6:]) / 6)


def test_healthy_run(tmp_path):
    r = review(write_run(tmp_path / "run", healthy_lines(), pairs(balanced(400, 0.8))))
    assert r.findings[0].code == "healthy"
    assert all(f.severity == "info" for f in r.findings)
    assert "held-out accuracy 0.55 -> 0.8 over 6 evals" in r.findings[0].sentence
    d = r.to_dict()
    assert d["kind"] == "run" and not d["unstable"] and d["findings"][0]["code"] == "healthy"
    path = write_review(r, tmp_path / "out")
    assert json.loads(path.read_text())["findings"][0]["sentence"] == r.findings[0].sentence
    assert write_review(r) == tmp_path / "run" / "review.json"  # default: into the run folder


def test_trl_trainer_state(tmp_path):
    history = []
    for step, m in enumerate(ramp(0.0, 3.0, 40), 1):
        history.append({"step": step, "epoch": step / 40, "loss": 0.5, "rewards/margins": m,
                        "logps/chosen": -30.0 - step, "learning_rate": 1e-6})
        if step % 8 == 0:
            history.append({"step": step, "eval_loss": 0.69, "eval_rewards/margins": 0.05,
                            "eval_rewards/accuracies": 0.6 - step / 1000, "eval_runtime": 1.0})
    history.append({"step": 40, "train_loss": 9.9, "train_runtime": 12.0, "total_flos": 0})
    path = tmp_path / "trainer_state.json"
    path.write_text(json.dumps({"global_step": 40, "log_history": history}))
    for src in (path, tmp_path):  # the file or the TRL output folder holding it
        r = review(src)
        assert r.kind == "trainer_state"
        found = codes(r)
        assert found["overoptimization"] == "warn" and found["likelihood_displacement"] == "warn"
        assert "divergence" not in found  # the end-of-training train_loss line is not a step


def test_jsonl_with_train_prefixes_and_nan(tmp_path):
    lines = [{"step": i, "train_loss": 0.6, "train_rewards/margins": 0.1 * i} for i in range(1, 21)]
    lines[12]["train_loss"] = float("nan")
    lines.append({"step": 20, "eval_rewards/margins": 1.0, "eval_accuracy": 0.7})
    path = tmp_path / "log.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in lines))  # no final newline: the last line still counts
    r = review(path)
    assert r.kind == "jsonl" and r.unstable
    nonfinite = next(f for f in r.findings if f.code == "nonfinite")
    assert nonfinite.severity == "error" and "loss (from step 13)" in nonfinite.sentence
    assert json.loads(json.dumps(r.to_dict(), allow_nan=False))  # strict JSON
    assert write_review(r) is None  # not a run folder: nothing written without a destination


def test_divergence_and_chance(tmp_path):
    lines = metrics(ramp(0.0, 0.2, 40), [0.0, 0.01], [0.5, 0.49], loss=ramp(0.69, 0.7, 20) + ramp(2.0, 6.0, 20))
    r = review(write_run(tmp_path / "run", lines, pairs(balanced(100, 0.49))))
    found = codes(r)
    assert found["divergence"] == "error" and found["at_chance"] == "error" and r.unstable
    assert "0.49" in next(f.sentence for f in r.findings if f.code == "at_chance")


def test_small_heldout_set_is_called_noisy(tmp_path):
    r = review(write_run(tmp_path / "run", healthy_lines(), pairs(balanced(30, 0.7))))
    noise = next(f for f in r.findings if f.code == "heldout_noise")
    assert noise.severity == "warn" and "30 held-out pairs" in noise.sentence
    lo, hi = noise.data["ci"]
    assert hi - lo > 0.3 and "too few to separate" in noise.sentence
    big = review(write_run(tmp_path / "big", healthy_lines(), pairs(balanced(2000, 0.7))))
    assert next(f for f in big.findings if f.code == "heldout_noise").severity == "info"


def test_length_bias_chosen_shorter(tmp_path):
    n = 100
    correct = [i % 3 != 0 for i in range(n)]
    ct = [6 if i < 85 else 12 for i in range(n)]
    rt = [12 if i < 85 else 10 for i in range(n)]
    r = review(write_run(tmp_path / "run", healthy_lines(), pairs(correct, chosen_tokens=ct, rejected_tokens=rt)))
    bias = next(f for f in r.findings if f.code == "length_bias")
    assert bias.severity == "warn" and "SimPO" in bias.sentence
    assert bias.data["chosen_shorter"] == pytest.approx(0.85) and "85%" in bias.sentence
    # median of the log-ratios: 85 pairs at 6/12 = 0.5 outnumber 15 at 12/10, so the median ratio is 0.5
    assert bias.data["median_length_ratio"] == pytest.approx(0.5)
    # "prefer the shorter" is right in 85 of 100; Wilson 95%: centre (0.85 + z²/200)/(1 + z²/100) = 0.8371,
    # half-width z/(1 + z²/100)·√(0.85·0.15/100 + z²/40000) = 0.0699
    assert (bias.data["rule"], bias.data["rule_accuracy"], bias.data["teaches"]) == ("shorter", 0.85, "brevity")
    assert bias.data["ci"] == pytest.approx([0.7672, 0.9069], abs=1e-4)
    assert bias.data["by"] == ["label"]
    even = review(write_run(tmp_path / "even", healthy_lines(), pairs(correct)))
    assert codes(even).get("length_bias") == "info"


def test_an_even_split_with_long_outliers_is_no_length_bias(tmp_path):
    """The issue's real data: chosen shorter in 41%, longer in 40%, a mean ratio of 1.64 from a few long ones."""
    ct = [8] * 41 + [10] * 19 + [79] * 10 + [11] * 30    # 10 chosen 7.9x the rejected's length: the outliers
    rt = [10] * 41 + [10] * 19 + [10] * 10 + [10] * 30
    correct = [i % 2 == 0 for i in range(100)]
    r = review(write_run(tmp_path / "run", healthy_lines(), pairs(correct, chosen_tokens=ct, rejected_tokens=rt)))
    bias = next(f for f in r.findings if f.code == "length_bias")
    assert summary_mean_ratio(ct, rt) == pytest.approx((41 * 0.8 + 19 * 1.0 + 10 * 7.9 + 30 * 1.1) / 100)  # 1.638
    d = bias.data
    assert (d["chosen_shorter"], d["chosen_longer"], d["equal"]) == (0.41, 0.40, 0.19)
    assert d["median_length_ratio"] == pytest.approx(1.0)  # the 50th and 51st log-ratios are both 0 (equal)
    # "prefer the shorter": 41 + 19/2 = 50.5 of 100; Wilson 95%: centre (0.505 + z²/200)/(1 + z²/100) = 0.5048,
    # half-width z/(1 + z²/100)·√(0.505·0.495/100 + z²/40000) = 0.0962: 0.4087-0.6010 straddles 0.5
    assert (d["rule"], d["rule_accuracy"], d["teaches"]) == ("shorter", 0.505, None)
    assert d["ci"] == pytest.approx([0.4087, 0.6010], abs=1e-4)
    assert bias.severity == "info" and d["by"] == [] and "SimPO" not in bias.sentence
    assert "median length ratio chosen/rejected 1;" in bias.sentence


def summary_mean_ratio(ct: list[int], rt: list[int]) -> float:
    from preftune.evaluation.stats import length_bias
    return length_bias(ct, rt)["mean_len_ratio"]


def test_margin_gap_gives_no_share_of_a_margin_indistinguishable_from_zero(tmp_path):
    # last 10% of 60 training margins (6 values) average 0.0005 with sd 0.00187: 1.96 SE = 0.0015 < 0.01, so the
    # floor is the absolute 0.01; the old sentence said "128% of the training margin does not carry over"
    tail = [0.003, -0.002, 0.001, 0.0, 0.002, -0.001]
    lines = metrics([0.0] * 54 + tail, [0.0, -0.00014], [0.55, 0.8])
    gap = next(f for f in review(write_run(tmp_path / "zero", lines, pairs(balanced(400, 0.8)))).findings
               if f.code == "margin_gap")
    assert gap.data["train_margin"] == pytest.approx(0.0005) and gap.data["gap"] == pytest.approx(0.00064)
    assert gap.data["noise_floor"] == 0.01 and gap.data["gap_share"] is None
    assert gap.severity == "info" and "does not carry over" not in gap.sentence and "noise floor 0.01" in gap.sentence
    # positive, but noisy: tail mean 0.0833, sd √(1.1433/5) = 0.4782, 1.96 SE = 1.96 · 0.4782 / √6 = 0.3826
    tail = [0.5, -0.3, 0.6, -0.4, 0.45, -0.35]
    lines = metrics([0.0] * 54 + tail, [0.0, 0.02], [0.55, 0.8])
    gap = next(f for f in review(write_run(tmp_path / "noisy", lines, pairs(balanced(400, 0.8)))).findings
               if f.code == "margin_gap")
    assert gap.data["noise_floor"] == pytest.approx(0.3826, abs=1e-4) and gap.data["gap_share"] is None
    # a margin well above its floor keeps its share: tail 1.0 +- 0.1, held-out 0.4, gap 0.6 = 60%
    tail = [1.1, 0.9, 1.1, 0.9, 1.1, 0.9]
    lines = metrics([0.0] * 54 + tail, [0.0, 0.4], [0.55, 0.8])
    gap = next(f for f in review(write_run(tmp_path / "clear", lines, pairs(balanced(400, 0.8)))).findings
               if f.code == "margin_gap")
    assert gap.data["gap_share"] == pytest.approx(0.6) and gap.severity == "warn"
    assert "(60% of the training margin does not carry over)" in gap.sentence


def test_margin_tracks_length_difference(tmp_path):
    rows = pairs([True] * 60 + [False] * 40, seed=3)
    for row in rows:  # equal share shorter/longer, but the margin follows the length difference
        row["margin"] = (row["chosen_tokens"] - row["rejected_tokens"]) * 0.5 + 0.01
        row["correct"] = row["margin"] > 0
    r = review(write_run(tmp_path / "run", healthy_lines(), rows))
    bias = next(f for f in r.findings if f.code == "length_bias")
    assert bias.severity == "warn" and bias.data["margin_length_rho"] == pytest.approx(1.0)  # margin follows rank
    assert bias.data["by"] == ["margin"] and bias.data["teaches"] is None


@pytest.mark.parametrize("content, message", [
    ('{"step": 1, "loss": 0.5}\nnot json\n{"step": 3}\n', "log.jsonl:2: invalid JSON"),
    ('{"step": 1, "loss": "high"}\n', "log.jsonl:1: field 'loss': 'high' is not a number"),
    ('[1, 2]\n', "log.jsonl:1: a log line must be a JSON object"),
    ('{"step": 1, "foo": 2}\n', "no log lines with known keys"),
])
def test_bad_jsonl(tmp_path, content, message):
    path = tmp_path / "log.jsonl"
    path.write_text(content)
    with pytest.raises(InputError, match=message):
        review(path)


def test_bad_inputs_name_the_file(tmp_path):
    with pytest.raises(InputError, match="no such file"):
        review(tmp_path / "missing")
    with pytest.raises(InputError, match="not a preftune run folder"):
        review(tmp_path)
    state = tmp_path / "trainer_state.json"
    state.write_text(json.dumps({"global_step": 3}))
    with pytest.raises(InputError, match="trainer_state.json: .*log_history"):
        review(state)
    state.write_text(json.dumps({"log_history": [{"step": 1, "loss": [1]}]}))
    with pytest.raises(InputError, match="log_history entry 0: loss"):
        review(state)
    run = write_run(tmp_path / "run", healthy_lines(), None)
    (run / "eval_pairs.jsonl").write_text('{"id": "a", "margin": 1.0}\n')
    with pytest.raises(InputError, match="eval_pairs.jsonl:1: field 'correct': missing"):
        review(run)
    (run / "eval_pairs.jsonl").write_text('{"id": "a", "margin": 1.0, "correct": "yes"}\n')
    with pytest.raises(InputError, match="eval_pairs.jsonl:1: field 'correct': 'yes' is not true/false"):
        review(run)


@pytest.mark.parametrize("fail_on, healthy, warned, errored", [
    (None, 0, 0, 1),          # the default is error: an unusable run fails a CI job, a doubtful one doesn't
    ("error", 0, 0, 1),
    ("warn", 0, 1, 1),
    ("never", 0, 0, 0),
])
def test_fail_on_sets_the_exit_status(tmp_path, capsys, fail_on, healthy, warned, errored):
    runs = {
        "healthy": write_run(tmp_path / "healthy", healthy_lines(), pairs(balanced(2000, 0.8))),
        "warned": write_run(tmp_path / "warned", inflating_lines(), pairs(balanced(400, 0.62))),
        "errored": write_run(tmp_path / "errored", metrics(ramp(0.0, 0.2, 40), [0.0, 0.01], [0.5, 0.49],
                                                           loss=ramp(0.69, 0.7, 20) + ramp(2.0, 6.0, 20)),
                             pairs(balanced(100, 0.49))),
    }
    assert set(codes(review(runs["healthy"])).values()) == {"info"}
    assert set(codes(review(runs["warned"])).values()) == {"info", "warn"}
    assert "error" in codes(review(runs["errored"])).values()
    flag = ["--fail-on", fail_on] if fail_on else []
    got = {name: main(["review", str(run), *flag]) for name, run in runs.items()}
    assert got == {"healthy": healthy, "warned": warned, "errored": errored}
    out = capsys.readouterr().out
    if fail_on in (None, "error"):
        assert "review: 2 finding(s) at or above error (divergence, at_chance): exit 1" in out
    elif fail_on == "warn":  # the warned run's warnings fail too, and the errored run's warning with its errors
        assert "review: 3 finding(s) at or above warn (overoptimization, margin_gap, likelihood_displacement): exit 1" in out
        assert "review: 3 finding(s) at or above warn (divergence, at_chance, overoptimization): exit 1" in out
    else:
        assert "exit 1" not in out
    assert main(["review", str(tmp_path / "missing"), *flag]) == 2  # bad input is 2 whatever --fail-on says
