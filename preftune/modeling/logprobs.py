"""Per-sequence log-probs: the one place where logits become the numbers objectives see.

Two paths that give the same numbers (tested to 1e-5 in fp32):

* ``sequence_logps(logits, labels, mask)`` — the plain helper: shift, gather, mask prompt and padding,
  sum and count. Used for testing and as the definition.
* ``batch_logps(model, batch)`` — the fast path used in training and evaluation: prefix sharing
  (``share_prompt``) and the LM head on completion positions only, in chunks (docs/speed.md, Levers); the
  plain layout where sharing can't be exact (``prefix_sharing_blocker``; docs/architectures.md).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from ..core.progress import tick
from .precision import SDPA_FP32

# Above this many logits in one chunk, recompute the chunk in backward instead of keeping it (large vocabs).
_CHECKPOINT_LOGITS = 1 << 25


def sequence_logps(logits: Tensor, labels: Tensor, loss_mask: Tensor) -> tuple[Tensor, Tensor]:
    """Summed log-probs (B,) and token counts (B,), fp32, of the completion tokens (``loss_mask`` True).

    Position t's logits score token t+1, so the shift drops the first label and the last logit.
    """
    logits = logits[:, :-1].float()                      # (B, T-1, V)
    labels = labels[:, 1:]                               # (B, T-1)
    mask = loss_mask[:, 1:].float()                      # (B, T-1)
    logp = torch.log_softmax(logits, dim=-1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (logp * mask).sum(-1), mask.sum(-1)


@dataclasses.dataclass
class Batch:
    """Pairs laid out for one forward pass. Sequence k < n is pair k's chosen, n + k its rejected."""

    input_ids: Tensor        # (R, L)
    position_ids: Tensor     # (R, L)
    attention_mask: Tensor   # (R, 1, L, L) bool when sharing the prompt, else (R, L) padding mask
    src: Tensor              # (M,) flat index into R*L of the hidden state that predicts each target
    targets: Tensor          # (M,) target token ids
    seq: Tensor              # (M,) which of the 2n sequences each target belongs to
    n_pairs: int
    real_tokens: int         # non-pad positions run through the model
    padded_tokens: int       # R * L

    def to(self, device: torch.device | str) -> Batch:
        moved = {k: v.to(device) for k, v in vars(self).items() if isinstance(v, Tensor)}
        return dataclasses.replace(self, **moved)


def make_batch(prompts: Sequence[Sequence[int]], chosen: Sequence[Sequence[int]],
               rejected: Sequence[Sequence[int]], pad_id: int, share_prompt: bool = True) -> Batch:
    """Lay out n pairs as n shared rows (``share_prompt``) or 2n plain rows (prompt+chosen, prompt+rejected).

    Run: ``make_batch([[1]], [[2]], [[3]], 0)``.
    """
    n = len(prompts)
    if share_prompt:
        rows = [list(p) + list(c) + list(r) for p, c, r in zip(prompts, chosen, rejected)]
    else:
        rows = [list(p) + list(c) for side in (chosen, rejected) for p, c in zip(prompts, side)]
    L = max(len(x) for x in rows)
    input_ids = torch.full((len(rows), L), pad_id, dtype=torch.long)
    for i, x in enumerate(rows):
        input_ids[i, :len(x)] = torch.tensor(x, dtype=torch.long)
    hits: list[tuple[int, int, int]] = []  # (flat index of the predicting position, target, sequence)

    def predict(row: int, at: Sequence[int], tokens: Sequence[int], s: int) -> None:
        # Token j of sequence s is predicted by position at[j] of its row. With no prompt the first token has
        # no predictor (position -1) and is skipped, as in TRL's shifted loss.
        hits.extend((row * L + a, token, s) for a, token in zip(at, tokens) if a >= 0)

    if share_prompt:
        pos = torch.zeros(n, L, dtype=torch.long)
        block = torch.full((n, L), 3, dtype=torch.long)  # 0 prompt, 1 chosen, 2 rejected, 3 pad
        for i, (p, c, r) in enumerate(zip(prompts, chosen, rejected)):
            P, C, R = len(p), len(c), len(r)
            pos[i, :P + C] = torch.arange(P + C)
            pos[i, P + C:P + C + R] = torch.arange(P, P + R)   # rejected continues right after the prompt
            block[i, :P], block[i, P:P + C], block[i, P + C:P + C + R] = 0, 1, 2
            predict(i, range(P - 1, P + C - 1), c, i)
            predict(i, [P - 1, *range(P + C, P + C + R - 1)], r, n + i)  # token 0 by the prompt's last too
        q, k = block.unsqueeze(2), block.unsqueeze(1)                       # (n, L, 1), (n, 1, L)
        causal = torch.ones(L, L, dtype=torch.bool).tril()
        mask = causal & (k != 3) & ~((q == 2) & (k == 1))                 # (n, L, L)
        mask |= torch.eye(L, dtype=torch.bool) & (q == 3)                  # pad rows see themselves: no NaN
        attn = mask.unsqueeze(1)
    else:
        for s, (x, c) in enumerate(zip(rows, list(chosen) + list(rejected))):
            predict(s, range(len(x) - len(c) - 1, len(x) - 1), c, s)
        pos = torch.arange(L).expand(2 * n, L).clone()
        attn = (pos < torch.tensor([[len(x)] for x in rows])).long()
    src, targets, seq = torch.tensor(hits, dtype=torch.long).reshape(-1, 3).T.contiguous()
    return Batch(input_ids, pos, attn, src, targets, seq, n, sum(len(x) for x in rows), len(rows) * L)


