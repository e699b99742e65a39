"""What ``preftune plan`` reads before it counts: a model's architecture from its config alone (no weights), the
RSS of a fresh interpreter that imports what training imports, and (with ``--data``) the lengths of the row that
peaks.

    arch = read_arch("path/or/hub-id"); arch.params, arch.lora_params(8, ["all-linear"])
    prompt, completion, max_length = data_lengths(cfg)   # the longest training row after truncation
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass, field
from typing import Any

from ..core.config import Config
from ..core.errors import InputError, one_line
from ..modeling.folder import suggestion


@dataclass
class Arch:
    """What the formula needs from a model config: sizes, parameter count and the linears of one layer."""

    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    params: int                 # every parameter, tied weights once
    matmul_params: int          # weights of every Linear incl. the LM head: 2 FLOPs per token each in a forward
    linears: list[tuple[str, str, int, int]] = field(default_factory=list)  # one layer: (name, parent, in, out)

    def lora_params(self, rank: int, targets: list[str]) -> int:
        """r·(d_in + d_out) per wrapped linear (A is r×d_in, B is d_out×r), every layer."""
        return self.layers * sum(rank * (i + o) for n, _, i, o in self.wrapped(targets))

    def wrapped(self, targets: list[str]) -> list[tuple[str, str, int, int]]:
        if targets == ["all-linear"]:  # peft: every Linear but the output layer (the head is outside the layers)
            return list(self.linears)
        return [x for x in self.linears if x[0].split(".")[-1] in targets or x[0] in targets]


def read_arch(model: str, *, trust_remote_code: bool = False) -> Arch:
    """Config only: ``AutoConfig.from_pretrained`` and a model built on the meta device (no weights read)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    if not os.path.exists(model) and (os.path.isabs(model) or model.startswith(".") or model.count("/") > 1):
        raise InputError("no such model folder", path=model, field="model")  # not a hub id either
    if os.path.isdir(model) and not os.path.exists(os.path.join(model, "config.json")):
        better = suggestion(model, ("config",))  # a world folder given for its model/, a run for its merged/
        hint = f"; did you mean {better}?" if better else ""
        raise InputError(f"no config.json in the model folder{hint}", path=model, field="model")
    try:
        cfg = AutoConfig.from_pretrained(model, trust_remote_code=trust_remote_code)
    except Exception as e:  # transformers raises many types; one line for the user
        raise InputError(f"cannot read model config: {one_line(e)}", path=model, field="model") from None
    try:
        with torch.device("meta"):
            lm = AutoModelForCausalLM.from_config(cfg, trust_remote_code=trust_remote_code)
    except Exception as e:
        raise InputError(f"cannot build a causal LM from this config: {one_line(e)}",
                         path=model, field="model") from None
    text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    head = lm.get_output_embeddings()
    decoder_layers = _layers(lm)
    linears = [(name, name.rpartition(".")[0], mod.in_features, mod.out_features)
               for name, mod in decoder_layers[0].named_modules()
               if isinstance(mod, torch.nn.Linear) and mod is not head]
    heads, hidden = text.num_attention_heads, text.hidden_size
    mlp_outs = [o for n, p, i, o in linears if i == hidden and o != hidden and "attn" not in p]
    return Arch(layers=len(decoder_layers), hidden=hidden,
                intermediate=getattr(text, "intermediate_size", None) or max(mlp_outs or [4 * hidden]),
                heads=heads, kv_heads=getattr(text, "num_key_value_heads", None) or heads,
                head_dim=getattr(text, "head_dim", None) or hidden // heads, vocab=text.vocab_size,
                params=sum(p.numel() for p in lm.parameters()),
                matmul_params=sum(m.weight.numel() for m in lm.modules() if isinstance(m, torch.nn.Linear)),
                linears=linears)


def _layers(lm: Any) -> Any:
    decoder = lm.get_decoder() if hasattr(lm, "get_decoder") else lm
    for obj in (decoder, getattr(decoder, "model", None)):
        layers = getattr(obj, "layers", None) or getattr(obj, "h", None)
        if layers is not None and len(layers):
            return layers
    raise InputError("cannot find the decoder layers of this model (plan knows Llama-style decoders)",
                     field="model")



def measure_baseline(model: str) -> tuple[int, int]:
    """(resident, peak) RSS of a fresh interpreter that imports what ``preftune train`` imports and builds the
    model class on the meta device: the part of a run's RSS that does not depend on the model's size (about
    350 MiB with torch 2.13 + transformers 5 on Linux). Resident is read after a garbage collection."""
    code = ("import gc, resource, torch, peft, preftune.training.loop, preftune.commands.cli\n"
            "from transformers import AutoConfig, AutoModelForCausalLM\n"
            f"c = AutoConfig.from_pretrained({model!r})\n"
            "with torch.device('meta'):\n    AutoModelForCausalLM.from_config(c)\n"
            "gc.collect()\n"
            "print(int(open('/proc/self/statm').read().split()[1]) * resource.getpagesize(),"
            " resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)\n")  # ru_maxrss: KiB on Linux
    env = {**os.environ, "TRANSFORMERS_VERBOSITY": "error", "PYTHONWARNINGS": "ignore"}
    try:
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300,
                             check=True).stdout
        resident, peak = (int(x) for x in out.strip().splitlines()[-1].split())
        return resident, peak
    except (subprocess.SubprocessError, ValueError, IndexError):
        return 350 << 20, 350 << 20  # the measured value above, when the probe cannot run


def data_lengths(cfg: Config) -> tuple[int, int, int]:
    """(prompt, completion, max_length) tokens to plan for from ``cfg.data``: the longest row the training pairs
    make after truncation, split as prompt + 2 x completion (the mean of its two), and the ``max_length`` the
    run truncates at (``auto`` resolved as training resolves it).

    Why the longest row: a batch is padded to its longest row, and batches are grouped by length, so the
    longest rows meet in one batch, and that batch is a step's peak. The data is read, split and tokenized
    exactly as ``preftune train`` does it (training.prepare.prepare_data), so a bad file is the same one line.
    """
    from dataclasses import replace

    from ..modeling.model import load_tokenizer
    from .prepare import prepare_data

    quiet = replace(cfg, quiet=True, audit=False)
    # the tokenizer alone: plan reads no weights, so a folder of config + tokenizer files is enough
    data = prepare_data(quiet, load_tokenizer(replace(quiet, tokenizer=cfg.tokenizer or cfg.model)))
    p, c, r = max(((len(x.prompt_ids), len(x.chosen_ids), len(x.rejected_ids)) for x in data.train),
                  key=lambda t: (sum(t), t))
    length = cfg.max_length if isinstance(cfg.max_length, int) else data.stats["train"].max_length
    return p, -(-(c + r) // 2), int(length)
