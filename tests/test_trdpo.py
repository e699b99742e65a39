"""TR-DPO with LoRA (--ref-sync-steps, --ref-sync-alpha): the reference as a second adapter synced to the
policy by TRL's rule on the weights, no second copy of the model, an exact tie at step 0, a run that learns,
resume after a crash (KeyboardInterrupt and kill -9) bit-identical to an uninterrupted run, one-line errors.

    pytest tests/test_trdpo.py
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import preftune.training.loop as T
import preftune.training.step as S
from preftune.commands.cli import main
from preftune.core import config
from preftune.core.files import read_jsonl
from preftune.core.layout import REFERENCE_ADAPTER, RunDir
from preftune.modeling.model import add_lora, load_model
from preftune.modeling.ref_adapter import NAME, ReferenceAdapter
from preftune.training.checkpoints import latest_checkpoint

TIMING_KEYS = {"pairs_per_second", "tokens_per_second"}


def cfg_for(world, tmp_path, name, **kw):
    base = dict(model=str(world.model_dir), data=str(world.train_path), eval_data=str(world.eval_path),
                lr=2e-3, batch_size=8, max_steps=16, eval_every=8, save_every=0, warmup_ratio=0.0, lora_rank=8,
                output=str(tmp_path / name), cache_dir=str(tmp_path / "cache"), quiet=True, max_train_pairs=128,
                ref_sync_steps=4)
    base.update(kw)
    return config.build(base)


@pytest.fixture(scope="module")
def lora(tiny_world, tmp_path_factory):
    """A rank-2 LoRA on the tiny model and a batch of token ids."""
    cfg = cfg_for(tiny_world, tmp_path_factory.mktemp("lora"), "x", lora_rank=2)
    torch.manual_seed(0)
    model = add_lora(load_model(cfg), cfg)
    return model, torch.randint(3, 300, (2, 12))


def set_policy(model, seed):
    """Random policy factors (a trained adapter's stand-in); returns {layer: (A, B, s)}."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    with torch.no_grad():
        for n, m in ReferenceAdapter(model, 1.0).layers.items():
            a, b = m.lora_A["default"].weight, m.lora_B["default"].weight
            a.copy_(torch.randn(a.shape, generator=g) * 0.1)
            b.copy_(torch.randn(b.shape, generator=g) * 0.1)
            out[n] = (a.clone(), b.clone(), m.scaling["default"])
    return out


def ref_deltas(ref):
    f = ref.factors()
    return {n: m.scaling[NAME] * f[f"{n}.B"] @ f[f"{n}.A"] for n, m in ref.layers.items()}


def logits(model, ids, ctx):
    with torch.no_grad(), ctx:
        return model(input_ids=ids).logits


def test_a_sync_follows_trls_rule_on_the_weights(lora):
    """W_ref <- a W_policy + (1 - a) W_ref on the merged weights (the product BA), worked out by hand."""
    model, ids = lora
    ref = ReferenceAdapter(model, alpha=0.5)
    with torch.no_grad():
        base = model(input_ids=ids).logits  # the policy with B = 0 is the base model
    assert torch.equal(logits(model, ids, ref.active()), base)  # before any sync: the base, exactly
    p1 = set_policy(model, 1)
    ref.sync()
    assert ref.syncs == 1 and ref.rank == 2
    for n, d in ref_deltas(ref).items():  # from the base (delta 0): half the policy's delta
        a1, b1, s = p1[n]
        assert torch.allclose(d, 0.5 * s * b1 @ a1, atol=1e-7)
    p2 = set_policy(model, 2)
    ref.sync()
    assert ref.rank == 4  # the exact blend of two rank-2 products needs rank 4
    for n, d in ref_deltas(ref).items():
        (a1, b1, s), (a2, b2, _) = p1[n], p2[n]
        assert torch.allclose(d, 0.5 * s * b2 @ a2 + 0.25 * s * b1 @ a1, atol=1e-7)  # 1/2 P2 + 1/2 (1/2 P1)
        factors = s * (0.5 * b2 + 0.25 * b1) @ (0.5 * a2 + 0.5 * a1)  # blending A and B apart: another model
        assert not torch.allclose(d, factors, atol=1e-4)
    # the reference's forward is the base plus its delta, and training goes on with the policy
    assert not torch.allclose(logits(model, ids, ref.active()), base, atol=1e-4)
    assert model.active_adapter == "default" and all(p.requires_grad == ("lora_" in n and ".default." in n)
                                                     for n, p in model.named_parameters())
    ref.close()


def test_alpha_1_copies_the_policy_bit_for_bit(lora):
    model, ids = lora
    ref = ReferenceAdapter(model, alpha=1.0)
    set_policy(model, 3)
    ref.sync()
    set_policy(model, 4)
    ref.sync()
    assert ref.rank == 2  # a copy drops what came before
    for m in ref.layers.values():
        assert torch.equal(m.lora_A[NAME].weight, m.lora_A["default"].weight)
        assert torch.equal(m.lora_B[NAME].weight, m.lora_B["default"].weight)
    with torch.no_grad():
        policy = model(input_ids=ids).logits
    assert torch.equal(logits(model, ids, ref.active()), policy)
    # a checkpoint's factors rebuild the same reference, with the same cache key
    again = ReferenceAdapter(model, alpha=1.0)
    digest, factors = ref.digest(), {k: v.clone() for k, v in ref.factors().items()}
    again.load(factors, 2)
    assert again.digest() == digest and torch.equal(logits(model, ids, again.active()), policy)
    set_policy(model, 5)
    assert again.digest() == digest  # the policy moved, not the reference
    again.close()


def test_no_second_copy_of_the_model(lora):
    """Parameters and buffers grow by the reference adapter alone; the base weights are the same tensors."""
    model, _ = lora
    count = lambda: sum(t.numel() for t in [*model.parameters(), *model.buffers()])  # noqa: E731
    policy = sum(p.numel() for n, p in model.named_parameters() if ".default." in n)
    before, ptrs = count(), {n: p.data_ptr() for n, p in model.named_parameters() if "lora_" not in n}
    rng = torch.get_rng_state()
    for alpha, syncs, grown in ((1.0, 3, policy), (0.6, 3, 3 * policy)):
        ref = ReferenceAdapter(model, alpha)
        for _ in range(syncs):
            ref.sync()
        assert count() - before == grown
        assert {n: p.data_ptr() for n, p in model.named_parameters() if "lora_" not in n} == ptrs
        ref.close()
        assert count() == before
    assert torch.equal(torch.get_rng_state(), rng)  # peft's init of the new factors leaves the run's RNG alone


def test_trdpo_run_ties_at_step_0_and_learns(tiny_world, tmp_path):
    kw = dict(scheduler="constant", eval_every=8)
    plain = T.train(cfg_for(tiny_world, tmp_path, "plain", max_steps=4, ref_sync_steps=0, **kw))
    tr = T.train(cfg_for(tiny_world, tmp_path, "tr", max_steps=16, ref_sync_steps=4, ref_sync_alpha=1.0, **kw))
    s0 = tr.step0_eval
    assert s0["eval_refrel/margin"] == 0.0 and s0["eval_accuracy"] == 0.5  # the exact tie at init, as ever
    assert tr.final_eval["eval_lennorm/accuracy"] > s0["eval_lennorm/accuracy"] + 0.05, (s0, tr.final_eval)
    assert tr.final_eval["eval_accuracy"] > 0.6 and tr.status == "finished"
    assert tr.ref_sync == {"steps": 4, "alpha": 1.0, "syncs": 3, "rank": 8}  # after steps 4, 8, 12
    assert "ref_sync" not in (tmp_path / "plain" / "summary.json").read_text() and plain.ref_sync is None
    # the first period trains against the base model, as DPO does (its pairs batched apart: 1e-5)
    rows = [[r for r in read_jsonl(tmp_path / n / "metrics.jsonl") if "loss" in r] for n in ("plain", "tr")]
    for a, b in zip(rows[0], rows[1][:4]):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5, abs=1e-6)
    # alpha 1: right after each sync the reference is the policy, so the first step of a period ties (ln 2)
    for step in (5, 9, 13):
        assert rows[1][step - 1]["loss"] == pytest.approx(math.log(2), abs=1e-5)
        assert rows[1][step - 1]["rewards/margins"] == pytest.approx(0.0, abs=1e-5)
    assert rows[1][5]["loss"] != pytest.approx(math.log(2), abs=1e-4)  # and moves away within the period
    # the saved adapter is the policy alone and loads with peft
    out = tmp_path / "tr" / "adapter"
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == []
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_world.model_dir), out)


