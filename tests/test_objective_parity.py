"""Every loss TRL implements, against TRL 1.16's own code on the same batch of log-probs: DPOTrainer's 15 loss
types alone, with ld_alpha, each f-divergence and use_weighting, and as loss_weights mixtures; CPOTrainer's
CPO-SimPO and AlphaPO; KTOTrainer's apo_zero_unpaired. The loss and every metric TRL logs from log-probs.
Objectives TRL doesn't have (dpo_norm) are checked against values worked out by hand."""

from __future__ import annotations

import math
import warnings
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from preftune.core import objectives as O
from preftune.core.errors import InputError
from preftune.evaluation.heldout import summarize

# (policy chosen, policy rejected, |c|, |r|, ref chosen, ref rejected) per pair; four pairs so AOT's sort matters
ROWS = [(-10.0, -12.0, 5, 4, -11.0, -11.5), (-4.0, -3.0, 2, 3, -4.5, -3.5), (-20.0, -18.0, 10, 6, -19.0, -19.5),
        (-6.0, -9.0, 3, 7, -6.5, -8.0)]
EQUAL = [(c, r, 4, nr, rc, rr) for c, r, _, nr, rc, rr in ROWS]  # chosen all 4 long: TRL's token-mean sft = ours
SUMSQ = [(-1.2, -0.9), (-0.4, -1.5), (-2.0, -0.7), (-0.8, -1.1)]  # per-token log Σ_v p_v² of chosen, rejected
METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
           "logps/rejected")
TRL_NAME = {o.trl_loss_type: name for name, o in O.REGISTRY.items() if o.trl_loss_type}
DTYPE = torch.float64
LOOSE = 1e-7  # exo_pair: TRL makes ε a float32 tensor, so its log(ε) terms carry float32 rounding


@pytest.fixture(scope="module")
def trainers():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from trl.experimental.cpo.cpo_trainer import CPOTrainer
        from trl.trainer.dpo_trainer import DPOTrainer
        from trl.trainer.kto_trainer import KTOTrainer
    return SimpleNamespace(dpo=DPOTrainer, cpo=CPOTrainer, kto=KTOTrainer)


def _per_token(rows, col_c: int, col_r: int, mask: torch.Tensor, dtype) -> torch.Tensor:
    """(2B, L-1) per-token values, constant within each completion, summing to the rows' columns."""
    per = [row[col_c] / row[2] for row in rows] + [row[col_r] / row[3] for row in rows]
    return mask[:, 1:].to(dtype) * torch.tensor(per, dtype=dtype).unsqueeze(1)


def trl_dpo(trainer_cls, rows, loss_types, weights=None, *, beta=0.3, eps=0.0, ld_alpha=None, f="reverse_kl",
            coef=0.5, wpo=False, tau=0.05, dtype=DTYPE) -> tuple[float, dict]:
    """DPOTrainer._compute_loss over the whole batch (chosen rows, then rejected), with stand-in policy and
    reference models (no precomputed reference, so ld_alpha reaches the reference as in training)."""
    n, length = len(rows), 1 + max(max(row[2], row[3]) for row in rows)
    mask = torch.zeros(2 * n, length, dtype=torch.long)
    for i, row in enumerate(rows):
        mask[i, 1:1 + row[2]], mask[n + i, 1:1 + row[3]] = 1, 1
    logp, ref = _per_token(rows, 0, 1, mask, dtype), _per_token(rows, 4, 5, mask, dtype)
    sq = torch.tensor([s[0] for s in SUMSQ[:n]] + [s[1] for s in SUMSQ[:n]], dtype=dtype).unsqueeze(1)
    zeros = torch.zeros_like(logp)
    policy = lambda **kw: SimpleNamespace(log_probs=logp, entropy=zeros, mean_logits=zeros,  # noqa: E731
                                          is_top1=zeros.bool(), log_sum_sq_probs=mask[:, 1:].to(dtype) * sq)
    trainer = SimpleNamespace(
        model=SimpleNamespace(training=False, is_gradient_checkpointing=False, _modules={}), ref_model=lambda **kw: SimpleNamespace(
            log_probs=ref), args=SimpleNamespace(gradient_checkpointing_kwargs=None, discopop_tau=tau),
        aux_loss_enabled=False, ld_alpha=ld_alpha, precompute_ref_logps=False, f_divergence_type=f,
        f_alpha_divergence_coef=coef, loss_types=list(loss_types), loss_weights=list(weights or [1.0] * len(loss_types)),
        beta=beta, label_smoothing=eps, use_weighting=wpo, _metrics=defaultdict(lambda: defaultdict(list)),
        _total_train_tokens=0, accelerator=SimpleNamespace(device="cpu", gather=lambda t: t, gather_for_metrics=lambda t: t))
    inputs = {"input_ids": torch.zeros(2 * n, length, dtype=torch.long), "attention_mask": torch.ones_like(mask),
              "completion_mask": mask}
    loss = trainer_cls._compute_loss(trainer, policy, inputs, return_outputs=False)
    return loss.item(), {k: v[-1] for k, v in trainer._metrics["eval"].items()}


