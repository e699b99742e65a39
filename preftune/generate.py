"""Sample completions: batched, KV-cached, each prompt prefilled once and its cache shared by its K samples.

    preftune generate --model M [--adapter A] --prompts heldout.jsonl --num-samples 4 --max-new-tokens 64 \
        --temperature 0.8 --top-p 0.95 --seed 0 --output samples.jsonl \
        [--judge python:preftune.tinyworld:judge --pairs pairs.jsonl --min-gap 0.1]

transformers' ``generate(num_return_sequences=K)`` copies every prompt K times *before* the prefill, so the
prompt is processed K times. Here a batch of prompts is prefilled once, then the cache rows are repeated K
times (``DynamicCache.batch_repeat_interleave``) and only the decode steps run at width B·K.
Temperature 0 is greedy and equals ``model.generate(do_sample=False)`` token for token.
"""

from __future__ import annotations

import argparse
import math
import os
import random
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from .data import Content, PromptRow, encode_prompts
from .errors import InputError

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
    eos = torch.tensor(sorted(eos_ids or set()), dtype=torch.long)
    device = next(model.parameters()).device
    eos = eos.to(device)
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
        logits = model(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=cache,
                       use_cache=True, logits_to_keep=1).logits[:, -1, :]  # (B, V)
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
            nxt = _sample(logits, temperature, top_p, gen)  # (B·K,)
            nxt = nxt.masked_fill(finished, pad_id)
            tokens[:, t] = nxt
            hit = torch.isin(nxt, eos) & ~finished if eos.numel() else torch.zeros_like(finished)
            lengths = torch.where(hit, torch.full_like(lengths, t), lengths)
            finished |= hit
            if bool(finished.all()) or t == max_new_tokens - 1:
                break
            mask = torch.cat([mask, torch.ones((rows, 1), dtype=mask.dtype, device=device)], dim=1)
            last_pos = last_pos + 1
            logits = model(input_ids=nxt[:, None], attention_mask=mask, position_ids=last_pos[:, None],
                           past_key_values=cache, use_cache=True).logits[:, -1, :]  # (B·K, V)
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


def _buffer_layer_class() -> type:
    """A DynamicLayer backed by preallocated (B·K, H, capacity, d) buffers; the class is built on first use so
    that importing this module (the CLI parser does) does not import transformers."""
    global _BUFFER_LAYER
    if _BUFFER_LAYER is not None:
        return _BUFFER_LAYER
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

    _BUFFER_LAYER = BufferLayer
    return BufferLayer


_BUFFER_LAYER: type | None = None


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
    _check_sampling(num_samples, max_new_tokens, temperature, top_p, batch_size)
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


def _check_sampling(num_samples: int, max_new_tokens: int, temperature: float, top_p: float,
                    batch_size: int) -> None:
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


# --- pairs -------------------------------------------------------------------------------------------------

# (chosen index, rejected index) among one prompt's usable completions, from their scores
PAIR_RULES: dict[str, Callable[[list[float], random.Random], tuple[int, int]]] = {
    "max_min": lambda s, rng: (max(range(len(s)), key=s.__getitem__), min(range(len(s)), key=s.__getitem__)),
    "max_random": lambda s, rng: (max(range(len(s)), key=s.__getitem__), rng.randrange(len(s))),
    "best_vs_second": lambda s, rng: tuple(sorted(range(len(s)), key=lambda i: -s[i])[:2]),  # type: ignore[dict-item]
}