def _same_run(a: Path, b: Path) -> None:
    wa, wb = (load_file(p / "adapter" / "adapter_model.safetensors") for p in (a, b))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    ra, rb = read_jsonl(a / "metrics.jsonl"), read_jsonl(b / "metrics.jsonl")
    assert len(ra) == len(rb)
    for x, y in zip(ra, rb):
        assert {k: v for k, v in x.items() if k not in TIMING_KEYS} == {k: v for k, v in y.items() if k not in TIMING_KEYS}


KW = dict(max_steps=8, save_every=2, eval_every=4, lora_dropout=0.1, ref_sync_steps=3, ref_sync_alpha=0.6)


@pytest.fixture(scope="module")
def uninterrupted(tiny_world, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("trdpo")
    T.train(cfg_for(tiny_world, tmp, "full", **KW))
    return tmp / "full"


@pytest.mark.parametrize("crash, checkpoint, clear_cache", [(5, 4, False), (7, 6, True)])
def test_resume_after_a_crash_equals_uninterrupted(tiny_world, tmp_path, monkeypatch, uninterrupted, crash,
                                                   checkpoint, clear_cache):
    """Syncs after steps 3 and 6, checkpoints every 2: step 4 is mid-period, step 6 right after a sync. The
    period's reference log-probs come from the cache, or (cache cleared) are computed again: the same numbers."""
    calls = {"n": 0}
    real = S.batch_logps

    def crash_at(*a, **k):  # one training forward per step
        calls["n"] += 1
        if calls["n"] == crash:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(S, "batch_logps", crash_at)
    cfg = cfg_for(tiny_world, tmp_path, "crashed", **KW)
    with pytest.raises(KeyboardInterrupt):
        T.train(cfg)
    monkeypatch.setattr(S, "batch_logps", real)
    last = latest_checkpoint(RunDir(tmp_path / "crashed"))
    assert last.name == f"step-{checkpoint:07d}" and (last / REFERENCE_ADAPTER).exists()
    if clear_cache:
        for f in (tmp_path / "cache" / "reference").glob("*"):
            f.unlink()
    summary = T.train(replace(cfg, resume=True))
    assert summary.ref_sync == {"steps": 3, "alpha": 0.6, "syncs": 2, "rank": 16}
    _same_run(uninterrupted, tmp_path / "crashed")


def test_kill_9_right_after_a_sync_then_resume(tiny_world, tmp_path, uninterrupted):
    """A real SIGKILL right after the checkpoint of step 6 (which holds the reference synced at step 6)."""
    cfg = cfg_for(tiny_world, tmp_path, "killed", **{**KW, "save_every": 6})
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in cfg.to_dict().items()
             if k in ("model", "data", "eval_data", "lr", "batch_size", "max_steps", "eval_every", "save_every",
                      "warmup_ratio", "lora_rank", "output", "cache_dir", "max_train_pairs", "ref_sync_steps",
                      "ref_sync_alpha", "lora_dropout")]
    marker = tmp_path / "killed.marker"
    env = {**os.environ, "PREFTUNE_TEST_KILL_AFTER_CHECKPOINT": str(marker),
           "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    proc = subprocess.run([sys.executable, "-m", "preftune", "train", *flags, "--quiet"], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9 and marker.exists(), proc.stderr[-2000:]
    assert latest_checkpoint(RunDir(tmp_path / "killed")).name == "step-0000006"
    assert main(["train", *flags, "--quiet", "--resume"]) == 0
    _same_run(uninterrupted, tmp_path / "killed")


@pytest.mark.parametrize("flags, field", [
    (["--ref-sync-steps", "4", "--lora-rank", "0"], "ref_sync_steps"),          # full fine-tuning
    (["--ref-sync-steps", "4", "--objective", "simpo"], "ref_sync_steps"),      # reference-free
    (["--ref-sync-steps", "-1"], "ref_sync_steps"),
    (["--ref-sync-steps", "4", "--ref-sync-alpha", "0"], "ref_sync_alpha"),
    (["--ref-sync-steps", "4", "--ref-sync-alpha", "1.5"], "ref_sync_alpha"),
    (["--ref-sync-steps", "4", "--ref-sync-alpha", "nan"], "ref_sync_alpha"),
])
def test_bad_input_is_one_line_exit_2_nothing_written(tiny_world, tmp_path, capsys, flags, field):
    out = tmp_path / "out"
    code = main(["train", "--model", str(tiny_world.model_dir), "--data", str(tiny_world.train_path),
                 "--output", str(out), *flags])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and field in err[0], err
    assert not out.exists()


def test_a_periods_cache_key_holds_the_reference_adapter(tiny_world, tmp_path):
    """Periods after a sync are cached under the reference's hash: the same run reads them back, a run whose
    reference differs (another alpha) computes its own, and the first period (the base) is shared by both."""
    kw = dict(max_steps=4, ref_sync_steps=2, eval_every=0)
    a = T.train(cfg_for(tiny_world, tmp_path, "a", ref_sync_alpha=0.6, **kw))
    b = T.train(cfg_for(tiny_world, tmp_path, "b", ref_sync_alpha=0.5, **kw))
    c = T.train(cfg_for(tiny_world, tmp_path, "c", ref_sync_alpha=0.6, **kw))
    assert [s.timing["reference_cached"] for s in (a, b, c)] == [
        {"train": False, "eval": False}, {"train": False, "eval": True}, {"train": True, "eval": True}]
    assert len(list((tmp_path / "cache" / "reference").glob("*"))) == 4  # held-out, base period, 2 synced ones
    _same_run(tmp_path / "a", tmp_path / "c")


def test_a_matrix_factor_on_a_shared_base_model(tiny_world, tmp_path, monkeypatch):
    """`--grid ref_sync_steps=0,2`: both cells on one loaded model, the first period warmed once for both, the
    shared model handed back without either adapter."""
    import preftune.modeling.model as M
    from preftune.modeling.model import is_peft
    from preftune.training.matrix import run_matrix

    models, real = [], M.load_model
    monkeypatch.setattr(M, "load_model", lambda cfg: models.append(real(cfg)) or models[-1])
    monkeypatch.setattr(T, "load_model", M.load_model)
    base = cfg_for(tiny_world, tmp_path, "m", max_steps=4, eval_every=0, save_every=2, ref_sync_steps=0,
                   max_train_pairs=32, batch_size=4)
    assert run_matrix(base, {"ref_sync_steps": [0, 2]}) == {"finished": 2, "failed": 0}
    runs = [json.loads(p.read_text()) for p in sorted((tmp_path / "m" / "cells").glob("*/summary.json"))]
    assert [r.get("ref_sync") for r in runs] == [None, {"steps": 2, "alpha": 0.6, "syncs": 1, "rank": 8}]
    assert runs[1]["timing"]["reference_cached"] == {"train": False, "eval": True}  # only the synced period
    assert len(models) == 1 and not is_peft(models[0])
    assert not [n for n, _ in models[0].named_modules() if "lora_" in n]
