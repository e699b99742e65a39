"""One run over several processes: the gradient all-reduce, gathering a step's micro-batch results, and FSDP2
for full fine-tuning on GPUs. At world size 1 none of this runs (``runtime.Runtime`` collectives are no-ops).

    torchrun --standalone --nproc-per-node 2 -m preftune train --batch-size 4 ... --output runs/x
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

from ..core.config import Config
from ..core.objectives import Output
from ..core.runtime import Runtime


def all_reduce_grads(rt: Runtime, params: list[Tensor]) -> None:
    """Sum every trainable gradient over ranks, in one flat all-reduce.

    Not DDP: the prefix-shared forward calls the decoder and the LM head itself (logprobs.batch_logps), so a
    DDP wrapper's forward, which arms its gradient hooks, would never run. One SUM after the last micro-step
    is what DDP with ``no_sync`` on the others does, and exact: each rank's loss is already divided by the
    global batch, so the sum is the one-process gradient. For LoRA it is a few MB per step.
    """
    for p in params:  # a rank whose slice gave a parameter no gradient still takes part in the collective
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    flat = torch.cat([p.grad.reshape(-1) for p in params])                   # (sum of numels,)
    rt.all_reduce(flat)
    for p, g in zip(params, flat.split([p.numel() for p in params])):
        p.grad.copy_(g.view_as(p.grad))


def gather_parts(rt: Runtime, parts: list[tuple[Tensor, Output]], tokens: int) -> tuple[list, int]:
    """Every rank's (logps (k, 2), Output) micro-batch results in rank order (= the global batch's order, since
    each rank holds a contiguous slice), and the real tokens summed over ranks."""
    mine = [(lp.cpu(), Output.concat([o], lambda t: t.detach().cpu())) for lp, o in parts]
    everyone = rt.gather((mine, tokens))
    return [part for rank_parts, _ in everyone for part in rank_parts], sum(t for _, t in everyone)


def maybe_fsdp(model: torch.nn.Module, cfg: Config, rt: Runtime) -> bool:
    """Full fine-tuning over several GPUs: shard weights, grads and Adam state with torch FSDP2.

    On CPUs full fine-tuning uses the manual all-reduce unless PREFTUNE_FSDP=1, which is how the suite (no
    GPU) checks this path with gloo; with nccl on GPUs it is untested. Each decoder layer, the decoder, the
    LM head and the root get their own ``fully_shard``: batch_logps calls the decoder and the head directly,
    and FSDP2 gathers a module's weights in that module's own forward hook, so each one that is called must
    be a unit. LoRA runs keep the manual all-reduce: their trainable weights are small and the frozen ones
    need no sharding.
    """
    wanted = torch.cuda.is_available() or os.environ.get("PREFTUNE_FSDP") == "1"
    if not (rt.distributed and cfg.lora_rank == 0 and wanted):
        return False
    from torch.distributed.fsdp import fully_shard

    decoder, head = model.get_decoder(), model.get_output_embeddings()
    for layer in getattr(decoder, "layers", []):
        fully_shard(layer)
    fully_shard(decoder)
    if head.weight is not decoder.get_input_embeddings().weight:  # a tied head is gathered with the decoder
        fully_shard(head)
    fully_shard(model)
    return True


def full_state_dict(model: torch.nn.Module) -> dict[str, Tensor]:
    """FSDP: the full state dict gathered to rank 0's CPU, so ``model/`` is saved like a one-process run's."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
