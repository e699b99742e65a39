"""Load a causal LM and its tokenizer through ``from_pretrained``, wrap it in LoRA, fingerprint its weights.

Weights are read as safetensors only; ``trust_remote_code`` stays off unless the config turns it on.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import warnings
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from .config import Config
from .errors import InputError

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


def _register_attention() -> None:
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import sdpa_mask

    AttentionInterface.register(SDPA_FP32, _sdpa_fp32)
    AttentionMaskInterface.register(SDPA_FP32, sdpa_mask)


_register_attention()


def load_tokenizer(cfg: Config) -> PreTrainedTokenizerBase:
    name = cfg.tokenizer or cfg.model
    try:
        tok = AutoTokenizer.from_pretrained(name, trust_remote_code=cfg.trust_remote_code)
    except Exception as e:  # transformers raises many types; the user needs one line
        raise InputError(f"cannot load tokenizer: {_first_line(e)}", path=name, field="tokenizer") from None
    if tok.pad_token_id is None:
        if tok.eos_token_id is None:
            raise InputError("tokenizer has neither a pad nor an eos token", path=name, field="tokenizer")
        tok.pad_token = tok.eos_token  # padding is masked everywhere; any id will do
    return tok


def load_model(cfg: Config) -> PreTrainedModel:
    """``AutoModelForCausalLM.from_pretrained`` with safetensors only and SDPA attention (fp32 inside for bf16)."""
    if not sys.stderr.isatty() or os.environ.get("CI"):
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # a bar redrawn per shard is noise in a log file
    device = cfg.resolved_device()
    cpu_bf16 = cfg.dtype == "bfloat16" and device == "cpu"  # GPU bf16 attention kernels are fast: keep them
    try:
        model = AutoModelForCausalLM.from_pretrained(
            cfg.model, dtype=DTYPES[cfg.dtype], trust_remote_code=cfg.trust_remote_code,
            use_safetensors=True, attn_implementation=SDPA_FP32 if cpu_bf16 else "sdpa")
        model.to(device)
    except Exception as e:
        raise InputError(f"cannot load model: {_first_line(e)}", path=cfg.model, field="model") from None
    model.config.use_cache = False
    return model


def add_lora(model: PreTrainedModel, cfg: Config) -> torch.nn.Module:
    """Wrap in a fresh LoRA adapter (B = 0, so at init the policy equals the base model exactly).

    ``lora_rank 0`` means full fine-tuning: the model is returned unchanged with every weight trainable.
    """
    if cfg.lora_rank == 0:
        model.requires_grad_(True)
        return model
    from peft import LoraConfig, get_peft_model

    targets = cfg.lora_target_modules
    lora = LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.resolved_alpha(), lora_dropout=cfg.lora_dropout,
                      target_modules="all-linear" if targets == ["all-linear"] else targets,
                      bias="none", task_type="CAUSAL_LM")
    try:
        with warnings.catch_warnings():  # peft calls a transformers API deprecated in v5: noise in every run log
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            return get_peft_model(model, lora)
    except ValueError as e:
        raise InputError(_first_line(e), field="lora_target_modules") from None


def is_peft(model: torch.nn.Module) -> bool:
    return hasattr(model, "disable_adapter") and hasattr(model, "get_base_model")


def fingerprint(model_path: str, cache_dir: Path) -> str:
    """A content hash of the model's weight and config files, memoized by (path, size, mtime).

    Hashing content (not names) means a fine-tuned model saved over the same folder gets a new key.
    """
    folder = _local_folder(model_path)
    memo_path = cache_dir / "fingerprints.json"
    try:
        memo = json.loads(memo_path.read_text())
    except (OSError, ValueError):
        memo = {}
    h = hashlib.blake2b(digest_size=20)
    changed = False
    for f in sorted(folder.glob("*")):
        if not (f.suffix == ".safetensors" or f.name in ("config.json", "generation_config.json")):
            continue
        st = f.stat()
        key = f"{f.resolve()}|{st.st_size}|{st.st_mtime_ns}"
        if key not in memo:
            fh = hashlib.blake2b(digest_size=20)
            with open(f, "rb") as fp:
                for block in iter(lambda: fp.read(1 << 24), b""):
                    fh.update(block)
            memo[key] = fh.hexdigest()
            changed = True
        h.update(f.name.encode() + memo[key].encode())
    if changed:
        from .files import atomic_write_json

        atomic_write_json(memo_path, memo)
    return h.hexdigest()


def _local_folder(model_path: str) -> Path:
    if os.path.isdir(model_path):
        return Path(model_path)
    from huggingface_hub import snapshot_download

    try:  # a hub id already downloaded by from_pretrained
        return Path(snapshot_download(model_path, local_files_only=True))
    except Exception as e:
        raise InputError(f"cannot find local files of model: {_first_line(e)}", path=model_path,
                         field="model") from None


def _first_line(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0]