def ours(name: str, rows, entries=None, dtype=DTYPE, **modifiers) -> dict:
    """The same batch through preftune: the shared-part and Σ log Σp² sums as logprobs.py would hand them."""
    cols = [torch.tensor(c, dtype=dtype) for c in zip(*rows)]
    c, r, nc, nr, rc, rr = cols
    shared = torch.minimum(nc, nr)
    n = len(rows)
    sq = torch.tensor(SUMSQ[:n], dtype=dtype)
    lp = O.SeqLogps(c, r, nc, nr, rc, rr, shared=(shared * c / nc, shared * r / nr),
                    ref_shared=(shared * rc / nc, shared * rr / nr), sumsq=(nc * sq[:, 0], nr * sq[:, 1]))
    params = O.run_params(name, entries or {}, modifiers=modifiers)
    out = O.compute(name, lp, params)
    return summarize(torch.stack([c, r], 1), out, out.loss)


def same(mine: dict, trl_loss: float, trl: dict, rel: float = 1e-9) -> None:
    assert mine["loss"] == pytest.approx(trl_loss, rel=max(rel, LOOSE), abs=1e-12)
    for key in METRICS:
        assert mine[key] == pytest.approx(trl[key], rel=rel, abs=1e-12), key


def entry(name: str, beta: float, eps: float) -> dict:
    takes = O.get(name).params
    return {name: {k: v for k, v in (("beta", beta), ("label_smoothing", eps)) if k in takes}}


DPO_TYPES = ["sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
             "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm"]


def test_every_dpo_loss_type_has_an_entry():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from trl.trainer.dpo_config import DPOConfig
    assert set(DPO_TYPES) == set(TRL_NAME) and "'sigmoid_norm'" in DPOConfig.__dataclass_fields__["loss_type"].metadata["help"]


@pytest.mark.parametrize("loss_type", DPO_TYPES)
def test_dpo_loss_types_match_trl(trainers, loss_type):
    name, rows, eps = TRL_NAME[loss_type], EQUAL if loss_type == "sft" else ROWS, 0.2
    loss, metrics = trl_dpo(trainers.dpo, rows, [loss_type], beta=0.3, eps=eps)
    mine = ours(name, rows, entry(name, 0.3, eps))
    assert mine["loss"] == pytest.approx(loss, rel=LOOSE, abs=1e-12)
    # TRL's rewards are β·ρ for every loss type; sft's own rewards are its mean token log-probs (β-free)
    for key in METRICS if loss_type != "sft" else METRICS[4:]:
        assert mine[key] == pytest.approx(metrics[key], rel=1e-9, abs=1e-12), key


@pytest.mark.parametrize("loss_type", [t for t in DPO_TYPES if t != "sft"])
def test_ld_alpha_matches_trl(trainers, loss_type):
    name = TRL_NAME[loss_type]
    loss, metrics = trl_dpo(trainers.dpo, ROWS, [loss_type], beta=0.3, eps=0.2, ld_alpha=0.4)
    same(ours(name, ROWS, entry(name, 0.3, 0.2), ld_alpha=0.4), loss, metrics)


F_TYPES = ["sigmoid", "hinge", "ipo", "exo_pair", "robust", "discopop", "sigmoid_norm"]


