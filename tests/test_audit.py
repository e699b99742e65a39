"""The data audit: planted problems found with their exact counts, the preflight of train and ablate (one line,
audit.json, once per matrix), the decision and review saying when held-out prompts leak, the report's data
section, the row policy end to end, visible truncation without transformers' length warning, --max-length auto,
and --chat-template."""

from __future__ import annotations

import json
import logging
import shutil

import pytest

from preftune.commands.cli import main
from preftune.core.layout import read_audit
from preftune.data import tokenize
from preftune.data.audit import audit_source, headline
from preftune.data.rows import RowPolicy
from preftune.verdict.data import length_learned

LONG = "The answer is probably {}, I think, but I am not sure."


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def planted(tmp_path):
    """(train, held-out) with known problems: 3 duplicates, 2 near-duplicate prompts, 2 contradictions, 3 chosen ==
    rejected (2 up to whitespace, 1 exactly), 2 whitespace rows, 1 pair differing only in its prompt, 3 leaked
    held-out prompts (2 exact, 1 near) and chosen shorter than rejected nearly everywhere."""
    base = [{"prompt": f"Question {i}: what is {i} plus {i}?", "chosen": f"{2 * i}", "rejected": LONG.format(2 * i + 1)}
            for i in range(60)]
    rows = base + base[:3]                                                               # 3 duplicates
    rows += [{"prompt": f"QUESTION {i} what is {i} plus {i}", "chosen": f"x{i}", "rejected": LONG.format(i)}
             for i in (3, 4)]                                                            # 2 near-duplicate prompts
    rows += [{**base[i], "chosen": base[i]["rejected"], "rejected": base[i]["chosen"]} for i in (5, 6)]  # 2 swapped
    rows += [{"prompt": f"Echo {k}", "chosen": f"same  text {k}", "rejected": f" same text {k} "} for k in range(2)]
    rows += [{"prompt": "Echo 2", "chosen": "x", "rejected": "x"}]                       # chosen == rejected: 3
    rows += [{"prompt": f"Blank {k}", "chosen": " ", "rejected": "no"} for k in range(2)]  # 2 whitespace rows
    rows += [{"prompt": "Other 0", "chosen": base[0]["chosen"], "rejected": base[0]["rejected"]}]  # same answers
    held = [base[10], base[11], {**base[12], "prompt": "question 12: WHAT is 12 plus 12"}]      # 2 exact, 1 near
    held += [{"prompt": f"Held {j}", "chosen": "1", "rejected": LONG.format(j)} for j in range(7)]
    return _write(tmp_path / "planted.jsonl", rows), _write(tmp_path / "held.jsonl", held)


def test_planted_problems_are_found_with_exact_counts(tmp_path):
    train, held = planted(tmp_path)
    audit = audit_source(train, held, RowPolicy())
    f = {x["code"]: x for x in audit.findings}
    assert audit.counts == {"rows": 73, "pairs": 70, "prompts": 65, "bad_rows": 2, "heldout_pairs": 10,
                            "heldout_prompts": 10}
    assert (f["bad_rows"]["bad"], f["bad_rows"]["kinds"]) == (2, {"whitespace": 2})
    assert f["duplicate_pairs"]["rows"] == 3 and f["near_duplicate_prompts"]["prompts"] == 2
    assert f["contradictions"]["rows"] == 2 and f["chosen_equals_rejected"]["rows"] == 3
    assert f["same_answers"]["rows"] == 1
    assert (f["heldout_leak"]["exact"], f["heldout_leak"]["near"], f["heldout_leak"]["leaked_pairs"]) == (2, 1, 3)
    bias = f["length_bias"]
    assert bias["rule"] == "shorter" and bias["teaches"] == "brevity" and bias["chosen_shorter"] > 0.9
    assert sum(bias["histogram"]["counts"]) == bias["pairs"] == 70 - 3  # every pair once: duplicates aside
    assert f["duplicate_pairs"]["examples"][0]["ids"] == ["planted.jsonl:1", "planted.jsonl:61"]
    line = headline(audit)
    assert line.startswith("73 rows; 2 bad rows, 3 duplicate pairs") and "a brevity prior" in line
    # without a held-out file: the split train would make (near leaks only: exact prompts stay on one side)
    split = audit_source(train, None, RowPolicy(), eval_fraction=0.5, split_seed=0)
    leak = {x["code"]: x for x in split.findings}["heldout_leak"]
    assert leak["exact"] == 0 and leak["heldout_prompts"] == 33 and leak["near"] <= 2


