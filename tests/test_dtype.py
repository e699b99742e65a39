"""bf16 only where the hardware has it: ``--dtype bfloat16`` refused at once without native bf16, ``auto``.

    .venv/bin/pytest -q tests/test_dtype.py
"""

from __future__ import annotations

import json
import time

import pytest
import torch

import preftune
from preftune.commands.cli import main
from preftune.core.config import Config
from preftune.core.errors import InputError
from preftune.modeling import model as model_mod
from preftune.modeling import precision
from preftune.modeling.logprobs import score_pairs
from preftune.modeling.model import load_adapter, load_model
from preftune.modeling.precision import Arithmetic, fp32_weights, native_bf16, resolve_dtype
from preftune.modeling.reference import cache_key
from preftune.training.loop import prepare_data

REFUSAL = ("preftune: error: field 'dtype': bfloat16 would be emulated, hundreds of times slower than float32: "
           "this CPU has no native bf16 (AMX / AVX-512 BF16); use --dtype float32 (or --dtype auto)\n")


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models: one intra-op thread is as fast, and immune to a busy machine's descheduled workers."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_bf16_refused_at_once_without_native_bf16(tiny_world, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(precision, "native_bf16", lambda device: False)

    def no_loading(*a, **k):
        raise AssertionError("a model was loaded before the dtype was checked")

    monkeypatch.setattr(model_mod.AutoModelForCausalLM, "from_pretrained", no_loading)
    monkeypatch.setattr(model_mod.AutoTokenizer, "from_pretrained", no_loading)
    out = tmp_path / "run"
    t = time.perf_counter()
    rc = main(["train", "--model", str(tiny_world.model_dir), "--data", str(tiny_world.train_path),
               "--eval-data", str(tiny_world.eval_path), "--dtype", "bfloat16", "--device", "cpu",
               "--output", str(out)])
    assert time.perf_counter() - t < 10
    assert rc == 2
    assert capsys.readouterr().err == REFUSAL  # one line, no traceback
    assert not out.exists()  # nothing half-written


def test_auto_dtype_follows_the_probe(monkeypatch):
    cfg = Config(model="m", data="d", dtype="auto", device="cpu")
    monkeypatch.setattr(precision, "native_bf16", lambda device: True)
    assert resolve_dtype(cfg) == "bfloat16"
    assert resolve_dtype(Config(model="m", data="d", dtype="bfloat16", device="cpu")) == "bfloat16"
    assert resolve_dtype(Config(model="m", data="d", dtype="float32", device="cpu")) == "float32"
    monkeypatch.setattr(precision, "native_bf16", lambda device: False)
    assert resolve_dtype(cfg) == "float32"
    with pytest.raises(InputError) as e:
        resolve_dtype(Config(model="m", data="d", dtype="bfloat16", device="cuda:1"))
    assert e.value.field == "dtype" and "cuda:1 has no native bf16" in str(e.value)


def test_probe_reads_the_hardware(monkeypatch):
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)
    assert native_bf16("cpu") is False
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True)
    assert native_bf16("cpu") is True
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    assert native_bf16("cuda:0") is False
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    assert native_bf16("cuda") is True
    assert native_bf16("mps") is False


def test_auto_resolves_to_bf16_and_the_summary_says_so(tiny_world, tmp_path, monkeypatch):
    monkeypatch.setattr(precision, "native_bf16", lambda device: True)
    summary = preftune.train(Config(model=str(tiny_world.model_dir), data=str(tiny_world.train_path),
                                    eval_data=str(tiny_world.eval_path), dtype="auto", device="cpu",
                                    max_train_pairs=8, batch_size=4, max_steps=1, eval_every=0, save_every=0,
                                    quiet=True, output=str(tmp_path / "run"), cache_dir=str(tmp_path / "cache")))
    # bf16 weights on CPU: SDPA runs in fp32 inside (preftune's registered wrapper)
    ran = {k: v for k, v in summary.model.items() if not k.startswith("base_")}  # base_*: where the base came from
    assert ran == {"attn_implementation": "preftune_sdpa_fp32", "dtype": "bfloat16",
                   "eval_arithmetic": "bfloat16", "share_prompt": True, "share_prompt_blocker": None}
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["model"]["dtype"] == "bfloat16"
    assert (tmp_path / "run" / "config.yaml").read_text().count("dtype: auto") == 1  # reproducible as asked


