"""Per-sequence log-probs: the one place where logits become the numbers objectives see.

Two paths that give the same numbers (tested to 1e-5 in fp32):

* ``sequence_logps(logits, labels, mask)`` — the plain helper: shift, gather, mask prompt and padding,
  sum and count. Used for testing and as the definition.
* ``batch_logps(model, batch)`` — the fast path used in training and evaluation:
    - prefix sharing (``share_prompt``): one row per pair, ``prompt + chosen + rejected``, with a 4D mask
      that hides chosen from rejected and position ids that restart rejected right after the prompt, so the
      prompt is processed once per pair instead of twice;
    - the LM head runs only on the positions that predict completion tokens, in chunks, and each token's
      log-prob is ``logit[target] - logsumexp(logits)`` in fp32; no (B, T, V) log-softmax is kept.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

# Above this many logits in one chunk, recompute the chunk in backward instead of keeping it (large vocabs).
_CHECKPOINT_LOGITS = 1 << 25


def sequence_logps(logits: Tensor, labels: Tensor, loss_mask: Tensor) -> tuple[Tensor, Tensor]:
    """Summed log-probs and token counts of the masked tokens of each sequence.

    logits (B, T, V) predict the next token; labels (B, T); loss_mask (B, T) is True where the token at
    that position belongs to the completion. Position t's logits score token t+1, so the shift drops the
    first label and the last logit. Returns (sum (B,) fp32, count (B,) fp32).
    """
    logits = logits[:, :-1].float()                      # (B, T-1, V)
    labels = labels[:, 1:]                               # (B, T-1)
    mask = loss_mask[:, 1:].float()                      # (B, T-1)
    logp = torch.log_softmax(logits, dim=-1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (logp * mask).sum(-1), mask.sum(-1)


@dataclass
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
        t = {k: getattr(self, k).to(device) for k in ("input_ids", "position_ids", "attention_mask", "src",
                                                       "targets", "seq")}
        return Batch(**t, n_pairs=self.n_pairs, real_tokens=self.real_tokens, padded_tokens=self.padded_tokens)


def make_batch(prompts: Sequence[Sequence[int]], chosen: Sequence[Sequence[int]],
               rejected: Sequence[Sequence[int]], pad_id: int, share_prompt: bool = True) -> Batch:
    """Lay out n pairs as n shared rows (``share_prompt``) or 2n plain rows (prompt+chosen, prompt+rejected)."""
    n = len(prompts)
    src: list[int] = []
    targets: list[int] = []
    seq: list[int] = []
    if share_prompt:
        rows = [list(p) + list(c) + list(r) for p, c, r in zip(prompts, chosen, rejected)]
        L = max(len(x) for x in rows)
        pos = torch.zeros(n, L, dtype=torch.long)
        block = torch.full((n, L), 3, dtype=torch.long)  # 0 prompt, 1 chosen, 2 rejected, 3 pad
        for i, (p, c, r) in enumerate(zip(prompts, chosen, rejected)):
            P, C, R = len(p), len(c), len(r)
            pos[i, :P + C] = torch.arange(P + C)
            pos[i, P + C:P + C + R] = torch.arange(P, P + R)   # rejected continues right after the prompt
            block[i, :P], block[i, P:P + C], block[i, P + C:P + C + R] = 0, 1, 2
            base = i * L
            # Token j of chosen is predicted by position P-1+j; rejected token 0 by the last prompt
            # position too, rejected token j>0 by position P+C+j-1. With no prompt the first token has
            # no predictor and is skipped (as in TRL's shifted loss).
            for j in range(C):
                if P + j - 1 >= 0:
                    src.append(base + P - 1 + j), targets.append(c[j]), seq.append(i)
            for j in range(R):
                at = P - 1 if j == 0 else P + C + j - 1
                if at >= 0:
                    src.append(base + at), targets.append(r[j]), seq.append(n + i)
        q, k = block.unsqueeze(2), block.unsqueeze(1)                       # (n, L, 1), (n, 1, L)
        causal = torch.ones(L, L, dtype=torch.bool).tril()
        mask = causal & (k != 3) & ~((q == 2) & (k == 1))                 # (n, L, L)
        mask |= torch.eye(L, dtype=torch.bool) & (q == 3)                  # pad rows see themselves: no NaN
        input_ids = torch.full((n, L), pad_id, dtype=torch.long)
        for i, x in enumerate(rows):
            input_ids[i, :len(x)] = torch.tensor(x, dtype=torch.long)
        real = sum(len(x) for x in rows)
        return Batch(input_ids, pos, mask.unsqueeze(1), torch.tensor(src, dtype=torch.long),
                     torch.tensor(targets, dtype=torch.long), torch.tensor(seq, dtype=torch.long), n, real, n * L)

    rows = [list(p) + list(c) for p, c in zip(prompts, chosen)] + [list(p) + list(r) for p, r in zip(prompts, rejected)]
    comps = list(chosen) + list(rejected)
    L = max(len(x) for x in rows)
    input_ids = torch.full((2 * n, L), pad_id, dtype=torch.long)
    attn = torch.zeros(2 * n, L, dtype=torch.long)
    for s, (x, c) in enumerate(zip(rows, comps)):
        input_ids[s, :len(x)] = torch.tensor(x, dtype=torch.long)
        attn[s, :len(x)] = 1
        P = len(x) - len(c)
        for j in range(len(c)):
            if P + j - 1 >= 0:
                src.append(s * L + P - 1 + j), targets.append(c[j]), seq.append(s)
    pos = torch.arange(L).expand(2 * n, L).clone()
    real = sum(len(x) for x in rows)
    return Batch(input_ids, pos, attn, torch.tensor(src, dtype=torch.long), torch.tensor(targets, dtype=torch.long),
                 torch.tensor(seq, dtype=torch.long), n, real, 2 * n * L)


def _chunk_logps(head: torch.nn.Module, hidden: Tensor, targets: Tensor, softcap: float | None,
                 scale: float | None) -> Tensor:
    logits = head(hidden).float()                        # (m, V)
    if scale is not None:
        logits = logits * scale
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    return logits.gather(1, targets.unsqueeze(1)).squeeze(1) - torch.logsumexp(logits, dim=-1)


def token_logps(head: torch.nn.Module, hidden: Tensor, targets: Tensor, chunk: int = 1024,
                softcap: float | None = None, scale: float | None = None) -> Tensor:
    """Log-prob of each target token from its predicting hidden state: hidden (M, H), targets (M,) -> (M,) fp32."""
    out = []
    for i in range(0, hidden.shape[0], chunk):
        h, t = hidden[i:i + chunk], targets[i:i + chunk]
        vocab = head.weight.shape[0] if hasattr(head, "weight") else 0
        if torch.is_grad_enabled() and h.shape[0] * vocab > _CHECKPOINT_LOGITS:
            out.append(checkpoint(_chunk_logps, head, h, t, softcap, scale, use_reentrant=False))
        else:
            out.append(_chunk_logps(head, h, t, softcap, scale))
    return torch.cat(out) if out else hidden.new_zeros(0, dtype=torch.float32)


def _mask_for(model: torch.nn.Module, mask: Tensor, dtype: torch.dtype) -> Tensor:
    """SDPA takes a bool mask (True = attend); eager attention adds a float mask."""
    impl = getattr(model.config, "_attn_implementation", "sdpa")
    if mask.dim() == 4 and impl == "eager":
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)
    return mask


def batch_logps(model: torch.nn.Module, batch: Batch, *, chunk: int = 1024,
                autocast_bf16: bool = False) -> tuple[Tensor, Tensor]:
    """Summed completion log-probs and token counts of every sequence in ``batch``.

    ``model`` is a transformers causal LM, possibly wrapped by peft. Returns (logps (2n,), counts (2n,)),
    fp32, chosen first: ``logps[:n]`` are the chosen sequences, ``logps[n:]`` the rejected ones.
    """
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder, head = lm.get_decoder(), lm.get_output_embeddings()
    device = head.weight.device
    batch = batch.to(device)
    dtype = head.weight.dtype
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast_bf16):
        hidden = decoder(input_ids=batch.input_ids, attention_mask=_mask_for(lm, batch.attention_mask, dtype),
                         position_ids=batch.position_ids, use_cache=False).last_hidden_state   # (R, L, H)
        hidden = hidden.reshape(-1, hidden.shape[-1]).index_select(0, batch.src)               # (M, H)
        cfg = lm.config
        logp = token_logps(head, hidden, batch.targets, chunk,
                           softcap=getattr(cfg, "final_logit_softcapping", None),
                           scale=getattr(cfg, "logit_scale", None))                            # (M,)
    n_seq = 2 * batch.n_pairs
    sums = torch.zeros(n_seq, dtype=torch.float32, device=device).index_add(0, batch.seq, logp.float())
    counts = torch.bincount(batch.seq, minlength=n_seq).float()
    return sums, counts


@torch.no_grad()
def score_pairs(model: torch.nn.Module, pairs: Sequence, *, pad_id: int, batch_size: int = 16,
                share_prompt: bool = True, chunk: int = 1024, autocast_bf16: bool = False,
                ) -> tuple[Tensor, Tensor, int]:
    """Policy log-probs of many pairs without gradients, batched by length to waste little padding.

    ``pairs`` have ``prompt_ids``, ``chosen_ids``, ``rejected_ids``. Returns (logps (N, 2), counts (N, 2),
    padded tokens processed); column 0 is chosen, column 1 rejected, rows in the order given.
    """
    was_training = model.training
    model.eval()
    n = len(pairs)
    logps = torch.zeros(n, 2)
    counts = torch.zeros(n, 2)
    order = sorted(range(n), key=lambda i: -(len(pairs[i].prompt_ids) + len(pairs[i].chosen_ids)
                                            + len(pairs[i].rejected_ids)))
    processed = 0
    for start in range(0, n, batch_size):
        idx = order[start:start + batch_size]
        sub = [pairs[i] for i in idx]
        batch = make_batch([p.prompt_ids for p in sub], [p.chosen_ids for p in sub],
                           [p.rejected_ids for p in sub], pad_id, share_prompt)
        s, c = batch_logps(model, batch, chunk=chunk, autocast_bf16=autocast_bf16)
        k = len(idx)
        logps[idx] = torch.stack([s[:k], s[k:]], 1).cpu()
        counts[idx] = torch.stack([c[:k], c[k:]], 1).cpu()
        processed += batch.padded_tokens
    model.train(was_training)
    return logps, counts, processed