def test_audit_command_with_model_and_judge(tiny_world, tmp_path, capsys):
    train, held = planted(tmp_path)
    assert main(["audit", train, "--eval-data", held, "--output", str(tmp_path / "a.json")]) == 0
    out = capsys.readouterr().out
    assert "[warn] heldout_leak: 3 of 10 held-out prompts (30%; 2 exactly, 1 nearly) also appear in training" in out
    assert json.loads((tmp_path / "a.json").read_text())["counts"]["rows"] == 73
    # for a CI job: exit 1 on a warning, naming the codes that warn (bad rows, duplicates, leaks, ...)
    assert main(["audit", train, "--eval-data", held, "--fail-on", "warn"]) == 1
    assert capsys.readouterr().out.splitlines()[-1].startswith("audit: 8 finding(s) at or above warn (bad_rows, ")
    assert main(["audit", str(tiny_world.train_path), "--eval-data", str(tiny_world.eval_path), "--model",
                 str(tiny_world.model_dir), "--judge", "python:preftune.tinyworld:judge", "--sample", "32",
                 "--cache-dir", str(tmp_path / "cache"), "--max-length", "16"]) == 0
    out = capsys.readouterr().out
    for code in ("truncation", "judge_agreement", "reference_ranking", "length_rule", "label_noise"):
        assert f"] {code}: " in out
    assert "judge python:preftune.tinyworld:judge agrees with the labels on 100% of 32 sampled pairs" in out
    assert "refrel 0.5 (95% CI" in out  # the reference ties every pair on a reference-relative yardstick


def test_skipped_rows_train_and_are_named(tiny_world, tmp_path, capsys):
    rows = tiny_world.train_path.read_text().splitlines()
    for i in (4, 9):
        rows[i] = json.dumps({**json.loads(rows[i]), "chosen": "  "})
    data = tmp_path / "train.jsonl"
    data.write_text("\n".join(rows) + "\n")
    out = tmp_path / "run"
    args = ["train", "--model", str(tiny_world.model_dir), "--data", str(data), "--eval-data",
            str(tiny_world.eval_path), "--output", str(out), "--cache-dir", str(tmp_path / "cache"), "--max-steps", "1",
            "--eval-every", "0"]
    assert main(args) == 2 and "train.jsonl:5: field 'chosen': whitespace only" in capsys.readouterr().err
    assert main([*args, "--bad-rows", "skip"]) == 0
    err = capsys.readouterr().err
    assert f"preftune: skipped 2 of 256 rows of {data} (whitespace: 2): {data}:5, {data}:10" in err
    train = json.loads((out / "summary.json").read_text())["data"]["train"]
    assert train["rows"] == train["kept"] == 254 and train["skipped"] == 2
    assert train["skipped_rows"] == [f"{data}:5: field 'chosen': whitespace only",
                                     f"{data}:10: field 'chosen': whitespace only"]
    assert read_audit(out).find("bad_rows")["kinds"] == {"whitespace": 2}


def test_truncation_line_and_no_length_warning(tiny_world, tmp_path, capfd, caplog):
    model = tmp_path / "short-context"
    shutil.copytree(tiny_world.model_dir, model)
    cfg = json.loads((model / "tokenizer_config.json").read_text())
    (model / "tokenizer_config.json").write_text(json.dumps({**cfg, "model_max_length": 12}))
    from transformers import AutoTokenizer

    tok, noisy = AutoTokenizer.from_pretrained(model), logging.getLogger("transformers.tokenization_utils_base")
    quiet = next(f for f in noisy.filters if isinstance(f, tokenize._NoLengthWarning))
    noisy.removeFilter(quiet)  # the setting does make transformers warn, without preftune's filter
    tok("sort: " + " ".join(map(str, range(30))))
    noisy.addFilter(quiet)
    assert "Token indices sequence length is longer" in caplog.text  # every record logged, whatever the handler
    caplog.clear()
    out = tmp_path / "run"
    assert main(["train", "--model", str(model), "--data", str(tiny_world.train_path), "--eval-data",
                 str(tiny_world.eval_path), "--output", str(out), "--cache-dir", str(tmp_path / "cache"),
                 "--max-steps", "1", "--eval-every", "0", "--max-length", "auto"]) == 0
    got = capfd.readouterr()
    assert "Token indices sequence length" not in got.out + got.err + caplog.text
    lines = [line for line in got.err.splitlines() if line.startswith("preftune: data ")]
    assert len(lines) == 2 and lines[0].startswith("preftune: data train: 256 rows, ")
    assert "at --max-length 12; prompt tokens p50 " in lines[0] and "--max-length 24 keeps 95% of pairs whole" in lines[0]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["data"]["train"]["max_length"] == 12  # auto: 24 would keep 95% whole, the context caps it
    assert "preftune: audit: 256 rows; truncation cuts pairs" in got.err


