"""Every architecture users bring: tiny random models saved to a folder and loaded through ``load_model``.

For each of 12 architectures: training runs, prefix-shared log-probs equal the plain layout, the LoRA target
modules resolve. Gemma-2 also gets a hand-written soft-capped reference, and Qwen2 / Gemma-2 are checked
against TRL's DPOTrainer. The sliding windows are set to 4 tokens so that they actually cut into the
tiny world's 10-30 token sequences (real models use 4096, which would test nothing here).

    .venv/bin/pytest -q tests/test_architectures.py
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
import transformers as tf

import preftune
from preftune.core.config import Config
from preftune.core.errors import InputError
from preftune.data.rows import load_examples
from preftune.data.tokenize import tokenize_examples
from preftune.modeling import precision
from preftune.modeling.logprobs import (
    _block_mask,
    batch_logps,
    make_batch,
    prefix_sharing_blocker,
    score_pairs,
    token_logps,
)
from preftune.modeling.model import add_lora, load_model, load_tokenizer
from preftune.tinyworld import _quiet

LLAMA_LIKE = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256)
QKVO = ["q_proj", "k_proj", "v_proj", "o_proj"]


def _configs(vocab: int) -> dict[str, tuple[object, list[str], int, int]]:
    """name -> (config, the architecture's usual LoRA targets, modules they wrap, modules all-linear wraps).

    Counts are per 2 layers: e.g. Llama has q,k,v,o + gate,up,down = 7 linears a layer, 4 of them attention.
    """
    ids = dict(vocab_size=vocab, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    gemma = dict(**ids, **LLAMA_LIKE, head_dim=8, sliding_window=4)
    return {
        "llama": (tf.LlamaConfig(**ids, **LLAMA_LIKE), QKVO, 8, 14),
        "qwen2": (tf.Qwen2Config(**ids, **LLAMA_LIKE), QKVO, 8, 14),
        # Qwen3 with its optional window from layer 1 on: one full and one sliding layer, like Gemma
        "qwen3": (tf.Qwen3Config(**ids, **LLAMA_LIKE, head_dim=8, use_sliding_window=True, sliding_window=4,
                                 max_window_layers=1), QKVO, 8, 14),
        "mistral": (tf.MistralConfig(**ids, **LLAMA_LIKE, sliding_window=4), QKVO, 8, 14),
        # soft-caps that bite: weights large enough for logits of several units, capped at +-2 (attention +-5)
        "gemma2": (tf.Gemma2Config(**gemma, final_logit_softcapping=2.0, attn_logit_softcapping=5.0,
                                   initializer_range=0.5), QKVO, 8, 14),
        "gemma3": (tf.Gemma3TextConfig(**gemma, layer_types=["sliding_attention", "full_attention"]), QKVO, 8, 14),
        "phi3": (tf.Phi3Config(**ids, **LLAMA_LIKE, sliding_window=4), ["qkv_proj", "o_proj"], 4, 8),  # + gate_up, down
        # GPT-2: c_attn, attn.c_proj, mlp.c_proj match "c_attn"/"c_proj"; all-linear adds mlp.c_fc
        "gpt2": (tf.GPT2Config(vocab_size=vocab, n_embd=32, n_layer=2, n_head=4, n_positions=256, bos_token_id=1,
                               eos_token_id=2, pad_token_id=0), ["c_attn", "c_proj"], 6, 8),
        "gpt_neox": (tf.GPTNeoXConfig(**ids, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, max_position_embeddings=256),
                     ["query_key_value", "dense"], 4, 8),                                    # + dense_h_to_4h, dense_4h_to_h
        "olmo2": (tf.Olmo2Config(**ids, **LLAMA_LIKE), QKVO, 8, 14),
        "opt": (tf.OPTConfig(**ids, hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
                             max_position_embeddings=256, word_embed_proj_dim=32),
                ["q_proj", "k_proj", "v_proj", "out_proj"], 8, 12),                           # + fc1, fc2
        "falcon": (tf.FalconConfig(**ids, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                   new_decoder_architecture=True, num_kv_heads=2),
                   ["query_key_value", "dense"], 4, 8),
    }


ARCHS = list(_configs(8))
EXPECTED_ATTENTION = {name: "eager" if name == "gemma2" else "sdpa" for name in ARCHS}  # Gemma-2: no SDPA


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Hidden size 32: a second intra-op thread only adds waiting, and on a busy machine a descheduled
    worker thread stalls every op (measured: 0.1 s -> 11 s for one architecture's test)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def zoo(tiny_world, tmp_path_factory) -> dict:
    """Every architecture saved as a folder with the tiny world's tokenizer, plus 8 held-out and 8 train rows."""
    root = tmp_path_factory.mktemp("zoo")
    tok = tf.AutoTokenizer.from_pretrained(tiny_world.model_dir)
    folders = {}
    configs = _configs(len(tok))
    configs["falcon_alibi"] = (tf.FalconConfig(**{**configs["falcon"][0].to_dict(), "alibi": True,
                                                  "new_decoder_architecture": False}), [], 0, 0)
    for name, (config, *_) in configs.items():
        with torch.random.fork_rng(devices=[]), warnings.catch_warnings(), _quiet():
            warnings.simplefilter("ignore")
            torch.manual_seed(0)
            model = tf.AutoModelForCausalLM.from_config(config)
            model.save_pretrained(root / name)
        tok.save_pretrained(root / name)
        folders[name] = str(root / name)
    rows = tiny_world.eval_path.read_text().splitlines()
    (root / "eval.jsonl").write_text("\n".join(rows[:8]) + "\n")
    return {"folders": folders, "eval": str(root / "eval.jsonl"), "train": str(tiny_world.train_path),
            "root": root}


def _cfg(zoo: dict, name: str, **kw) -> Config:
    base = dict(model=zoo["folders"][name], data=zoo["train"], eval_data=zoo["eval"], max_train_pairs=8,
                batch_size=4, max_steps=2, eval_every=0, save_every=0, eval_batch_size=8, quiet=True,
                cache_dir=str(zoo["root"] / "cache"), output=str(zoo["root"] / "runs" / name), lr=1e-3)
    return Config(**{**base, **kw})


_RUNS: dict[str, dict] = {}


def _trained(zoo: dict, name: str) -> dict:
    """preftune.training.loop on this architecture, once per module (the TRL test reuses its step-0 eval)."""
    if name not in _RUNS:
        _RUNS[name] = preftune.train(_cfg(zoo, name))
    return _RUNS[name]


def _pairs(zoo: dict, cfg: Config) -> list:
    pairs, _ = tokenize_examples(load_examples(zoo["eval"]), load_tokenizer(cfg), max_length=512, max_prompt_length=256)
    return pairs


@pytest.mark.parametrize("name", ARCHS)
def test_architecture_trains_and_shares_the_prompt_exactly(zoo, name):
    cfg = _cfg(zoo, name)
    model = load_model(cfg)
    assert model.config._attn_implementation == EXPECTED_ATTENTION[name]
    assert prefix_sharing_blocker(model) is None  # the shared layout really runs
    pairs = _pairs(zoo, cfg)
    assert len({len(p.prompt_ids) for p in pairs}) >= 3  # prompts of different lengths share one batch
    pad = load_tokenizer(cfg).pad_token_id
    shared, counts, _ = score_pairs(model, pairs, pad_id=pad, batch_size=8, share_prompt=True)
    plain, counts_plain, _ = score_pairs(model, pairs, pad_id=pad, batch_size=8, share_prompt=False)
    assert torch.equal(counts, counts_plain)
    assert (shared - plain).abs().max().item() <= 1e-5

    summary = _trained(zoo, name)
    assert summary.status == "finished" and summary.steps == 2
    ran = {k: v for k, v in summary.model.items() if not k.startswith("base_")}  # base_*: where the base came from
    assert ran == {"attn_implementation": EXPECTED_ATTENTION[name], "dtype": "float32",
                   "eval_arithmetic": "float32", "share_prompt": True, "share_prompt_blocker": None}
    # step 0: LoRA's B = 0, so the policy is the base model and matches the plain-layout numbers above
    assert summary.step0_eval["eval_logps/chosen"] == pytest.approx(plain[:, 0].mean().item(), abs=1e-5)
    assert summary.step0_eval["eval_refrel/margin"] == 0.0  # exact tie with the reference at step 0


@pytest.mark.parametrize("name", ARCHS)
def test_lora_targets_resolve(zoo, name):
    from peft.tuners.lora import LoraLayer

    _, usual, n_usual, n_all = _configs(8)[name]
    for targets, expected in ((["all-linear"], n_all), (usual, n_usual)):
        model = add_lora(load_model(_cfg(zoo, name)), _cfg(zoo, name, lora_target_modules=targets))
        wrapped = [n for n, m in model.named_modules() if isinstance(m, LoraLayer)]
        assert len(wrapped) == expected, wrapped
        assert not any("lm_head" in n or "embed_out" in n for n in wrapped)


def test_gemma2_logps_apply_the_final_logit_softcap(zoo):
    model = load_model(_cfg(zoo, "gemma2"))
    cap = model.config.final_logit_softcapping
    assert cap == 2.0
    pairs = _pairs(zoo, _cfg(zoo, "gemma2"))[:3]
    ref_sums = []
    with torch.no_grad():
        for p in pairs:
            for completion in (p.chosen_ids, p.rejected_ids):
                ids = torch.tensor([p.prompt_ids + completion])                          # (1, T)
                hidden = model.model(input_ids=ids).last_hidden_state[0]                 # (T, H)
                logits = hidden @ model.lm_head.weight.T                                 # (T, V)
                capped = cap * torch.tanh(logits / cap)
                P = len(p.prompt_ids)
                pos = torch.arange(P - 1, P - 1 + len(completion))                       # predictors
                target = torch.tensor(completion)
                ref = torch.log_softmax(capped[pos], -1)[torch.arange(len(completion)), target]
                ours = token_logps(model.lm_head, hidden[pos], target, softcap=model.config.final_logit_softcapping)
                assert (ours - ref).abs().max().item() <= 1e-6
                uncapped = torch.log_softmax(logits[pos], -1)[torch.arange(len(completion)), target]
                assert (uncapped - ref).abs().max().item() > 1e-2  # the cap matters at this size
                own = torch.log_softmax(model(ids).logits[0, pos], -1)[torch.arange(len(completion)), target]
                assert (own - ref).abs().max().item() <= 1e-5  # transformers' own forward caps the same way
                ref_sums.append(ref.sum().item())
        for share in (True, False):
            batch = make_batch([p.prompt_ids for p in pairs], [p.chosen_ids for p in pairs],
                               [p.rejected_ids for p in pairs], 0, share)
            sums, _ = batch_logps(model, batch)                                          # (2n,) chosen first
            ref = torch.tensor(ref_sums).view(3, 2).T.reshape(-1)                         # (2n,) chosen first
            assert (sums - ref).abs().max().item() <= 1e-5


def test_gemma2_in_bf16_shares_the_prompt(zoo, monkeypatch):
    """bf16 weights with eager attention and its additive mask in bf16: close to fp32, shared or not."""

    monkeypatch.setattr(precision, "native_bf16", lambda device: True)  # this test's CPU may lack it: only slower
    cfg = _cfg(zoo, "gemma2")
    pairs = _pairs(zoo, cfg)
    f32, _, _ = score_pairs(load_model(cfg), pairs, pad_id=0, batch_size=8, share_prompt=False)
    b16 = load_model(_cfg(zoo, "gemma2", dtype="bfloat16"))
    assert (b16.config._attn_implementation, b16.lm_head.weight.dtype) == ("eager", torch.bfloat16)
    shared, _, _ = score_pairs(b16, pairs, pad_id=0, batch_size=8, share_prompt=True)
    plain, _, _ = score_pairs(b16, pairs, pad_id=0, batch_size=8, share_prompt=False)
    assert (shared - plain).abs().max().item() <= 1e-2
    # bf16 rounding: measured 0.06 on sums of about 46 nats; 1% of the magnitude is the bound
    assert (shared - f32).abs().max().item() <= 0.01 * f32.abs().mean().item()


@pytest.mark.parametrize("name", ["qwen2", "gemma2"])
def test_step0_eval_logps_match_trl(zoo, name, tmp_path):
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    rows = [json.loads(line) for line in Path(zoo["eval"]).read_text().splitlines()]
    ds = Dataset.from_list([{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in rows])
    folder = zoo["folders"][name]
    model = tf.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)  # transformers' own default
    args = DPOConfig(output_dir=str(tmp_path), per_device_eval_batch_size=4, report_to="none", use_cpu=True,
                     disable_tqdm=True, beta=0.1, dataloader_num_workers=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = DPOTrainer(model=model, args=args, train_dataset=ds, eval_dataset=ds,
                             processing_class=tf.AutoTokenizer.from_pretrained(folder))
        theirs = trainer.evaluate()
    ours = _trained(zoo, name).step0_eval
    for key in ("eval_logps/chosen", "eval_logps/rejected"):
        assert ours[key] == pytest.approx(theirs[key], rel=1e-6), key  # fp32 summation order only


def test_alibi_falls_back_to_the_plain_layout(zoo):
    """Falcon with ALiBi biases attention by token index, which the shared layout would shift: plain layout."""
    cfg = _cfg(zoo, "falcon_alibi")
    model = load_model(cfg)
    assert prefix_sharing_blocker(model) == "ALiBi position bias follows the token index, not position ids"
    pairs = _pairs(zoo, cfg)
    pad = load_tokenizer(cfg).pad_token_id
    asked, _, tokens = score_pairs(model, pairs, pad_id=pad, batch_size=8, share_prompt=True)
    plain, _, plain_tokens = score_pairs(model, pairs, pad_id=pad, batch_size=8, share_prompt=False)
    assert torch.equal(asked, plain) and tokens == plain_tokens  # 2 rows a pair: the fallback ran
    summary = preftune.train(cfg)
    assert summary.model["share_prompt"] is False
    assert summary.model["share_prompt_blocker"] == prefix_sharing_blocker(model)


def test_kernels_without_a_custom_mask_get_the_plain_layout(zoo, monkeypatch):
    import preftune.modeling.logprobs as lp

    model = load_model(_cfg(zoo, "llama"))
    impl = model.config._attn_implementation
    model.config._attn_implementation_internal = "flash_attention_2"  # as loaded on a GPU with flash-attn
    assert prefix_sharing_blocker(model) == "flash_attention_2 attention takes no custom 4D mask"
    model.config._attn_implementation_internal = impl
    pairs = _pairs(zoo, _cfg(zoo, "llama"))[:2]
    _, _, shared_tokens = score_pairs(model, pairs, pad_id=0, batch_size=2, share_prompt=True)
    monkeypatch.setattr(lp, "prefix_sharing_blocker", lambda m: "some reason")
    _, _, tokens = score_pairs(model, pairs, pad_id=0, batch_size=2, share_prompt=True)
    assert shared_tokens == 2 * max(len(p.prompt_ids) + len(p.chosen_ids) + len(p.rejected_ids) for p in pairs)
    longest = max(len(p.prompt_ids) + max(len(p.chosen_ids), len(p.rejected_ids)) for p in pairs)
    assert tokens == 4 * longest  # 2 pairs as 4 plain rows


def test_attention_override_and_its_errors(zoo):
    llama = load_model(_cfg(zoo, "llama", attn_implementation="eager"))
    assert llama.config._attn_implementation == "eager"
    with pytest.raises(InputError) as e:
        load_model(_cfg(zoo, "gemma2", attn_implementation="sdpa"))
    assert e.value.field == "attn_implementation"
    assert str(e.value) == (f"{zoo['folders']['gemma2']}: field 'attn_implementation': Gemma2ForCausalLM does not "
                            "support 'sdpa'; it supports eager, flex_attention, flash_attention_2, flash_attention_3 "
                            "(leave it unset to pick one)")
    with pytest.raises(InputError, match="GPT2LMHeadModel does not support 'flex'"):
        load_model(_cfg(zoo, "gpt2", attn_implementation="flex"))


def test_flex_attention_block_mask_is_the_sharing_mask():
    """flex gets the prefix-sharing mask as a BlockMask: same attention as SDPA with the 4D bool mask.

    Checked on the attention op itself (uncompiled flex): transformers compiles flex per shape, about 15 s
    each on 2 CPU cores, too slow for the suite. End to end it was measured equal on Llama and Mistral.
    """
    from torch.nn.attention.flex_attention import flex_attention

    batch = make_batch([[1, 5, 6, 7, 8], [1, 9]], [[20, 21, 2], [22, 2]], [[30, 2], [31, 32, 33, 34, 2]], 0)
    mask = batch.attention_mask                                                          # (2, 1, L, L)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, mask.shape[-1], 8, generator=g) for _ in range(3))      # (B, H, L, d)
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "flex_attention called without torch.compile"
        got = flex_attention(q, k, v, block_mask=_block_mask(mask))
    assert (got - want).abs().max().item() <= 1e-6


def test_flex_attention_refused_where_it_has_no_backward(zoo, monkeypatch):
    """torch 2.13 has no FlexAttention backward on CPU: asking for flex there is one InputError at load time,
    not a NotImplementedError in the first training step. The probe decides, so a torch with one lets it through."""
    from preftune.modeling import model as model_mod

    assert model_mod.flex_backward("cpu") is False  # torch 2.13; when this fails, torch has added it
    with pytest.raises(InputError) as e:
        load_model(_cfg(zoo, "llama", attn_implementation="flex_attention"))
    assert e.value.field == "attn_implementation"
    assert f"flex_attention cannot train on cpu: torch {torch.__version__} has no FlexAttention backward" in str(e.value)
    monkeypatch.setattr(model_mod, "flex_backward", lambda device: True)
    assert load_model(_cfg(zoo, "llama", attn_implementation="flex_attention")).config._attn_implementation == \
        "flex_attention"


def test_layout_switch_keeps_the_step0_tie_with_a_shared_cache(zoo):
    """The reference cache is per layout: a --no-share-prompt run next to a shared one still ties exactly."""
    first = _trained(zoo, "llama")  # shared layout, same cache folder
    plain = preftune.train(_cfg(zoo, "llama", share_prompt=False, output=str(zoo["root"] / "runs" / "llama-plain")))
    assert plain.model["share_prompt"] is False and plain.model["share_prompt_blocker"] is None
    assert first.timing["reference_cached"]["eval"] is False
    assert plain.timing["reference_cached"] == {"train": False, "eval": False}  # not the shared numbers
    for s in (first, plain):
        assert s.step0_eval["eval_refrel/margin"] == 0.0
        assert s.step0_eval["eval_accuracy"] == 0.5  # every pair an exact tie, counted one half
