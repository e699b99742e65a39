"""Data as users bring it: every row shape TRL's DPOTrainer and KTOTrainer accept trains, string implicit prompts
end at a turn boundary (and agree with trl.data_utils.extract_prompt where its character rule lands there too),
--columns maps other names, and each kind of bad input is one line, exit code 2, nothing written."""

from __future__ import annotations

import json

import pytest

from preftune.commands.cli import main
from preftune.core.errors import InputError
from preftune.data.rows import RowPolicy, load_examples, read_examples
from preftune.data.shapes import TURN, turn_boundary

USER, BOT = "user", "assistant"


def _rows(world, n=24):
    return [json.loads(line) for line in world.train_path.read_text().splitlines()[:n]]


def _dialogue(r, side):
    return f"\n\nHuman: {r['prompt']}\n\nAssistant: previous answer\n\nHuman: again\n\nAssistant:{r[side]}"


SHAPES = {  # name -> (row from a standard pair, extra flags)
    "standard": (lambda r: r, []),
    "conversational": (lambda r: {"prompt": [{"role": USER, "content": r["prompt"]}],
                                  "chosen": [{"role": BOT, "content": r["chosen"]}],
                                  "rejected": [{"role": BOT, "content": r["rejected"]}]}, []),
    "implicit_messages": (lambda r: {s: [{"role": USER, "content": r["prompt"]}, {"role": BOT, "content": r[s]}]
                                     for s in ("chosen", "rejected")}, []),
    "implicit_strings": (lambda r: {s: _dialogue(r, s) for s in ("chosen", "rejected")}, []),
    "unpaired": (None, ["--objective", "kto"]),
    "mapped_columns": (lambda r: {"question": r["prompt"], "response_j": r["chosen"], "response_k": r["rejected"]},
                       ["--columns", "prompt=question,chosen=response_j,rejected=response_k"]),
}


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.mark.parametrize("shape", list(SHAPES))
def test_every_shape_trains(tiny_world, tmp_path, shape):
    make, flags = SHAPES[shape]
    rows = _rows(tiny_world)
    if make is None:  # thumbs up/down rows, as TRL's KTOTrainer takes them
        data = [{"prompt": r["prompt"], "completion": r[k], "label": k == "chosen"} for r in rows
                for k in ("chosen", "rejected")]
    else:
        data = [make(r) for r in rows]
    train, held = _write(tmp_path / "train.jsonl", data[:-8]), _write(tmp_path / "held.jsonl", data[-8:])
    out = tmp_path / "run"
    assert main(["train", "--model", str(tiny_world.model_dir), "--data", train, "--eval-data", held, "--output",
                 str(out), "--cache-dir", str(tmp_path / "cache"), "--max-steps", "1", "--batch-size", "4",
                 "--eval-every", "0", "--quiet", *flags]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["data"]["train"]["kept"] == len(data) - 8
    assert (out / "audit.json").is_file()


def test_string_implicit_prompts_end_at_a_turn_boundary_and_agree_with_trl(tiny_world, tmp_path):
    from trl.data_utils import extract_prompt

    rows = [{s: _dialogue(r, s) for s in ("chosen", "rejected")} for r in _rows(tiny_world, 64)]
    examples = load_examples(_write(tmp_path / "hh.jsonl", rows))
    agree = differ = 0
    for row, ex in zip(rows, examples):
        assert ex.prompt.endswith("\n\nAssistant:") and ex.prompt + ex.chosen == row["chosen"]
        assert ex.prompt + ex.rejected == row["rejected"]
        trl = extract_prompt(row)
        if trl["prompt"] == ex.prompt:  # the answers differ at their first character: the two rules agree
            assert (trl["chosen"], trl["rejected"]) == (ex.chosen, ex.rejected)
            agree += 1
        else:  # the answers begin alike: TRL's character rule cuts inside the answer, ours at the turn boundary
            assert trl["prompt"].startswith(ex.prompt) and len(trl["prompt"]) > len(ex.prompt)
            assert [m.end() for m in TURN.finditer(trl["prompt"])][-1] == len(ex.prompt)
            differ += 1
    assert agree >= 10 and differ >= 10  # the tiny world has both kinds
    # never inside a word: "I think yes" vs "I think no" keeps the whole answer
    a, b = "\n\nHuman: hi\n\nAssistant: I think yes", "\n\nHuman: hi\n\nAssistant: I think no"
    assert extract_prompt({"chosen": a, "rejected": b})["prompt"].endswith("I think")
    assert a[:turn_boundary(a, b)] == "\n\nHuman: hi\n\nAssistant:"
    for marker in ("\n### Response:", "\nASSISTANT :", "<|im_start|>assistant\n", "[/INST]", "<|assistant|>"):
        assert turn_boundary(f"q {marker} yes", f"q {marker} no") == len(f"q {marker}")


def test_columns_are_checked(tmp_path):
    path = _write(tmp_path / "t.jsonl", [{"question": "q", "response_j": "a", "response_k": "b"}])
    [ex] = load_examples(path, policy=RowPolicy({"prompt": "question", "chosen": "response_j", "rejected": "response_k"}))
    assert (ex.prompt, ex.chosen, ex.rejected) == ("q", "a", "b")
    with pytest.raises(InputError, match=r"field 'columns': unknown field 'promt' \(did you mean 'prompt'\?\)"):
        load_examples(path, policy=RowPolicy({"promt": "question"}))


def test_row_policy_counts_names_and_caps(tmp_path):
    good = [{"prompt": f"p{i}", "chosen": "a", "rejected": "b"} for i in range(98)]
    path = _write(tmp_path / "t.jsonl", good[:3] + [{"prompt": "x", "chosen": " ", "rejected": "b"}] + good[3:]
                  + [{"prompt": "y", "chosen": "a"}])
    with pytest.raises(InputError) as e:
        load_examples(path)
    assert str(e.value) == (f"{path}:4: field 'chosen': whitespace only; --bad-rows skip skips such rows")
    with pytest.raises(InputError, match=r"2 of 100 rows are bad, more than --max-bad-rows 0.01 allows \(1\)"):
        read_examples(path, policy=RowPolicy(bad_rows="skip"))
    loaded = read_examples(path, policy=RowPolicy(bad_rows="skip", max_bad_rows=2))
    assert len(loaded.examples) == 98 and [(b.line, b.kind) for b in loaded.skipped] == [(4, "whitespace"),
                                                                                          (100, "missing")]
    assert loaded.to_dict() == {"skipped": 2, "skipped_rows": [f"{path}:4: field 'chosen': whitespace only",
                                                                f"{path}:100: field 'rejected': missing (the row has "
                                                                "columns: prompt, chosen; --columns rejected=NAME "
                                                                "maps yours)"]}
    assert loaded.note("t.jsonl") == f"skipped 2 of 100 rows of t.jsonl (whitespace: 1, missing: 1): {path}:4, {path}:100"


BAD = {  # name -> (rows, flags, words in the one line)
    "mapped column missing": ([{"question": "q", "chosen": "a", "rejected": "b"}], ["--columns", "prompt=query"],
                              "column 'query' (--columns) not found; the row has columns: question, chosen, rejected"),
    "every row bad": ([{"prompt": "p", "chosen": " ", "rejected": "b"}] * 3, ["--bad-rows", "skip"],
                      "every row is bad (3 rows; the first:"),
    "skips past the cap": ([{"prompt": f"p{i}", "chosen": "a" if i % 4 else "\t", "rejected": "b"} for i in range(40)],
                           ["--bad-rows", "skip"], "10 of 40 rows are bad, more than --max-bad-rows 0.01 allows (1)"),
    "no turn boundary": ([{"chosen": "The sky is blue.", "rejected": "The sky is green."}], [],
                         "plain strings whose shared beginning has no turn boundary (a line starting with "
                         "'Assistant:') to end a prompt at: add a 'prompt' column"),
    "whitespace row": ([{"prompt": "p", "chosen": "a", "rejected": "b"}, {"prompt": "q", "chosen": "a", "rejected": " "}],
                       [], "t.jsonl:2: field 'rejected': whitespace only; --bad-rows skip skips such rows"),
    "one pair, no held-out file": ([{"prompt": "p", "chosen": "a", "rejected": "b"}], ["--no-eval-data"],
                                   "one distinct prompt: holding it out for evaluation (--eval-fraction) would leave "
                                   "no training pairs"),
}


@pytest.mark.parametrize("name", list(BAD))
def test_bad_input_is_one_line_exit_2_nothing_written(tiny_world, tmp_path, capsys, name):
    rows, flags, words = BAD[name]
    train = _write(tmp_path / "t.jsonl", rows)
    held = [] if "--no-eval-data" in flags else ["--eval-data", str(tiny_world.eval_path)]
    out = tmp_path / "out"
    code = main(["train", "--model", str(tiny_world.model_dir), "--data", train, *held, "--output", str(out),
                 *[f for f in flags if f != "--no-eval-data"]])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and words in err[0], err
    assert not out.exists()
