"""Weights and checkpoints, safetensors only: the adapter (or model) a run ends with, and the checkpoint a run
resumes from (trainable weights, optimizer state, RNG state, step).

    folder = save_checkpoint(run, 50, trainable, opt)        # runs/x/checkpoints/step-0000050/
    step = load_checkpoint(latest_checkpoint(run), trainable, opt)
"""

from __future__ import annotations

import json
import os
import shutil
import signal
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from ..core.files import atomic_dir, atomic_write_json
from ..core.layout import ADAPTER, FULL_MODEL, OPTIMIZER, STATE, TRAINABLE, RunDir
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


def save_checkpoint(run: RunDir, step: int, trainable: Trainable, opt: torch.optim.Optimizer) -> Path:
    """Write ``checkpoints/step-N/`` in one rename, then drop the older ones: the newest complete one stays."""
    folder = run.checkpoint(step)
    with atomic_dir(folder) as d:
        save_file({n: p.detach().contiguous() for n, p in trainable}, str(d / TRAINABLE))
        sd = opt.state_dict()
        tensors = {f"{i}.{k}": v.contiguous() for i, st in sd["state"].items() for k, v in st.items()}
        tensors["rng.torch"] = torch.get_rng_state()
        if torch.cuda.is_available():  # dropout on the GPU draws from the CUDA generator
            tensors["rng.cuda"] = torch.cuda.get_rng_state()
        save_file(tensors, str(d / OPTIMIZER))
        atomic_write_json(d / STATE, {"step": step, "param_groups": sd["param_groups"]})
    for old in run.checkpoints.glob("step-*"):
        if old != folder:
            shutil.rmtree(old, ignore_errors=True)
    return folder


def checkpoint_step(folder: Path | None) -> int | None:
    return None if folder is None else int(json.loads((folder / STATE).read_text())["step"])


def latest_checkpoint(run: RunDir) -> Path | None:
    done = sorted(p for p in run.checkpoints.glob("step-*") if (p / STATE).exists())
    return done[-1] if done else None


def load_checkpoint(folder: Path, trainable: Trainable, opt: torch.optim.Optimizer) -> int:
    """Restore weights, optimizer state and RNG from ``folder``; returns its step."""
    weights = load_file(str(folder / TRAINABLE))
    with torch.no_grad():
        for n, p in trainable:
            p.copy_(weights[n])
    tensors = load_file(str(folder / OPTIMIZER))
    state: dict[int, dict[str, Tensor]] = {}
    for key, v in tensors.items():
        if not key.startswith("rng."):
            i, k = key.split(".", 1)
            state.setdefault(int(i), {})[k] = v
    meta = json.loads((folder / STATE).read_text())
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    torch.set_rng_state(tensors["rng.torch"])
    if "rng.cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng.cuda"])
    return int(meta["step"])


def crash_hook() -> None:
    """Tests of kill -9 + resume (torchrun, Ray retries) need a death right after a checkpoint, every time:
    PREFTUNE_TEST_KILL_AFTER_CHECKPOINT=MARKER makes the first process that gets here (the one that creates
    MARKER) SIGKILL itself. Unset, this does nothing."""
    marker = os.environ.get("PREFTUNE_TEST_KILL_AFTER_CHECKPOINT")
    if not marker:
        return
    try:
        os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return
    os.kill(os.getpid(), signal.SIGKILL)
