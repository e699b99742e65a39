"""The fast log-prob path (prefix sharing, gathered LM head) equals the plain definition."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from preftune.modeling.logprobs import batch_logps, make_batch, sequence_logps


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


def test_compiled_decoder_equals_eager_through_lora_and_shared_mask(llama):
    """--compile: one graph (no breaks) through peft's LoRA layers and the prefix-sharing 4D mask, the same
    log-probs and LoRA gradients as eager to 1e-5 in fp32, and one graph for every row length (dynamic)."""
    import copy

    from peft import LoraConfig, get_peft_model

    from preftune.modeling.logprobs import _mask_for, compiled_decoder, compiled_graphs

    torch.manual_seed(1)
    model = get_peft_model(copy.deepcopy(llama), LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    prompts, chosen, rejected = zip(*PAIRS)
    batch = make_batch(prompts, chosen, rejected, pad_id=0, share_prompt=True)
    lm = model.get_base_model()
    explained = torch._dynamo.explain(lm.get_decoder())(
        input_ids=batch.input_ids, attention_mask=_mask_for(lm, batch, torch.float32),
        position_ids=batch.position_ids, use_cache=False)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0)
    torch._dynamo.reset()  # explain's frames are not the compiled ones below

    def run(batch, compile):
        model.zero_grad()
        sums, counts = batch_logps(model, batch, compile=compile)
        sums.sum().backward()
        return sums.detach(), counts, {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    graphs = compiled_graphs()
    longer = make_batch([p + [9, 10, 11] for p in prompts], chosen, rejected, pad_id=0, share_prompt=True)
    for b in (batch, longer):  # two row lengths, one compiled graph: the length is symbolic
        (eager, c_eager, g_eager), (comp, c_comp, g_comp) = run(b, False), run(b, True)
        assert torch.equal(c_eager, c_comp) and eager.abs().min() > 1  # real log-prob sums, not zeros
        assert torch.allclose(comp, eager, rtol=0, atol=1e-5)
        assert g_eager.keys() == g_comp.keys() and len(g_eager) > 0
        for name in g_eager:
            assert torch.allclose(g_comp[name], g_eager[name], rtol=1e-4, atol=1e-5), name
    assert longer.input_ids.shape[1] == batch.input_ids.shape[1] + 3
    assert compiled_graphs() == graphs + 1
    assert "_preftune_compiled" in lm.get_decoder().__dict__
    assert not any("_preftune_compiled" in k for k in model.state_dict())  # the compiled copy is never saved
    assert compiled_decoder(lm.get_decoder()) is lm.get_decoder().__dict__["_preftune_compiled"]


def test_checkpointed_decoder_is_still_one_graph(llama):
    """--gradient-checkpointing with --compile: transformers' embedding hook (requires_grad_ on an output)
    broke the graph in two; checkpoint_layers takes it off, and its undo leaves the model as it came."""
    import copy

    from peft import LoraConfig, get_peft_model

    from preftune.modeling.logprobs import _mask_for
    from preftune.modeling.model import checkpoint_layers

    model = get_peft_model(copy.deepcopy(llama), LoraConfig(r=4, target_modules="all-linear"))
    lm = model.get_base_model()
    undo = checkpoint_layers(lm)
    assert lm.is_activation_checkpointing and not getattr(lm, "_require_grads_hooks", None)
    prompts, chosen, rejected = zip(*PAIRS)
    batch = make_batch(prompts, chosen, rejected, pad_id=0, share_prompt=True)
    model.train()
    explained = torch._dynamo.explain(lm.get_decoder())(
        input_ids=batch.input_ids, attention_mask=_mask_for(lm, batch, torch.float32),
        position_ids=batch.position_ids, use_cache=False)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0)
    undo()
    assert not lm.is_activation_checkpointing