@pytest.mark.parametrize("loss_type", F_TYPES)
@pytest.mark.parametrize("f,coef", [("forward_kl", 0.5), ("js_divergence", 0.5), ("alpha_divergence", 0.5),
                                    ("alpha_divergence", 1.0)])
def test_f_divergences_match_trl(trainers, loss_type, f, coef):
    name = TRL_NAME[loss_type]
    dtype = torch.float32 if f == "alpha_divergence" else DTYPE  # TRL's clamp table has no float64
    loss, metrics = trl_dpo(trainers.dpo, ROWS, [loss_type], beta=0.3, eps=0.2, f=f, coef=coef, dtype=dtype)
    mine = ours(name, ROWS, entry(name, 0.3, 0.2), dtype=dtype, f_divergence_type=f, f_alpha_divergence_coef=coef)
    same(mine, loss, metrics, rel=1e-9 if dtype == DTYPE else 1e-5)


@pytest.mark.parametrize("loss_type", [t for t in DPO_TYPES if t not in ("aot", "aot_unpaired", "sft")])
def test_use_weighting_matches_trl(trainers, loss_type):
    name, rows = TRL_NAME[loss_type], ROWS
    loss, metrics = trl_dpo(trainers.dpo, rows, [loss_type], beta=0.3, eps=0.2, wpo=True)
    mine = ours(name, rows, entry(name, 0.3, 0.2), use_weighting=True)
    assert mine["loss"] == pytest.approx(loss, rel=LOOSE, abs=1e-12)
    assert mine["logps/chosen"] == pytest.approx(metrics["logps/chosen"], rel=1e-9)


MIXTURES = [  # (TRL loss types, weights, modifiers)
    (["sigmoid", "bco_pair", "sft"], [0.8, 0.2, 1.0], {}),                     # MPO, as TRL's docs give it
    (["sigmoid", "bco_pair", "sft"], [0.8, 0.2, 1.0], {"ld_alpha": 0.4}),
    (["sigmoid", "bco_pair"], [0.8, 0.2], {"ld_alpha": 0.4, "use_weighting": True}),
    (["ipo", "nca_pair", "apo_down"], [0.5, 2.0, 1.0], {"use_weighting": True}),
    (["hinge", "discopop", "robust", "sigmoid_norm"], [1.0, 0.3, 0.7, 2.0], {"f_divergence_type": "js_divergence"}),
    (["aot", "apo_zero", "sppo_hard", "exo_pair"], [0.25, 1.0, 0.1, 3.0], {"ld_alpha": 0.0}),
]


@pytest.mark.parametrize("types,weights,mods", MIXTURES)
def test_loss_weights_mixtures_match_trl(trainers, types, weights, mods):
    name = " + ".join(f"{w}*{TRL_NAME[t]}" for t, w in zip(types, weights))
    trl_mods = {"ld_alpha": mods.get("ld_alpha"), "wpo": mods.get("use_weighting", False),
                "f": mods.get("f_divergence_type", "reverse_kl")}
    loss, metrics = trl_dpo(trainers.dpo, EQUAL, types, weights, beta=0.3, eps=0.2, **trl_mods)
    entries = {k: v for t in types for k, v in entry(TRL_NAME[t], 0.3, 0.2).items()}
    mine = ours(name, EQUAL, entries, **mods)
    same(mine, loss, metrics)
    terms = [(w, O.get(TRL_NAME[t])) for t, w in zip(types, weights)]
    assert {f"loss/{t}" for t in types} <= set(mine)  # each term's own loss, under TRL's loss_type name
    assert sum(w * mine[f"loss/{o.trl_loss_type}"] for w, o in terms) == pytest.approx(mine["loss"], rel=1e-12)


