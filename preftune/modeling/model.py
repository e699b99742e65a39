"""Load a causal LM and its tokenizer through ``from_pretrained``, wrap it in LoRA, fingerprint its weights.

Weights are read as safetensors only; ``trust_remote_code`` stays off unless the config turns it on.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from ..core.config import Config
from ..core.errors import InputError, one_line
from ..core.layout import FINGERPRINTS
from ..data.tokenize import use_chat_template
from .folder import check_model_folder
from .precision import DTYPES, SDPA_FP32, resolve_dtype


def load_tokenizer(cfg: Config) -> PreTrainedTokenizerBase:
    """``AutoTokenizer.from_pretrained`` on ``tokenizer`` (default: ``model``), pad token set.

    It is the first thing a run loads, so a model folder missing its config, tokenizer or weights is named here,
    whole, before transformers' own error. Run: ``tok = load_tokenizer(cfg)``.
    """
    name = cfg.tokenizer or cfg.model
    if cfg.tokenizer:
        check_model_folder(cfg.tokenizer, need=("tokenizer",), field="tokenizer")
    else:
        check_model_folder(cfg.model)
    try:
        tok = AutoTokenizer.from_pretrained(name, trust_remote_code=cfg.trust_remote_code)
    except Exception as e:  # transformers raises many types; the user needs one line
        raise InputError(f"cannot load tokenizer: {one_line(e)}", path=name, field="tokenizer") from None
    if tok.pad_token_id is None:
        if tok.eos_token_id is None:
            raise InputError("tokenizer has neither a pad nor an eos token", path=name, field="tokenizer")
        tok.pad_token = tok.eos_token  # padding is masked everywhere; any id will do
    return use_chat_template(tok, cfg.chat_template) if cfg.chat_template else tok  # --chat-template


def flex_backward(device: str) -> bool:
    """Whether FlexAttention has a backward on ``device``; torch 2.13 raises NotImplementedError on CPU.

    Probed (on 1x1x1x8 tensors) rather than assumed, so a torch that adds it is let through. On CPU flex
    isn't faster anyway: see bench/bench_attention.py and bench/README.md.
    """
    from torch.nn.attention.flex_attention import flex_attention

    q = torch.zeros(1, 1, 1, 8, device=device, requires_grad=True)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "flex_attention called without torch.compile"
            flex_attention(q, q, q).sum().backward()
    except NotImplementedError:
        return False
    return True


def supported_attention(model: PreTrainedModel) -> list[str]:
    """The attention implementations the model's class declares, eager first."""
    flags = {"_supports_sdpa": ["sdpa"], "_supports_flex_attn": ["flex_attention"],
             "_supports_flash_attn": ["flash_attention_2", "flash_attention_3"]}
    return ["eager"] + [name for f, names in flags.items() if getattr(model, f, False) for name in names]


def load_model(cfg: Config) -> PreTrainedModel:
    """``AutoModelForCausalLM.from_pretrained`` with safetensors only and an attention the model supports.

    ``attn_implementation`` None (auto) takes SDPA where the model has it, else the model's own default
    (eager for Gemma-2, whose soft-capped attention SDPA can't express); on CPU in bf16 SDPA runs in fp32
    inside. ``model.config._attn_implementation`` says what was chosen.
    """
    check_model_folder(cfg.model, need=("config", "weights"))
    dtype = resolve_dtype(cfg)
    if not sys.stderr.isatty() or os.environ.get("CI"):
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # a bar redrawn per shard is noise in a log file
    device = cfg.resolved_device()
    try:
        # None lets transformers pick: sdpa if the class supports it, eager otherwise
        model = AutoModelForCausalLM.from_pretrained(
            cfg.model, dtype=DTYPES[dtype], trust_remote_code=cfg.trust_remote_code,
            use_safetensors=True, attn_implementation=None)
        model.to(device)
    except Exception as e:
        raise InputError(f"cannot load model: {one_line(e)}", path=cfg.model, field="model") from None
    model.config.use_cache = False
    want = cfg.attn_implementation or model.config._attn_implementation
    if want not in supported_attention(model):
        raise InputError(f"{type(model).__name__} does not support {want!r}; it supports "
                         f"{', '.join(supported_attention(model))} (leave it unset to pick one)",
                         path=cfg.model, field="attn_implementation")
    if want == "flex_attention" and not flex_backward(device):
        raise InputError(f"flex_attention cannot train on {device}: torch {torch.__version__} has no FlexAttention "
                         "backward there; use sdpa (the default, same numbers)", path=cfg.model,
                         field="attn_implementation")
    if want == "sdpa" and dtype == "bfloat16" and device == "cpu":
        want = SDPA_FP32  # GPU bf16 attention kernels are fast: keep them
    if want != model.config._attn_implementation:
        try:
            model.set_attn_implementation(want)
        except (ValueError, ImportError) as e:  # e.g. flash-attn not installed
            raise InputError(one_line(e), path=cfg.model, field="attn_implementation") from None
        if model.config._attn_implementation != want:  # old-style classes only warn and keep their own
            raise InputError(f"{type(model).__name__} cannot switch its attention to {want!r}", path=cfg.model,
                             field="attn_implementation")
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
            wrapped = get_peft_model(model, lora)
    except ValueError as e:
        raise InputError(one_line(e), field="lora_target_modules") from None
    if cfg.init_adapter:
        _load_adapter_weights(wrapped, cfg.init_adapter)
    return wrapped


