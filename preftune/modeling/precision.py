"""Precision: which dtype a run uses (``--dtype auto`` decided for the hardware, emulated bf16 refused), how a
no-grad pass computes (:class:`Arithmetic`), the exact in-place fp32 upcast of bf16 weights, and the fp32-inside
SDPA that bf16 models use on CPU.

    dtype = resolve_dtype(cfg)                   # "float32" | "bfloat16"; InputError for emulated bf16
    dtype_for("auto", Hardware("cuda", True))    # the same rule for a device described, not probed (plan)
    with arithmetic(cfg, dtype, held_out=True).applied(model): ...
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.masking_utils import sdpa_mask

from ..core.config import Config
from ..core.errors import InputError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


SDPA_FP32 = "preftune_sdpa_fp32"


def _sdpa_fp32(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               attention_mask: torch.Tensor | None, **kwargs: object) -> tuple[torch.Tensor, None]:
    """SDPA with fp32 inputs for bf16 models: bf16 weights make the projections fast, but on CPU the bf16
    attention kernels run slower than fp32 ones at these sizes (profiled: 2x), and attention scores are where
    bf16 rounding hurts most. Projections stay bf16; only (B, H, T, d) q/k/v are upcast."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    out, weights = sdpa_attention_forward(module, query.float(), key.float(), value.float(), attention_mask,
                                          **kwargs)
    return out.to(query.dtype), weights


AttentionInterface.register(SDPA_FP32, _sdpa_fp32)
AttentionMaskInterface.register(SDPA_FP32, sdpa_mask)


def native_bf16(device: str) -> bool:
    """Whether ``device`` runs bf16 matmuls natively (CUDA with bf16, CPUs with AMX / AVX-512 BF16).

    Without it, bf16 is emulated: on a CPU lacking AVX-512 BF16 a 2048^2 bf16 matmul measured 0.3 GFLOP/s
    against 174 for fp32. The one probe; tests monkeypatch it.
    """
    kind = device.split(":")[0]
    if kind == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if kind == "cpu":
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return False  # mps and others: fp32 is the safe default


@dataclass(frozen=True)
class Hardware:
    """The device a run trains on, as the dtype rule sees it: its name and whether it has native bf16.

    ``preftune train`` probes its own device (:func:`resolve_dtype`); ``preftune plan`` describes the device it
    plans for, which need not be this machine's.
    """

    device: str                       # "cpu", "cuda", "cuda:1", "mps"
    native_bf16: bool

    @classmethod
    def probe(cls, device: str) -> Hardware:
        return cls(device, native_bf16(device))


def dtype_for(requested: str, hw: Hardware) -> str:
    """The rule: ``requested`` (float32 | bfloat16 | auto) on ``hw`` -> "float32" | "bfloat16". ``auto`` takes
    bf16 where it is native; InputError for bf16 that the hardware would emulate.

    Run: ``dtype_for("auto", Hardware("cuda", True))``  -> "bfloat16".
    """
    if requested == "float32" or (requested == "auto" and not hw.native_bf16):
        return "float32"
    if not hw.native_bf16:
        what = "this CPU has no native bf16 (AMX / AVX-512 BF16)" if hw.device.startswith("cpu") else \
            f"{hw.device} has no native bf16"
        raise InputError(f"bfloat16 would be emulated, hundreds of times slower than float32: {what}; "
                         "use --dtype float32 (or --dtype auto)", field="dtype")
    return "bfloat16"


def resolve_dtype(cfg: Config) -> str:
    """``cfg.dtype`` decided for the device this process trains on (:func:`dtype_for` on a probe of it).

    Called before any model is loaded, so a doomed run stops at once instead of crawling.
    """
    device = cfg.resolved_device()
    # float32 needs no probe: the rule gives float32 whatever the hardware
    return dtype_for(cfg.dtype, Hardware(device, False) if cfg.dtype == "float32" else Hardware.probe(device))


@dataclass(frozen=True)
class Arithmetic:
    """How a no-grad scoring pass computes: ``dtype`` of the loaded weights, ``autocast_bf16`` (bf16 matmuls
    over fp32 weights), and ``upcast``: bf16 weights cast to fp32 for the pass (``Config.eval_fp32``).

    Upcasting is exact on the bf16 weights: fp32 compute on bf16-rounded weights matched fp32 to 1.2e-4 nats,
    while bf16 activations put 0.03-0.05 nats of noise on every pair's margin (bench/README.md, "bf16
    held-out, investigated"), as much as the margins of a short low-lr run.
    """

    dtype: str
    autocast_bf16: bool = False
    upcast: bool = False

    @property
    def label(self) -> str:
        """The reference cache key's dtype: fp32 arithmetic on bf16-rounded weights is a cache of its own."""
        return f"{self.dtype}->float32" if self.upcast else self.dtype

    @property
    def compute(self) -> str:
        """What the matmuls compute in: ``float32`` or ``bfloat16`` (summary.json's ``eval_arithmetic``)."""
        return "float32" if self.upcast or (self.dtype == "float32" and not self.autocast_bf16) else "bfloat16"

    def applied(self, model: torch.nn.Module) -> contextlib.AbstractContextManager:
        return fp32_weights(model) if self.upcast else contextlib.nullcontext()


def arithmetic(cfg: Config, dtype: str, *, held_out: bool = False) -> Arithmetic:
    """The arithmetic of a pass over training pairs (``held_out`` False) or held-out pairs, for ``dtype``
    as ``resolve_dtype`` decided it."""
    fp32 = held_out and cfg.eval_fp32
    return Arithmetic(dtype, cfg.autocast_bf16 and not fp32, fp32 and dtype != "float32")


@contextlib.contextmanager
def fp32_weights(model: torch.nn.Module) -> Iterator[None]:
    """Every bf16 parameter and buffer of ``model`` in fp32 inside the block, back in bf16 after it.

    Exact both ways (bf16 -> fp32 -> bf16 is the identity), in place (optimizer state and peft keep their
    tensors), one tensor at a time: the peak is the fp32 weights plus one tensor, 2 more bytes per weight.
    """
    touched = []
    for t in itertools.chain(model.parameters(), model.buffers()):  # a tied weight comes once
        if t.dtype == torch.bfloat16:
            t.data = t.data.float()
            touched.append(t)
    try:
        yield
    finally:
        for t in touched:
            t.data = t.data.to(torch.bfloat16)