def _chunk_logps(head: torch.nn.Module, hidden: Tensor, targets: Tensor, softcap: float | None,
                 scale: float | None, sumsq: bool = False) -> Tensor:
    logits = head(hidden).float()                        # (m, V)
    if scale is not None:
        logits = logits * scale
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    lse = torch.logsumexp(logits, dim=-1)
    logp = logits.gather(1, targets.unsqueeze(1)).squeeze(1) - lse
    if not sumsq:
        return logp                                      # (m,)
    with torch.no_grad():  # log Σ_v p_v² = logsumexp(2·logits) − 2·logsumexp(logits) (WPO's weight; TRL's kernel)
        sq = torch.logsumexp(2 * logits, dim=-1) - 2 * lse
    return torch.stack([logp, sq])                       # (2, m)


def token_logps(head: torch.nn.Module, hidden: Tensor, targets: Tensor, chunk: int = 1024,
                softcap: float | None = None, scale: float | None = None, sumsq: bool = False) -> Tensor:
    """Log-prob of each target token from its predicting hidden state: hidden (M, H), targets (M,) -> (M,) fp32.
    ``sumsq``: (2, M), row 1 the token's log Σ_v p_v² (no gradient), from the same logits."""
    out = []
    vocab = head.weight.shape[0] if hasattr(head, "weight") else 0
    for i in range(0, hidden.shape[0], chunk):
        h = hidden[i:i + chunk]
        args = (head, h, targets[i:i + chunk], softcap, scale, sumsq)
        big = torch.is_grad_enabled() and h.shape[0] * vocab > _CHECKPOINT_LOGITS
        out.append(checkpoint(_chunk_logps, *args, use_reentrant=False) if big else _chunk_logps(*args))
    if not out:
        return hidden.new_zeros((2, 0) if sumsq else (0,), dtype=torch.float32)
    return torch.cat(out, dim=-1)


def shared_mask(batch: Batch) -> Tensor:
    """(M,) True for the targets among the first min(|c|, |r|) completion tokens of their pair (LD-DPO's shared
    part, counted as TRL counts: predicted completion tokens). make_batch appends each sequence's targets
    contiguously and in order, so a target's rank in its sequence is its index minus the sequence's first."""
    n_seq, m = 2 * batch.n_pairs, batch.seq.numel()
    counts = torch.bincount(batch.seq, minlength=n_seq)                                      # (2n,)
    shared = torch.minimum(counts[:batch.n_pairs], counts[batch.n_pairs:]).repeat(2)          # (2n,)
    idx = torch.arange(m, device=batch.seq.device)
    first = torch.full((n_seq,), m, device=idx.device).scatter_reduce(0, batch.seq, idx, "amin")
    return (idx - first[batch.seq]) < shared[batch.seq]


def cut_to_shared(pairs: Sequence) -> list:
    """Each pair with both completions cut to min(|c|, |r|) tokens: scoring these gives the shared-part sums
    (LD-DPO) through the plain path, as the reference pass does. (With no prompt the first completion token is
    predicted on neither path, and the shared part is the same.)"""
    def cut(p: Any) -> Any:
        k = min(len(p.chosen_ids), len(p.rejected_ids))
        return dataclasses.replace(p, chosen_ids=list(p.chosen_ids[:k]), rejected_ids=list(p.rejected_ids[:k]))

    return [cut(p) for p in pairs]


