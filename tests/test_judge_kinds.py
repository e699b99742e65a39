"""A judge kind registered from outside the package with ``@preftune.judge_kind``, used as
``--judge MODULE:KIND:ARGS`` by ``preftune generate`` and by a run's behavioural evaluation."""

from __future__ import annotations

import json
import sys

import pytest

import preftune
from preftune.commands.cli import main
from preftune.core import config
from preftune.core.files import read_jsonl
from preftune.generation.judges import KINDS

KINDS_MODULE = '''
import preftune
from preftune.generation.judges import PairwiseJudge


@preftune.judge_kind("keyword", mode="pointwise")
def keyword(args):
    """Score: how many of the comma-separated words the completion contains."""
    words = args.split(",")
    if not all(words):
        raise ValueError("empty word")
    return lambda prompt, completion: float(sum(w in completion.split() for w in words))


class Longer(PairwiseJudge):
    def compare(self, prompts, a, b):
        return [1.0 if len(x) > len(y) else 0.0 if len(x) < len(y) else 0.5 for x, y in zip(a, b)]


@preftune.judge_kind("longer", mode="pairwise")
def longer(args):
    return Longer()


@preftune.judge_kind("liar", mode="pairwise")
def liar(args):
    return lambda prompt, a, b: 1.0
'''


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    """``myjudges.py`` in the working directory, not on sys.path yet (as test_api does for objectives)."""
    (tmp_path / "myjudges.py").write_text(KINDS_MODULE)
    (tmp_path / "brokenjudges.py").write_text("raise RuntimeError('half written')\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    yield tmp_path
    for name in ("myjudges", "brokenjudges"):
        sys.modules.pop(name, None)
    for kind in ("keyword", "longer", "liar"):
        KINDS.pop(kind, None)


def test_user_kind_through_generate_and_its_errors(tiny_world, user_module, capsys):
    base = ["generate", "--model", str(tiny_world.model_dir), "--prompts", str(tiny_world.eval_path), "--device",
            "cpu", "--num-samples", "3", "--max-new-tokens", "6", "--temperature", "1", "--seed", "0",
            "--cache-dir", str(user_module / "cache")]
    out = user_module / "s.jsonl"
    assert main(base + ["--judge", "myjudges:keyword:1,2", "--output", str(out)]) == 0
    rows = read_jsonl(out)
    assert any(s > 0 for r in rows for s in r["scores"])
    assert rows and all(r["scores"] == [float(("1" in c.split()) + ("2" in c.split())) for c in r["completions"]]
                        for r in rows)
    assert preftune.judge_kind is preftune.generation.judges.judge_kind and KINDS["keyword"].mode == "pointwise"
    capsys.readouterr()
    for spec, msg in [("myjudges:kewyord:x", "module 'myjudges' registers no judge kind 'kewyord' (did you mean "
                                             "'keyword'?)"),
                      ("myjudges:keyword:a,,b", "cannot parse 'myjudges:keyword:a,,b': expected "
                                                "myjudges:keyword:ARGS (empty word)"),
                      ("myjudges:liar:", "judge kind 'liar' is pairwise but its factory returned function"),
                      ("brokenjudges:k:x", "cannot import judge module 'brokenjudges': RuntimeError: half written"),
                      ("nosuchjudges_zz:k:x", "unknown judge kind 'nosuchjudges_zz'")]:
        assert main(base + ["--judge", spec, "--output", str(user_module / "never.jsonl")]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and msg in err, err
    assert not (user_module / "never.jsonl").exists()


def test_user_pairwise_kind_in_a_runs_behavioural_evaluation(tiny_world, user_module):
    from preftune.training.loop import train

    cfg = config.build(dict(model=str(tiny_world.model_dir), data=str(tiny_world.train_path),
                            eval_data=str(tiny_world.eval_path), lr=2e-3, batch_size=8, max_steps=2, eval_every=0,
                            save_every=0, lora_rank=4, output=str(user_module / "run"), quiet=True,
                            cache_dir=str(user_module / "cache"), max_train_pairs=16, gen_eval_prompts=6,
                            gen_max_new_tokens=8, judge="myjudges:longer:"))
    gen = train(cfg).gen_eval
    rows = read_jsonl(user_module / "run" / "gen_eval.jsonl")
    want = [1.0 if len(r["policy"]) > len(r["reference"]) else 0.0 if len(r["policy"]) < len(r["reference"]) else 0.5
            for r in rows]
    assert gen["judge"] == "myjudges:longer:" and [r["preference"] for r in rows] == want
    assert all(r["policy_score"] is None for r in rows)
    assert json.loads((user_module / "run" / "summary.json").read_text())["gen_eval"]["win_rate"] == sum(want) / 6
