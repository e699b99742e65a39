"""End-to-end tiny CPU runs of the engine: learning, resume, reference cache, bad input, divergence, outputs."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import preftune.training.loop as T
import preftune.training.prepare as P
import preftune.training.step as S
from preftune.commands.cli import main
from preftune.core import config
from preftune.core.config import Config
from preftune.core.errors import TrainingDiverged
from preftune.core.files import read_jsonl
from preftune.core.layout import RunDir
from preftune.data.rows import load_examples
from preftune.data.tokenize import tokenize_examples
from preftune.modeling import precision
from preftune.modeling.logprobs import make_batch, score_pairs
from preftune.modeling.model import add_lora, load_model, load_tokenizer
from preftune.training.checkpoints import latest_checkpoint
from preftune.training.summary import CompileClock

TIMING_KEYS = {"pairs_per_second", "tokens_per_second"}


def cfg_for(world, tmp_path, name, **kw) -> Config:
    base = dict(model=str(world.model_dir), data=str(world.train_path), eval_data=str(world.eval_path),
                lr=2e-3, batch_size=8, max_steps=16, eval_every=8, save_every=0, warmup_ratio=0.0,
                lora_rank=8, output=str(tmp_path / name), cache_dir=str(tmp_path / "cache"), quiet=True,
                max_train_pairs=128)
    base.update(kw)
    return config.build(base)  # takes the shorthands (beta=...) for the objective's entry, as the CLI does


@pytest.mark.parametrize("objective", ["dpo", "simpo", "orpo", "ipo", "robust", "cdpo", "hinge"])
def test_every_objective_learns_on_heldout(tiny_world, tmp_path, objective):
    beta = {"simpo": 2.0, "ipo": 0.5}.get(objective)
    lr = 5e-3 if objective == "orpo" else 2e-3  # ORPO's NLL term dominates early: it moves the margin slowest
    summary = T.train(cfg_for(tiny_world, tmp_path, objective, objective=objective, beta=beta, lr=lr, max_steps=20,
                              eval_every=10))
    step0, final = summary.step0_eval, summary.final_eval
    # The length-normalized yardstick is objective-free, so "rises" means the policy learned the preference.
    assert final["eval_lennorm/accuracy"] > step0["eval_lennorm/accuracy"] + 0.05, (step0, final)
    assert final["eval_accuracy"] > 0.6
    assert summary.status == "finished"


def test_outputs_and_metric_names(tiny_world, tmp_path):
    cfg = cfg_for(tiny_world, tmp_path, "run", max_steps=4, eval_every=2)
    T.train(cfg)
    out = tmp_path / "run"
    rows = read_jsonl(out / "metrics.jsonl")
    train_rows = [r for r in rows if "loss" in r]
    eval_rows = [r for r in rows if "eval_loss" in r]
    for key in ("loss", "grad_norm", "learning_rate", "rewards/chosen", "rewards/rejected", "rewards/margins",
                "rewards/accuracies", "logps/chosen", "logps/rejected"):
        assert key in train_rows[0]
        if key not in ("grad_norm", "learning_rate"):
            assert "eval_" + key in eval_rows[0]
    for key in ("eval_accuracy", "eval_refrel/accuracy", "eval_lennorm/accuracy", "eval_length/chosen"):
        assert key in eval_rows[0]
    assert [r["step"] for r in eval_rows] == [0, 2, 4]
    assert eval_rows[0]["eval_refrel/margin"] == 0.0 and eval_rows[0]["eval_accuracy"] == 0.5  # exact tie at init
    pairs = read_jsonl(out / "eval_pairs.jsonl")
    assert len(pairs) == eval_rows[-1]["eval_pairs"] == 64
    assert sum(p["correct"] for p in pairs) / len(pairs) == pytest.approx(eval_rows[-1]["eval_rewards/accuracies"])
    saved = Config(**{**json.loads(json.dumps(cfg.to_dict()))})
    assert saved == cfg
    # The adapter loads with peft and reproduces the final held-out log-probs.
    base = AutoModelForCausalLM.from_pretrained(tiny_world.model_dir)
    model = PeftModel.from_pretrained(base, out / "adapter")
    tok = load_tokenizer(cfg)
    held, _ = tokenize_examples(load_examples(str(tiny_world.eval_path)), tok, max_length=cfg.max_length,
                                max_prompt_length=cfg.prompt_length())
    logps, _, _ = score_pairs(model, held, pad_id=tok.pad_token_id)
    assert logps[0, 0].item() == pytest.approx(pairs[0]["chosen_logps"], abs=1e-4)
    assert not (out / "checkpoints").exists()  # nothing left to resume once finished


def test_lora_at_init_equals_base(tiny_world, tmp_path):
    cfg = cfg_for(tiny_world, tmp_path, "x", lora_rank=16, lora_dropout=0.1)
    tok = load_tokenizer(cfg)
    pairs, _ = tokenize_examples(load_examples(str(tiny_world.eval_path))[:8], tok, max_length=128,
                                 max_prompt_length=64)
    base = load_model(cfg)
    before, _, _ = score_pairs(base, pairs, pad_id=tok.pad_token_id)
    wrapped = add_lora(base, cfg)
    after, _, _ = score_pairs(wrapped, pairs, pad_id=tok.pad_token_id)
    assert torch.equal(before, after)


def test_resume_equals_uninterrupted(tiny_world, tmp_path, monkeypatch):
    kw = dict(max_steps=8, save_every=3, eval_every=4, lora_dropout=0.1)  # dropout: the RNG must be restored too
    T.train(cfg_for(tiny_world, tmp_path, "full", **kw))

    calls = {"n": 0}
    real = S.batch_logps

    def crash_at_step_7(*a, **k):  # one training forward per step (batch_size pairs, no accumulation)
        calls["n"] += 1
        if calls["n"] == 7:
            raise KeyboardInterrupt  # killed mid-run, after the step-6 checkpoint
        return real(*a, **k)

    monkeypatch.setattr(S, "batch_logps", crash_at_step_7)
    cfg = cfg_for(tiny_world, tmp_path, "crashed", **kw)
    with pytest.raises(KeyboardInterrupt):
        T.train(cfg)
    monkeypatch.setattr(S, "batch_logps", real)
    assert latest_checkpoint(RunDir(tmp_path / "crashed")).name == "step-0000006"
    T.train(replace(cfg, resume=True))

    a = load_file(tmp_path / "full" / "adapter" / "adapter_model.safetensors")
    b = load_file(tmp_path / "crashed" / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ra, rb = read_jsonl(tmp_path / "full" / "metrics.jsonl"), read_jsonl(tmp_path / "crashed" / "metrics.jsonl")
    assert len(ra) == len(rb)
    for x, y in zip(ra, rb):
        assert {k: v for k, v in x.items() if k not in TIMING_KEYS} == {k: v for k, v in y.items() if k not in TIMING_KEYS}


def test_reference_cache_hit_and_miss(tiny_world, tmp_path):
    s1 = T.train(cfg_for(tiny_world, tmp_path, "a", max_steps=2, eval_every=0))
    s2 = T.train(cfg_for(tiny_world, tmp_path, "b", max_steps=2, eval_every=0))
    s3 = T.train(cfg_for(tiny_world, tmp_path, "c", max_steps=2, eval_every=0, max_length=12,
                           max_prompt_length=6))  # truncation differs
    assert s1.timing["reference_cached"] == {"train": False, "eval": False}
    assert s2.timing["reference_cached"] == {"train": True, "eval": True}
    assert s3.timing["reference_cached"] == {"train": False, "eval": False}
    from preftune.core.cpus import allowed_cpus

    # threads from the CPUs this process may use; CPU-seconds recorded
    assert s1.timing["threads"] == allowed_cpus() and 0 < s1.timing["cpu_s"] and s1.timing["omp_wait_policy"]
    r1, r2 = read_jsonl(tmp_path / "a" / "eval_pairs.jsonl"), read_jsonl(tmp_path / "b" / "eval_pairs.jsonl")
    assert [r["ref_chosen_logps"] for r in r1] == [r["ref_chosen_logps"] for r in r2]


def test_reference_free_objective_skips_train_reference(tiny_world, tmp_path):
    s = T.train(cfg_for(tiny_world, tmp_path, "s", objective="simpo", max_steps=2, eval_every=0))
    held_tokens = sum(r["chosen_tokens"] + r["rejected_tokens"] for r in read_jsonl(tmp_path / "s" / "eval_pairs.jsonl"))
    assert 0 < s.timing["reference_tokens"] < 2 * held_tokens + 64 * 40  # held-out only, not the train set


def test_same_data_order_for_every_objective(tiny_world, tmp_path, monkeypatch):
    seen: dict[str, list] = {}
    real = S.make_batch

    def record(prompts, *a, **k):
        seen.setdefault(current, []).append([tuple(p) for p in prompts])
        return real(prompts, *a, **k)

    monkeypatch.setattr(S, "make_batch", record)
    for current in ("dpo", "simpo", "orpo"):
        T.train(cfg_for(tiny_world, tmp_path, current, objective=current, max_steps=5, eval_every=0))
    assert seen["dpo"] == seen["simpo"] == seen["orpo"] and len(seen["dpo"]) == 5


def test_bad_input_exit_2_and_nothing_written(tiny_world, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": "a", "chosen": ""}\n')
    out = tmp_path / "out"
    code = main(["train", "--model", str(tiny_world.model_dir), "--data", str(bad), "--output", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "bad.jsonl:2" in err[0] and "chosen" in err[0]
    assert not out.exists()
    code = main(["train", "--model", str(tmp_path / "no-model"), "--data", str(tiny_world.train_path),
                 "--output", str(out)])
    assert code == 2 and not out.exists()


def test_nan_stops_and_keeps_last_checkpoint(tiny_world, tmp_path, monkeypatch):
    real = S.batch_logps
    calls = {"n": 0}

    def nan_at_step_5(*a, **k):
        calls["n"] += 1
        logps, counts = real(*a, **k)
        return (logps * float("nan"), counts) if calls["n"] == 5 else (logps, counts)

    monkeypatch.setattr(S, "batch_logps", nan_at_step_5)
    with pytest.raises(TrainingDiverged, match="step 5"):
        T.train(cfg_for(tiny_world, tmp_path, "nan", max_steps=8, save_every=2, eval_every=0))
    out = tmp_path / "nan"
    assert latest_checkpoint(RunDir(out)).name == "step-0000004"
    assert json.loads((out / "summary.json").read_text())["status"] == "diverged"


def test_full_finetune_saves_model_and_eval_cli(tiny_world, tmp_path, capsys):
    T.train(cfg_for(tiny_world, tmp_path, "sft", objective="sft", lora_rank=0, max_steps=3, eval_every=0))
    model_dir = tmp_path / "sft" / "model"
    assert (model_dir / "model.safetensors").exists()
    AutoModelForCausalLM.from_pretrained(model_dir)
    # `preftune eval` on a trained adapter matches the run's own final eval.
    T.train(cfg_for(tiny_world, tmp_path, "lora", max_steps=3, eval_every=0))
    code = main(["eval", "--model", str(tiny_world.model_dir), "--adapter", str(tmp_path / "lora" / "adapter"),
                 "--eval-data", str(tiny_world.eval_path), "--output", str(tmp_path / "ev"), "--cache-dir",
                 str(tmp_path / "cache")])
    assert code == 0
    final = json.loads((tmp_path / "lora" / "summary.json").read_text())["final_eval"]
    got = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert got["eval_accuracy"] == pytest.approx(final["eval_accuracy"])
    assert got["eval_refrel/margin"] == pytest.approx(final["eval_refrel/margin"], abs=1e-4)


def test_short_run_scores_only_the_pairs_it_visits(tiny_world, tmp_path):
    s = T.train(cfg_for(tiny_world, tmp_path, "short", max_steps=2, eval_every=0))  # 2 steps x 8 of 128 pairs
    held = read_jsonl(tmp_path / "short" / "eval_pairs.jsonl")
    held_tokens = sum(r["chosen_tokens"] + r["rejected_tokens"] for r in held)
    train_ref_tokens = s.timing["reference_tokens"] - held_tokens - 64 * 12  # minus held-out prompts (<12 each)
    assert 0 < train_ref_tokens < 40 * 16  # 16 visited pairs of at most ~40 tokens, not 128


def test_bf16_mode_trains_and_keeps_its_own_reference(tiny_world, tmp_path, monkeypatch):
    monkeypatch.setattr(precision, "native_bf16", lambda device: True)  # bf16 asked for on any CPU: just slower
    f32 = T.train(cfg_for(tiny_world, tmp_path, "f32", max_steps=12, eval_every=0))
    b16 = T.train(cfg_for(tiny_world, tmp_path, "b16", max_steps=12, eval_every=0, dtype="bfloat16"))
    assert b16.timing["reference_cached"] == {"train": False, "eval": False}  # bf16 never reuses fp32 numbers
    assert b16.final_eval["eval_lennorm/accuracy"] > b16.step0_eval["eval_lennorm/accuracy"] + 0.05
    # Same data, same steps: bf16 lands within a few held-out pairs of fp32 (64 pairs).
    assert abs(b16.final_eval["eval_accuracy"] - f32.final_eval["eval_accuracy"]) * 64 <= 6


def test_a_newcomers_first_command_with_only_max_length(tiny_world, tmp_path, capsys):
    """`preftune train --model M --data D --eval-data E --max-length 256 --output runs/x`: every other value a
    default (max_prompt_length follows max_length), and it trains to the end."""
    out = tmp_path / "runs" / "x"
    assert main(["train", "--model", str(tiny_world.model_dir), "--data", str(tiny_world.train_path), "--eval-data",
                 str(tiny_world.eval_path), "--max-length", "256", "--output", str(out), "--cache-dir",
                 str(tmp_path / "cache"), "--quiet"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    saved = config.from_file(out / "config.yaml")
    assert summary["status"] == "finished" and summary["steps"] == 32  # one epoch of 256 pairs, 8 per step
    assert (saved.max_length, saved.max_prompt_length, saved.prompt_length()) == (256, None, 128)


def test_reference_sized_by_tokens_equals_row_batches(tiny_world, tmp_path):
    """Training-set reference batches sized by a token budget give the row-count layout's sums (fp32, 1e-5)."""
    from preftune.modeling.logprobs import token_batches

    cfg = cfg_for(tiny_world, tmp_path, "x", reference_tokens=600)
    tok = load_tokenizer(cfg)
    pairs, _ = tokenize_examples(load_examples(str(tiny_world.train_path))[:48], tok, max_length=128,
                                 max_prompt_length=64)
    model = load_model(cfg)
    rows, _, _ = score_pairs(model, pairs, pad_id=tok.pad_token_id, batch_size=32)
    for share in (True, False):
        by_tokens, _, padded = score_pairs(model, pairs, pad_id=tok.pad_token_id, tokens=600, share_prompt=share)
        assert torch.allclose(by_tokens, rows, rtol=0, atol=1e-5)
        order = sorted(range(len(pairs)), key=lambda i: -(len(pairs[i].prompt_ids) + len(pairs[i].chosen_ids)
                                                          + len(pairs[i].rejected_ids)))
        batches = token_batches(pairs, order, 600, share)
        assert sorted(i for b in batches for i in b) == list(range(len(pairs))) and len(batches) > 2
        for b in batches:  # every batch within budget (or a single pair), as make_batch pads it
            sub = [pairs[i] for i in b]
            shape = make_batch([p.prompt_ids for p in sub], [p.chosen_ids for p in sub],
                               [p.rejected_ids for p in sub], tok.pad_token_id, share).input_ids.shape
            assert len(b) == 1 or shape[0] * shape[1] <= 600
        assert padded == sum(
            make_batch(*[[getattr(pairs[i], f) for i in b] for f in ("prompt_ids", "chosen_ids", "rejected_ids")],
                       tok.pad_token_id, share).padded_tokens for b in batches)
    data = P.prepare_data(cfg, tok)
    req = P.reference_requests(cfg, data, P.Schedule(cfg, data.train))
    assert req["eval"][1:3] == (cfg.eval_batch_size, None) and req["train"].tokens == 600  # held-out layout untouched


