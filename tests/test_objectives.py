from __future__ import annotations

import math
import warnings
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from preftune.core import objectives as O
from preftune.core.errors import InputError

# three pairs: (policy chosen, policy rejected, |c|, |r|, ref chosen, ref rejected)
ROWS = [(-10.0, -12.0, 5, 4, -11.0, -11.5), (-4.0, -3.0, 2, 3, -4.5, -3.5), (-20.0, -18.0, 10, 6, -19.0, -19.5)]


def batch(rows=ROWS, grad: bool = False, dtype=torch.float32) -> O.SeqLogps:
    cols = [torch.tensor(c, dtype=dtype, requires_grad=grad and i < 2) for i, c in enumerate(zip(*rows))]
    return O.SeqLogps(*cols)


def logsig(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def margins(rows=ROWS):
    return [(c - rc) - (r - rr) for c, r, _, _, rc, rr in rows]


def run(name: str, lp: O.SeqLogps | None = None, **given) -> O.Output:
    return O.compute(name, lp if lp is not None else batch(), O.resolve_params(name, given))


def close(t: torch.Tensor, expected) -> None:
    assert t.detach().double().tolist() == pytest.approx(list(expected), rel=1e-5, abs=1e-6)


def test_dpo_matches_hand_computation_and_rewards():
    out = run("dpo", beta=0.2)
    close(out.loss, [-logsig(0.2 * d) for d in margins()])
    close(out.chosen_rewards, [0.2 * (c - rc) for c, _, _, _, rc, _ in ROWS])
    close(out.rejected_rewards, [0.2 * (r - rr) for _, r, _, _, _, rr in ROWS])
    assert not out.chosen_rewards.requires_grad and out.extras == {}


def test_dpo_at_zero_margin_is_ln2():
    lp = batch([(-5.0, -7.0, 3, 4, -5.0, -7.0)])
    close(run("dpo", lp).loss, [math.log(2)])


@pytest.mark.parametrize("name", ["cdpo", "robust"])
def test_label_smoothing_zero_is_dpo(name):
    close(run(name, label_smoothing=0.0, beta=0.3).loss, run("dpo", beta=0.3).loss.tolist())


def test_cdpo_and_robust_hand_computation():
    b, e = 0.5, 0.2
    close(run("cdpo", beta=b, label_smoothing=e).loss,
          [-(1 - e) * logsig(b * d) - e * logsig(-b * d) for d in margins()])
    close(run("robust", beta=b, label_smoothing=e).loss,
          [(-(1 - e) * logsig(b * d) + e * logsig(-b * d)) / (1 - 2 * e) for d in margins()])
    assert run("cdpo").chosen_rewards.tolist() == run("dpo").chosen_rewards.tolist()


def test_ipo_hand_computation_and_zero_margin():
    b = 0.25
    expected = [((c - rc) / nc - (r - rr) / nr - 1 / (2 * b)) ** 2 for c, r, nc, nr, rc, rr in ROWS]
    out = run("ipo", beta=b)
    close(out.loss, expected)
    close(out.chosen_rewards, [b * (c - rc) for c, _, _, _, rc, _ in ROWS])  # summed, not normalized
    close(run("ipo", batch([(-3.0, -4.0, 2, 7, -3.0, -4.0)]), beta=0.1).loss, [25.0])


def test_hinge_hand_computation():
    out = run("hinge", beta=1.0)
    close(out.loss, [max(0.0, 1 - d) for d in margins()])
    assert out.loss[0].item() == 0.0  # Δ = 1.5 is past the margin 1/β


def test_simpo_hand_computation_and_gamma_forms():
    b, g = 2.5, 1.0
    expected = [-logsig(b * c / nc - b * r / nr - g) for c, r, nc, nr, _, _ in ROWS]
    close(run("simpo", beta=b, gamma=g).loss, expected)
    close(run("simpo", beta=b, gamma_beta_ratio=g / b).loss, expected)
    out = run("simpo", batch([(-6.0, -9.0, 2, 3, 0.0, 0.0)]), beta=b, gamma=g)
    close(out.loss, [-logsig(-g)])
    close(out.chosen_rewards, [b * -3.0])
    assert O.resolve_params("simpo", {}) == {"beta": 2.0, "gamma_beta_ratio": 0.5, "nll_weight": 0.0}
    assert O.resolve_params("simpo", {"gamma": 1.0}) == {"beta": 2.0, "gamma": 1.0, "nll_weight": 0.0}


def test_reference_free_objectives_run_without_reference():
    lp = batch()
    lp = O.SeqLogps(lp.chosen, lp.rejected, lp.chosen_tokens, lp.rejected_tokens)
    for name in ("simpo", "orpo", "sft"):
        assert torch.isfinite(run(name, lp).loss).all()
    with pytest.raises(ValueError, match="reference"):
        run("dpo", lp)


def test_orpo_hand_computation_and_extras():
    b = 0.1
    out = run("orpo", beta=b)
    exp_loss, exp_odds = [], []
    for c, r, nc, nr, _, _ in ROWS:
        mc, mr = c / nc, r / nr
        odds = (mc - math.log(1 - math.exp(mc))) - (mr - math.log(1 - math.exp(mr)))
        exp_odds.append(odds)
        exp_loss.append(-mc - b * logsig(odds))
    close(out.loss, exp_loss)
    close(out.extras["log_odds_chosen"], exp_odds)
    close(out.extras["log_odds_ratio"], [logsig(o) for o in exp_odds])
    close(out.extras["nll_loss"], [-c / nc for c, _, nc, _, _, _ in ROWS])
    close(out.chosen_rewards, [b * c / nc for c, _, nc, _, _, _ in ROWS])


@pytest.mark.parametrize("chosen", [-1e-8, 0.0])
def test_orpo_stable_near_probability_one(chosen):
    lp = O.SeqLogps(*(torch.tensor([v], requires_grad=i < 2) for i, v in enumerate([chosen, -2.0, 1.0, 2.0])))
    out = O.compute("orpo", lp, O.resolve_params("orpo", {}))
    out.loss.sum().backward()
    for t in (out.loss, out.extras["log_odds_chosen"], lp.chosen.grad, lp.rejected.grad):
        assert torch.isfinite(t).all()


def test_log1mexp_matches_naive_formula_away_from_zero():
    x = torch.tensor([-50.0, -2.0, -0.7, -0.69, -0.1, -1e-3], dtype=torch.float64)
    assert torch.allclose(O.log1mexp(x), torch.log(1 - torch.exp(x)), rtol=1e-9)


def test_sft_is_mean_token_nll_of_chosen():
    out = run("sft")
    close(out.loss, [-c / nc for c, _, nc, _, _, _ in ROWS])
    close(out.rejected_rewards, [r / nr for _, r, _, nr, _, _ in ROWS])
    assert O.resolve_params("sft", {}) == {"nll_weight": 0.0}


@pytest.mark.parametrize("name", sorted(O.REGISTRY))
@pytest.mark.parametrize("rows", [ROWS, ROWS[:1]], ids=["B3", "B1"])
def test_gradients_flow(name, rows):
    lp = batch(rows, grad=True)
    out = run(name, lp)
    assert out.loss.shape == (len(rows),) and out.chosen_rewards.shape == (len(rows),)
    out.loss.sum().backward()
    assert torch.isfinite(lp.chosen.grad).all() and lp.chosen.grad.abs().sum() > 0
    if name == "sft":
        assert lp.rejected.grad is None
    else:
        assert torch.isfinite(lp.rejected.grad).all() and lp.rejected.grad.abs().sum() > 0


def test_needs_reference_flags():
    assert {n for n, o in O.REGISTRY.items() if o.needs_reference} == {
        "dpo", "cdpo", "robust", "ipo", "hinge", "kto", "sigmoid_norm", "dpo_norm", "exo_pair", "discopop", "aot",
        "aot_unpaired", "nca_pair", "bco_pair", "sppo_hard", "apo_zero", "apo_down", "apo_zero_unpaired"}
    assert {n for n, o in O.REGISTRY.items() if not o.needs_reference} == {"simpo", "orpo", "sft", "cpo_simpo",
                                                                              "alphapo"}
    assert all(o.summary and o.fn.__doc__ for o in O.REGISTRY.values())


def test_resolve_params_fills_defaults_from_the_schema():
    assert O.resolve_params("dpo", {"beta": None, "nll_weight": 0.0}) == {"beta": 0.1, "nll_weight": 0.0}
    assert O.resolve_params("robust", {"label_smoothing": "0.05"}) == {"beta": 0.1, "label_smoothing": 0.05,
                                                                      "nll_weight": 0.0}
    assert O.resolve_params("simpo", {"gamma": 3.0}) == {"beta": 2.0, "gamma": 3.0, "nll_weight": 0.0}
    assert O.resolve_params("cdpo", {})["label_smoothing"] == 0.1
    # the ratio form is the absolute form with gamma = ratio * beta
    close(run("simpo", beta=4.0, gamma_beta_ratio=0.3).loss, run("simpo", beta=4.0, gamma=1.2).loss.tolist())


@pytest.mark.parametrize("name,given,close_name", [("dpo", {"betta": 0.1}, "beta"), ("simpo", {"gama": 1.0}, "gamma"),
                                                   ("sft", {"beta": 3.0}, None)])
def test_unknown_hyperparameter_is_one_line_with_a_suggestion(name, given, close_name):
    with pytest.raises(InputError) as e:
        O.resolve_params(name, given)
    key = next(iter(given))
    assert e.value.field == f"objectives.{name}.{key}" and "\n" not in str(e.value)
    assert (f"did you mean '{close_name}'" in str(e.value)) == (close_name is not None)


def test_every_objective_declares_family_and_schema():
    assert {o.family for o in O.REGISTRY.values()} <= set(O.FAMILIES)
    assert O.fallback() == "orpo" and [o.name for o in O.REGISTRY.values() if o.fallback] == ["orpo"]
    assert {n for n, o in O.REGISTRY.items() if o.judged} == set(O.REGISTRY) - {"orpo", "sft"}
    assert [o.name for o in O.REGISTRY.values() if o.data == "unpaired"] == ["kto", "apo_zero_unpaired"]
    for o in O.REGISTRY.values():
        for key, p in o.params.items():
            assert p.default is None or p.check(p.default), (o.name, key)


def test_user_objective_from_a_module(tmp_path, monkeypatch):
    (tmp_path / "mylosses_t.py").write_text(
        "import torch, preftune\n"
        "@preftune.objective('slic_t', needs_reference=False, family='reference-free', params={'beta': 1.0, 'delta': 1.0})\n"
        "def slic(lp, beta, delta):\n"
        "    loss = torch.relu(delta - beta * (lp.chosen - lp.rejected))\n"
        "    return preftune.ObjectiveOutput(loss, beta * lp.chosen.detach(), beta * lp.rejected.detach())\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("sys.path", [p for p in __import__("sys").path if p not in ("", str(tmp_path))])
    obj = O.get("mylosses_t:slic_t")
    assert obj.name == "slic_t" and obj.family == "reference-free" and {k: p.default for k, p in obj.params.items()} == {"beta": 1.0, "delta": 1.0}
    out = run("slic_t", delta=2.0)
    close(out.loss, [max(0.0, 2.0 - (c - r)) for c, r, *_ in ROWS])
    with pytest.raises(InputError, match="did you mean 'delta'"):
        O.resolve_params("slic_t", {"detla": 1.0})
    with pytest.raises(InputError, match="registers no objective 'nope'"):
        O.get("mylosses_t:nope")
    with pytest.raises(InputError, match="cannot import objective module 'no_such_module_t'"):
        O.get("no_such_module_t:x")
    O.REGISTRY.pop("slic_t")


@pytest.mark.parametrize("name,given,field", [
    ("simpo", {"gamma": 1.0, "gamma_beta_ratio": 0.5}, "gamma"),
    ("dpo", {"beta": 0.0}, "beta"),
    ("orpo", {"beta": -1.0}, "beta"),
    ("ipo", {"beta": float("nan")}, "beta"),
    ("robust", {"label_smoothing": 0.5}, "label_smoothing"),
    ("cdpo", {"label_smoothing": -0.1}, "label_smoothing"),
    ("simpo", {"gamma": -1.0}, "gamma"),
    ("dpo", {"nll_weight": -1.0}, "nll_weight"),
])
def test_resolve_params_rejects_nonsense(name, given, field):
    with pytest.raises(InputError, match=f"field 'objectives.{name}.{field}'"):
        O.resolve_params(name, given)


def test_unknown_objective_suggests():
    with pytest.raises(InputError) as e:
        O.get("dpx")
    msg = str(e.value)
    assert "field 'objective'" in msg and "unknown objective 'dpx' (did you mean 'dpo'?)" in msg
    assert "choose from dpo, cdpo" in msg
    with pytest.raises(InputError, match=f"choose from {', '.join(O.REGISTRY)}$"):
        O.get("zzzzzz")
    assert list(O.REGISTRY)[:5] == ["dpo", "cdpo", "robust", "ipo", "hinge"] and list(O.REGISTRY)[-2:] == \
        ["kto", "apo_zero_unpaired"]


def test_nll_weight_adds_chosen_nll():
    base, plus = run("dpo"), run("dpo", nll_weight=0.5)
    nll = [-c / nc for c, _, nc, _, _, _ in ROWS]
    close(plus.loss - base.loss, [0.5 * v for v in nll])
    close(plus.extras["nll_loss"], nll)
    assert "nll_loss" not in base.extras


# --- against TRL 1.16's own code (TRL is an optional bench dependency) -----------------------------------------

@pytest.fixture(scope="module")
def trl_code():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from trl.experimental.cpo.cpo_trainer import CPOTrainer
        from trl.experimental.orpo.orpo_trainer import ORPOTrainer
        from trl.trainer.dpo_trainer import DPOTrainer
    return DPOTrainer, CPOTrainer, ORPOTrainer


def _trl_dpo(dpo_trainer, loss_type: str, row, beta: float, eps: float) -> tuple[float, float, float]:
    """DPOTrainer._compute_loss on one pair, with a stand-in model whose per-token log-probs sum to the row's."""
    c, r, nc, nr, rc, rr = row
    length = 1 + max(nc, nr)
    mask = torch.zeros(2, length, dtype=torch.long)
    mask[0, 1:1 + nc], mask[1, 1:1 + nr] = 1, 1
    logp = mask[:, 1:].double() * torch.tensor([[c / nc], [r / nr]], dtype=torch.float64)
    zeros = torch.zeros_like(logp)
    model = lambda **kw: SimpleNamespace(log_probs=logp, entropy=zeros, mean_logits=zeros,  # noqa: E731
                                         is_top1=zeros.bool())
    trainer = SimpleNamespace(
        model=SimpleNamespace(training=False), aux_loss_enabled=False, ld_alpha=None, precompute_ref_logps=True,
        f_divergence_type="reverse_kl", loss_types=[loss_type], loss_weights=[1.0], beta=beta,
        label_smoothing=eps, use_weighting=False, _metrics=defaultdict(lambda: defaultdict(list)),
        _total_train_tokens=0, accelerator=SimpleNamespace(device="cpu", gather=lambda t: t,
                                                           gather_for_metrics=lambda t: t))
    inputs = {"input_ids": torch.zeros(2, length, dtype=torch.long), "attention_mask": torch.ones_like(mask),
              "completion_mask": mask, "ref_chosen_logps": torch.tensor([rc], dtype=torch.float64),
              "ref_rejected_logps": torch.tensor([rr], dtype=torch.float64)}
    loss = dpo_trainer._compute_loss(trainer, model, inputs, return_outputs=False)
    metrics = trainer._metrics["eval"]
    return loss.item(), metrics["rewards/chosen"][-1], metrics["rewards/rejected"][-1]


@pytest.mark.parametrize("ours,theirs", [("dpo", "sigmoid"), ("ipo", "ipo"), ("robust", "robust"),
                                         ("hinge", "hinge")])
def test_reference_objectives_match_trl(trl_code, ours, theirs):
    beta, eps = 0.3, 0.2
    given = {"beta": beta, "label_smoothing": eps}  # TRL's sigmoid/ipo/hinge ignore label_smoothing; ours reject it
    out = run(ours, batch(dtype=torch.float64), **{k: v for k, v in given.items() if k in O.get(ours).params})
    for i, row in enumerate(ROWS):
        loss, rc, rr = _trl_dpo(trl_code[0], theirs, row, beta, eps)
        assert (out.loss[i].item(), out.chosen_rewards[i].item(), out.rejected_rewards[i].item()) == \
            pytest.approx((loss, rc, rr), rel=1e-12, abs=1e-12)


def test_simpo_and_orpo_match_trl(trl_code):
    _, cpo, orpo = trl_code
    lp = batch(dtype=torch.float64)
    mc, mr = lp.chosen / lp.chosen_tokens, lp.rejected / lp.rejected_tokens
    dev = SimpleNamespace(device="cpu")
    fake = SimpleNamespace(alpha=0.0, loss_type="simpo", simpo_gamma=1.5, beta=2.5, label_smoothing=0.0,
                           accelerator=dev)
    losses, rc, rr = cpo.cpo_loss(fake, mc, mr)
    out = run("simpo", lp, beta=2.5, gamma=1.5)
    assert torch.allclose(out.loss, losses) and torch.allclose(out.chosen_rewards, rc)
    assert torch.allclose(out.rejected_rewards, rr)
    ratio_term, rc, rr, mean_ratio, mean_odds = orpo.odds_ratio_loss(SimpleNamespace(beta=0.2, accelerator=dev),
                                                                     mc, mr)
    out = run("orpo", lp, beta=0.2)
    assert torch.allclose(out.loss, -mc - ratio_term)  # TRL: loss = nll − mean(β·log σ(log odds))
    assert torch.allclose(out.chosen_rewards, rc.double()) and torch.allclose(out.rejected_rewards, rr.double())
    assert out.extras["log_odds_chosen"].mean().item() == pytest.approx(mean_odds.item())
    assert out.extras["log_odds_ratio"].mean().item() == pytest.approx(mean_ratio.item())


# --- KTO: unpaired rows (chosen = completion, rejected = the KL completion), against TRL's KTOTrainer -----------

KTO_ROWS = [  # (completion logp, KL logp, ref completion, ref KL, label)
    (-10.0, -12.0, -11.0, -11.5, True), (-4.0, -3.0, -4.5, -3.5, False), (-20.0, -18.0, -19.0, -19.5, True),
    (-7.0, -9.0, -6.0, -9.5, False)]


def kto_batch(rows=KTO_ROWS) -> O.SeqLogps:
    c, k, rc, rk, lab = (torch.tensor(col, dtype=torch.float64) for col in zip(*rows))
    return O.SeqLogps(c, k, torch.ones_like(c), torch.ones_like(c), rc, rk, label=lab.bool())


def test_kto_hand_computation():
    beta, wd, wu = 0.5, 1.0, 1.3
    out = run("kto", kto_batch(), beta=beta, desirable_weight=wd, undesirable_weight=wu)
    z = max(0.0, sum(k - rk for _, k, _, rk, _ in KTO_ROWS) / 4)   # (-0.5 + 0.5 + 1.5 + 0.5) / 4 = 0.5
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    expected = [wd * (1 - sig(beta * ((c - rc) - z))) if lab else wu * (1 - sig(beta * (z - (c - rc))))
                for c, _, rc, _, lab in KTO_ROWS]
    close(out.loss, expected)
    close(out.extras["kl"], [0.5] * 4)
    assert out.chosen_rewards[1].isnan() and out.rejected_rewards[0].isnan()
    close(out.chosen_rewards[[0, 2]], [beta * 1.0, beta * -1.0])
    # a batch whose KL estimate is negative is clamped at 0
    neg = [(c, k - 5, rc, rk, lab) for c, k, rc, rk, lab in KTO_ROWS]
    close(run("kto", kto_batch(neg), beta=beta).extras["kl"], [0.0] * 4)


def test_kto_on_heldout_pairs_ranks_like_dpo():
    lp = batch(dtype=torch.float64)
    out, dpo = run("kto", lp, beta=0.3), run("dpo", lp, beta=0.3)
    close(out.chosen_rewards - out.rejected_rewards, (dpo.chosen_rewards - dpo.rejected_rewards).tolist())


def _trl_kto(kto_trainer, rows, beta: float, wd: float, wu: float) -> tuple[float, dict]:
    """KTOTrainer._compute_loss on one batch, with a stand-in model whose per-token log-probs sum to the rows'."""
    n = len(rows)
    main = torch.tensor([[c] for c, *_ in rows], dtype=torch.float64)       # (n, 1): one completion position
    kl = torch.tensor([[k] for _, k, *_ in rows], dtype=torch.float64)
    zeros = torch.zeros(n, 1, dtype=torch.float64)

    def model(**kw):
        logp = kl if int(kw["input_ids"][0, 0]) == 1 else main   # KL sequences are marked by token id 1
        return SimpleNamespace(log_probs=logp, entropy=zeros, mean_logits=zeros)

    trainer = SimpleNamespace(
        model=SimpleNamespace(training=False), calculate_KL=True, precompute_ref_logps=True, loss_type="kto",
        beta=beta, desirable_weight=wd, undesirable_weight=wu, aux_loss_enabled=False, _tp_size=1,
        _total_train_tokens=0, _metrics=defaultdict(lambda: defaultdict(list)),
        accelerator=SimpleNamespace(device="cpu", gather_for_metrics=lambda t: t, gather=lambda t: t))
    trainer._compute_kl_logps = lambda m, b: kto_trainer._compute_kl_logps(trainer, m, b)
    mask = torch.tensor([[0, 1]] * n)
    inputs = {"input_ids": torch.zeros(n, 2, dtype=torch.long), "attention_mask": torch.ones(n, 2, dtype=torch.long),
              "completion_mask": mask, "KL_input_ids": torch.ones(n, 2, dtype=torch.long),
              "KL_attention_mask": torch.ones(n, 2, dtype=torch.long), "KL_completion_mask": mask,
              "label": torch.tensor([lab for *_, lab in rows]),
              "ref_logps": torch.tensor([rc for _, _, rc, _, _ in rows], dtype=torch.float64),
              "ref_KL_logps": torch.tensor([rk for *_, rk, _ in rows], dtype=torch.float64)}
    loss = kto_trainer._compute_loss(trainer, model, inputs, return_outputs=False)
    return loss.item(), {k: v[-1] for k, v in trainer._metrics["eval"].items()}


def test_kto_matches_trl():
    from trl.trainer.kto_trainer import KTOTrainer

    from preftune.evaluation.heldout import summarize

    beta, wd, wu = 0.3, 1.0, 1.25
    lp = kto_batch()
    out = run("kto", lp, beta=beta, desirable_weight=wd, undesirable_weight=wu)
    loss, metrics = _trl_kto(KTOTrainer, KTO_ROWS, beta, wd, wu)
    ours = summarize(torch.stack([lp.chosen, lp.rejected], 1), out, out.loss)
    assert ours["loss"] == pytest.approx(loss, rel=1e-6, abs=1e-9)
    for key in ("kl", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected"):
        assert ours[key] == pytest.approx(metrics[key], rel=1e-6, abs=1e-9), key
    assert "rewards/accuracies" not in ours  # KTO rows have one label each: TRL logs no accuracy either
