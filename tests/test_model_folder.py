"""`--model` at a folder that holds no model (issue 24, item 10): one line naming the folder and what it lacks,
with the sub-folder that has a model, exit 2, before transformers is asked.

    pytest tests/test_model_folder.py
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from preftune.commands.cli import main
from preftune.core.errors import InputError
from preftune.modeling.folder import check_model_folder, missing, suggestion

NOTHING = "no config.json, no tokenizer files (tokenizer.json, tokenizer.model, vocab.json, ...), no weights (*.safetensors)"


def _train(model: Path, world, out: Path, *extra: str) -> list[str]:
    return ["train", "--model", str(model), "--data", str(world.train_path), "--max-steps", "1", "--output",
            str(out), "--quiet", *extra]


def test_a_folder_without_a_model_says_what_is_missing(tiny_world, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("not a model\n")
    assert main(_train(empty, tiny_world, tmp_path / "out")) == 2
    err = capsys.readouterr().err
    assert err == f"preftune: error: {empty}: field 'model': no model in this folder: {NOTHING}\n"
    assert not (tmp_path / "out").exists()


def test_a_world_folder_points_at_its_model_subfolder(tiny_world, tmp_path, capsys):
    world = tiny_world.model_dir.parent  # the world folder, not its model/
    assert main(_train(world, tiny_world, tmp_path / "out")) == 2
    err = capsys.readouterr().err
    assert err == (f"preftune: error: {world}: field 'model': no model in this folder: {NOTHING}; "
                   f"did you mean {tiny_world.model_dir}?\n")
    assert main(["plan", "--model", str(world), "--gpu-memory", "24GiB"]) == 2  # plan reads only the config
    assert capsys.readouterr().err.endswith(f"no config.json in the model folder; did you mean {tiny_world.model_dir}?\n")


def test_an_incomplete_folder_names_only_what_it_lacks(tiny_world, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_world.model_dir, broken)
    (broken / "model.safetensors").rename(broken / "pytorch_model.bin")
    assert missing(broken) == ["no weights (*.safetensors)"]
    with pytest.raises(InputError) as e:
        check_model_folder(str(broken))
    assert e.value.message == ("an incomplete model folder: no weights (*.safetensors); its weights are pickled "
                               "(.bin/.pt), preftune reads *.safetensors only")
    assert e.value.path == str(broken) and e.value.field == "model"
    check_model_folder(str(broken), need=("config", "tokenizer"))  # enough for a tokenizer: no error
    check_model_folder("owner/some-hub-model")  # not a folder: a hub id, left to from_pretrained


def test_an_adapter_folder_and_a_tokenizer_folder(tiny_world, tmp_path, capsys):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    (adapter / "adapter_model.safetensors").write_bytes(b"")
    with pytest.raises(InputError, match="an incomplete model folder: no config.json, no tokenizer files .*; it "
                                         r"holds a LoRA adapter \(adapter_config.json\)"):
        check_model_folder(str(adapter))
    assert suggestion(tmp_path) is None  # no sub-folder here has all three
    empty = tmp_path / "tok"
    empty.mkdir()
    assert main(_train(tiny_world.model_dir, tiny_world, tmp_path / "out", "--tokenizer", str(empty))) == 2
    assert capsys.readouterr().err == (f"preftune: error: {empty}: field 'tokenizer': no tokenizer in this folder: no "
                                       "tokenizer files (tokenizer.json, tokenizer.model, vocab.json, ...)\n")


def test_a_mistyped_local_folder_is_no_such_folder_not_a_hub_lookup(tmp_path, monkeypatch):
    """`W/modle` next to a local `W/` is a typo of a folder, not a hub id: one line at once, with W's folders."""
    (tmp_path / "W" / "model").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    for path in ("W/modle", "./W/modle", str(tmp_path / "W" / "modle"), "a/b/c"):
        with pytest.raises(InputError) as e:
            check_model_folder(path)
        assert e.value.field == "model" and "no such folder" in str(e.value), path
    with pytest.raises(InputError) as e:
        check_model_folder("W/modle")
    assert "W has: model" in str(e.value)
    for hub_id in ("gpt2", "owner/name"):  # shaped like a hub id, no local folder of that owner: left to the hub
        check_model_folder(hub_id)
