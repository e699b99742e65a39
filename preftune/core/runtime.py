"""Which process am I: rank, world size and the few collectives one run needs across processes.

``torchrun`` (or ``accelerate launch``) sets RANK, WORLD_SIZE and LOCAL_RANK; :func:`init` reads them, starts
torch.distributed (gloo on CPU, nccl on CUDA) and returns a :class:`Runtime`. Without them it returns the
world-size-1 runtime, whose collectives are no-ops, so train, reference and evaluate run one code path.

    torchrun --standalone --nproc-per-node 2 -m preftune train --model M --data train.jsonl ... --output runs/x

    >>> rt = init()                 # in the spirit of nanochat's compute_init
    >>> lo, hi = rt.shard(100)      # this rank's contiguous slice of 100 items, no padding
"""

from __future__ import annotations

import atexit
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch is imported where a collective runs: the CLI asks for the rank before loading torch
    from torch import Tensor


@dataclass(frozen=True)
class Runtime:
    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        """Rank 0 alone writes files, holds the folder lock and prints."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def shard(self, n: int) -> tuple[int, int]:
        """[lo, hi) of this rank's contiguous share of ``n`` items; sizes differ by at most one and nothing is
        repeated, so gathering the shards in rank order gives back exactly the n items in order."""
        per, extra = divmod(n, self.world_size)
        lo = self.rank * per + min(self.rank, extra)
        return lo, lo + per + (self.rank < extra)

    def all_reduce(self, t: Tensor, op: str = "sum") -> Tensor:
        """Sum (or max) of ``t`` over ranks, in place; at world size 1 returns ``t`` untouched."""
        if self.distributed:
            import torch.distributed as dist

            dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
        return t

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, in rank order, on every rank (picklable objects; CPU tensors)."""
        if not self.distributed:
            return [obj]
        import torch.distributed as dist

        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank (e.g. a decision only rank 0 can make, like "is this run finished")."""
        if not self.distributed:
            return obj
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]


_SINGLE = Runtime()


def launched_rank() -> int:
    """This process's rank as the launcher set it (RANK; 0 without a launcher), before any process group."""
    return int(os.environ.get("RANK", "0"))


def init() -> Runtime:
    """The runtime of this process: from RANK/WORLD_SIZE/LOCAL_RANK when a launcher set them (starting the
    process group once), else world size 1. Safe to call repeatedly."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return _SINGLE
    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        cuda = torch.cuda.is_available()
        if cuda:  # before any CUDA work: "cuda" then means this rank's GPU, for load_model and nccl alike
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend="nccl" if cuda else "gloo")
        # gloo's threads must be joined before interpreter shutdown, or C++ aborts the process at exit
        # ("terminate called without an active exception") after a run that otherwise finished
        atexit.register(_shutdown)
    return Runtime(rank=launched_rank(), world_size=world)


def _shutdown() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        try:
            dist.barrier()  # leave together: a peer closing its sockets mid-teardown aborts the other one
        finally:
            dist.destroy_process_group()


def current() -> Runtime:
    """The runtime already started in this process (world size 1 when none was)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return Runtime(rank=dist.get_rank(), world_size=dist.get_world_size())
    return _SINGLE


def crash_hook(point: str) -> None:
    """Tests of kill -9 + resume need a death at a known point, every time: PREFTUNE_TEST_KILL_AT="GLOB|MARKER"
    makes the first process that reaches a point matching GLOB (the one that creates MARKER) SIGKILL itself.
    PREFTUNE_TEST_KILL_AFTER_CHECKPOINT=MARKER is the same for every checkpoint. Unset, this does nothing.
    Points: ``checkpoint <run folder>`` after a checkpoint, ``pipeline <stage>`` inside a pipeline stage."""
    import fnmatch
    import signal

    glob, _, marker = os.environ.get("PREFTUNE_TEST_KILL_AT", "").partition("|")
    if os.environ.get("PREFTUNE_TEST_KILL_AFTER_CHECKPOINT"):
        glob, marker = "checkpoint *", os.environ["PREFTUNE_TEST_KILL_AFTER_CHECKPOINT"]
    if not marker or not fnmatch.fnmatch(point, glob):
        return
    try:
        os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return
    os.kill(os.getpid(), signal.SIGKILL)