def make_pairs(rows: Sequence[dict], *, min_gap: float = 0.0, rule: str = "max_min",
               seed: int = 0) -> tuple[list[dict], dict]:
    """Preference pairs from scored samples: ``max_min`` (best vs worst, SimPO's on-policy recipe and the
    default), ``max_random`` or ``best_vs_second`` (RLHFlow's rules). Returns (pairs, stats).

    Dropped, and counted: prompts whose completions are all identical ("identical"), prompts with fewer than
    two non-blank completions ("empty": an immediate EOS can't be a training completion), and prompts whose
    picked completions tie, are the same text, or differ by less than ``min_gap`` ("gap").
    """
    rng = random.Random(seed)
    pairs, dropped = [], {"identical": 0, "empty": 0, "gap": 0}
    for r in rows:
        if len(set(r["completions"])) <= 1:
            dropped["identical"] += 1
            continue
        usable = [(c, s) for c, s in zip(r["completions"], r["scores"]) if c.strip()]
        if len(usable) < 2:
            dropped["empty"] += 1
            continue
        comps, scores = [c for c, _ in usable], [s for _, s in usable]
        best, worst = PAIR_RULES[rule](scores, rng)  # first of equal scores: stable
        gap = scores[best] - scores[worst]
        if gap <= 0 or gap < min_gap or comps[best] == comps[worst]:
            dropped["gap"] += 1
            continue
        chosen, rejected = comps[best], comps[worst]
        if isinstance(r["prompt"], list):  # conversational prompt: completions as assistant turns
            chosen = [{"role": "assistant", "content": chosen}]
            rejected = [{"role": "assistant", "content": rejected}]
        pairs.append({"prompt": r["prompt"], "chosen": chosen, "rejected": rejected,
                      "chosen_score": scores[best], "rejected_score": scores[worst]})
    stats = {"prompts": len(rows), "pairs": len(pairs), "dropped": dropped, "min_gap": min_gap, "rule": rule}
    return pairs, stats


def score_rows(rows: list[dict], judge: Any) -> None:
    """Add ``scores`` to each row. A pairwise judge scores each completion by its mean preference over the
    others of the same prompt (round robin, ties one half)."""
    from .data import as_text

    if judge.kind == "pointwise":
        flat_p = [r["prompt"] for r in rows for _ in r["completions"]]
        flat_c = [c for r in rows for c in r["completions"]]
        scores = judge.score(flat_p, flat_c)
        it = iter(scores)
        for r in rows:
            r["scores"] = [next(it) for _ in r["completions"]]
        return
    asks = [(ri, i, j) for ri, r in enumerate(rows) for i in range(len(r["completions"]))
            for j in range(i + 1, len(r["completions"]))]
    prefs = judge.compare([as_text(rows[ri]["prompt"]) for ri, _, _ in asks],
                          [rows[ri]["completions"][i] for ri, i, _ in asks],
                          [rows[ri]["completions"][j] for ri, _, j in asks])
    for r in rows:
        r["scores"] = [0.0] * len(r["completions"])
    for (ri, i, j), p in zip(asks, prefs):
        k = len(rows[ri]["completions"]) - 1
        rows[ri]["scores"][i] += p / k
        rows[ri]["scores"][j] += (1 - p) / k


# --- CLI ---------------------------------------------------------------------------------------------------

