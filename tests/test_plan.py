"""preftune plan: hand-counted parameters, LoRA sizes and activation bytes of a tiny Llama config (no weights on
disk), the reference term, the CPU's heap slack, fixes (those that fit first), --dtype auto decided as train
decides it, the lengths of --data, --json, bad input; and the --gradient-checkpointing it suggests trains the
same adapter.

    .venv/bin/pytest -q tests/test_plan.py
"""

from __future__ import annotations

import json
from dataclasses import asdict

import pytest
import torch
from safetensors.torch import load_file
from transformers import LlamaConfig

import preftune
from preftune.commands import cli
from preftune.commands.plan import parse_size
from preftune.core import config
from preftune.core.config import Config
from preftune.core.errors import InputError
from preftune.modeling import precision
from preftune.training.loop import train
from preftune.training.plan import Fix, Setting, estimate, fixes, read_arch

# hidden 32, intermediate 64, 4 heads of 8, 2 KV heads (k/v project to 16), vocab 100, 2 layers, untied head
TINY = dict(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, tie_word_embeddings=False, max_position_embeddings=64)


@pytest.fixture()
def cfg_dir(tmp_path):
    LlamaConfig(**TINY).save_pretrained(tmp_path / "m")  # config.json only: plan never reads weights
    return tmp_path / "m"


def _plan(cfg_dir, objectives, ranks, *, device="cuda", budget=2**30, reference_cached=False, baseline=None,
          native_bf16=True, **cfg):
    return preftune.plan(Config(model=str(cfg_dir), **cfg), {"objective": objectives, "lora_rank": ranks},
                         device=device, budget=budget, reference_cached=reference_cached, baseline=baseline,
                         native_bf16=native_bf16)