def with_shared_cuts(pairs: Sequence, needs: Sequence[str]) -> list:
    """The pairs as held-out scoring and its reference score them: when the shared-part sums are needed
    (LD-DPO), each pair whole and then each cut to its shared part (rows N..), one list so both are batched
    alike in the policy's pass and the reference's (their step-0 tie stays exact)."""
    return list(pairs) + cut_to_shared(pairs) if "shared" in needs else list(pairs)


# Attention implementations that take the prefix-sharing mask: SDPA a 4D bool tensor, eager an additive
# float one, flex a BlockMask (a float tensor there crashed torch 2.13's CPU kernel). Anything else
# (flash_attention_*, hub kernels) takes no custom mask and gets the plain layout.
_BOOL_MASK = ("sdpa", SDPA_FP32)
_FLOAT_MASK = ("eager",)
_BLOCK_MASK = ("flex_attention",)
_LAYER_TYPES = {"full_attention", "sliding_attention"}


def prefix_sharing_blocker(model: torch.nn.Module) -> str | None:
    """Why sharing the prompt can't give this model's exact numbers, or None when it can.

    The one capability check: score_pairs and the training loop fall back to the plain layout (two rows per
    pair) whenever it names a reason, so numbers never depend on ``share_prompt``.

        >>> prefix_sharing_blocker(load_model(cfg)) is None
    """
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    cfg = lm.config
    impl = getattr(cfg, "_attn_implementation", None) or "eager"
    if impl not in _BOOL_MASK + _FLOAT_MASK + _BLOCK_MASK:
        return f"{impl} attention takes no custom 4D mask"
    if getattr(cfg, "alibi", False) or getattr(cfg, "model_type", "") in ("bloom", "mpt"):
        # ALiBi biases by token index, not position id: rejected would sit C tokens too far from the prompt
        return "ALiBi position bias follows the token index, not position ids"
    types = set(getattr(cfg, "layer_types", None) or ())
    if types - _LAYER_TYPES:
        return f"layer types {sorted(types - _LAYER_TYPES)} need masks of their own"
    if _sliding_window(cfg) is not None and len(types) > 1 and not _takes_mask_per_layer_type(lm.get_decoder()):
        return "sliding and full-attention layers need two masks and this decoder takes one"
    return None


def _sliding_window(cfg: object) -> int | None:
    """The window of the sliding layers (if any layer slides)."""
    window = getattr(cfg, "sliding_window", None)
    types = getattr(cfg, "layer_types", None)
    if not window or (types is not None and "sliding_attention" not in types):
        return None  # e.g. Qwen2 without use_sliding_window keeps sliding_window None
    return int(window)


def _takes_mask_per_layer_type(decoder: torch.nn.Module) -> bool:
    """Decoders with mixed layers (Gemma-2/3, Qwen2/3) accept ``{layer_type: 4D mask}`` as attention_mask."""
    import inspect

    try:
        return "causal_mask_mapping" in inspect.getsource(type(decoder).forward)
    except (OSError, TypeError):
        return False


def _mask_for(model: torch.nn.Module, batch: Batch, dtype: torch.dtype) -> Tensor | dict[str, Tensor]:
    """The attention mask the decoder gets: the 2D padding mask as is (transformers builds causal and sliding
    masks from it), or the 4D prefix-sharing mask made exact for this model.

    Sliding-window layers (Mistral, Gemma-2/3) see a key only if it is less than ``window`` positions back,
    where a position is the index in the plain layout, i.e. ``position_ids``; transformers can't derive
    that from a custom mask, so it is applied here. Mixed models get one mask per layer type. SDPA takes
    bool (True = attend), eager adds a float mask, flex takes a BlockMask.
    """
    mask = batch.attention_mask
    if mask.dim() != 4:
        return mask
    cfg = model.config
    masks = {"full_attention": mask}
    window = _sliding_window(cfg)
    if window is not None and int(batch.position_ids.max()) >= window:  # else no query reaches past the window
        pos = batch.position_ids
        near = (pos.unsqueeze(2) - pos.unsqueeze(1)) < window           # (R, L, L): q - k < window
        masks = {"sliding_attention": mask & near.unsqueeze(1)}         # (R, 1, L, L)
        if "full_attention" in (getattr(cfg, "layer_types", None) or ()):
            masks["full_attention"] = mask
    impl = getattr(cfg, "_attn_implementation", None)
    if impl in _FLOAT_MASK:
        masks = {k: torch.zeros(m.shape, dtype=dtype, device=m.device).masked_fill(~m, torch.finfo(dtype).min)
                 for k, m in masks.items()}
    elif impl in _BLOCK_MASK:
        masks = {k: _block_mask(m) for k, m in masks.items()}
    return masks if len(masks) > 1 else next(iter(masks.values()))