def test_fp32_weights_is_exact_both_ways_and_in_place():
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Linear(4, 10)).to(torch.bfloat16)
    m[1].weight = m[0].weight  # tied (both (10, 4)): one tensor reached twice
    m.register_buffer("inv_freq", torch.rand(3, dtype=torch.bfloat16))
    m.register_buffer("kept", torch.rand(3))  # fp32 stays as it is
    before = {n: t.clone() for n, t in [*m.named_parameters(), *m.named_buffers()]}
    ids = {n: id(t) for n, t in [*m.named_parameters(), *m.named_buffers()]}
    with fp32_weights(m):
        assert {t.dtype for t in [*m.parameters(), *m.buffers()]} == {torch.float32}
        assert torch.equal(m[0].weight, before["0.weight"].float())
        assert m[1].weight is m[0].weight
    after = dict([*m.named_parameters(), *m.named_buffers()])
    assert {n: id(t) for n, t in after.items()} == ids  # the optimizer's and peft's tensors, not copies
    for n, t in after.items():
        assert t.dtype == before[n].dtype and torch.equal(t, before[n])


def test_eval_fp32_scores_a_bf16_run_in_fp32_on_its_bf16_weights(tiny_world, tmp_path, monkeypatch):
    """``--eval-fp32``: a bf16 run's held-out pairs and their reference are fp32 compute on the bf16 weights.

    The truth is that computation done by hand: the bf16-loaded model upcast, the run's adapter, score_pairs.
    bf16 evaluation of the same adapter is far from it; the upcast one agrees to fp32 resolution.
    """
    monkeypatch.setattr(precision, "native_bf16", lambda device: True)
    common = dict(model=str(tiny_world.model_dir), data=str(tiny_world.train_path), eval_data=str(tiny_world.eval_path),
                  dtype="bfloat16", device="cpu", max_train_pairs=32, batch_size=8, lr=5e-3, eval_every=0,
                  save_every=0, quiet=True, cache_dir=str(tmp_path / "cache"))
    run = tmp_path / "run"
    summary = preftune.train(Config(**common, max_steps=4, eval_fp32=True, output=str(run)))
    assert summary.model["dtype"] == "bfloat16" and summary.model["eval_arithmetic"] == "float32"
    step0 = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    assert step0["step"] == 0 and step0["eval_rewards/margins"] == 0.0  # policy == reference, bit for bit
    rows = [json.loads(x) for x in (run / "eval_pairs.jsonl").read_text().splitlines()]

    cfg = Config(**common)
    pairs = prepare_data(cfg, preftune.modeling.model.load_tokenizer(cfg)).eval
    model = load_adapter(load_model(cfg), str(run / "adapter")).eval()
    pad = preftune.modeling.model.load_tokenizer(cfg).pad_token_id
    with fp32_weights(model):
        truth, _, _ = score_pairs(model, pairs, pad_id=pad)                                    # (N, 2)
        with model.disable_adapter():
            truth_ref, _, _ = score_pairs(model, pairs, pad_id=pad)
    got = torch.tensor([[r["chosen_logps"], r["rejected_logps"]] for r in rows])
    got_ref = torch.tensor([[r["ref_chosen_logps"], r["ref_rejected_logps"]] for r in rows])
    assert (got - truth).abs().max() < 1e-4 and (got_ref - truth_ref).abs().max() < 1e-4
    bf16, _, _ = score_pairs(model, pairs, pad_id=pad)  # the same adapter scored in bf16 arithmetic
    assert (bf16 - truth).abs().max() > 1e-3  # measured 5.6e-3 nats, where the upcast one is off by 0.0
    assert {p.dtype for p in model.parameters() if not p.requires_grad} == {torch.bfloat16}

    # `preftune eval --eval-fp32` on the saved adapter: the run's own final numbers
    rc = main(["eval", "--model", common["model"], "--eval-data", common["eval_data"], "--dtype", "bfloat16",
               "--device", "cpu", "--eval-fp32", "--adapter", str(run / "adapter"), "--quiet",
               "--cache-dir", common["cache_dir"], "--output", str(tmp_path / "eval")])
    assert rc == 0
    again = [json.loads(x) for x in (tmp_path / "eval" / "eval_pairs.jsonl").read_text().splitlines()]
    assert max(abs(a["margin"] - b["margin"]) for a, b in zip(again, rows)) < 1e-4


def test_eval_fp32_reference_is_a_cache_of_its_own():
    pairs = [type("P", (), {"prompt_ids": [1, 2], "chosen_ids": [3], "rejected_ids": [4]})()]
    keys = {cache_key("fp", pairs, a) for a in (Arithmetic("bfloat16"), Arithmetic("bfloat16", upcast=True),
                                               Arithmetic("float32"), Arithmetic("float32", autocast_bf16=True))}
    assert len(keys) == 4
