"""The sampling engine and ``preftune generate``: greedy parity with transformers, seeds, shared prefill, pairs."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from preftune.commands.cli import main
from preftune.core.errors import InputError
from preftune.data.rows import load_prompts
from preftune.generation.pairs import make_pairs
from preftune.generation.sampler import _eos_ids, generate, generate_ids

PROMPTS = ["sort: 7 3 9 1 =", "sort: 1 =", "sort: 5 5 2 8 0 1 3 ="]


@pytest.fixture(scope="module")
def lm(tiny_world):
    tok = AutoTokenizer.from_pretrained(tiny_world.model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_world.model_dir, dtype=torch.float32)
    return model, tok


def _strip(row: list[int], eos: int, pad: int) -> list[int]:
    out = []
    for t in row:
        if t == eos:
            break
        out.append(t)
    return [t for t in out if t != pad]


def test_greedy_equals_transformers_generate_token_for_token(lm):
    model, tok = lm
    ids = [tok(p)["input_ids"] for p in PROMPTS]
    ours = generate_ids(model, ids, num_samples=2, max_new_tokens=20, temperature=0, eos_ids=_eos_ids(model, tok),
                        pad_id=tok.pad_token_id, batch_size=3)
    enc = tok(PROMPTS, return_tensors="pt", padding=True, padding_side="left")
    hf = model.generate(**enc, do_sample=False, max_new_tokens=20, pad_token_id=tok.pad_token_id)
    width = enc["input_ids"].shape[1]
    for i in range(len(PROMPTS)):
        want = hf[i, width:].tolist()
        (a, reason_a), (b, _) = ours[i]
        assert a == b  # greedy: the K samples agree
        assert a == _strip(want, tok.eos_token_id, tok.pad_token_id)
        assert reason_a == ("eos" if tok.eos_token_id in want else "length")
        if reason_a == "length":
            assert len(a) == 20
    # batching must not change greedy output: each prompt alone gives the same tokens
    for i, p in enumerate(ids):
        alone = generate_ids(model, [p], max_new_tokens=20, temperature=0, eos_ids={tok.eos_token_id})
        assert alone[0][0][0] == ours[i][0][0]


def test_same_seed_same_samples_other_seed_other_samples(lm):
    model, tok = lm
    kw = dict(num_samples=3, max_new_tokens=12, temperature=1.0, top_p=0.9, batch_size=2)
    a = generate(model, tok, PROMPTS, seed=5, **kw)
    b = generate(model, tok, PROMPTS, seed=5, **kw)
    c = generate(model, tok, PROMPTS, seed=6, **kw)
    assert a == b
    assert [r["completions"] for r in a] != [r["completions"] for r in c]
    assert all(len(r["completions"]) == 3 == len(r["finish_reasons"]) for r in a)


def test_k_samples_share_one_prefill(lm):
    """Prefill forward calls see each prompt once (B rows), not K times as num_return_sequences does."""
    model, tok = lm
    calls: list[tuple[int, int]] = []

    def hook(_module, args, kwargs):
        x = kwargs.get("input_ids", args[0] if args else None)
        calls.append(tuple(x.shape))

    handle = model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        ids = [tok(p)["input_ids"] for p in PROMPTS]
        generate_ids(model, ids, num_samples=4, max_new_tokens=5, temperature=1.0, seed=0, batch_size=3)
        ours = list(calls)
        calls.clear()
        enc = tok(PROMPTS, return_tensors="pt", padding=True, padding_side="left")
        model.generate(**enc, do_sample=True, num_return_sequences=4, max_new_tokens=5,
                       pad_token_id=tok.pad_token_id)
        theirs = list(calls)
    finally:
        handle.remove()
    width = max(len(i) for i in ids)
    assert ours[0] == (3, width)                      # one prefill of the 3 prompts
    assert all(s == (12, 1) for s in ours[1:])        # decode at width B*K = 12, one token per step
    assert len(ours) == 5                             # 1 prefill + 4 decode steps for 5 tokens
    assert theirs[0] == (12, width)                   # transformers prefills every prompt 4 times


def test_peft_model_with_a_fresh_adapter_generates_as_the_base(lm):
    from peft import LoraConfig, get_peft_model

    model, tok = lm
    base = generate(model, tok, PROMPTS, max_new_tokens=10, temperature=0)
    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(model.name_or_path),
                                LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    assert generate(peft_model, tok, PROMPTS, max_new_tokens=10, temperature=0) == base  # B = 0 at init


def test_decoding_warns_nothing_for_plain_and_peft_models(lm):
    """transformers 5.2x renamed past_key_values to cache and warns on every step for the old name (issue 24)."""
    import warnings

    from peft import LoraConfig, get_peft_model

    model, tok = lm
    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(model.name_or_path),
                                LoraConfig(r=4, target_modules=["q_proj"]))
    for m in (model, peft_model):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert len(generate(m, tok, PROMPTS[:2], max_new_tokens=4, temperature=0.7, num_samples=2)) == 2


def test_prompt_longer_than_the_context_names_the_line(lm, tmp_path):
    model, tok = lm
    f = tmp_path / "p.jsonl"
    f.write_text(json.dumps({"prompt": "sort: 1 2 ="}) + "\n" + json.dumps({"prompt": "sort: " + "7 3 " * 20 + "="}) + "\n")
    with pytest.raises(InputError, match=r"p\.jsonl:2: field 'prompt': prompt is \d+ tokens; the model's context "
                                         r"\(1024\) minus max_new_tokens \(1014\) leaves 10$"):
        generate(model, tok, load_prompts(str(f)), max_new_tokens=1014)


def test_load_prompts_takes_prompt_only_rows_and_pairs(tmp_path):
    f = tmp_path / "p.jsonl"
    rows = [{"prompt": "a"}, {"prompt": [{"role": "user", "content": "hi"}]},
            {"chosen": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "x"}],
             "rejected": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "y"}]}]
    f.write_text("".join(json.dumps(r) + "\n" for r in rows) + "\n" + json.dumps({"text": "no prompt"}) + "\n")
    with pytest.raises(InputError, match=r"^.*p\.jsonl:5: field 'prompt': missing$"):
        load_prompts(str(f))
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    got = load_prompts(str(f))
    assert [r.prompt for r in got] == ["a", [{"role": "user", "content": "hi"}], [{"role": "user", "content": "q"}]]
    assert [r.id for r in got] == ["p.jsonl:1", "p.jsonl:2", "p.jsonl:3"]


def test_make_pairs_best_vs_worst_and_drops_with_counts():
    rows = [
        {"prompt": "p1", "completions": ["a", "b", "c"], "scores": [0.2, 0.9, 0.1]},   # kept: b over c
        {"prompt": "p2", "completions": ["x", "x", "x"], "scores": [0.5, 0.5, 0.5]},   # identical
        {"prompt": "p3", "completions": ["x", "y", "z"], "scores": [0.5, 0.55, 0.5]},  # gap 0.05 < 0.1
        {"prompt": "p4", "completions": ["x", "y"], "scores": [0.3, 0.3]},             # no gap at all
        {"prompt": [{"role": "user", "content": "q"}], "completions": ["u", "v"], "scores": [1.0, 0.0]},
    ]
    pairs, stats = make_pairs(rows, min_gap=0.1)
    assert stats == {"prompts": 5, "pairs": 2, "dropped": {"identical": 1, "empty": 0, "gap": 2}, "min_gap": 0.1,
                     "rule": "max_min"}
    assert pairs[0] == {"prompt": "p1", "chosen": "b", "rejected": "c", "chosen_score": 0.9, "rejected_score": 0.1}
    assert pairs[1]["chosen"] == [{"role": "assistant", "content": "u"}]
    assert pairs[1]["rejected"] == [{"role": "assistant", "content": "v"}]


def _prompts_file(tmp_path, prompts=PROMPTS):
    f = tmp_path / "prompts.jsonl"
    f.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    return f


def test_cli_generate_with_judge_and_pairs(tiny_world, tmp_path, capsys):
    from preftune.tinyworld import judge

    out, pairs = tmp_path / "s.jsonl", tmp_path / "pairs.jsonl"
    rc = main(["generate", "--model", str(tiny_world.model_dir), "--prompts", str(_prompts_file(tmp_path)),
               "--num-samples", "3", "--max-new-tokens", "8", "--temperature", "1.0", "--seed", "1",
               "--output", str(out), "--judge", "python:preftune.tinyworld:judge", "--pairs", str(pairs),
               "--device", "cpu"])
    assert rc == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["prompt"] for r in rows] == PROMPTS
    for r in rows:
        assert len(r["completions"]) == len(r["scores"]) == len(r["finish_reasons"]) == 3
        assert r["scores"] == [judge(r["prompt"], c) for c in r["completions"]]
        assert set(r["finish_reasons"]) <= {"eos", "length"}
    stats = json.loads((tmp_path / "pairs.jsonl.stats.json").read_text())
    kept = pairs.read_text().splitlines()
    assert stats["prompts"] == 3 and stats["pairs"] == len(kept)
    assert stats["pairs"] + stats["dropped"]["identical"] + stats["dropped"]["gap"] == 3
    assert f"pairs: {stats['pairs']} of 3 prompts" in capsys.readouterr().out


def _bad(argv, tmp_path, capsys, pattern):
    out = tmp_path / "never.jsonl"
    rc = main(argv + ["--output", str(out)])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.count("\n") == 1 and err.startswith("preftune: error: ")
    assert pattern in err, err
    assert not out.exists() and not list(tmp_path.glob("never*")) and not list(tmp_path.glob("*.stats.json"))


def test_cli_bad_input_is_one_line_exit_2_nothing_written(tiny_world, tmp_path, capsys, monkeypatch):
    base = ["generate", "--model", str(tiny_world.model_dir), "--prompts", str(_prompts_file(tmp_path)),
            "--device", "cpu", "--max-new-tokens", "4", "--num-samples", "2"]
    _bad(base + ["--num-samples", "0"], tmp_path, capsys, "field 'num_samples': invalid value 0")
    _bad(base + ["--judge", "nonsense"], tmp_path, capsys, "cannot parse 'nonsense'")
    _bad(base + ["--judge", "python:no_such_module_xyz:f"], tmp_path, capsys, "cannot import module 'no_such_module_xyz'")
    _bad(base + ["--judge", "python:preftune.tinyworld:nope"], tmp_path, capsys, "has no function 'nope'")
    _bad(base + ["--engine", "vllm"], tmp_path, capsys, "field 'engine': vllm")
    _bad(base + ["--pairs", str(tmp_path / "never-pairs.jsonl")], tmp_path, capsys, "--pairs needs a --judge")
    # judges that raise, return NaN or return a non-number: written in a module the test puts on the path
    (tmp_path / "badjudges_mod.py").write_text(
        "def nan(p, c):\n    return float('nan')\n"
        "def boom(p, c):\n    raise RuntimeError('judge broke')\n"
        "def many(p, c):\n    return [1.0, 2.0]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    _bad(base + ["--judge", "python:badjudges_mod:nan"], tmp_path, capsys, "returned nan")
    _bad(base + ["--judge", "python:badjudges_mod:boom"], tmp_path, capsys, "raised RuntimeError: judge broke")
    _bad(base + ["--judge", "python:badjudges_mod:many"], tmp_path, capsys, "returned [1.0, 2.0]")
    long = tmp_path / "long.jsonl"
    long.write_text(json.dumps({"prompt": "sort: 1 ="}) + "\n" + json.dumps({"prompt": "sort: 2 ="}) + "\n")
    _bad(["generate", "--model", str(tiny_world.model_dir), "--prompts", str(long), "--device", "cpu",
          "--max-new-tokens", "1020"], tmp_path, capsys, "long.jsonl:1: field 'prompt': prompt is 5 tokens; the model's context (1024) minus max_new_tokens (1020) leaves 4")


def test_cli_generate_with_an_adapter_uses_it(tiny_world, tmp_path, lm):
    from peft import LoraConfig, PeftModel, get_peft_model

    model, tok = lm
    torch.manual_seed(1)
    adapted = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_world.model_dir),
                             LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    adapted.save_pretrained(tmp_path / "adapter")
    out = tmp_path / "s.jsonl"
    assert main(["generate", "--model", str(tiny_world.model_dir), "--adapter", str(tmp_path / "adapter"),
                 "--prompts", str(_prompts_file(tmp_path)), "--num-samples", "1", "--temperature", "0",
                 "--max-new-tokens", "8", "--output", str(out), "--device", "cpu"]) == 0
    got = [json.loads(line)["completions"][0] for line in out.read_text().splitlines()]
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_world.model_dir), tmp_path / "adapter")
    want = [r["completions"][0] for r in generate(loaded, tok, PROMPTS, max_new_tokens=8, temperature=0)]
    base = [r["completions"][0] for r in generate(model, tok, PROMPTS, max_new_tokens=8, temperature=0)]
    assert got == want and got != base
    assert main(["generate", "--model", str(tiny_world.model_dir), "--adapter", str(tmp_path / "nope"),
                 "--prompts", str(_prompts_file(tmp_path)), "--output", str(tmp_path / "x.jsonl"),
                 "--device", "cpu"]) == 2
    assert not (tmp_path / "x.jsonl").exists()


def test_progress_is_a_bar_on_a_terminal_and_lines_otherwise(monkeypatch, capsys):
    import io

    from preftune.commands.generate import progress_printer

    monkeypatch.delenv("CI", raising=False)
    monkeypatch.setattr("sys.stderr.isatty", lambda: False)
    update, close = progress_printer(20)
    for done in (1, 2, 3, 20):  # a line every 2 prompts (10% of 20) and at the end
        update(done, 20)
    close()
    assert capsys.readouterr().out.splitlines() == ["[generate] 2/20 prompts", "[generate] 20/20 prompts"]
    tty = io.StringIO()
    tty.isatty = lambda: True  # type: ignore[method-assign]
    monkeypatch.setattr("sys.stderr", tty)
    update, close = progress_printer(4)
    update(4, 4)
    close()
    assert "4/4" in tty.getvalue() and capsys.readouterr().out == ""
    monkeypatch.setenv("CI", "1")  # CI: plain lines even on a terminal
    update, close = progress_printer(1)
    update(1, 1)
    assert capsys.readouterr().out == "[generate] 1/1 prompts\n"