def _block_mask(mask: Tensor) -> object:
    """(R, 1, L, L) bool -> flex attention BlockMask with the same True = attend entries."""
    from torch.nn.attention.flex_attention import create_block_mask

    m = mask[:, 0]                                                       # (R, L, L)
    R, L, _ = m.shape
    return create_block_mask(lambda b, h, q, k: m[b, q, k], R, None, L, L, device=str(m.device))


# Graphs dynamo may keep for the decoder before it falls back to eager (torch's default is 8). A matrix's
# cells share the base model's decoder and each LoRA rank is a graph of its own, as is each row count.
RECOMPILE_LIMIT = 64


def compiled_decoder(decoder: torch.nn.Module) -> torch.nn.Module:
    """``torch.compile(decoder)``, made once per decoder and kept on it.

    Stored in the instance ``__dict__``, not as a submodule: a registered child would enter ``state_dict``
    and the saved adapter. Call it through ``_run_compiled``, which makes the sequence length dynamic.
    Run: ``compiled_decoder(model.get_decoder())``.
    """
    if "_preftune_compiled" not in decoder.__dict__:
        decoder.__dict__["_preftune_compiled"] = torch.compile(decoder)
    return decoder.__dict__["_preftune_compiled"]


def _run_compiled(decoder: torch.nn.Module, input_ids: Tensor, attention_mask: Tensor | dict[str, Tensor],
                  position_ids: Tensor) -> Any:
    """The compiled decoder's output, with every length dimension of its inputs dynamic from the first call.

    Static shapes compiled one graph per row length (10-30 s each for the benchmark model on 2 cores), and
    dynamo's recompile limit then sent every later length back to eager without a word. One graph with a
    symbolic length ran the steady step within noise of a static one (bench/README.md).
    """
    length = input_ids.shape[1]
    masks = list(attention_mask.values()) if isinstance(attention_mask, dict) else [attention_mask]
    for t in (input_ids, position_ids, *masks):
        for dim in range(1, t.dim()):  # (R, L), (R, L), (R, 1, L, L): never the rows
            if t.shape[dim] == length:
                torch._dynamo.maybe_mark_dynamic(t, dim)
    limit = "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"
    with torch._dynamo.config.patch(**{limit: max(RECOMPILE_LIMIT, getattr(torch._dynamo.config, limit))}):
        return compiled_decoder(decoder)(input_ids=input_ids, attention_mask=attention_mask,
                                         position_ids=position_ids, use_cache=False)


