"""The public API as the README shows it, called twice in mixed order in one process, and a user-defined
objective from outside the package through train, ablate (serial and --parallel 2), decide, report, review."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml

import preftune

SLIC = '''
import torch
import preftune


@preftune.objective("slic", needs_reference=False, family="reference-free", params={"beta": 1.0, "delta": 1.0})
def slic(lp, beta, delta):
    """SLiC-style calibration hinge on summed log-probs: relu(delta - beta * (pc - pr))."""
    loss = torch.relu(delta - beta * (lp.chosen - lp.rejected))
    return preftune.ObjectiveOutput(loss, beta * lp.chosen.detach(), beta * lp.rejected.detach())
'''


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    """``myloss.py`` in the working directory, as a research team would write it (not on sys.path yet)."""
    (tmp_path / "myloss.py").write_text(SLIC)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    yield tmp_path
    sys.modules.pop("myloss", None)
    preftune.core.objectives.REGISTRY.pop("slic", None)


def base(world, out, **kw) -> preftune.Config:
    d = dict(model=str(world.model_dir), data=str(world.train_path), eval_data=str(world.eval_path), lr=2e-3,
             batch_size=4, max_steps=2, eval_every=0, save_every=0, max_train_pairs=16, quiet=True,
             cache_dir=str(out.parent / "cache"), output=str(out))
    return preftune.Config(**{**d, **kw})


def test_readme_api_twice_in_one_process(tiny_world, tmp_path):
    for i in range(2):
        root = tmp_path / f"round{i}"
        summary = preftune.train(base(tiny_world, root / "s", objective="simpo",
                                      objectives={"simpo": {"beta": 2.0, "gamma_beta_ratio": 0.5}}))
        assert summary.status == "finished" and 0 <= summary.final_eval["eval_accuracy"] <= 1
        assert summary.params == {"beta": 2.0, "gamma_beta_ratio": 0.5, "nll_weight": 0.0}
        m = base(tiny_world, root / "matrix")
        assert preftune.ablate(m, {"objective": ["dpo", "simpo"], "lora_rank": [4]}) == {"finished": 2, "failed": 0}
        md, html = preftune.report(str(root / "matrix"))          # decides first: no decision.json yet
        d = preftune.decide(str(root / "matrix"))
        assert d.verdict in ("switch", "keep", "not_decisive") and all("code" in r for r in d.reasons)
        assert md.exists() and html.exists()
        assert preftune.review(str(root / "s")).findings
        metrics = preftune.evaluate(base(tiny_world, root / "e"), adapter=str(root / "s" / "adapter"))
        assert metrics["eval_pairs"] == 64
        assert preftune.report(str(root / "s"))[1].name == "report.html"  # a single run folder too


@pytest.mark.parametrize("parallel", [1, 2])
def test_user_objective_through_every_stage(tiny_world, user_module, parallel):
    out = user_module / "matrix"
    cfg = base(tiny_world, out, objectives={"slic": {"delta": 2.0}})
    run = preftune.train(base(tiny_world, user_module / "one", objective="myloss:slic",
                              objectives={"slic": {"delta": 2.0}}))
    assert run.params == {"beta": 1.0, "delta": 2.0, "nll_weight": 0.0}
    assert preftune.core.objectives.get("slic").spec == "myloss:slic"
    cfg_again = preftune.from_file(user_module / "one" / "config.yaml")
    assert cfg_again.objective == "myloss:slic" and cfg_again.objective_params() == run.params
    if parallel == 1:
        assert preftune.ablate(cfg, {"objective": ["dpo", "myloss:slic"], "lora_rank": [4]}) == \
            {"finished": 2, "failed": 0}
    else:  # the command line, as a user types it, with cells in child processes
        (user_module / "base.yaml").write_text(yaml.safe_dump({k: v for k, v in cfg.to_dict().items()
                                                               if k not in ("output", "resume")}))
        done = subprocess.run([sys.executable, "-m", "preftune.commands.cli", "ablate", "--config", "base.yaml",
                               "--grid", "objective=dpo,myloss:slic", "--grid", "lora_rank=4", "--parallel", "2",
                               "--output", str(out)], cwd=user_module, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr
        assert "2 finished, 0 failed" in done.stdout
    cell = out / "cells" / "objective=myloss:slic,lora_rank=4"
    assert json.loads((cell / "summary.json").read_text())["params"]["delta"] == 2.0
    d = preftune.decide(str(out))
    assert {c.objective for c in d.cells} == {"dpo", "myloss:slic"}
    assert any(r["code"] == "comparison" for r in d.reasons)
    md, html = preftune.report(str(out))
    assert "myloss:slic" in html.read_text()
    assert preftune.review(str(cell)).findings


def test_user_objective_bad_names_are_one_line(tiny_world, user_module):
    with pytest.raises(preftune.InputError, match="did you mean 'delta'"):
        base(tiny_world, user_module / "x", objective="myloss:slic", objectives={"slic": {"detla": 1.0}}).validate()
    with pytest.raises(preftune.InputError, match="registers no objective 'slik'"):
        base(tiny_world, user_module / "x", objective="myloss:slik").validate()
    with pytest.raises(preftune.InputError, match="cannot import objective module 'nosuch'"):
        base(tiny_world, user_module / "x", objective="nosuch:slic").validate()
    assert not (user_module / "x").exists()