def test_use_weighting_on_sft_by_hand(trainers):
    """TRL 1.16 crashes on sft with use_weighting (an in-place multiply of its expanded batch loss), so MPO with
    WPO can't run there; here the sft term takes the pair's weight like any other term."""
    with pytest.raises(RuntimeError, match="more than one element"):
        trl_dpo(trainers.dpo, EQUAL, ["sft"], wpo=True)
    c, r, nc, nr, *_ = (torch.tensor(col, dtype=DTYPE) for col in zip(*EQUAL))
    sq = torch.tensor(SUMSQ, dtype=DTYPE)
    w = torch.exp(c / nc - sq[:, 0]) * torch.exp(r / nr - sq[:, 1])
    assert ours("sft", EQUAL, use_weighting=True)["loss"] == pytest.approx(float((w * -c / nc).mean()), rel=1e-12)
    mpo = ours("0.8*dpo+0.2*bco_pair+1*sft", EQUAL, use_weighting=True)
    assert mpo["loss/sft"] == pytest.approx(float((w * -c / nc).mean()), rel=1e-12)


def test_trl_refusals_are_ours_too():
    for name, mods, field in [("0.8*dpo+0.2*bco_pair", {"f_divergence_type": "js_divergence"}, "f_divergence_type"),
                              ("aot", {"use_weighting": True}, "use_weighting"),
                              ("simpo", {"ld_alpha": 0.5}, "ld_alpha"), ("kto", {"use_weighting": True}, "use_weighting")]:
        with pytest.raises(InputError) as e:
            O.run_params(name, {}, modifiers=mods)
        assert e.value.field == field and "\n" not in str(e.value)
    for bad, field in [({"ld_alpha": 1.5}, "ld_alpha"), ({"f_divergence_type": "kl"}, "f_divergence_type"),
                       ({"f_divergence_type": "alpha_divergence", "f_alpha_divergence_coef": math.inf},
                        "f_alpha_divergence_coef")]:
        with pytest.raises(InputError) as e:
            O.run_params("dpo", {}, modifiers=bad)
        assert e.value.field == field


# --- CPOTrainer: CPO-SimPO and AlphaPO; KTOTrainer: apo_zero_unpaired ------------------------------------------

@pytest.mark.parametrize("name,alpha,cpo_alpha", [("cpo_simpo", 0.0, 0.7), ("alphapo", 0.3, 0.0), ("alphapo", -0.5, 0.0)])
def test_cpo_simpo_and_alphapo_match_trl(trainers, name, alpha, cpo_alpha):
    c, r, nc, nr, *_ = (torch.tensor(col, dtype=DTYPE) for col in zip(*EQUAL))
    mc, mr = c / nc, r / nr
    nll = -(c.sum() / nc.sum())  # TRL's cross-entropy: the mean over every chosen token of the batch
    fake = SimpleNamespace(alpha=alpha, loss_type="simpo", simpo_gamma=1.5, beta=2.5, label_smoothing=0.0,
                           cpo_alpha=cpo_alpha, aux_loss_enabled=False, accelerator=SimpleNamespace(
                               device="cpu", gather_for_metrics=lambda t: t),
                           concatenated_forward=lambda m, b: (mc, mr, mc[:, None], mr[:, None], nll))
    fake.cpo_loss = lambda a, b: trainers.cpo.cpo_loss(fake, a, b)
    loss, metrics = trainers.cpo.get_batch_loss_metrics(fake, None, {}, train_eval="train")
    given = {"beta": 2.5, "gamma": 1.5, **({"alpha": alpha} if name == "alphapo" else {"cpo_alpha": cpo_alpha})}
    lp = O.SeqLogps(c, r, nc, nr)
    out = O.compute(name, lp, O.run_params(name, {name: given}))
    mine = summarize(torch.stack([c, r], 1), out, out.loss)
    assert mine["loss"] == pytest.approx(loss.item(), rel=1e-9)
    for key in METRICS[:4]:
        assert mine[key] == pytest.approx(metrics[key], rel=1e-9), key
    # TRL's CPOTrainer logs mean token log-probs as logps/* (it averages for simpo); preftune logs the sums
    assert mine["logps/chosen"] / 4 == pytest.approx(metrics["logps/chosen"], rel=1e-9)
    if cpo_alpha:
        assert mine["nll_loss"] == pytest.approx(metrics["nll_loss"], rel=1e-9)