def compiled_graphs() -> int:
    """Graphs dynamo has compiled in this process so far (torch's own counter): a step that raised it compiled."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def batch_logps(model: torch.nn.Module, batch: Batch, *, chunk: int = 1024, autocast_bf16: bool = False,
                compile: bool = False, needs: Sequence[str] = ()) -> tuple[Tensor, ...]:
    """Summed completion log-probs and token counts of every sequence in ``batch``.

    ``model`` is a transformers causal LM, possibly wrapped by peft. Returns (logps (2n,), counts (2n,)),
    fp32, chosen first: ``logps[:n]`` are the chosen sequences, ``logps[n:]`` the rejected ones.
    ``compile`` runs the decoder through ``compiled_decoder`` (equal to eager to 1e-5 in fp32).

    ``needs`` (an objective's, ``objectives.needs``) asks for more per-sequence sums from the same forward, and
    adds a third item, {need: (2n,)}: ``shared`` the sum over each pair's first min(|c|, |r|) completion tokens
    (LD-DPO, with gradient), ``sumsq`` the sum of log Σ_v p_v² over the completion (WPO, without).
    """
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder, head = lm.get_decoder(), lm.get_output_embeddings()
    device = head.weight.device
    batch = batch.to(device)
    dtype = head.weight.dtype
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast_bf16):
        mask = _mask_for(lm, batch, dtype)
        if compile:
            out = _run_compiled(decoder, batch.input_ids, mask, batch.position_ids)
        else:
            out = decoder(input_ids=batch.input_ids, attention_mask=mask, position_ids=batch.position_ids,
                          use_cache=False)
        hidden = out.last_hidden_state                                                           # (R, L, H)
        hidden = hidden.reshape(-1, hidden.shape[-1]).index_select(0, batch.src)               # (M, H)
        cfg = lm.config
        logp = token_logps(head, hidden, batch.targets, chunk,
                           softcap=getattr(cfg, "final_logit_softcapping", None),
                           scale=getattr(cfg, "logit_scale", None), sumsq="sumsq" in needs)     # (M,) or (2, M)
    n_seq = 2 * batch.n_pairs

    def per_seq(values: Tensor) -> Tensor:                                                      # (M,) -> (2n,)
        return torch.zeros(n_seq, dtype=torch.float32, device=device).index_add(0, batch.seq, values.float())

    counts = torch.bincount(batch.seq, minlength=n_seq).float()
    more = {}
    if "sumsq" in needs:
        logp, more["sumsq"] = logp[0], per_seq(logp[1])
    if "shared" in needs:
        more["shared"] = per_seq(logp * shared_mask(batch))
    return (per_seq(logp), counts, more) if needs else (per_seq(logp), counts)


def token_batches(pairs: Sequence, order: Sequence[int], tokens: int, share_prompt: bool) -> list[list[int]]:
    """Split ``order`` (longest first) into consecutive batches of at most ``tokens`` padded tokens each.

    The padded size is what ``make_batch`` allocates: rows x longest row (one row per pair when the prompt is
    shared, two otherwise). A pair longer than the budget gets a batch of its own. Fixed-row batches leave
    short pairs in matmuls of a few hundred rows; a token budget keeps every no-grad forward equally large.
    Run: ``token_batches(pairs, range(len(pairs)), 8192, True)``.
    """
    batches: list[list[int]] = [[]]
    longest = 0
    for i in order:
        p = pairs[i]
        P, C, R = len(p.prompt_ids), len(p.chosen_ids), len(p.rejected_ids)
        row, rows = (P + C + R, 1) if share_prompt else (P + max(C, R), 2)
        longest = max(longest, row)
        if batches[-1] and (len(batches[-1]) + 1) * rows * longest > tokens:
            batches.append([])
            longest = row
        batches[-1].append(i)
    return [b for b in batches if b]


@torch.no_grad()
def score_pairs(model: torch.nn.Module, pairs: Sequence, *, pad_id: int, batch_size: int = 16,
                share_prompt: bool = True, chunk: int = 1024, autocast_bf16: bool = False,
                tokens: int | None = None, needs: Sequence[str] = ()) -> tuple:
    """Policy log-probs of many pairs without gradients, batched by length to waste little padding.

    ``pairs`` have ``prompt_ids``, ``chosen_ids``, ``rejected_ids``. Returns (logps (N, 2), counts (N, 2),
    padded tokens processed); column 0 is chosen, column 1 rejected, rows in the order given. ``tokens``
    sizes each batch by padded tokens instead of ``batch_size`` pairs (see ``token_batches``). ``needs`` (see
    ``batch_logps``) adds a fourth item, {need: (N, 2)}.
    Run: ``score_pairs(model, pairs, pad_id=0, tokens=8192)``.
    """
    was_training = model.training
    model.eval()
    share_prompt = share_prompt and prefix_sharing_blocker(model) is None
    n = len(pairs)
    more = {key: torch.zeros(n, 2) for key in ("logps", "counts", *needs)}
    order = sorted(range(n), key=lambda i: -sum(map(len, (pairs[i].prompt_ids, pairs[i].chosen_ids,
                                                          pairs[i].rejected_ids))))
    batches = ([order[start:start + batch_size] for start in range(0, n, batch_size)] if tokens is None
               else token_batches(pairs, order, tokens, share_prompt))
    processed = 0
    for idx in batches:
        sub = [pairs[i] for i in idx]
        batch = make_batch([p.prompt_ids for p in sub], [p.chosen_ids for p in sub],
                           [p.rejected_ids for p in sub], pad_id, share_prompt)
        s, c, *extra = batch_logps(model, batch, chunk=chunk, autocast_bf16=autocast_bf16, needs=needs)
        for key, v in {"logps": s, "counts": c, **(extra[0] if extra else {})}.items():
            more[key][idx] = torch.stack([v[:len(idx)], v[len(idx):]], 1).cpu()
        processed += batch.padded_tokens
        tick(len(idx))  # the terminal's phase bar (reference pass, evaluation), if one is open
    model.train(was_training)
    logps, counts = more.pop("logps"), more.pop("counts")
    return (logps, counts, processed, more) if needs else (logps, counts, processed)