def test_chat_template_file_and_its_wording(tiny_world, tmp_path, capsys):
    bare = tmp_path / "bare"
    shutil.copytree(tiny_world.model_dir, bare)
    template = tmp_path / "chat.jinja"
    shutil.move(bare / "chat_template.jinja", template)
    conv = tmp_path / "conv.jsonl"
    _write(conv, [{"prompt": [{"role": "user", "content": r["prompt"]}],
                   "chosen": [{"role": "assistant", "content": r["chosen"]}],
                   "rejected": [{"role": "assistant", "content": r["rejected"]}]}
                  for r in map(json.loads, tiny_world.train_path.read_text().splitlines()[:16])])
    common = ["--model", str(bare), "--eval-fraction", "0.25", "--cache-dir", str(tmp_path / "cache"), "--max-steps",
              "1", "--eval-every", "0", "--batch-size", "4"]
    assert main(["train", "--data", str(conv), "--output", str(tmp_path / "a"), *common]) == 2
    assert "message-list (conversational) rows need: give one with --chat-template FILE" in capsys.readouterr().err
    assert main(["train", "--data", str(tiny_world.train_path), "--apply-chat-template", "--output",
                 str(tmp_path / "b"), *common]) == 2
    err = capsys.readouterr().err
    assert "which --apply-chat-template needs to wrap plain-string rows" in err and "conversational" not in err
    assert main(["train", "--data", str(conv), "--chat-template", str(template), "--output", str(tmp_path / "c"),
                 "--quiet", *common]) == 0
    assert main(["train", "--data", str(conv), "--chat-template", str(tmp_path / "none.jinja"), "--output",
                 str(tmp_path / "d"), *common]) == 2
    assert "field 'chat_template': cannot read chat template" in capsys.readouterr().err


def test_a_leaking_matrix_says_so_in_decide_review_and_report(tiny_world, tmp_path, capsys):
    train = tiny_world.train_path.read_text().splitlines()
    held = tmp_path / "held.jsonl"
    held.write_text(tiny_world.eval_path.read_text() + "\n".join(train[:16]) + "\n")  # 16 training prompts leak
    out = tmp_path / "m"
    assert main(["ablate", "--model", str(tiny_world.model_dir), "--data", str(tiny_world.train_path), "--eval-data",
                 str(held), "--grid", "objective=dpo,simpo", "--grid", "lora_rank=4", "--max-steps", "2",
                 "--eval-every", "0", "--max-train-pairs", "64", "--output", str(out), "--cache-dir",
                 str(tmp_path / "cache")]) == 0
    err = capsys.readouterr().err
    assert err.count("preftune: audit: ") == 1 and "16 of 80 held-out prompts also in training" in err
    assert (out / "audit.json").is_file() and not list(out.glob("cells/*/audit.json"))
    assert main(["decide", str(out)]) == 0
    decision = json.loads((out / "decision.json").read_text())
    leak = next(r for r in decision["reasons"] if r["code"] == "heldout_leak")
    assert (leak["exact"], leak["near"], leak["heldout_prompts"]) == (16, 0, 80)
    assert [r["code"] for r in decision["basis"]["data"]] == ["heldout_leak"]
    assert "Data: 16 of 80 held-out prompts (20%; 16 exactly, 0 nearly) also appear in training" in decision["summary"]
    # a 2-step cell may well be at chance ([error]): --fail-on never, this test reads the leak warning
    assert main(["review", str(out / "cells" / "objective=dpo,lora_rank=4"), "--fail-on", "never"]) == 0
    assert "[warn] 16 of 80 held-out prompts (16 exactly, 0 nearly) also appear in training" in capsys.readouterr().out
    assert main(["report", str(out)]) == 0
    page = (out / "report.html").read_text()
    assert "<h2>Data</h2>" in page and "id='data-examples'" in page and "heldout_leak" in page
    assert "## Data" in (out / "report.md").read_text()


def test_length_learned_when_moves_follow_the_datas_prior():
    bias = {"rule": "shorter", "teaches": "brevity", "rule_accuracy": 0.8}
    # 40 held-out pairs of unequal length: training moved 34 toward the shorter completion
    pairs = [{"chosen_tokens": 3 if i % 2 else 9, "rejected_tokens": 9 if i % 2 else 3,
              "refrel_margin": (1.0 if i % 2 else -1.0) * (1 if i < 34 else -1)} for i in range(40)]
    r = length_learned("dpo", pairs, bias)
    assert r.code == "length_learned" and r.data["follows"] == pytest.approx(34 / 40) and r.data["pairs"] == 40
    assert r.data["labels_follow"] == 0.5 and r.data["ci"][0] > 0.5
    assert length_learned("dpo", pairs[:8], bias) is None  # too few pairs to say
    flat = [{**p, "refrel_margin": 1.0} for p in pairs]    # moved toward chosen whatever its length
    assert length_learned("dpo", flat, bias) is None
