"""Reference log-probs: computed once before training, cached on disk, shared by every run that can.

The cache key, and what the reference is for LoRA, TR-DPO and full fine-tuning: docs/speed.md, Levers
("reference log-probs once"). Tokenized ids already encode the tokenizer, the data and the truncation settings,
so a second run with the same key reads the cache exactly and any difference in them gives another key.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from ..core.files import DamagedFile, read_tensors, write_tensors
from ..core.layout import REFERENCE_CACHE
from ..core.runtime import Runtime, current
from .logprobs import prefix_sharing_blocker, score_pairs
from .model import is_peft
from .precision import Arithmetic


def cache_key(model_fingerprint: str, pairs: Sequence, arith: Arithmetic) -> str:
    h = hashlib.blake2b(digest_size=20)
    h.update(json.dumps({"model": model_fingerprint, "dtype": arith.label, "bf16": arith.autocast_bf16,
                         "n": len(pairs)}).encode())
    for p in pairs:
        for ids in (p.prompt_ids, p.chosen_ids, p.rejected_ids):
            h.update(np.asarray(ids, dtype=np.int64).tobytes())
            h.update(b"|")
    return h.hexdigest()


def reference_logps(model: torch.nn.Module, pairs: Sequence, *, fingerprint: str, arith: Arithmetic,
                    cache_dir: Path, pad_id: int, batch_size: int = 32, share_prompt: bool = True,
                    chunk: int = 1024, rt: Runtime | None = None,
                    tokens: int | None = None,
                    under: contextlib.AbstractContextManager | None = None) -> tuple[torch.Tensor, bool]:
    """(N, 2) reference log-probs (chosen, rejected) and whether they came from the cache.

    ``fingerprint`` (``model.fingerprint``) and ``arith`` (``model.arithmetic``) key the cache with the
    pairs; ``arith`` also says how a miss is computed (an upcast happens only then).

    ``under`` is what makes ``model`` the reference; default: its adapter disabled (LoRA), as is (full).

    ``tokens`` sizes the batches by padded tokens (``logprobs.token_batches``) instead of ``batch_size`` pairs.

    The file name adds the batch layout (shared or plain rows, batch size) to the key: the layouts agree to
    1e-6, but the held-out exact tie at step 0 needs the reference in evaluation's own layout, bit for bit,
    also when a cache is shared by runs with and without ``--no-share-prompt``.

    Under torchrun (``rt`` of world size W > 1) each rank scores its contiguous shard (``rt.shard``, the same
    one evaluation uses, so the step-0 tie stays exact) and the shards are gathered in order; rank 0 writes
    the file, whose name adds ``-wW`` since its batches differ from a single process's. Every rank reads the
    cache, so ``cache_dir`` must be on a filesystem all ranks see.
    """
    rt = rt or current()
    shared = share_prompt and prefix_sharing_blocker(model) is None
    size = f"b{batch_size}" if tokens is None else f"t{tokens}"
    layout = f"{'shared' if shared else 'plain'}-{size}" + (f"-w{rt.world_size}" if rt.distributed else "")
    path = Path(cache_dir) / REFERENCE_CACHE / f"{cache_key(fingerprint, pairs, arith)}.{layout}.safetensors"
    logps = None
    with contextlib.suppress(DamagedFile):  # checked against its checksum: a damaged entry is recomputed
        logps = read_tensors(path).get("logps") if path.exists() else None
    if all(rt.gather(logps is not None and logps.shape == (len(pairs), 2))):  # all ranks hit, or all compute
        return logps, True
    lo, hi = rt.shard(len(pairs))
    if under is None:
        under = model.disable_adapter() if is_peft(model) else contextlib.nullcontext()
    with under, arith.applied(model):
        logps, _, _ = score_pairs(model, pairs[lo:hi], pad_id=pad_id, batch_size=batch_size,
                                  share_prompt=share_prompt, chunk=chunk, autocast_bf16=arith.autocast_bf16,
                                  tokens=tokens)                                                    # (hi-lo, 2)
    logps = torch.cat(rt.gather(logps))                                                                 # (N, 2)
    if rt.is_main:
        write_tensors(path, {"logps": logps})  # cells may race: each writes its own temp file, rename wins
    return logps, False