def add_arguments(p: argparse.ArgumentParser) -> None:
    """Flags of ``preftune generate``."""
    p.add_argument("--model", required=True, help="folder or hub id (AutoModelForCausalLM)")
    p.add_argument("--tokenizer", help="defaults to --model")
    p.add_argument("--adapter", help="a peft adapter folder (e.g. runs/x/adapter)")
    p.add_argument("--prompts", required=True, help="any data file preftune reads; its `prompt` field is used")
    p.add_argument("--prompts-split", default="train", help="split for .json dicts and datasets sources")
    p.add_argument("--apply-chat-template", action="store_true", help="wrap string prompts as a user turn")
    p.add_argument("--num-samples", type=int, default=4, help="completions per prompt (K)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=8, help="prompts per batch (decode rows = this x K)")
    p.add_argument("--output", required=True, help="samples JSONL, one row per prompt")
    p.add_argument("--judge", help="reward-model:PATH | python:module:function | openai:MODEL@BASE_URL")
    p.add_argument("--pairs", help="also write best-vs-worst prompt/chosen/rejected pairs here (needs --judge)")
    p.add_argument("--min-gap", type=float, default=0.0, help="drop prompts whose best-worst score gap is below")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--device", default="auto")
    p.add_argument("--engine", default="transformers", help="transformers (default) | vllm (GPU, if installed)")


def progress_printer(total: int, label: str = "generate") -> tuple[Progress, Callable[[], None]]:
    """A tqdm bar on a terminal (stderr); plain lines on stdout (about every 10%) in CI or without a terminal."""
    if sys.stderr.isatty() and not os.environ.get("CI"):
        from tqdm.auto import tqdm

        bar = tqdm(total=total, desc=label, unit="prompt", file=sys.stderr)

        def update(done: int, _total: int) -> None:
            bar.update(done - bar.n)

        return update, bar.close
    step = max(1, total // 10)
    last = [0]

    def line(done: int, _total: int) -> None:
        if done - last[0] >= step or done == _total:
            last[0] = done
            print(f"[{label}] {done}/{_total} prompts", flush=True)  # a log line, like training's: stdout

    return line, lambda: None


def main(args: argparse.Namespace) -> int:
    """``preftune generate``: validate everything, generate, judge, then write every output at once."""
    from .config import Config
    from .data import load_prompts
    from .files import atomic_write_json, write_jsonl
    from .judges import parse_judge
    from .model import load_model, load_tokenizer

    _check_sampling(args.num_samples, args.max_new_tokens, args.temperature, args.top_p, args.batch_size)
    if args.min_gap < 0 or not math.isfinite(args.min_gap):
        raise InputError(f"invalid value {args.min_gap!r}", field="min_gap")
    if args.pairs and not args.judge:
        raise InputError("--pairs needs a --judge to rank completions", field="pairs")
    if args.pairs and args.num_samples < 2:
        raise InputError("--pairs needs --num-samples of at least 2", field="pairs")
    cfg = Config(model=args.model, tokenizer=args.tokenizer, dtype=args.dtype, device=args.device)
    if not (cfg.device in ("auto", "cpu", "mps") or cfg.device.split(":")[0] == "cuda"):
        raise InputError(f"{cfg.device!r} is not one of auto, cpu, cuda, cuda:N, mps", field="device")
    check_engine(args.engine, cfg.resolved_device())
    judge = parse_judge(args.judge, device=cfg.resolved_device()) if args.judge else None
    rows_in = load_prompts(args.prompts, args.prompts_split)
    tok = load_tokenizer(cfg)
    ids = encode_prompts(rows_in, tok, apply_chat_template=args.apply_chat_template)
    kw = dict(num_samples=args.num_samples, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
              top_p=args.top_p, seed=args.seed)
    if args.engine == "vllm":
        from transformers import AutoConfig

        check_context(AutoConfig.from_pretrained(args.model), rows_in, ids, args.max_new_tokens)
        rows = generate_vllm(args.model, tok, rows_in, ids, adapter=args.adapter, dtype=args.dtype, **kw)
    else:
        model = load_model(cfg)
        check_context(model, rows_in, ids, args.max_new_tokens)
        if args.adapter:
            model = load_adapter(model, args.adapter)
        update, close = progress_printer(len(rows_in))
        try:
            rows = generate(model, tok, rows_in, batch_size=args.batch_size, progress=update,
                            apply_chat_template=args.apply_chat_template, **kw)
        finally:
            close()
    if judge is not None:
        score_rows(rows, judge)
    out_rows = [{"id": r["id"], "prompt": r["prompt"], "completions": r["completions"],
                 **({"scores": r["scores"]} if "scores" in r else {}), "finish_reasons": r["finish_reasons"]}
                for r in rows]
    pairs = stats = None
    if args.pairs:
        pairs, stats = make_pairs(rows, min_gap=args.min_gap)
    # every check passed and every judge answered: only now write, each file atomically
    write_jsonl(args.output, out_rows)
    n = sum(len(r["completions"]) for r in rows)
    print(f"generate: {n} completions for {len(rows)} prompts -> {args.output}")
    if pairs is not None and stats is not None:
        write_jsonl(args.pairs, pairs)
        atomic_write_json(f"{args.pairs}.stats.json", stats)
        d = stats["dropped"]
        print(f"pairs: {stats['pairs']} of {stats['prompts']} prompts -> {args.pairs} (dropped: {d['identical']} "
              f"with identical completions, {d['gap']} with a score gap below {args.min_gap} or none)")
    return 0


def load_adapter(model: Any, adapter: str) -> Any:
    from peft import PeftModel

    try:
        return PeftModel.from_pretrained(model, adapter)
    except Exception as e:  # peft raises ValueError/OSError/... for a wrong folder: one line
        text = (str(e).strip() or type(e).__name__).splitlines()[0]
        raise InputError(f"cannot load adapter: {text}", path=adapter, field="adapter") from None
