"""Sample completions: batched, KV-cached, each prompt prefilled once and its cache shared by its K samples.

    rows = generate(model, tok, ["sort: 3 1 2 ="], num_samples=4, temperature=0.8, seed=0)

transformers' ``generate(num_return_sequences=K)`` copies every prompt K times *before* the prefill, so the
prompt is processed K times. Here a batch of prompts is prefilled once, then the cache rows are repeated K
times (``DynamicCache.batch_repeat_interleave``) and only the decode steps run at width B·K.
Temperature 0 is greedy and equals ``model.generate(do_sample=False)`` token for token.
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from ..core.errors import InputError
from ..data.rows import Content, PromptRow
from ..data.tokenize import encode_prompts

if TYPE_CHECKING:
    import torch

Progress = Callable[[int, int], None]  # (prompts done, prompts total)
ENGINES = ("transformers", "vllm")


# --- engine ------------------------------------------------------------------------------------------------

def _eos_ids(model: Any, tokenizer: Any) -> set[int]:
    ids: set[int] = set()
    gen_cfg = getattr(model, "generation_config", None)
    for source in (getattr(gen_cfg, "eos_token_id", None), getattr(tokenizer, "eos_token_id", None)):
        if isinstance(source, int):
            ids.add(source)
        elif isinstance(source, (list, tuple)):
            ids.update(int(i) for i in source)
    return ids


def _sample(logits: torch.Tensor, temperature: float, top_p: float, gen: torch.Generator) -> torch.Tensor:
    """(N, V) logits -> (N,) next tokens: argmax at temperature 0, else nucleus sampling."""
    import torch

    if temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)  # (N, V)
    if top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        # drop a token when the mass strictly before it already reaches top_p: the top token always stays
        drop = (sorted_p.cumsum(-1) - sorted_p) >= top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p)
    return torch.multinomial(probs, 1, generator=gen).squeeze(-1)


def generate_ids(model: Any, prompt_ids: Sequence[list[int]], *, num_samples: int = 1, max_new_tokens: int = 64,
                 temperature: float = 1.0, top_p: float = 1.0, seed: int = 0, batch_size: int = 8,
                 eos_ids: set[int] | None = None, pad_id: int = 0,
                 progress: Progress | None = None) -> list[list[tuple[list[int], str]]]:
    """Per prompt, ``num_samples`` (completion ids without EOS, "eos"|"length") tuples.

    ``batch_size`` counts prompts; decode runs ``batch_size * num_samples`` rows. Prompts are batched longest
    first (less padding), each batch with its own generator seeded from (seed, batch index), so the same
    inputs and seed give the same samples.
    """
    import torch

    if num_samples < 1:
        raise InputError(f"invalid value {num_samples!r}: need at least 1 sample", field="num_samples")
    device = next(model.parameters()).device
    eos = torch.tensor(sorted(eos_ids or set()), dtype=torch.long, device=device)
    order = sorted(range(len(prompt_ids)), key=lambda i: -len(prompt_ids[i]))
    out: list[Any] = [None] * len(prompt_ids)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            _decode_batches(model, prompt_ids, order, out, num_samples, max_new_tokens, temperature, top_p, seed,
                            batch_size, eos, pad_id, device, progress)
    finally:
        model.train(was_training)
    return out


def _cache_argument(model: Any) -> str:
    """``cache`` where the model's forward takes it (transformers 5.2x renamed it, and warns on every call for the
    old name), else ``past_key_values`` (older transformers, and architectures not yet renamed)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # peft's forward is (*args, **kw)
    return "cache" if "cache" in inspect.signature(type(base).forward).parameters else "past_key_values"


