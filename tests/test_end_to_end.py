"""The decision layer on real tiny runs: no learnable preference never switches, length bias is flagged."""

from __future__ import annotations

import json

from preftune.commands.cli import main
from preftune.core.config import Config
from preftune.core.layout import read_audit
from preftune.evaluation.review import review
from preftune.tinyworld import build_world
from preftune.training.loop import train
from preftune.training.matrix import DEFAULT_GRID, run_matrix
from preftune.verdict.decide import decide


def base_config(world, out, **kw) -> Config:
    d = dict(model=str(world.model_dir), data=str(world.train_path), eval_data=str(world.eval_path), lr=2e-3,
             max_steps=16, eval_every=4, save_every=0, warmup_ratio=0.0, output=str(out), quiet=True,
             cache_dir=str(out.parent / "cache"), objectives={"simpo": {"beta": 2.0, "gamma_beta_ratio": 0.5}})
    d.update(kw)
    return Config(**d)


def test_flipped_labels_are_never_a_switch(tmp_path):
    world = build_world(tmp_path / "world", variant="flipped", n_train=128, n_eval=160)
    run_matrix(base_config(world, tmp_path / "m"), dict(DEFAULT_GRID))
    d = decide(tmp_path / "m", n_boot=1000)
    assert d.verdict == "not_decisive", d.summary


def test_chosen_shorter_is_flagged_as_length_biased(tmp_path):
    world = build_world(tmp_path / "world", variant="chosen_shorter", n_train=64, n_eval=64)
    out = tmp_path / "run"
    summary = train(base_config(world, out, max_steps=4))
    assert summary.length_bias["chosen_shorter"] > 0.9  # a fraction of the held-out pairs
    findings = {f.code: f for f in review(out).findings}
    assert "length_bias" in findings, [f.sentence for f in review(out).findings]
    assert "shorter" in findings["length_bias"].sentence and "SimPO" in findings["length_bias"].sentence
    bias = read_audit(out).find("length_bias")  # the preflight saw it in the training pairs, before any step
    assert bias["teaches"] == "brevity" and bias["rule"] == "shorter" and bias["ci"][0] > 0.5


def test_quick_demo_runs_the_loop_end_to_end(tmp_path, capsys):
    """make demo is the pipeline: a recipe written, every stage run, the gate's verdict and reasons printed."""
    assert main(["demo", "--quick", "--output", str(tmp_path / "demo")]) == 0
    out = capsys.readouterr().out
    assert "[demo] matrix verdict:" in out and "[demo] gate:" in out and "report.html" in out
    loop = tmp_path / "demo" / "loop"
    decision = json.loads((loop / "matrix" / "decision.json").read_text())
    assert decision["verdict"] in ("switch", "keep", "not_decisive", "fallback_orpo")
    gate = json.loads((loop / "gate" / "gate.json").read_text())
    assert gate["verdict"] in ("ship", "hold") and [c["check"] for c in gate["checks"]] == [
        "safety", "over_refusal", "regression"]
    assert (loop / "ship").exists() == (gate["verdict"] == "ship")
    assert (loop / "report.html").stat().st_size > 1000 and (loop / "matrix" / "report.html").stat().st_size > 1000
    assert (tmp_path / "demo" / "recipe.yaml").exists()


def test_a_real_gap_is_a_switch(tmp_path):
    """SFT vs DPO on the same pairs: DPO learns the preference, SFT barely does; judged on the yardsticks
    relative to step 0, the real gap must still be a switch (measured: 40 more of 200 pairs, p ~ 5e-8)."""
    world = build_world(tmp_path / "world", n_train=256, n_eval=200)
    run_matrix(base_config(world, tmp_path / "m", max_steps=24, lora_rank=8), {"objective": ["sft", "dpo"]})
    d = decide(tmp_path / "m", n_boot=1000)
    assert (d.verdict, d.objective) == ("switch", "dpo"), d.explanation
    assert d.basis["a_only"] - d.basis["b_only"] >= 20 and d.basis["mcnemar_p"] < 1e-4
    assert [r["code"] for r in d.reasons] == ["comparison", "switch_rule_met"]