def test_compiled_run_equals_eager_and_reports_its_compile_time(tiny_world, tmp_path):
    """--compile end to end: the same held-out margins as eager (1e-4), one graph for the run's row lengths,
    the compile time apart from the steady step in summary.json."""
    kw = dict(max_steps=4, eval_every=0, batch_size=4, group_by_length=False)  # shuffled: several row lengths
    eager = T.train(cfg_for(tiny_world, tmp_path, "eager", **kw))
    comp = T.train(cfg_for(tiny_world, tmp_path, "compiled", compile=True, **kw))
    rows = [read_jsonl(tmp_path / name / "eval_pairs.jsonl") for name in ("eager", "compiled")]
    assert [r["id"] for r in rows[0]] == [r["id"] for r in rows[1]]
    assert max(abs(a["margin"] - b["margin"]) for a, b in zip(*rows)) < 1e-4
    assert comp.final_eval["eval_loss"] == pytest.approx(eager.final_eval["eval_loss"], abs=1e-5)
    cfg = cfg_for(tiny_world, tmp_path, "x", **kw)
    data = P.prepare_data(cfg, load_tokenizer(cfg))
    schedule = P.Schedule(cfg, data.train)
    row = [len(p.prompt_ids) + len(p.chosen_ids) + len(p.rejected_ids) for p in data.train]
    assert len({max(row[i] for i in schedule.batch(step)) for step in range(4)}) > 1  # the steps' row lengths
    c = comp.timing["compile"]
    assert c["graphs"] == 1 and c["compile_s"] > 0 and 0 < c["steady_step_s"] < c["compile_s"]
    assert "compile" not in eager.timing


def test_compile_clock_by_hand():
    """Steps that compiled count beyond the steady mean: (9.1 - 0.9) + (2.0 - 0.9) = 9.3 s over 3 graphs."""
    clock = CompileClock()
    for dt, graphs in ((9.1, 2), (0.8, 0), (2.0, 1), (1.0, 0)):
        clock.add(dt, graphs)
    c = clock.summary()
    assert c["graphs"] == 3 and c["steady_step_s"] == pytest.approx(0.9) and c["compile_s"] == pytest.approx(9.3)
    assert CompileClock().summary() == {"graphs": 0, "compile_s": 0.0, "steady_step_s": None}
