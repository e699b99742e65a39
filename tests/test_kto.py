"""KTO on thumbs-up/down data: unpaired rows, the unpaired view of pairs, bad input, learning, a mixed matrix."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import preftune
from preftune.commands.cli import main
from preftune.core import config
from preftune.core.errors import InputError
from preftune.data.rows import Example, load_examples
from preftune.data.split import heldout_pairs, unpaired_view


def unpaired_file(world, path: Path, n: int | None = None) -> Path:
    """The tiny world's training pairs as thumbs-up/down rows (chosen up, rejected down), in file order."""
    rows = [json.loads(line) for line in world.train_path.read_text().splitlines()][:n]
    path.write_text("".join(json.dumps({"prompt": r["prompt"], "completion": r[k], "label": k == "chosen"}) + "\n"
                            for r in rows for k in ("chosen", "rejected")))
    return path


def base(world, out: Path, **kw) -> config.Config:
    d = dict(model=str(world.model_dir), data=str(world.train_path), eval_data=str(world.eval_path), objective="kto",
             lr=2e-3, batch_size=8, max_steps=20, eval_every=10, save_every=0, warmup_ratio=0.0, quiet=True,
             output=str(out), cache_dir=str(out.parent / "cache"), max_train_pairs=128)
    return config.build({}, {**d, **kw})


def test_unpaired_view_of_pairs_rotates_kl_completions_in_batch_chunks():
    pairs = [Example(f"f:{i}", f"p{i}", f"c{i}", f"r{i}") for i in range(5)]
    rows = unpaired_view(pairs, batch_size=4, seed=0)
    assert len(rows) == 10 and sum(r.label for r in rows) == 5
    assert {(r.prompt, r.chosen, r.label) for r in rows} == \
        {(f"p{i}", f"{s}{i}", s == "c") for i in range(5) for s in "cr"}
    assert [r.id for r in rows] != [r.id for r in sorted(rows, key=lambda r: r.id)]  # shuffled after unpairing
    for s in range(0, 10, 4):  # KL completion: the previous row's completion inside its chunk of 4
        chunk = rows[s:s + 4]
        assert [r.rejected for r in chunk] == [chunk[-1].chosen] + [r.chosen for r in chunk[:-1]]


def test_unpaired_rows_load_and_held_out_pairs_come_from_them(tmp_path, tiny_world):
    path = unpaired_file(tiny_world, tmp_path / "thumbs.jsonl", n=4)
    rows = load_examples(str(path))
    assert [r.label for r in rows] == [True, False] * 4 and rows[0].id == "thumbs.jsonl:1"
    pairs = heldout_pairs(rows, str(path))
    assert len(pairs) == 4 and pairs[0].chosen == rows[0].chosen and pairs[0].rejected == rows[1].chosen
    with pytest.raises(InputError, match="no held-out pairs"):
        heldout_pairs([r for r in rows if r.label], str(path))


@pytest.mark.parametrize("line,field,words", [
    ('{"prompt": "p", "completion": "c"}', "label", "missing"),
    ('{"prompt": "p", "completion": "c", "label": "yes"}', "label", "'yes' is not true/false"),
    ('{"prompt": "p", "label": true}', "completion", "missing"),
    ('{"prompt": "p", "completion": [{"role": "assistant", "content": "c"}], "label": true}', "completion", "both"),
])
def test_bad_unpaired_rows_are_one_line(tmp_path, line, field, words):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "q", "completion": "ok", "label": false}\n' + line + "\n")
    with pytest.raises(InputError) as e:
        load_examples(str(path))
    assert (e.value.line, e.value.field) == (2, field) and words in str(e.value)


def test_mixed_kinds_unpaired_to_a_paired_objective_and_batch_size_1(tmp_path, tiny_world, capsys):
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text('{"prompt": "p", "chosen": "a", "rejected": "b"}\n{"prompt": "p", "completion": "a", "label": true}\n')
    with pytest.raises(InputError, match="mixes pairs") as e:
        load_examples(str(mixed))
    assert e.value.line == 2
    thumbs = unpaired_file(tiny_world, tmp_path / "thumbs.jsonl", n=8)
    common = ["--model", str(tiny_world.model_dir), "--eval-data", str(tiny_world.eval_path), "--cache-dir",
              str(tmp_path / "cache"), "--max-steps", "2"]
    assert main(["train", "--data", str(thumbs), "--objective", "dpo", "--output", str(tmp_path / "a"), *common]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "need an objective that takes them (kto, apo_zero_unpaired)" in err[0] and not (tmp_path / "a").exists()
    assert main(["train", "--data", str(thumbs), "--objective", "kto", "--batch-size", "1", "--output",
                 str(tmp_path / "b"), *common]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "field 'batch_size'" in err[0] and "at least 2 for 'kto'" in err[0]


def test_kto_learns_from_thumbs_and_warns_on_imbalance(tmp_path, tiny_world, capsys):
    thumbs = unpaired_file(tiny_world, tmp_path / "thumbs.jsonl", n=128)
    s = preftune.train(base(tiny_world, tmp_path / "kto", data=str(thumbs), quiet=False, max_train_pairs=None,
                            objectives={"kto": {"desirable_weight": 2.0}}))
    step0, final = s.step0_eval, s.final_eval
    assert final["eval_refrel/accuracy"] > step0["eval_refrel/accuracy"] + 0.15, (step0, final)
    assert final["eval_lennorm/accuracy"] > step0["eval_lennorm/accuracy"] + 0.1, (step0, final)
    assert s.data["train"]["kept"] == 256 and s.params["desirable_weight"] == 2.0
    assert "desirable_weight x 128 desirable / (undesirable_weight x 128 undesirable) = 2.00" in capsys.readouterr().err
    rows = [json.loads(line) for line in (tmp_path / "kto" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if "loss" in r]
    assert all(r["kl"] >= 0 for r in train) and {"rewards/chosen", "rewards/rejected", "logps/chosen"} <= set(train[0])


def test_kto_in_a_mixed_matrix(tmp_path, tiny_world):
    out = tmp_path / "m"
    cfg = base(tiny_world, out, objective="dpo", max_steps=12, eval_every=6,
               objectives={"simpo": {"beta": 2.0, "gamma_beta_ratio": 0.5}})
    assert preftune.ablate(cfg, {"objective": ["dpo", "simpo", "kto"], "lora_rank": [8]}) == {"finished": 3, "failed": 0}
    kto = json.loads((out / "cells" / "objective=kto,lora_rank=8" / "summary.json").read_text())
    assert kto["data"]["train"]["kept"] == 256   # the unpaired view of the same 128 pairs
    d = preftune.decide(str(out))
    compared = {(r["a"], r["yardstick"]) for r in d.reasons if r["code"] == "comparison"}
    assert ("objective=kto,lora_rank=8", "own") in compared
    kto_cmp = [c for c in d.comparisons if c["a"] == "objective=kto,lora_rank=8"]
    assert {c["yardstick"] for c in kto_cmp} >= {"refrel", "lennorm"} and all(c["n"] == 64 for c in kto_cmp)
    md, html = preftune.report(str(out))
    assert "objective=kto,lora_rank=8" in html.read_text()
