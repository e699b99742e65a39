"""preftune export: merged model reloads with plain transformers and matches the adapter model; adapter copy;
model cards; a full fine-tuning run; bad input is one line with exit code 2.

    .venv/bin/pytest -q tests/test_export.py
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import yaml
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from preftune.commands import cli
from preftune.core import config
from preftune.core.layout import RunSummary
from preftune.modeling.model import fingerprint
from preftune.training.export import export, model_card
from preftune.training.loop import train


def _run(world, tmp_path, name, **kw):
    base = dict(model=str(world.model_dir), data=str(world.train_path), eval_data=str(world.eval_path),
                objective="simpo", lr=1e-2, batch_size=8, max_steps=3, eval_every=0, save_every=0, warmup_ratio=0.0,
                lora_rank=4, output=str(tmp_path / name), cache_dir=str(tmp_path / "cache"), quiet=True,
                max_train_pairs=32, eval_batch_size=32)
    base.update(kw)
    train(config.build(base))
    return tmp_path / name


@pytest.fixture(scope="module")
def lora_run(tiny_world, tmp_path_factory):
    return _run(tiny_world, tmp_path_factory.mktemp("export"), "run")


def _header(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n")[1])


@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")  # peft on transformers v5
def test_merged_export_matches_adapter_model_logits(tiny_world, lora_run, tmp_path):
    assert cli.main(["export", str(lora_run), "--merge", "--output", str(tmp_path / "merged")]) == 0
    out = tmp_path / "merged"
    assert (out / "model.safetensors").exists() and (out / "tokenizer.json").exists()
    assert not list(out.glob("adapter_*"))  # a plain transformers model, no peft files

    ids = AutoTokenizer.from_pretrained(out)(["sort: 3 1 2 = 1 2 3", "sort: 9 0 ="], padding=True,
                                             return_tensors="pt")
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    base = AutoModelForCausalLM.from_pretrained(tiny_world.model_dir, dtype=torch.float32)
    adapted = PeftModel.from_pretrained(base, str(lora_run / "adapter")).eval()
    with torch.no_grad():
        want = adapted(**ids).logits                                        # (2, T, V)
        got = merged(**ids).logits
        with adapted.disable_adapter():
            plain = adapted(**ids).logits
    assert merged.dtype == torch.float32
    assert (want - plain).abs().max() > 1e-3  # the adapter really changes the model, so the check has teeth
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)

    card = (out / "README.md").read_text()
    head = _header(card)
    assert "base_model" not in head  # a local folder is no Hub id: the card says where it came from instead
    fp = fingerprint(str(tiny_world.model_dir), tmp_path / "fp")  # recomputed from the files, not read back
    assert json.loads((lora_run / "summary.json").read_text())["model"]["base_fingerprint"] == fp
    assert f"Base model: local folder `{tiny_world.model_dir.resolve()}` (a path, not a Hub id" in card
    assert f"Fingerprint of its weights and config at training: `{fp}`" in card
    assert head["library_name"] == "transformers"
    assert head["tags"] == ["preftune", "simpo", "lora", "merged"]
    summary = json.loads((lora_run / "summary.json").read_text())
    assert f"| `beta` | {summary['params']['beta']:.4g} |" in card
    assert "| `lora_rank` | 4 |" in card and "| `lora_alpha` | 8 |" in card  # alpha None means 2 x rank
    assert "| train | 32 | 32 |" in card  # rows and kept of the 32 training pairs
    acc = summary["final_eval"]["eval_accuracy"]
    assert f"| accuracy (own reward) | {summary['step0_eval']['eval_accuracy']:.4g} | {acc:.4g} |" in card


def test_merged_export_in_bfloat16(lora_run, tmp_path):
    export(lora_run, tmp_path / "bf16", merge=True, dtype="bfloat16")
    m = AutoModelForCausalLM.from_pretrained(tmp_path / "bf16")
    assert m.dtype == torch.bfloat16


def test_adapter_export_copies_adapter_with_peft_card(tiny_world, lora_run, tmp_path):
    assert cli.main(["export", str(lora_run), "--output", str(tmp_path / "ad")]) == 0
    out = tmp_path / "ad"
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        assert (out / name).read_bytes() == (lora_run / "adapter" / name).read_bytes()
    head = _header((out / "README.md").read_text())
    assert head["library_name"] == "peft" and "base_model" not in head
    assert head["tags"] == ["preftune", "simpo", "lora"]


@pytest.mark.parametrize("base, local, hub", [
    ("owner/name", False, True),
    ("Qwen/Qwen2.5-0.5B-Instruct", None, True),   # a summary.json from before base_local: the name decides
    ("owner/name", True, False),                  # a folder named like a hub id, where training ran
    ("gpt2", False, False),                       # not owner/name: said in words only
    ("./models/m", False, False), ("/abs/m", False, False), ("a/b/c", False, False), ("a/../b", False, False),
])
def test_base_model_in_the_header_only_for_a_hub_id(tmp_path, monkeypatch, base, local, hub):
    monkeypatch.chdir(tmp_path)
    model = {"base_fingerprint": "ab12"} | ({} if local is None else {"base_local": local})
    summary = RunSummary("dpo", 4, 1, 3, "finished", {}, model=model)
    card = model_card(tmp_path, {"model": base}, summary, kind="adapter", dtype="float32")
    assert _header(card).get("base_model") == (base if hub else None)
    if hub:
        assert f"Base model: [`{base}`](https://huggingface.co/{base}) on the Hugging Face Hub." in card
    else:
        assert f"Base model: local folder `{base}` (a path, not a Hub id" in card
    assert "at training: `ab12`" in card
    (tmp_path / "owner" / "name").mkdir(parents=True)  # the same id, now a folder here: a path after all
    card = model_card(tmp_path, {"model": "owner/name"}, summary, kind="adapter", dtype="float32")
    assert "base_model" not in _header(card)
    assert f"local folder `{tmp_path / 'owner' / 'name'}`" in card


def test_matrix_cell_card_carries_the_verdict(lora_run, tmp_path):
    cell = tmp_path / "matrix" / "cells" / "objective=simpo,lora_rank=4"
    shutil.copytree(lora_run, cell)
    decision = {"verdict": "switch", "objective": "simpo", "lora_rank": 4, "summary": "simpo ranks more pairs.",
                "reasons": [{"code": "x", "data": {}}], "explanation": ["first reason", "second reason"],
                "comparisons": [], "cells": []}
    (tmp_path / "matrix" / "decision.json").write_text(json.dumps(decision))
    (tmp_path / "matrix" / "matrix.json").write_text(json.dumps({"factors": {}, "cells": []}))
    export(cell, tmp_path / "out")
    card = (tmp_path / "out" / "README.md").read_text()
    assert "**switch** -> simpo r=4 (this cell)." in card
    assert "- first reason\n- second reason" in card


def test_full_finetuning_run_is_copied_with_a_card(tiny_world, tmp_path):
    run = _run(tiny_world, tmp_path, "full", lora_rank=0, lr=1e-4, max_steps=1)
    assert cli.main(["export", str(run), "--output", str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "model.safetensors").read_bytes() == (run / "model" / "model.safetensors").read_bytes()
    head = _header((tmp_path / "out" / "README.md").read_text())
    assert head["library_name"] == "transformers" and head["tags"] == ["preftune", "simpo"]


def test_run_without_adapter_is_one_line_exit_2(lora_run, tmp_path, capsys):
    broken = tmp_path / "broken"
    shutil.copytree(lora_run, broken)
    shutil.rmtree(broken / "adapter")
    assert cli.main(["export", str(broken), "--merge", "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no adapter" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_non_empty_output_is_refused(lora_run, tmp_path, capsys):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("x")
    assert cli.main(["export", str(lora_run), "--output", str(tmp_path / "out")]) == 2
    assert (tmp_path / "out" / "keep.txt").read_text() == "x"
    assert capsys.readouterr().err.startswith("preftune: error: ")