def _decode_batches(model: Any, prompt_ids: Sequence[list[int]], order: list[int], out: list, k: int,
                    max_new_tokens: int, temperature: float, top_p: float, seed: int, batch_size: int,
                    eos: torch.Tensor, pad_id: int, device: Any, progress: Progress | None) -> None:
    import torch
    from transformers import DynamicCache

    done = 0
    for b, start in enumerate(range(0, len(order), batch_size)):
        idx = order[start:start + batch_size]
        seqs = [prompt_ids[i] for i in idx]
        width = max(len(s) for s in seqs)
        # left padding, so every row's next token goes at the same column
        ids = torch.tensor([[pad_id] * (width - len(s)) + list(s) for s in seqs], device=device)  # (B, T)
        mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in seqs], device=device)  # (B, T)
        pos = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)  # as transformers' generate builds them
        cache = DynamicCache()
        kv = {_cache_argument(model): cache, "use_cache": True}
        logits = model(input_ids=ids, attention_mask=mask, position_ids=pos, logits_to_keep=1,
                       **kv).logits[:, -1, :]  # (B, V)
        # share the prefill: the prompt's KV rows are copied K times into preallocated buffers, never recomputed
        _preallocate(cache, k, width + max_new_tokens)
        if k > 1:
            logits = logits.repeat_interleave(k, dim=0)  # (B·K, V)
            mask = mask.repeat_interleave(k, dim=0)      # (B·K, T)
        last_pos = pos[:, -1].repeat_interleave(k)       # (B·K,)
        gen = torch.Generator(device=device).manual_seed(seed * 1_000_003 + b)
        rows = logits.shape[0]
        tokens = torch.full((rows, max_new_tokens), pad_id, dtype=torch.long, device=device)  # (B·K, N)
        finished = torch.zeros(rows, dtype=torch.bool, device=device)
        lengths = torch.full((rows,), max_new_tokens, dtype=torch.long, device=device)
        for t in range(max_new_tokens):
            nxt = _sample(logits, temperature, top_p, gen).masked_fill(finished, pad_id)  # (B·K,)
            tokens[:, t] = nxt
            hit = torch.isin(nxt, eos) & ~finished if eos.numel() else torch.zeros_like(finished)
            lengths = torch.where(hit, torch.full_like(lengths, t), lengths)
            finished |= hit
            if bool(finished.all()) or t == max_new_tokens - 1:
                break
            mask = torch.cat([mask, torch.ones((rows, 1), dtype=mask.dtype, device=device)], dim=1)
            last_pos = last_pos + 1
            logits = model(input_ids=nxt[:, None], attention_mask=mask, position_ids=last_pos[:, None],
                           **kv).logits[:, -1, :]  # (B·K, V)
        tokens_l, lengths_l, finished_l = tokens.tolist(), lengths.tolist(), finished.tolist()
        for j, i in enumerate(idx):
            out[i] = [(tokens_l[r][:lengths_l[r]], "eos" if finished_l[r] else "length")
                      for r in range(j * k, (j + 1) * k)]
        done += len(idx)
        if progress:
            progress(done, len(prompt_ids))


def _preallocate(cache: Any, k: int, capacity: int) -> None:
    """Swap each plain DynamicLayer for one whose keys/values live in a buffer of ``capacity`` positions, each
    prompt's rows repeated ``k`` times. DynamicLayer concatenates on every step, copying the whole cache (at
    long prompts, most of a decode step's time); here a step writes one position and returns a view.
    Other layer types (sliding windows, linear attention) are only repeated."""
    from transformers.cache_utils import DynamicLayer

    for i, layer in enumerate(cache.layers):
        if type(layer) is DynamicLayer and layer.is_initialized and layer.keys.numel():
            cache.layers[i] = _buffer_layer_class()(layer.keys, layer.values, k, capacity)
        else:
            layer.batch_repeat_interleave(k)


@functools.cache
def _buffer_layer_class() -> type:
    """A DynamicLayer backed by preallocated (B·K, H, capacity, d) buffers; the class is built on first use so
    that importing this module (the CLI parser does) does not import transformers."""
    from transformers.cache_utils import DynamicLayer

    class BufferLayer(DynamicLayer):
        def __init__(self, keys: Any, values: Any, k: int, capacity: int) -> None:
            super().__init__()
            b, h, t, d = keys.shape  # (B, H, T, d) from the prefill
            self.dtype, self.device, self.is_initialized = keys.dtype, keys.device, True
            self.buf_k = keys.new_empty(b * k, h, capacity, d)  # (B·K, H, C, d)
            self.buf_v = values.new_empty(b * k, h, capacity, values.shape[-1])
            # rows j*K .. j*K+K-1 belong to prompt j, as repeat_interleave orders them: one broadcast copy
            self.buf_k.view(b, k, h, capacity, d)[:, :, :, :t] = keys[:, None]
            self.buf_v.view(b, k, h, capacity, values.shape[-1])[:, :, :, :t] = values[:, None]
            self.n = t
            self.keys, self.values = self.buf_k[:, :, :t], self.buf_v[:, :, :t]

        def update(self, key_states: Any, value_states: Any, *args: Any, **kwargs: Any) -> tuple[Any, Any]:
            t = key_states.shape[-2]
            self.buf_k[:, :, self.n:self.n + t] = key_states
            self.buf_v[:, :, self.n:self.n + t] = value_states
            self.n += t
            self.keys, self.values = self.buf_k[:, :, :self.n], self.buf_v[:, :, :self.n]  # views, no copy
            return self.keys, self.values

    return BufferLayer


def check_context(model: Any, rows: Sequence[PromptRow], ids: Sequence[list[int]], max_new_tokens: int) -> None:
    """A prompt that leaves no room for ``max_new_tokens`` in the model's context is bad input (file:line)."""
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if not limit:
        return
    room = limit - max_new_tokens
    for r, p in zip(rows, ids):
        if len(p) > room:
            raise InputError(f"prompt is {len(p)} tokens; the model's context ({limit}) minus max_new_tokens "
                             f"({max_new_tokens}) leaves {max(room, 0)}", path=r.source, line=r.line, field="prompt")


