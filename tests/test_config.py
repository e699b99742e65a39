"""Config: defaults in one place, YAML < per-objective < command line, unknown keys rejected with a hint."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from preftune.commands.cli import main
from preftune.core import config as C
from preftune.core.errors import InputError

CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))


def test_precedence(tmp_path):
    f = tmp_path / "run.yaml"
    f.write_text("objective: simpo\nlora_rank: 16\nbeta: 0.5\nobjectives:\n  simpo: {beta: 2.5}\n")
    cfg = C.from_file(f, lora_rank="4")
    assert cfg.objective == "simpo" and cfg.lora_rank == 4
    assert cfg.objective_params()["beta"] == 2.5  # the objectives entry beats the top-level shorthand
    cfg = C.from_file(f, beta="3.0")
    assert cfg.objective_params()["beta"] == 3.0  # the command line beats both


def test_objective_fields_live_per_objective():
    assert not {"beta", "gamma", "gamma_beta_ratio", "label_smoothing"} & set(C.FIELDS)
    cfg = C.build({"objective": "simpo", "model": "m", "data": "d"}, {"gamma_beta_ratio": "0.3", "beta": "4"}).validate()
    assert cfg.objectives == {"simpo": {"gamma_beta_ratio": 0.3, "beta": 4.0}}
    assert cfg.objective_params() == {"beta": 4.0, "gamma_beta_ratio": 0.3, "nll_weight": 0.0}


def test_old_saved_config_still_loads(tmp_path):
    """A config.yaml saved by the previous version: shorthands at the top level, null when unset."""
    f = tmp_path / "old.yaml"
    f.write_text("objective: simpo\nbeta: 2.5\ngamma: null\ngamma_beta_ratio: 0.4\nlabel_smoothing: null\n"
                 "objectives:\n  dpo: {beta: 0.1}\nmodel: m\ndata: d\n")
    cfg = C.from_file(f).validate()
    assert cfg.objective_params() == {"beta": 2.5, "gamma_beta_ratio": 0.4, "nll_weight": 0.0}
    assert cfg.objectives["dpo"] == {"beta": 0.1}


@pytest.mark.parametrize("yaml_text,field", [
    ("objectives:\n  simpo: {gama: 1.0}\n", "objectives.simpo.gama"),
    ("objectives:\n  dpx: {beta: 1.0}\n", "objective"),
    ("objectives:\n  dpo: {beta: -1}\n", "objectives.dpo.beta"),
])
def test_bad_objectives_entry_is_one_line(tmp_path, yaml_text, field):
    f = tmp_path / "run.yaml"
    f.write_text(yaml_text + "model: m\ndata: d\n")
    with pytest.raises(InputError) as e:
        C.from_file(f).validate()
    assert e.value.field == field and "\n" not in str(e.value)


def test_unknown_key_suggests(tmp_path):
    f = tmp_path / "run.yaml"
    f.write_text("lora_rnak: 8\n")
    with pytest.raises(InputError, match=r"run.yaml: field 'lora_rnak': unknown key \(did you mean 'lora_rank'\?\)"):
        C.from_file(f)
    f.write_text("betta: 0.1\n")  # a shorthand of an objective's hyperparameter
    with pytest.raises(InputError, match=r"field 'betta': unknown key \(did you mean 'beta'\?\)"):
        C.from_file(f)


def test_bad_type_and_yaml(tmp_path):
    with pytest.raises(InputError, match="field 'lora_rank'"):
        C.build({"lora_rank": "eight"})
    f = tmp_path / "bad.yaml"
    f.write_text("lora_rank: [8\n")
    with pytest.raises(InputError, match="bad.yaml:"):
        C.from_file(f)


def test_validate_rejects_nonsense():
    with pytest.raises(InputError, match="objective"):
        C.Config(model="m", data="d", objective="dpx").validate()
    with pytest.raises(InputError, match="gamma"):
        C.Config(model="m", data="d", objective="simpo",
                 objectives={"simpo": {"gamma": 1.0, "gamma_beta_ratio": 0.5}}).validate()
    with pytest.raises(InputError, match="max_prompt_length"):
        C.Config(model="m", data="d", max_length=64, max_prompt_length=64).validate()


def test_dump_round_trips(tmp_path):
    cfg = C.build({"objective": "simpo", "beta": 2.0, "gamma_beta_ratio": 0.5, "lora_target_modules": "q_proj,v_proj",
                   "objectives": {"dpo": {"beta": 0.1}}})
    f = tmp_path / "saved.yaml"
    f.write_text(C.dump_yaml(cfg))
    assert C.from_file(f) == cfg
    assert cfg.lora_target_modules == ["q_proj", "v_proj"]


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_shipped_configs_parse(path):
    cfg = C.from_file(path, model="some/model", data="train.jsonl")
    cfg.validate()
    assert set(yaml.safe_load(path.read_text())) <= set(C.FIELDS) | set(C.SHORTHANDS)


def test_cli_bad_flag_is_one_line_exit_2(capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", "--lora-rnak", "8"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--lora-rank" in err[0]


def test_cli_bad_config_exit_2(tmp_path, capsys):
    f = tmp_path / "run.yaml"
    f.write_text("bogus: 1\n")
    assert main(["train", "--config", str(f)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "bogus" in err[0] and "Traceback" not in err[0]


def test_saved_config_reproduces_a_cli_override(tmp_path):
    f = tmp_path / "run.yaml"
    f.write_text("objective: dpo\nobjectives:\n  dpo: {beta: 0.1}\n  simpo: {beta: 2.0}\n")
    cfg = C.from_file(f, beta="0.3", model="m", data="d").validate()
    assert cfg.objective_params()["beta"] == 0.3
    saved = tmp_path / "saved.yaml"
    saved.write_text(C.dump_yaml(cfg))
    again = C.from_file(saved).validate()
    assert again.objective_params() == cfg.objective_params() and again.objectives["simpo"] == {"beta": 2.0}


def test_python_config_uses_its_objectives_entry():
    cfg = C.Config(model="m", data="d", objective="simpo", objectives={"simpo": {"beta": 5.0}})
    assert cfg.objective_params()["beta"] == 5.0


def test_device_choices():
    assert C.Config(model="m", data="d", device="cpu").validate().resolved_device() == "cpu"
    C.Config(model="m", data="d", device="cuda:1").validate()
    with pytest.raises(InputError, match="field 'device'"):
        C.Config(model="m", data="d", device="gpu").validate()


NUMERIC = [k for k, f in C.FIELDS.items() if C._HINTS[k] in (int, float, int | None, float | None)]


@pytest.mark.parametrize("key", NUMERIC)
def test_every_numeric_flag_alone_works_or_names_its_rule(key):
    """A single numeric flag changed from the defaults, at user-plausible values: it validates, or the one-line
    error names the flag and the rule it broke (max_prompt_length also names max_length and where it came from)."""
    for value in (0, 1, 2, 8, 64, 256, 1024, 0.5, -1):
        if C._HINTS[key] in (int, int | None) and isinstance(value, float):
            continue
        try:
            C.build({}, {"model": "m", "data": "d", key: str(value)}).validate()
        except InputError as e:
            assert e.field == key and "\n" not in str(e), str(e)
            assert "must be" in str(e) or "below max_length (512, its default)" in str(e), str(e)


def test_max_length_alone_moves_the_prompt_limit():
    cfg = C.build({}, {"model": "m", "data": "d", "max_length": "256"}).validate()
    assert cfg.max_prompt_length is None and cfg.prompt_length() == 128
    assert C.build({}, {"model": "m", "data": "d"}).validate().prompt_length() == 256  # as before: 512 / 2
    with pytest.raises(InputError) as e:
        C.build({}, {"model": "m", "data": "d", "max_length": "128", "max_prompt_length": "200"}).validate()
    assert e.value.field == "max_prompt_length" and "below max_length (128, given)" in str(e.value)


def test_every_flag_has_help_and_each_command_only_its_flags(capsys):
    docs = C.field_docs()
    assert all(docs[k][1] for k in C.FIELDS), [k for k in C.FIELDS if not docs[k][1]]
    assert {g for g, _ in docs.values()} == {"model", "LoRA", "data", "objective", "optimisation", "evaluation",
                                             "output", "speed"}
    for cmd in ("train", "eval", "ablate"):
        with pytest.raises(SystemExit):
            main([cmd, "--help"])
        text = capsys.readouterr().out
        assert "(default" in text and "--beta" in text and "--max-length" in text
        assert ("--lr " in text) == (cmd != "eval") and ("--lora-rank" in text) == (cmd != "eval")
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    assert all(f"    {c} " in text or f"    {c}\n" in text for c in ("train", "eval", "ablate", "decide", "report"))
    assert "example:" in text and "preftune decide matrix" in text
