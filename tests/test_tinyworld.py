from __future__ import annotations

import hashlib
import json

import pytest

from preftune.core.errors import InputError
from preftune.tinyworld import build_world, make_pairs

SMALL = {"n_train": 8, "n_eval": 4, "hidden": 16, "layers": 1, "heads": 2}


def _digits(text: str) -> list[int]:
    return [int(t) for t in text.split() if t.isdigit()]


def _hashes(folder) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _rows(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_build_is_deterministic(tiny_world, tmp_path):
    again = build_world(tmp_path / "again")
    assert _hashes(tmp_path / "again") == _hashes(tiny_world.model_dir.parent)
    assert again.variant == "default" and again.model_dir.name == "model"


def test_world_loads_with_auto_classes(tiny_world):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_world.model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_world.model_dir)
    assert (tok.pad_token, tok.bos_token, tok.eos_token) == ("<pad>", "<s>", "</s>")
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    assert tok.chat_template and tok("sort: 1")["input_ids"][0] == tok.bos_token_id
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert chat == "<s>user:\nhi</s>\nassistant:\n"
    assert model.config.vocab_size == len(tok) and not model.config.tie_word_embeddings
    assert (tiny_world.model_dir / "model.safetensors").exists()
    ids = torch.tensor([tok("sort: 3 1 = 1 3</s>")["input_ids"]])
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=ids).logits).all()


def test_rebuild_only_when_arguments_change(tmp_path):
    world = build_world(tmp_path, **SMALL)
    weights = world.model_dir / "model.safetensors"
    stamp = weights.stat().st_mtime_ns
    assert build_world(tmp_path, **SMALL) == world and weights.stat().st_mtime_ns == stamp
    build_world(tmp_path, **{**SMALL, "n_eval": 5})
    assert len(_rows(world.eval_path)) == 5


def test_refuses_a_folder_that_is_not_a_world(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(InputError, match="not a tiny world"):
        build_world(tmp_path, **SMALL)
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_pairs_have_a_ground_truth_and_no_prompt_in_both_files(tiny_world):
    train, held = _rows(tiny_world.train_path), _rows(tiny_world.eval_path)
    assert (len(train), len(held)) == (256, 64)
    prompts = [r["prompt"] for r in train + held]
    assert len(set(prompts)) == len(prompts)
    for r in train + held:
        digits = _digits(r["prompt"])
        assert _digits(r["chosen"]) == sorted(digits)
        assert sorted(_digits(r["rejected"])) == sorted(digits) and _digits(r["rejected"]) != sorted(digits)


@pytest.fixture(scope="module")
def tokenizer(tiny_world):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_world.model_dir)


def _chosen_shorter(pairs, tok) -> tuple[float, float]:
    n = [(len(tok(p["chosen"])["input_ids"]), len(tok(p["rejected"])["input_ids"])) for p in pairs]
    return sum(c < r for c, r in n) / len(n), sum(c > r for c, r in n) / len(n)


def test_variants(tokenizer):
    shorter, longer = _chosen_shorter(make_pairs(300, seed=1, variant="default"), tokenizer)
    assert shorter > 0.15 and longer > 0.15  # length says nothing about the label
    shorter, _ = _chosen_shorter(make_pairs(300, seed=1, variant="chosen_shorter"), tokenizer)
    assert shorter > 0.9
    flipped = make_pairs(300, seed=1, variant="flipped")
    sorted_chosen = sum(_digits(p["chosen"]) == sorted(_digits(p["prompt"])) for p in flipped) / len(flipped)
    assert 0.4 < sorted_chosen < 0.6
    assert [p["prompt"] for p in flipped] == [p["prompt"] for p in make_pairs(300, seed=1)]


def test_make_pairs_is_deterministic_and_checks_variant():
    assert make_pairs(20, seed=3) == make_pairs(20, seed=3) != make_pairs(20, seed=4)
    with pytest.raises(InputError, match="variant"):
        make_pairs(2, seed=0, variant="nope")


def test_world_command_builds_the_refusal_class_for_a_gate(tmp_path, capsys):
    from preftune.commands.cli import main

    assert main(["world", str(tmp_path / "w"), "--n-train", "40", "--n-eval", "10", "--safety", "0.2"]) == 0
    out = capsys.readouterr().out
    assert f"safety prompts: {tmp_path / 'w' / 'safety.jsonl'}" in out
    train = [json.loads(line) for line in (tmp_path / "w" / "train.jsonl").read_text().splitlines()]
    assert sum(r["prompt"].startswith("leak:") for r in train) == 8  # round(0.2 * 40)
    assert (tmp_path / "w" / "benign.jsonl").is_file()
    assert main(["world", str(tmp_path / "x"), "--safety", "1.5"]) == 2
    assert "field 'safety'" in capsys.readouterr().err and not (tmp_path / "x").exists()