def as_rows(prompts: Sequence[PromptRow | Content]) -> list[PromptRow]:
    """Accept PromptRow objects or bare prompts (strings / message lists) from Python callers."""
    return [p if isinstance(p, PromptRow) else PromptRow(f"prompt:{i}", p, "prompt", i) for i, p in enumerate(prompts)]


def generate(model: Any, tokenizer: Any, prompts: Sequence[PromptRow | Content], *, num_samples: int = 1,
             max_new_tokens: int = 64, temperature: float = 1.0, top_p: float = 1.0, seed: int = 0,
             batch_size: int = 8, progress: Progress | None = None, apply_chat_template: bool = False,
             prompt_ids: Sequence[list[int]] | None = None) -> list[dict]:
    """One row per prompt: ``{"id", "prompt", "completions", "finish_reasons", "completion_tokens"}``.

    ``prompt_ids`` (already tokenized prompts, e.g. training's held-out pairs) skips the encoding.

        rows = generate(model, tok, ["sort: 3 1 2 ="], num_samples=4, temperature=0.8, seed=0)
    """
    check_sampling(num_samples, max_new_tokens, temperature, top_p, batch_size)
    rows = as_rows(prompts)
    ids = list(prompt_ids) if prompt_ids is not None else encode_prompts(rows, tokenizer,
                                                                          apply_chat_template=apply_chat_template)
    check_context(model, rows, ids, max_new_tokens)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    samples = generate_ids(model, ids, num_samples=num_samples, max_new_tokens=max_new_tokens,
                           temperature=temperature, top_p=top_p, seed=seed, batch_size=batch_size,
                           eos_ids=_eos_ids(model, tokenizer), pad_id=pad, progress=progress)
    return [{"id": r.id, "prompt": r.prompt,
             "completions": [tokenizer.decode(c, skip_special_tokens=True) for c, _ in s],
             "finish_reasons": [f for _, f in s], "completion_tokens": [len(c) for c, _ in s]}
            for r, s in zip(rows, samples)]


def check_sampling(num_samples: int, max_new_tokens: int, temperature: float, top_p: float,
                    batch_size: int) -> None:
    """Sampling settings out of range are bad input, one line naming the field."""
    checks = [("num_samples", num_samples >= 1, num_samples), ("max_new_tokens", max_new_tokens >= 1, max_new_tokens),
              ("temperature", math.isfinite(temperature) and temperature >= 0, temperature),
              ("top_p", 0 < top_p <= 1, top_p), ("batch_size", batch_size >= 1, batch_size)]
    for name, ok, value in checks:
        if not ok:
            raise InputError(f"invalid value {value!r}", field=name)


def generate_vllm(model_path: str, tokenizer: Any, rows: Sequence[PromptRow], ids: Sequence[list[int]], *,
                  adapter: str | None, num_samples: int, max_new_tokens: int, temperature: float, top_p: float,
                  seed: int, dtype: str) -> list[dict]:
    """The same rows through vLLM (GPU only); prompts go in as token ids so both engines see the same input."""
    from vllm import LLM, SamplingParams  # type: ignore[import-not-found]

    llm = LLM(model=model_path, dtype=dtype, seed=seed, enable_lora=adapter is not None)
    params = SamplingParams(n=num_samples, temperature=temperature, top_p=top_p, max_tokens=max_new_tokens,
                            seed=seed)
    kw: dict[str, Any] = {}
    if adapter:
        from vllm.lora.request import LoRARequest  # type: ignore[import-not-found]

        kw["lora_request"] = LoRARequest("adapter", 1, adapter)
    outs = llm.generate([{"prompt_token_ids": p} for p in ids], params, **kw)
    return [{"id": r.id, "prompt": r.prompt, "completions": [c.text for c in o.outputs],
             "finish_reasons": ["length" if c.finish_reason == "length" else "eos" for c in o.outputs],
             "completion_tokens": [len(c.token_ids) for c in o.outputs]} for r, o in zip(rows, outs)]


def check_engine(engine: str, device: str) -> None:
    if engine not in ENGINES:
        raise InputError(f"{engine!r} is not one of {', '.join(ENGINES)}", field="engine")
    if engine == "vllm":
        import importlib.util

        import torch

        if importlib.util.find_spec("vllm") is None:
            raise InputError("vllm is not installed (pip install 'preftune[vllm]'); use --engine transformers",
                             field="engine")
        if not torch.cuda.is_available() or device == "cpu":
            raise InputError("vllm needs a CUDA GPU; use --engine transformers", field="engine")
