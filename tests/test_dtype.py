"""bf16 only where the hardware has it: ``--dtype bfloat16`` refused at once without native bf16, ``auto``.

    .venv/bin/pytest -q tests/test_dtype.py
"""

from __future__ import annotations

import json
import time

import pytest
import torch

import preftune
from preftune import model as model_mod
from preftune.cli import main
from preftune.config import Config
from preftune.errors import InputError
from preftune.model import native_bf16, resolve_dtype

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
    monkeypatch.setattr(model_mod, "native_bf16", lambda device: False)

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
    monkeypatch.setattr(model_mod, "native_bf16", lambda device: True)
    assert resolve_dtype(cfg) == "bfloat16"
    assert resolve_dtype(Config(model="m", data="d", dtype="bfloat16", device="cpu")) == "bfloat16"
    assert resolve_dtype(Config(model="m", data="d", dtype="float32", device="cpu")) == "float32"
    monkeypatch.setattr(model_mod, "native_bf16", lambda device: False)
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
    monkeypatch.setattr(model_mod, "native_bf16", lambda device: True)
    summary = preftune.train(Config(model=str(tiny_world.model_dir), data=str(tiny_world.train_path),
                                    eval_data=str(tiny_world.eval_path), dtype="auto", device="cpu",
                                    max_train_pairs=8, batch_size=4, max_steps=1, eval_every=0, save_every=0,
                                    quiet=True, output=str(tmp_path / "run"), cache_dir=str(tmp_path / "cache")))
    # bf16 weights on CPU: SDPA runs in fp32 inside (preftune's registered wrapper)
    assert summary["model"] == {"attn_implementation": "preftune_sdpa_fp32", "dtype": "bfloat16",
                                "share_prompt": True, "share_prompt_blocker": None}
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["model"]["dtype"] == "bfloat16"
    assert (tmp_path / "run" / "config.yaml").read_text().count("dtype: auto") == 1  # reproducible as asked