def load_adapter(model: PreTrainedModel, adapter: str) -> torch.nn.Module:
    """``PeftModel.from_pretrained`` on a saved adapter folder; a wrong folder is one line."""
    from peft import PeftModel

    try:
        return PeftModel.from_pretrained(model, adapter)
    except Exception as e:  # peft raises ValueError/OSError/... for a wrong folder: one line
        raise InputError(f"cannot load adapter: {one_line(e)}", path=adapter, field="adapter") from None


def _load_adapter_weights(model: torch.nn.Module, folder: str) -> None:
    """Copy a saved adapter's weights into the fresh LoRA of the same shape (``init_adapter``)."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    try:
        result = set_peft_model_state_dict(model, load_file(str(Path(folder) / "adapter_model.safetensors")))
    except (OSError, RuntimeError) as e:  # missing file; a rank or target set that doesn't match
        raise InputError(f"cannot start from this adapter: {one_line(e)}", path=folder,
                         field="init_adapter") from None
    if result.unexpected_keys:
        raise InputError(f"adapter weights this LoRA doesn't have ({result.unexpected_keys[0]}, ...): use its rank and "
                         "target modules", path=folder, field="init_adapter")


def checkpoint_layers(lm: PreTrainedModel) -> Callable[[], None]:
    """Activation checkpointing on: each layer keeps only its input and is recomputed in backward. Returns the undo.

    Non-reentrant checkpointing (transformers' default) needs no input that requires grad, so the hook that
    transformers puts on the embeddings anyway comes off: it broke ``--compile``'s graph in two, and
    transformers' own disable leaves it on a peft-wrapped model. Run: ``undo = checkpoint_layers(lm)``.
    """
    lm.activation_checkpointing_enable()
    lm.disable_input_require_grads()
    return lm.activation_checkpointing_disable


def is_peft(model: torch.nn.Module) -> bool:
    return hasattr(model, "disable_adapter") and hasattr(model, "get_base_model")


def fingerprint(model_path: str, cache_dir: Path) -> str:
    """A content hash of the model's weight and config files, memoized by (path, size, mtime).

    Hashing content (not names) means a fine-tuned model saved over the same folder gets a new key.
    """
    folder = _local_folder(model_path)
    memo_path = cache_dir / FINGERPRINTS
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
            with open(f, "rb") as fp:
                memo[key] = hashlib.file_digest(fp, lambda: hashlib.blake2b(digest_size=20)).hexdigest()
            changed = True
        h.update(f.name.encode() + memo[key].encode())
    if changed:
        from ..core.files import atomic_write_json

        atomic_write_json(memo_path, memo)
    return h.hexdigest()


def _local_folder(model_path: str) -> Path:
    if os.path.isdir(model_path):
        return Path(model_path)
    from huggingface_hub import snapshot_download

    try:  # a hub id already downloaded by from_pretrained
        return Path(snapshot_download(model_path, local_files_only=True))
    except Exception as e:
        raise InputError(f"cannot find local files of model: {one_line(e)}", path=model_path,
                         field="model") from None
