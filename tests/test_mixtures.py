"""Mixtures of objectives and the modifiers: what the registry says about them, the extra sums logprobs.py
computes for them from the one forward, bad input as one line, training, and the whole registry in one matrix
through ablate, decide, report and review."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import preftune
from preftune.commands.cli import main
from preftune.core import config
from preftune.core import objectives as O
from preftune.core.errors import InputError
from preftune.data.tokenize import Pair
from preftune.modeling.logprobs import batch_logps, cut_to_shared, make_batch, score_pairs, sequence_logps
from preftune.training import step as S

MPO = "0.8*dpo + 0.2*bco_pair + 1.0*sft"


def test_a_mixture_is_an_objective():
    m = O.get(MPO)
    assert m.name == m.spec == O.canonical(MPO) == "0.8*dpo+0.2*bco_pair+1*sft" and O.get(m.name) is not None
    assert (m.family, m.needs_reference, m.data, m.params, m.judged) == ("reference-relative", True, "paired", {}, True)
    assert [(w, o.name) for w, o in m.terms] == [(0.8, "dpo"), (0.2, "bco_pair"), (1.0, "sft")]
    assert O.get("simpo+0.5*sft").family == "reference-free" and not O.get("simpo+0.5*sft").needs_reference
    assert O.get("2*sft").family == "likelihood" and not O.get("2*sft").judged
    unpaired = O.get("kto+0.5*apo_zero_unpaired")
    assert (unpaired.data, unpaired.min_batch_size, unpaired.advice is not None) == ("unpaired", 2, True)
    assert m.name not in O.REGISTRY  # `preftune objectives` lists entries; mixtures are made on demand


def test_mixture_params_come_from_each_terms_entry():
    p = O.run_params(MPO, {"dpo": {"beta": 0.2}, "bco_pair": {"beta": 0.05}, "simpo": {"beta": 9.0}}, nll_weight=0.1)
    assert p == {"dpo.beta": 0.2, "bco_pair.beta": 0.05, "nll_weight": 0.1}
    assert O.entries_of(MPO, p) == {"dpo": {"beta": 0.2}, "bco_pair": {"beta": 0.05}, "sft": {}}
    assert O.spread(MPO, {"beta": 0.3}) == {"dpo": {"beta": 0.3}, "bco_pair": {"beta": 0.3}}
    with pytest.raises(InputError, match="no term of '0.8\\*dpo\\+0.2\\*bco_pair\\+1\\*sft' takes 'gamma'"):
        O.spread(MPO, {"gamma": 1.0})
    with pytest.raises(InputError, match="set it in a term's own entry"):
        O.resolve_params(MPO, {"beta": 0.1})
    # shorthands: --beta reaches every term that takes it, over the YAML entry
    run = {"model": "m", "data": "d", "objective": MPO}
    cfg = config.build({**run, "beta": 0.4, "objectives": {"dpo": {"beta": 0.2}}}, {"nll_weight": 0.0})
    assert cfg.validate().objective_params()["dpo.beta"] == 0.2 and cfg.objective_params()["bco_pair.beta"] == 0.4
    cfg = config.build({**run, "objectives": {"dpo": {"beta": 0.2}}}, {"beta": 0.5})
    assert cfg.validate().objective_params()["dpo.beta"] == 0.5


def _combined(lp, name, **mods):
    return O.compute(name, lp, O.run_params(name, {}, modifiers=mods))


def test_mixture_loss_is_the_weighted_sum_and_logs_each_term():
    c, r, nc, nr, rc, rr = (torch.tensor(v) for v in ([-10.0, -4.0], [-12.0, -3.0], [5.0, 2.0], [4.0, 3.0],
                                                        [-11.0, -4.5], [-11.5, -3.5]))
    lp = O.SeqLogps(c, r, nc, nr, rc, rr)
    out, parts = _combined(lp, MPO), {n: _combined(lp, n) for n in ("dpo", "bco_pair", "sft")}
    expected = 0.8 * parts["dpo"].loss + 0.2 * parts["bco_pair"].loss + parts["sft"].loss
    assert torch.allclose(out.loss, expected)
    assert torch.equal(out.chosen_rewards, parts["dpo"].chosen_rewards)  # the first preference term's rewards
    assert {"loss/sigmoid", "loss/bco_pair", "loss/sft", "nll_loss"} <= set(out.extras)
    assert torch.equal(out.extras["loss/bco_pair"], parts["bco_pair"].loss)


@pytest.mark.parametrize("text,words", [
    ("0.8*dpo + 0.2*bco_pari", "unknown objective 'bco_pari' (did you mean 'bco_pair'?)"),
    ("-0.2*dpo + sft", "weight -0.2 of 'dpo' in mixture '-0.2*dpo + sft' must be a finite number >= 0"),
    ("nan*dpo+sft", "weight nan of 'dpo'"), ("inf*dpo+sft", "weight inf of 'dpo'"),
    ("x*dpo+sft", "weight 'x' of 'dpo' in mixture 'x*dpo+sft' is not a number"),
    ("0.5*dpo+0.5*kto", "mixes data kinds (paired: dpo; unpaired: kto)"),
    ("dpo+0.5*dpo", "'dpo' appears twice"), ("dpo+", "cannot read ''"),
])
def test_bad_mixtures_are_one_line(text, words):
    with pytest.raises(InputError) as e:
        O.get(text)
    assert words in str(e.value) and e.value.field == "objective" and "\n" not in str(e.value)


@pytest.mark.parametrize("args,field,words", [
    (["--objective", "0.8*dpo+0.2*bco_pari"], "objective", "did you mean 'bco_pair'"),
    (["--objective", "dpo+-1*sft"], "objective", "must be a finite number >= 0"),
    (["--objective", "dpo+kto"], "objective", "mixes data kinds"),
    (["--objective", "simpo", "--ld-alpha", "0.5"], "ld_alpha", "'simpo' does not take ld_alpha"),
    (["--objective", "dpo+bco_pair", "--f-divergence-type", "js_divergence"], "f_divergence_type",
     "'bco_pair' does not take f_divergence_type"),
    (["--objective", "aot", "--use-weighting"], "use_weighting", "'aot' does not take use_weighting"),
    (["--objective", "dpo", "--ld-alpha", "2"], "ld_alpha", "in [0, 1]"),
])
@pytest.mark.parametrize("command", ["train", "ablate"])
def test_bad_input_exits_2_and_writes_nothing(tiny_world, tmp_path, capsys, args, field, words, command):
    out = tmp_path / "out"
    common = ["--model", str(tiny_world.model_dir), "--data", str(tiny_world.train_path), "--output", str(out),
              "--cache-dir", str(tmp_path / "cache")]
    if command == "ablate":  # the same input as a matrix factor: --grid objective=dpo,<it>
        args = [*args[2:], "--grid", f"objective=dpo,{args[1]}"] if args[0] == "--objective" else args
    assert main([command, *common, *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and words in err[0], err
    assert f"field '{field}'" in err[0] or field == "objective"
    assert not out.exists() and not (tmp_path / "cache").exists()


# --- the extra sums, from the same forward ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=128, attn_implementation="sdpa")
    return LlamaForCausalLM(cfg).eval()


PAIRS = [([1, 5, 7], [9, 9, 2], [8, 2]), ([3, 4, 6, 10, 11, 12], [13, 2], [14, 15, 16, 17, 2]),
         ([20], [21, 22, 23, 24, 25, 2], [26, 2]), ([], [30, 31, 2], [32, 33, 34, 2])]


def _per_token(model, prompt, completion) -> tuple[torch.Tensor, torch.Tensor]:
    """Per completion token (predicted ones only): log p and log Σ_v p_v², from the plain definition."""
    ids = torch.tensor([prompt + completion])
    logits = model(ids).logits[0, :-1].double()
    logp = logits.log_softmax(-1)
    start = max(len(prompt), 1)
    pos = torch.arange(start - 1, len(prompt) + len(completion) - 1)
    tok = logp[pos, ids[0, pos + 1]]
    return tok, torch.logsumexp(2 * logp[pos], -1)


@pytest.mark.parametrize("share", [True, False])
def test_needs_come_from_the_same_forward(llama, share):
    batch = make_batch(*zip(*PAIRS), pad_id=0, share_prompt=share)
    with torch.no_grad():
        sums, counts, more = batch_logps(llama, batch, needs=("shared", "sumsq"))
        plain, _ = batch_logps(llama, batch)
    assert torch.equal(sums, plain) and set(more) == {"shared", "sumsq"}
    n = len(PAIRS)
    for i, (p, c, r) in enumerate(PAIRS):
        (tc, qc), (tr, qr) = _per_token(llama, p, c), _per_token(llama, p, r)
        k = min(len(tc), len(tr))
        for j, (t, q) in ((i, (tc, qc)), (n + i, (tr, qr))):
            assert sums[j].item() == pytest.approx(t.sum().item(), abs=1e-4)
            assert more["shared"][j].item() == pytest.approx(t[:k].sum().item(), abs=1e-4)
            assert more["sumsq"][j].item() == pytest.approx(q.sum().item(), abs=1e-4)
    # the reference gets the same shared sums by scoring the pairs cut to their shared part
    pairs = [Pair(str(i), p, c, r, "", "", "") for i, (p, c, r) in enumerate(PAIRS)]
    cut, _, _ = score_pairs(llama, cut_to_shared(pairs), pad_id=0, share_prompt=share)
    assert torch.allclose(cut, torch.stack([more["shared"][:n], more["shared"][n:]], 1), atol=1e-5)
    logps, _, _, extra = score_pairs(llama, pairs, pad_id=0, share_prompt=share, needs=("sumsq",))
    assert torch.allclose(extra["sumsq"], torch.stack([more["sumsq"][:n], more["sumsq"][n:]], 1), atol=1e-5)


def test_sequence_logps_is_still_the_definition(llama):
    p, c, _ = PAIRS[0]
    ids = torch.tensor([p + c])
    s, n = sequence_logps(llama(ids).logits, ids, torch.tensor([[False] * len(p) + [True] * len(c)]))
    assert s.item() == pytest.approx(_per_token(llama, p, c)[0].sum().item(), abs=1e-4) and n.item() == len(c)


# --- training --------------------------------------------------------------------------------------------------

def _cfg(world, out: Path, **kw) -> config.Config:
    d = dict(model=str(world.model_dir), data=str(world.train_path), eval_data=str(world.eval_path), lr=2e-3,
             batch_size=4, grad_accum=2, max_steps=2, eval_every=0, save_every=0, warmup_ratio=0.0, quiet=True,
             threads=1, output=str(out), cache_dir=str(out.parent / "cache"), max_train_pairs=16)
    return config.build({}, {**d, **kw})


def test_a_mixture_with_modifiers_trains_on_one_forward_per_micro_batch(tiny_world, tmp_path, monkeypatch):
    calls, real = [], S.batch_logps

    def counted(*a, **k):
        calls.append(tuple(sorted(k.get("needs", ()))))
        return real(*a, **k)

    monkeypatch.setattr(S, "batch_logps", counted)
    s = preftune.train(_cfg(tiny_world, tmp_path / "mpo", objective=MPO, ld_alpha=0.5, use_weighting=True))
    assert calls == [("shared", "sumsq")] * 4  # 2 steps x 2 micro-batches: one forward each, every term inside
    assert s.objective == "0.8*dpo+0.2*bco_pair+1*sft" and s.params["ld_alpha"] == 0.5
    assert s.step0_eval["eval_accuracy"] == 0.5  # the LD-weighted step-0 margins still tie exactly
    rows = [json.loads(line) for line in (tmp_path / "mpo" / "metrics.jsonl").read_text().splitlines()]
    assert {"loss/sigmoid", "loss/bco_pair", "loss/sft"} <= set(rows[1]) and "eval_loss/sigmoid" in rows[-1]
    saved = config.from_file(tmp_path / "mpo" / "config.yaml").validate()
    assert saved.objective_params() == s.params


@pytest.mark.parametrize("sync", [0, 1])
def test_ld_alpha_reads_shared_sums_aligned_with_the_reference(tiny_world, tmp_path, monkeypatch, sync):
    """The policy's shared sums (from its one forward) and the reference's (pairs cut to their shared part, per
    TR-DPO period too) line up: the shorter side's shared sum is its whole sum, and at step 1 (LoRA B = 0) the
    policy's equal the reference's."""
    seen, real = [], O.compute

    def spy(name, lp, params):
        if lp.chosen.requires_grad:
            seen.append(lp)
        return real(name, lp, params)

    monkeypatch.setattr(O, "compute", spy)
    preftune.train(_cfg(tiny_world, tmp_path / "ld", objective="dpo", ld_alpha=0.0, ref_sync_steps=sync,
                        ref_sync_alpha=0.5))
    assert len(seen) == 4
    for i, lp in enumerate(seen):
        short = lp.chosen_tokens <= lp.rejected_tokens
        for shared, chosen, rejected in ((lp.shared, lp.chosen, lp.rejected),
                                         (lp.ref_shared, lp.ref_chosen, lp.ref_rejected)):
            assert torch.allclose(torch.where(short, shared[0], shared[1]), torch.where(short, chosen, rejected),
                                  atol=1e-4)
            assert (torch.stack(shared) >= torch.stack([chosen, rejected]) - 1e-4).all()
        if i < 2:  # step 1: the policy is the reference
            assert torch.allclose(torch.stack(lp.shared), torch.stack(lp.ref_shared), atol=1e-4)


def test_runs_without_modifiers_record_what_they_did():
    """No modifier on: params (summary.json) hold only the hyperparameters and nll_weight, as before."""
    assert O.run_params("dpo", {}, modifiers={"ld_alpha": None, "use_weighting": False, "f_divergence_type":
                                               "reverse_kl", "f_alpha_divergence_coef": 0.5}) == \
        {"beta": 0.1, "nll_weight": 0.0}


# --- the whole registry in one matrix --------------------------------------------------------------------------

def test_the_whole_registry_in_one_matrix(tiny_world, tmp_path, monkeypatch, capsys):
    (tmp_path / "mylosses_w.py").write_text(
        "import torch, preftune\n"
        "@preftune.objective('slic_w', needs_reference=False, family='reference-free', params={'beta': 1.0})\n"
        "def slic(lp, beta):\n"
        "    loss = torch.relu(1 - beta * (lp.chosen - lp.rejected))\n"
        "    return preftune.ObjectiveOutput(loss, beta * lp.chosen.detach(), beta * lp.rejected.detach())\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("sys.path", [p for p in sys.path if p not in ("", str(tmp_path))])
    held = tmp_path / "held8.jsonl"
    held.write_text("".join(tiny_world.eval_path.read_text().splitlines(keepends=True)[:8]))
    names = [*O.REGISTRY, "0.8*dpo + 0.2*bco_pair + 1*sft", "mylosses_w:slic_w"]
    out = tmp_path / "m"
    args = ["--model", str(tiny_world.model_dir), "--data", str(tiny_world.train_path), "--eval-data", str(held),
            "--max-steps", "2", "--batch-size", "2", "--max-train-pairs", "8", "--eval-every", "0",
            "--save-every", "0", "--threads", "1", "--cache-dir", str(tmp_path / "cache"), "--output", str(out),
            "--quiet", "--grid", "objective=" + ",".join(names)]
    try:
        assert main(["ablate", *args]) == 0
        cells = json.loads((out / "matrix.json").read_text())["cells"]
        assert [c["values"]["objective"] for c in cells] == [O.canonical(n) for n in names]
        assert all(c["status"] == "finished" for c in cells)
        assert main(["decide", str(out)]) == 0 and main(["report", str(out)]) == 0
        d = json.loads((out / "decision.json").read_text())
        assert {c["objective"] for c in d["cells"]} == {O.canonical(n) for n in names}
        page = (out / "report.md").read_text()
        assert "| 0.8\\*dpo+0.2\\*bco_pair+1\\*sft |" in page and "0.8*dpo" not in page  # no stray emphasis
        for c in cells:
            assert main(["review", str(out / "cells" / c["name"]), "--fail-on", "never"]) == 0  # 2 steps: may be at chance
    finally:
        O.REGISTRY.pop("slic_w", None)
    capsys.readouterr()


def test_user_objective_in_a_mixture(tmp_path, monkeypatch):
    (tmp_path / "mylosses_x.py").write_text(
        "import torch, preftune\n"
        "@preftune.objective('slic_x', needs_reference=False, family='reference-free', params={'delta': 1.0})\n"
        "def slic(lp, delta):\n"
        "    return preftune.ObjectiveOutput(torch.relu(delta - (lp.chosen - lp.rejected)), lp.chosen.detach(),\n"
        "                                    lp.rejected.detach())\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("sys.path", [p for p in sys.path if p not in ("", str(tmp_path))])
    try:
        m = O.get("0.5*mylosses_x:slic_x + 2*sft")
        assert m.spec == "0.5*mylosses_x:slic_x+2*sft" and m.name == "0.5*slic_x+2*sft"
        p = O.run_params(m.spec, {"mylosses_x:slic_x": {"delta": 3.0}})
        assert p == {"slic_x.delta": 3.0, "nll_weight": 0.0}
        assert O.entries_of(m.spec, p) == {"mylosses_x:slic_x": {"delta": 3.0}, "sft": {}}
        lp = O.SeqLogps(*(torch.tensor(v) for v in ([-1.0], [-2.0], [2.0], [2.0])))
        assert O.compute(m.spec, lp, p).loss.item() == pytest.approx(0.5 * 2.0 + 2 * 0.5)
        assert config.Config(model="m", data="d", objective=" 0.5*mylosses_x:slic_x+2*sft").validate().objective \
            == m.spec
    finally:
        O.REGISTRY.pop("slic_x", None)
