"""Shared fixtures: one tiny world per test session (about 2 s to build)."""

from __future__ import annotations

import pytest

from preftune.tinyworld import World, build_world


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory: pytest.TempPathFactory) -> World:
    """The default tiny world (256 train / 64 eval sorting pairs, 2-layer Llama), built once, read-only."""
    return build_world(tmp_path_factory.mktemp("tiny_world"))


@pytest.fixture(scope="module")
def policy(tiny_world: World):
    """(a peft model on the tiny world with random A and B, its tokenizer): the adapter changes what the model
    writes, so policy and reference differ."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_world.model_dir)
    model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    return model, AutoTokenizer.from_pretrained(tiny_world.model_dir)