KTO_ROWS = [(-10.0, -12.0, -11.0, -11.5, True), (-4.0, -3.0, -4.5, -3.5, False), (-20.0, -18.0, -19.0, -19.5, True),
            (-7.0, -9.0, -6.0, -9.5, False), (-2.0, -5.0, -2.5, -4.0, False)]


def test_apo_zero_unpaired_matches_trl(trainers):
    n, (beta, wd, wu) = len(KTO_ROWS), (0.3, 1.2, 0.8)
    main = torch.tensor([[c] for c, *_ in KTO_ROWS], dtype=DTYPE)
    zeros = torch.zeros(n, 1, dtype=DTYPE)
    model = lambda **kw: SimpleNamespace(log_probs=main, entropy=zeros, mean_logits=zeros)  # noqa: E731
    trainer = SimpleNamespace(
        model=SimpleNamespace(training=False), calculate_KL=False, precompute_ref_logps=True,
        loss_type="apo_zero_unpaired", beta=beta, desirable_weight=wd, undesirable_weight=wu, aux_loss_enabled=False,
        _tp_size=1, _total_train_tokens=0, _metrics=defaultdict(lambda: defaultdict(list)),
        accelerator=SimpleNamespace(device="cpu", gather_for_metrics=lambda t: t, gather=lambda t: t))
    trainer._compute_kl_logps = lambda m, b: trainers.kto._compute_kl_logps(trainer, m, b)
    inputs = {"input_ids": torch.zeros(n, 2, dtype=torch.long), "attention_mask": torch.ones(n, 2, dtype=torch.long),
              "completion_mask": torch.tensor([[0, 1]] * n), "label": torch.tensor([row[4] for row in KTO_ROWS]),
              "ref_logps": torch.tensor([row[2] for row in KTO_ROWS], dtype=DTYPE)}
    loss = trainers.kto._compute_loss(trainer, model, inputs, return_outputs=False).item()
    metrics = {k: v[-1] for k, v in trainer._metrics["eval"].items()}
    c, k, rc, rk, lab = (torch.tensor(col, dtype=DTYPE) for col in zip(*KTO_ROWS))
    lp = O.SeqLogps(c, k, torch.ones_like(c), torch.ones_like(c), rc, rk, label=lab.bool())
    out = O.compute("apo_zero_unpaired", lp, O.run_params("apo_zero_unpaired", {"apo_zero_unpaired": {
        "beta": beta, "desirable_weight": wd, "undesirable_weight": wu}}))
    mine = summarize(torch.stack([c, k], 1), out, out.loss)
    assert mine["loss"] == pytest.approx(loss, rel=1e-9)
    for key in ("kl", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected"):
        assert mine[key] == pytest.approx(metrics[key], rel=1e-9, abs=1e-12), key


# --- not in TRL: by hand ---------------------------------------------------------------------------------------

def test_dpo_norm_by_hand():
    """open-instruct's dpo_norm: DPO on mean token log-probs, with cDPO's label smoothing, per-token rewards."""
    beta, eps = 5.0, 0.1
    c, r, nc, nr, rc, rr = (torch.tensor(col, dtype=DTYPE) for col in zip(*ROWS))
    out = O.compute("dpo_norm", O.SeqLogps(c, r, nc, nr, rc, rr),
                    O.run_params("dpo_norm", {"dpo_norm": {"label_smoothing": eps}}))
    for i, (ci, ri, nci, nri, rci, rri) in enumerate(ROWS):
        z = beta * ((ci - rci) / nci - (ri - rri) / nri)
        expected = (1 - eps) * math.log1p(math.exp(-z)) + eps * math.log1p(math.exp(z))
        assert out.loss[i].item() == pytest.approx(expected, rel=1e-12)
        assert out.chosen_rewards[i].item() == pytest.approx(beta * (ci - rci) / nci, rel=1e-12)
    assert O.run_params("dpo_norm", {}) == {"beta": 5.0, "label_smoothing": 0.0, "nll_weight": 0.0}
    sig = ours("sigmoid_norm", ROWS, {"sigmoid_norm": {"beta": 5.0}})  # the same loss as TRL's sigmoid_norm at ε = 0
    assert ours("dpo_norm", ROWS)["loss"] == pytest.approx(sig["loss"], rel=1e-12)
