"""TR-DPO's moving reference as a second LoRA adapter on the one base model; the rule, its flags and costs:
docs/config.md, A moving reference (TR-DPO). On LoRA deltas the rule is Δ_ref <- α·s·B_θA_θ + (1 - α)·Δ_ref,
linear in the product BA, not in the factors: blending A and B separately gives
α²·BθAθ + α(1-α)·(BθAr + BrAθ) + (1-α)²·BrAr, another model. The reference adapter therefore keeps the blend
exactly, as stacked factors with the policy's scaling s:

    A_ref <- [A_θ ; A_ref]      B_ref <- [α·B_θ , (1 - α)·B_ref]      B_ref·A_ref = Σ_k α(1-α)^(n-k)·B_k·A_k

    ref = ReferenceAdapter(model, alpha=0.6)
    ref.sync()                          # after step τ, 2τ, ... (training/reference.py)
    with ref.active(): ...              # forwards see the reference
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
from collections.abc import Iterator

import torch
from torch import Tensor

NAME = "reference"  # the peft adapter's name beside the policy's ("default")


class ReferenceAdapter:
    """The reference of a LoRA run as its own adapter; ``syncs`` counts the syncs it holds."""

    def __init__(self, model: torch.nn.Module, alpha: float) -> None:
        from peft.tuners.lora import LoraLayer

        self.model, self.alpha, self.syncs = model, alpha, 0
        self.policy = model.active_adapter
        self.layers = {n: m for n, m in model.named_modules() if isinstance(m, LoraLayer) and self.policy in m.lora_A}

    def factors(self) -> dict[str, Tensor]:
        """{layer.A: (R, in), layer.B: (out, R)}: the reference's stacked factors; empty before the first sync."""
        if NAME not in self.model.peft_config:
            return {}
        return {f"{n}.{k}": getattr(m, f"lora_{k}")[NAME].weight.detach() for n, m in self.layers.items() for k in "AB"}

    @property
    def rank(self) -> int:
        return next((t.shape[0] for k, t in self.factors().items() if k.endswith(".A")), 0)

    @torch.no_grad()
    def sync(self) -> None:
        """W_ref <- α·W_θ + (1 - α)·W_ref, exactly (module docstring); α = 1 drops the older terms."""
        old, a = self.factors(), self.alpha
        new = {}
        for n, m in self.layers.items():
            pa, pb = m.lora_A[self.policy].weight, m.lora_B[self.policy].weight                  # (r, in), (out, r)
            keep = bool(old) and a < 1
            new[f"{n}.A"] = torch.cat([pa, old[f"{n}.A"]]) if keep else pa.clone()              # (R, in)
            new[f"{n}.B"] = torch.cat([a * pb, (1 - a) * old[f"{n}.B"]], 1) if keep else a * pb  # (out, R)
        self.load(new, self.syncs + 1)

    def load(self, factors: dict[str, Tensor], syncs: int) -> None:
        """Install stacked factors (from :meth:`factors`, e.g. a checkpoint's) as the reference; the rank is
        theirs. peft can't resize an adapter, so it is rebuilt."""
        self.close()
        self.syncs = syncs
        if not factors:
            return
        rank = factors[f"{next(iter(self.layers))}.A"].shape[0]
        config = dataclasses.replace(self.model.peft_config[self.policy], r=rank, lora_alpha=rank, lora_dropout=0.0,
                                     inference_mode=True)  # frozen; scaling set to the policy's below
        device = next(iter(self.layers.values())).lora_A[self.policy].weight.device
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            self.model.add_adapter(NAME, config)  # peft draws initial factors: not from the run's RNG stream
        with torch.no_grad():
            for n, m in self.layers.items():
                m.lora_A[NAME].weight.copy_(factors[f"{n}.A"])
                m.lora_B[NAME].weight.copy_(factors[f"{n}.B"])
                m.scaling[NAME] = m.scaling[self.policy]

    def digest(self) -> str:
        """A hash of the reference's weights and scaling: part of its log-probs' cache key."""
        h = hashlib.blake2b(digest_size=20)
        for k, t in sorted(self.factors().items()):
            h.update(f"{k}|{tuple(t.shape)}|{t.dtype}|".encode())
            h.update(t.cpu().contiguous().view(torch.uint8).numpy().tobytes())
        h.update(repr(sorted({m.scaling[self.policy] for m in self.layers.values()})).encode())
        return h.hexdigest()

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        """Forwards inside see the reference: the adapter disabled (the base model) before the first sync."""
        if NAME not in self.model.peft_config:
            with self.model.disable_adapter():
                yield
            return
        self.model.set_adapter(NAME, inference_mode=True)
        try:
            yield
        finally:
            self.model.set_adapter(self.policy)  # the policy's factors trainable again

    def close(self) -> None:
        """Drop the reference adapter: the saved adapter and a shared base model hold only the policy."""
        if NAME in self.model.peft_config:
            self.model.delete_adapter(NAME)