def _plan_json(capsys, *argv):
    assert cli.main(["plan", *argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_parameter_and_lora_counts_by_hand(cfg_dir):
    a = read_arch(str(cfg_dir))
    # embed 100*32 + per layer [q 32*32 + k 32*16 + v 32*16 + o 32*32 + gate/up/down 3 * 32*64 + 2 norms * 32]
    # + final norm 32 + lm_head 100*32
    assert a.params == 3200 + 2 * (1024 + 512 + 512 + 1024 + 3 * 2048 + 64) + 32 + 3200 == 24992
    # r * (d_in + d_out) per linear: q 4*64, k 4*48, v 4*48, o 4*64, gate 4*96, up 4*96, down 4*96; x 2 layers
    assert a.lora_params(4, ["all-linear"]) == 2 * (256 + 192 + 192 + 256 + 384 + 384 + 384) == 4096
    assert a.lora_params(8, ["q_proj", "v_proj"]) == 2 * (8 * 64 + 8 * 48) == 1792
    assert (a.layers, a.hidden, a.intermediate, a.heads, a.kv_heads, a.vocab) == (2, 32, 64, 4, 2, 100)


def test_cell_terms_by_hand(cfg_dir):
    out = _plan(cfg_dir, ["dpo"], [4], batch_size=2, max_length=5, max_prompt_length=3)
    c = out.cells[0]
    assert out.prompt_tokens == 3 and out.completion_tokens == 2 and c.row_tokens == 3 + 2 * 2
    assert c.frozen_weights_bytes == 24992 * 4
    assert c.trainable_params == 4096 and c.trainable_state_bytes == 4096 * 16
    # per token and layer (fp32): saved 6h + 3i = 384 values, the three LoRA input groups 32 + 32 + 64, seven
    # r=4 LoRA outputs in fp32, 4 heads of log-sum-exp -> 384*4 + 128*4 + 7*4*4 + 4*4 = 2176 bytes;
    # 2 rows of 7 tokens = 14 tokens; the float mask 2 * 7 * 7 * 4 = 392; 2 layers; final norm 2 * 32 * 14 * 4
    assert c.activations_bytes == 2 * (2176 * 14 + 392) + 2 * 32 * 14 * 4 == 65296
    # 2 pairs x 2 completions x 2 tokens = 8 LM-head rows, vocab 100, fp32: every logit kept + one chunk's
    # exp and gradient
    assert c.lm_head_bytes == 8 * 100 * 4 + 2 * 8 * 100 * 4
    assert c.baseline_bytes == 0 and c.allocator_slack_bytes == 0  # a GPU: no process RSS terms
    assert c.fits is True and c.fixes == []
    assert c.peak_bytes > c.frozen_weights_bytes + c.trainable_state_bytes + c.activations_bytes


def test_full_finetuning_cell(cfg_dir):
    c = _plan(cfg_dir, ["simpo"], [0]).cells[0]
    # every weight trains: gradient + Adam m and v in fp32 beside the weights (4 x N x 4 bytes in all)
    assert c.trainable_params == 24992 and c.trainable_state_bytes == 3 * 24992 * 4
    assert c.compute.policy_forwards == 3.0  # backward computes weight gradients too


def test_reference_free_objective_has_no_reference_term(cfg_dir):
    by = {c.objective: c for c in _plan(cfg_dir, ["dpo", "simpo", "orpo"], [8]).cells}
    assert by["dpo"].reference.needed is True and by["dpo"].reference.forward_bytes > 0
    assert by["dpo"].compute.forwards_per_pair == 3.0  # forward + input-gradient backward + reference
    for name in ("simpo", "orpo"):
        ref = by[name].reference
        assert (ref.needed, ref.kind, ref.forward_bytes, ref.cache_disk_bytes_per_pair) == (False, "none", 0, 0)
        assert (by[name].compute.forwards_per_pair, by[name].compute.reference_forwards) == (2.0, 0.0)
    cached = _plan(cfg_dir, ["dpo"], [8], reference_cached=True).cells[0]
    assert cached.reference.kind == "cache" and cached.compute.forwards_per_pair == 2.0


def test_eval_fp32_plans_the_upcast_weights_and_fp32_activations(cfg_dir):
    fp32, bf16, up = (_plan(cfg_dir, ["dpo"], [4], dtype=d, eval_fp32=e).cells[0] for d, e in (
        ("float32", False), ("bfloat16", False), ("bfloat16", True)))
    # the held-out pass of an upcast bf16 run: fp32 activations as in an fp32 run, plus 2 more bytes per weight
    assert up.eval_pass_bytes == fp32.eval_pass_bytes + 24992 * 2 > bf16.eval_pass_bytes
    assert _plan(cfg_dir, ["dpo"], [4], eval_fp32=True).cells[0] == fp32  # fp32 weights: nothing to upcast
    # one pair per step with checkpointing: the 16-pair held-out pass is the peak, and scoring it in bf16 the fix
    a = read_arch(str(cfg_dir))
    s = Setting.of(Config(objective="simpo", lora_rank=4, batch_size=1, dtype="bfloat16", gradient_checkpointing=True,
                          eval_fp32=True), device="cuda", prompt_len=32, completion_len=32)
    peak, without = (estimate(a, Setting(**{**s.__dict__, "eval_fp32": e})).peak_bytes for e in (True, False))
    assert without < peak
    assert Fix("held-out scoring in bf16", "--no-eval-fp32", without, True) in fixes(a, s, peak - 1)


def test_fixes_listed_when_it_does_not_fit(cfg_dir):
    lengths = dict(batch_size=64, max_length=64, max_prompt_length=32)
    full = _plan(cfg_dir, ["simpo"], [8], **lengths).cells[0]
    a = read_arch(str(cfg_dir))
    base = Setting.of(Config(objective="simpo", lora_rank=8, batch_size=64), device="cuda", prompt_len=32,
                      completion_len=32)
    assert full.peak_bytes == estimate(a, base).peak_bytes
    ckpt = estimate(a, Setting(**{**base.__dict__, "gradient_checkpointing": True})).peak_bytes
    half = estimate(a, Setting(**{**base.__dict__, "batch_size": 32, "grad_accum": 2})).peak_bytes
    budget = (max(ckpt, half) + full.peak_bytes) // 2  # both fixes fit, the plan as given does not
    cell = _plan(cfg_dir, ["simpo"], [8], budget=budget, **lengths).cells[0]
    assert cell.fits is False
    fixes = {f.fix: f for f in cell.fixes}
    assert fixes["gradient checkpointing"] == Fix("gradient checkpointing", "--gradient-checkpointing", ckpt, True)
    assert fixes["smaller batch + accumulation"].flags == "--batch-size 32 --grad-accum 2"
    assert fixes["smaller batch + accumulation"].peak_bytes == half
    assert fixes["bf16 weights"].flags == "--dtype bfloat16"
    assert all(f.fits == (f.peak_bytes <= budget) for f in cell.fixes)


def test_json_shape(cfg_dir, capsys, tmp_path):
    out = _plan_json(capsys, "--model", str(cfg_dir), "--objective", "dpo,simpo", "--lora-rank", "16,8",
                     "--gpu-memory", "24GiB")
    assert out["budget_bytes"] == 24 * 2**30 and out["device"] == "cuda"
    assert [(c["objective"], c["lora_rank"]) for c in out["cells"]] == [("dpo", 16), ("dpo", 8), ("simpo", 16),
                                                                         ("simpo", 8)]
    for c in out["cells"]:
        assert isinstance(c["peak_bytes"], int) and isinstance(c["fits"], bool)
        for key in ("frozen_weights_bytes", "trainable_state_bytes", "activations_bytes", "lm_head_bytes",
                    "reference", "compute", "fixes"):
            assert key in c
    # the Python API's records are the JSON; the default grid is the matrix's; settings from --config YAML
    (tmp_path / "run.yaml").write_text(f"model: {cfg_dir}\nbatch_size: 4\nmax_length: 64\n")
    api = preftune.plan(Config(model=str(cfg_dir), batch_size=4, max_length=64), device="cuda", budget=24 * 2**30)
    assert _plan_json(capsys, "--config", str(tmp_path / "run.yaml"), "--gpu-memory", "24GiB") == asdict(api)
    assert [(c.objective, c.lora_rank) for c in api.cells] == [("dpo", 16), ("dpo", 8), ("simpo", 16), ("simpo", 8)]


def test_cpu_plan_counts_the_process_baseline(cfg_dir):
    c = _plan(cfg_dir, ["simpo"], [8], device="cpu", budget=4 * 2**30, baseline=(300 * 2**20,) * 2).cells[0]
    assert c.baseline_bytes == c.import_peak_bytes == 300 * 2**20
    terms = (c.baseline_bytes + c.frozen_weights_bytes + c.trainable_state_bytes + c.activations_bytes
             + c.lm_head_bytes + c.allocator_slack_bytes + c.temporaries_bytes)
    assert c.peak_bytes == max(terms, c.baseline_bytes + c.frozen_weights_bytes + c.trainable_state_bytes
                               + c.eval_pass_bytes)


def test_cpu_heap_slack_by_hand(cfg_dir):
    c = _plan(cfg_dir, ["simpo"], [4], device="cpu", budget=4 * 2**30, baseline=(300 * 2**20,) * 2, batch_size=2,
              max_length=5, max_prompt_length=3).cells[0]
    # hidden-sized (32) temporaries per token and layer: 4 sums + 4 RMSNorm + 7 RoPE + 3 per wrapped linear whose
    # output is hidden-sized (q, o, down; k and v project to 16 under GQA) = 24; 2 layers, 14 tokens, fp32
    assert c.allocator_slack_bytes == 2 * 24 * 32 * 14 * 4
    # the largest single temporary: a gate or up LoRA output, 64 per token
    assert c.temporaries_bytes == 64 * 14 * 4


def _requested_vs_trained(monkeypatch, native, plan_cpu_dtype):
    """(requested, what plan plans for the CPU, what train would use) for each --dtype."""
    monkeypatch.setattr(precision, "native_bf16", lambda device: native)
    out = []
    for requested in ("float32", "bfloat16", "auto"):
        try:
            trained = precision.resolve_dtype(Config(model="m", data="d", dtype=requested, device="cpu"))
        except InputError:
            trained = "refused"
        try:
            planned = plan_cpu_dtype(requested)
        except InputError as e:
            planned = "refused" if e.field == "dtype" else str(e)
        out.append((requested, planned, trained))
    return out


def test_dtype_auto_is_decided_for_the_device_planned_for(cfg_dir, monkeypatch):
    # a GPU with native bf16 (the default for a GPU that is not here): auto is bf16, 2 bytes per weight
    bf16 = _plan(cfg_dir, ["dpo"], [4], dtype="auto")
    assert (bf16.dtype_requested, bf16.native_bf16, bf16.cells[0].dtype) == ("auto", True, "bfloat16")
    assert bf16.cells[0].frozen_weights_bytes == 24992 * 2
    old = _plan(cfg_dir, ["dpo"], [4], dtype="auto", native_bf16=False)  # pre-Ampere: fp32, 4 bytes per weight
    assert (old.cells[0].dtype, old.cells[0].frozen_weights_bytes) == ("float32", 24992 * 4)
    with pytest.raises(InputError) as e:  # as train refuses it: emulated bf16
        _plan(cfg_dir, ["dpo"], [4], dtype="bfloat16", native_bf16=False)
    assert e.value.field == "dtype"

    # on the CPU plan and train make the same decision, from one rule (precision.dtype_for) and one probe
    def cpu(requested):
        return _plan(cfg_dir, ["dpo"], [4], device="cpu", native_bf16=None, baseline=(0, 0), dtype=requested,
                     budget=2**40).cells[0].dtype

    assert _requested_vs_trained(monkeypatch, True, cpu) == [("float32", "float32", "float32"),
                                                             ("bfloat16", "bfloat16", "bfloat16"),
                                                             ("auto", "bfloat16", "bfloat16")]
    assert _requested_vs_trained(monkeypatch, False, cpu) == [("float32", "float32", "float32"),
                                                              ("bfloat16", "refused", "refused"),
                                                              ("auto", "float32", "float32")]


def test_fixes_that_do_not_fit_are_marked_and_listed_last(cfg_dir, capsys):
    lengths = dict(batch_size=64, max_length=64, max_prompt_length=32)
    a = read_arch(str(cfg_dir))
    base = Setting.of(Config(objective="simpo", lora_rank=8, batch_size=64), device="cuda", prompt_len=32,
                      completion_len=32)
    ckpt = estimate(a, Setting(**{**base.__dict__, "gradient_checkpointing": True})).peak_bytes
    rank1 = estimate(a, Setting(**{**base.__dict__, "lora_rank": 1})).peak_bytes
    assert ckpt < rank1  # a budget between them: checkpointing fits, the lowest rank does not
    budget = (ckpt + rank1) // 2
    cell = _plan(cfg_dir, ["simpo"], [8], budget=budget, **lengths).cells[0]
    by = {f.fix: f for f in cell.fixes}
    assert by["gradient checkpointing"].fits is True
    assert by["lower rank"] == Fix("lower rank", "--lora-rank 1", rank1, False)
    assert [f.fits for f in cell.fixes] == sorted((f.fits for f in cell.fixes), reverse=True)  # fits first
    assert all(f.fits == (f.peak_bytes <= budget) for f in cell.fixes)
    # without native bf16, --dtype bfloat16 would be refused by train: it is no fix
    no_bf16 = _plan(cfg_dir, ["simpo"], [8], budget=budget, native_bf16=False, **lengths).cells[0]
    assert "bf16 weights" in by and "bf16 weights" not in {f.fix for f in no_bf16.fixes}
    # printed: each fix says whether it fits; the one that doesn't by how much
    assert cli.main(["plan", "--model", str(cfg_dir), "--objective", "simpo", "--lora-rank", "8",
                     "--batch-size", "64", "--max-length", "64", "--max-prompt-length", "32",
                     "--gpu-memory", str(budget)]) == 0
    lines = [x for x in capsys.readouterr().out.splitlines() if x.strip().startswith("fix:")]
    assert len(lines) == len(cell.fixes)
    assert all(x.endswith(", fits") or "does NOT fit" in x for x in lines)
    assert "--lora-rank 1" in next(x for x in lines if "does NOT fit" in x)
    assert lines.index(next(x for x in lines if "does NOT fit" in x)) > lines.index(
        next(x for x in lines if x.endswith(", fits")))


def test_data_lengths_are_the_longest_row_after_truncation(tiny_world, tmp_path):
    # tiny world tokenizer: "sort:" is 2 tokens, each " d" digit 1, " =" 1, filler " all sorted now" 3; BOS on
    # the prompt, EOS on each completion. The long pair: prompt 1 + 2 + 9 + 1 = 13, chosen 9 + 1 = 10,
    # rejected 9 + 3 + 1 = 13 -> a row of 36; the short pair: 8 + 5 + 5 = 18.
    rows = [{"prompt": "sort: 7 3 9 1 =", "chosen": " 1 3 7 9", "rejected": " 3 1 7 9"},
            {"prompt": "sort: 9 8 7 6 5 4 3 2 1 =", "chosen": " 1 2 3 4 5 6 7 8 9",
             "rejected": " 9 8 7 6 5 4 3 2 1 all sorted now"}]
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    kw = dict(model=str(tiny_world.model_dir), data=str(data), eval_data=str(data))
    p = preftune.plan(Config(**kw, max_length=64), {"objective": ["dpo"], "lora_rank": [4]}, device="cuda",
                      budget=2**30)
    # prompt 13, completion ceil((10 + 13) / 2) = 12: a row of 13 + 2 x 12 = 37 >= the real 36
    assert (p.lengths, p.prompt_tokens, p.completion_tokens, p.cells[0].row_tokens) == ("data", 13, 12, 37)
    # truncated at max_length 20, prompt 8 (from the left): chosen 10, rejected 12 -> prompt 8, completion 11
    cut = preftune.plan(Config(**kw, max_length=20, max_prompt_length=8), {"objective": ["dpo"], "lora_rank": [4]},
                        device="cuda", budget=2**30)
    assert (cut.prompt_tokens, cut.completion_tokens) == (8, 11)
    # without data: every pair at the caps (prompt half of 64, completion the rest)
    caps = preftune.plan(Config(model=kw["model"], max_length=64), {"objective": ["dpo"], "lora_rank": [4]},
                         device="cuda", budget=2**30)
    assert (caps.lengths, caps.prompt_tokens, caps.completion_tokens) == ("caps", 32, 32)
    assert caps.cells[0].peak_bytes > p.cells[0].peak_bytes
    # plan reads no weights, --data included: a folder with only the config and the tokenizer plans the same
    import shutil

    light = tmp_path / "light"
    shutil.copytree(tiny_world.model_dir, light, ignore=shutil.ignore_patterns("*.safetensors"))
    bare = preftune.plan(Config(**{**kw, "model": str(light)}, max_length=64), {"objective": ["dpo"],
                         "lora_rank": [4]}, device="cuda", budget=2**30)
    assert (bare.prompt_tokens, bare.completion_tokens) == (13, 12)


def test_parse_size():
    assert parse_size("24GiB") == 24 * 2**30
    assert parse_size("24GB") == 24 * 10**9
    assert parse_size("1.5g") == int(1.5 * 2**30)
    assert parse_size("800MiB") == 800 * 2**20
    assert parse_size("1024") == 1024


@pytest.mark.parametrize("argv, where", [
    (["--gpu-memory", "lots"], "field 'gpu_memory'"),
    (["--lora-rank", "8,x"], "field 'lora_rank'"),
    (["--objective", "dpoo"], "did you mean 'dpo'"),
])
def test_bad_flags_are_one_line_exit_2(cfg_dir, capsys, argv, where):
    assert cli.main(["plan", "--model", str(cfg_dir), *argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and where in err


def test_folder_without_config_is_one_line_exit_2(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert cli.main(["plan", "--model", str(tmp_path / "empty"), "--gpu-memory", "24GiB"]) == 2
    err = capsys.readouterr().err
    assert err == f"preftune: error: {tmp_path / 'empty'}: field 'model': no config.json in the model folder\n"


def test_gradient_checkpointing_trains_the_same_adapter(tiny_world, tmp_path):
    def run(name, **kw):
        cfg = config.build(dict(model=str(tiny_world.model_dir), data=str(tiny_world.train_path),
                                eval_data=str(tiny_world.eval_path), objective="simpo", lr=1e-2, batch_size=8,
                                max_steps=2, eval_every=0, save_every=0, lora_rank=4, max_train_pairs=16,
                                eval_batch_size=32, output=str(tmp_path / name), cache_dir=str(tmp_path / "c"),
                                quiet=True, **kw))
        train(cfg)
        return load_file(str(tmp_path / name / "adapter" / "adapter_model.safetensors"))

    plain, ckpt = run("plain"), run("ckpt", gradient_checkpointing=True)
    assert plain.keys() == ckpt.keys()
    for k in plain:
        torch.testing.assert_close(ckpt[k], plain[k], rtol=0, atol=1e-6)
    assert max((v.abs().max().item() for k, v in plain.items() if "lora_B" in k)) > 0  # it did train
