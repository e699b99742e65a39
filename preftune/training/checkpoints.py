"""Weights and checkpoints, safetensors only: the adapter (or model) a run ends with, and the checkpoint a run
resumes from (trainable weights, optimizer state, RNG state, step, and TR-DPO's reference adapter).

    folder = save_checkpoint(run, 50, trainable, opt)        # runs/x/checkpoints/step-0000050/
    step = load_checkpoint(latest_checkpoint(run), trainable, opt)
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..core.files import DamagedFile, atomic_dir, atomic_write_json, read_tensors, write_tensors
from ..core.layout import ADAPTER, FULL_MODEL, OPTIMIZER, REFERENCE_ADAPTER, STATE, TRAINABLE, RunDir
from ..modeling.model import is_peft

Trainable = list[tuple[str, Tensor]]


def save_weights(run: RunDir, model: torch.nn.Module, tok: Any, state_dict: dict | None = None) -> None:
    """LoRA runs: ``adapter/`` for ``PeftModel.from_pretrained``; full fine-tuning: ``model/`` + tokenizer
    (``state_dict``: FSDP's gathered one)."""
    name = ADAPTER if is_peft(model) else FULL_MODEL
    with atomic_dir(run.file(name)) as d:
        model.save_pretrained(d, state_dict=state_dict, safe_serialization=True)  # None: the model's own
        if name == FULL_MODEL:
            tok.save_pretrained(d)


def save_checkpoint(run: RunDir, step: int, trainable: Trainable, opt: torch.optim.Optimizer,
                    reference: dict[str, Tensor] | None = None) -> Path:
    """Write ``checkpoints/step-N/`` in one rename, each tensor file with its checksum; the newest two stay, so a
    damaged newest one falls back to the one before (:func:`latest_checkpoint`). ``reference``: TR-DPO's
    reference adapter (``ReferenceAdapter.factors``), when it has one."""
    folder = run.checkpoint(step)
    with atomic_dir(folder) as d:
        write_tensors(d / TRAINABLE, {n: p.detach() for n, p in trainable})
        if reference:
            write_tensors(d / REFERENCE_ADAPTER, reference)
        sd = opt.state_dict()
        tensors = {f"{i}.{k}": v for i, st in sd["state"].items() for k, v in st.items()}
        tensors["rng.torch"] = torch.get_rng_state()
        if torch.cuda.is_available():  # dropout on the GPU draws from the CUDA generator
            tensors["rng.cuda"] = torch.cuda.get_rng_state()
        write_tensors(d / OPTIMIZER, tensors)
        atomic_write_json(d / STATE, {"step": step, "param_groups": sd["param_groups"]})
    for old in sorted(run.checkpoints.glob("step-*"))[:-2]:
        shutil.rmtree(old, ignore_errors=True)
    return folder


def checkpoint_step(folder: Path | None) -> int | None:
    return None if folder is None else int(json.loads((folder / STATE).read_text())["step"])


def _verified(folder: Path) -> tuple[dict[str, Tensor], dict[str, Tensor], dict[str, Any]]:
    """(trainable weights, optimizer and RNG tensors, state.json) of a checkpoint, each checked; DamagedFile
    naming the file that is not what was written."""
    meta_path = folder / STATE
    try:
        meta = json.loads(meta_path.read_text())
        int(meta["step"]), meta["param_groups"]  # noqa: B018  (the two keys a resume needs)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DamagedFile(f"damaged: not a checkpoint state ({type(e).__name__})", path=str(meta_path)) from None
    read_reference(folder)  # checked with the rest, so a damaged one falls back to the checkpoint before
    return read_tensors(folder / TRAINABLE), read_tensors(folder / OPTIMIZER), meta


def read_reference(folder: Path) -> dict[str, Tensor]:
    """TR-DPO's reference adapter as the checkpoint holds it (checked); empty when it has none."""
    return read_tensors(folder / REFERENCE_ADAPTER) if (folder / REFERENCE_ADAPTER).exists() else {}


def latest_checkpoint(run: RunDir) -> Path | None:
    """The newest checkpoint that passes its checks; a damaged newer one is skipped with a one-line notice.
    DamagedFile (one line naming the file) when checkpoints exist and none is good."""
    done = sorted((p for p in run.checkpoints.glob("step-*") if (p / STATE).exists()), reverse=True)
    first: DamagedFile | None = None
    for folder in done:
        try:
            _verified(folder)
            return folder
        except DamagedFile as e:
            first = first or e
            print(f"preftune: warning: {e}; trying the checkpoint before it", file=sys.stderr)
    if first is not None:
        raise DamagedFile(f"{first}; no earlier good checkpoint: start again without --resume",
                          path=None) from None
    return None


def load_checkpoint(folder: Path, trainable: Trainable, opt: torch.optim.Optimizer) -> int:
    """Restore weights, optimizer state and RNG from ``folder`` (checked first, changed only when good)."""
    weights, tensors, meta = _verified(folder)
    with torch.no_grad():
        for n, p in trainable:
            p.copy_(weights[n])
    state: dict[int, dict[str, Tensor]] = {}
    for key, v in tensors.items():
        if not key.startswith("rng."):
            i, k = key.split(".", 1)
            state.setdefault(int(i), {})[k] = v
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    torch.set_rng_state(tensors["rng.torch"])
    if "rng.cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng.cuda"])
    return int(meta["step"])
