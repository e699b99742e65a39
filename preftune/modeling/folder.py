"""What a local model folder lacks, said before transformers is asked (its own errors end mid-sentence).

    check_model_folder("worlds/w", need=("config", "tokenizer", "weights"))
    # InputError: worlds/w: field 'model': no model in this folder: no config.json, no tokenizer files, no
    #   weights (*.safetensors); did you mean worlds/w/model?

A hub id (anything that is not an existing folder) passes through untouched: ``from_pretrained`` resolves it.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from ..core.errors import InputError

# Files any tokenizer class reads: fast (tokenizer.json), sentencepiece (*.model), BPE/WordPiece vocabularies,
# tiktoken files of remote-code tokenizers. Lenient on purpose: the check only catches folders with none at all.
_TOKENIZER_PATTERNS = ("tokenizer.json", "*.model", "vocab.json", "vocab.txt", "merges.txt", "*.tiktoken")
_PARTS = {
    "config": ("no config.json", lambda d: (d / "config.json").is_file()),
    "tokenizer": ("no tokenizer files (tokenizer.json, tokenizer.model, vocab.json, ...)",
                  lambda d: any(next(d.glob(p), None) for p in _TOKENIZER_PATTERNS)),
    "weights": ("no weights (*.safetensors)", lambda d: next(d.glob("*.safetensors"), None) is not None),
}
_PICKLED = ("*.bin", "*.pt", "*.pth")   # weights preftune won't read: unpickling runs code
ALL = ("config", "tokenizer", "weights")


def missing(folder: str | Path, need: Sequence[str] = ALL) -> list[str]:
    """The ``need`` parts (config, tokenizer, weights) the folder lacks, as phrases; empty when it has them all."""
    d = Path(folder)
    return [_PARTS[part][0] for part in need if not _PARTS[part][1](d)]


def suggestion(folder: str | Path, need: Sequence[str] = ALL) -> str | None:
    """The first sub-folder (by name) that has every ``need`` part, e.g. a world's ``model/`` or a run's ``merged/``."""
    try:
        subs = sorted(p for p in Path(folder).iterdir() if p.is_dir() and not p.name.startswith("."))
    except OSError:
        return None
    return next((str(p) for p in subs if not missing(p, need)), None)


def check_model_folder(path: str, *, need: Sequence[str] = ALL, field: str = "model") -> None:
    """One line (InputError, exit 2) naming the folder and what it lacks, with the sub-folder that has a model.

    Does nothing for a hub id or a folder that has every ``need`` part. A missing folder that can't be a hub id
    (``./x``, ``/x``, ``~/x``, ``a/b/c``), or whose first part is a local folder (``worlds/modle`` next to
    ``worlds/``), is "no such folder" at once, not a minute of hub retries ending in a message about the network.
    """
    if not os.path.isdir(path):
        parts = Path(path).parts
        if path and (path.startswith((".", "/", "~")) or len(parts) > 2
                     or (len(parts) == 2 and os.path.isdir(parts[0]))):
            near = Path(os.path.expanduser(path)).parent
            try:
                has = sorted(p.name for p in near.iterdir() if p.is_dir()) if near.is_dir() else []
            except OSError:  # an unreadable parent: no hint, still one line
                has = []
            hint = f"; {near} has: {', '.join(has[:8])}" if has else ""
            raise InputError(f"no such folder (and not a hub id 'owner/name'){hint}", path=path, field=field)
        return
    lacks = missing(path, need)
    if not lacks:
        return
    d = Path(path)
    thing = "tokenizer" if tuple(need) == ("tokenizer",) else "model"
    what = f"no {thing} in this folder" if len(lacks) == len(need) else f"an incomplete {thing} folder"
    notes = []
    if "weights" in need and any(next(d.glob(p), None) for p in _PICKLED):
        notes.append("its weights are pickled (.bin/.pt), preftune reads *.safetensors only")
    if (d / "adapter_config.json").is_file():
        notes.append("it holds a LoRA adapter (adapter_config.json): give the adapter's base model as --model")
    better = suggestion(path, need)
    if better:
        notes.append(f"did you mean {better}?")
    tail = "".join(f"; {n}" for n in notes)
    raise InputError(f"{what}: {', '.join(lacks)}{tail}", path=path, field=field)
