"""The fast log-prob path (prefix sharing, gathered LM head) equals the plain definition."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from preftune.logprobs import batch_logps, make_batch, sequence_logps


@pytest.fixture(scope="module")
def llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      attn_implementation="sdpa")
    return LlamaForCausalLM(cfg).eval()


PAIRS = [  # (prompt, chosen, rejected) of uneven lengths, so padding and masks matter
    ([1, 5, 7], [9, 9, 2], [8, 2]),
    ([3, 4, 6, 10, 11, 12], [13, 2], [14, 15, 16, 17, 2]),
    ([20], [21, 22, 23, 24, 25, 2], [26, 2]),
]


def brute_force(model, prompt, completion) -> float:
    """Score each completion token with a separate full forward of its prefix."""
    total = 0.0
    for j, tok in enumerate(completion):
        ids = torch.tensor([prompt + completion[:j]])
        logits = model(ids).logits[0, -1].double()
        total += (logits.log_softmax(-1)[tok]).item()
    return total


def test_sequence_logps_matches_brute_force(llama):
    p, c, _ = PAIRS[1]
    ids = torch.tensor([p + c])
    mask = torch.tensor([[False] * len(p) + [True] * len(c)])
    with torch.no_grad():
        s, n = sequence_logps(llama(ids).logits, ids, mask)
    assert n.item() == len(c)
    assert s.item() == pytest.approx(brute_force(llama, p, c), abs=1e-4)


def test_sequence_logps_hand_values():
    # Two-token vocab, uniform logits: each completion token has log-prob ln(1/2).
    logits = torch.zeros(1, 4, 2)
    labels = torch.tensor([[0, 1, 1, 0]])
    mask = torch.tensor([[False, False, True, True]])
    s, n = sequence_logps(logits, labels, mask)
    assert n.item() == 2 and s.item() == pytest.approx(2 * math.log(0.5))


@pytest.mark.parametrize("share", [True, False])
def test_fast_path_equals_plain(llama, share):
    prompts, chosen, rejected = zip(*PAIRS)
    batch = make_batch(prompts, chosen, rejected, pad_id=0, share_prompt=share)
    with torch.no_grad():
        fast, counts = batch_logps(llama, batch, chunk=5)  # small chunk: exercise chunking
    n = len(PAIRS)
    for i, (p, c, r) in enumerate(PAIRS):
        for k, comp in ((i, c), (n + i, r)):
            ids = torch.tensor([p + comp])
            mask = torch.tensor([[False] * len(p) + [True] * len(comp)])
            with torch.no_grad():
                ref, cnt = sequence_logps(llama(ids).logits, ids, mask)
            assert counts[k].item() == cnt.item() == len(comp)
            assert fast[k].item() == pytest.approx(ref.item(), abs=1e-5)


def test_shared_prompt_processes_fewer_tokens():
    prompts, chosen, rejected = zip(*PAIRS)
    shared = make_batch(prompts, chosen, rejected, pad_id=0, share_prompt=True)
    plain = make_batch(prompts, chosen, rejected, pad_id=0, share_prompt=False)
    saved = sum(len(p) for p in prompts)
    assert plain.real_tokens - shared.real_tokens == saved


def test_gradients_flow_through_shared_prompt(llama):
    prompts, chosen, rejected = zip(*PAIRS)
    batch = make_batch(prompts, chosen, rejected, pad_id=0, share_prompt=True)
    llama.zero_grad()
    logps, _ = batch_logps(llama, batch)
    (logps[:3] - logps[3:]).sum().backward()
    g = llama.model.embed_tokens.weight.grad
    assert g is not None and torch.isfinite(g).all()
    assert g[1].abs().sum() > 0  # a prompt-only token gets gradient through both completions
