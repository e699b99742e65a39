"""Load a causal LM and its tokenizer through ``from_pretrained``, wrap it in LoRA, fingerprint its weights.

Weights are read as safetensors only; ``trust_remote_code`` stays off unless the config turns it on.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import os
import sys
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
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


def resolve_dtype(cfg: Config) -> str:
    """``cfg.dtype`` with ``auto`` decided; InputError for bf16 where the hardware would emulate it.

    Called before any model is loaded, so a doomed run stops at once instead of crawling.
    """
    if cfg.dtype == "float32":
        return "float32"
    device = cfg.resolved_device()
    native = native_bf16(device)
    if cfg.dtype == "auto":
        return "bfloat16" if native else "float32"
    if not native:
        what = "this CPU has no native bf16 (AMX / AVX-512 BF16)" if device.startswith("cpu") else \
            f"{device} has no native bf16"
        raise InputError(f"bfloat16 would be emulated, hundreds of times slower than float32: {what}; "
                         "use --dtype float32 (or --dtype auto)", field="dtype")
    return "bfloat16"


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
    out = ["eager"]
    if getattr(model, "_supports_sdpa", False):
        out.append("sdpa")
    if getattr(model, "_supports_flex_attn", False):
        out.append("flex_attention")
    if getattr(model, "_supports_flash_attn", False):
        out += ["flash_attention_2", "flash_attention_3"]
    return out


def load_model(cfg: Config) -> PreTrainedModel:
    """``AutoModelForCausalLM.from_pretrained`` with safetensors only and an attention the model supports.

    ``attn_implementation`` None (auto) takes SDPA where the model has it, else the model's own default
    (eager for Gemma-2, whose soft-capped attention SDPA can't express); on CPU in bf16 SDPA runs in fp32
    inside. ``model.config._attn_implementation`` says what was chosen.
    """
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
        raise InputError(f"cannot load model: {_first_line(e)}", path=cfg.model, field="model") from None
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
            raise InputError(_first_line(e), path=cfg.model, field="attn_implementation") from None
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
        raise InputError(_first_line(e), field="lora_target_modules") from None
    if cfg.init_adapter:
        _load_adapter_weights(wrapped, cfg.init_adapter)
    return wrapped


def _load_adapter_weights(model: torch.nn.Module, folder: str) -> None:
    """Copy a saved adapter's weights into the fresh LoRA of the same shape (``init_adapter``)."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    try:
        result = set_peft_model_state_dict(model, load_file(str(Path(folder) / "adapter_model.safetensors")))
    except (OSError, RuntimeError) as e:  # missing file; a rank or target set that doesn't match
        raise InputError(f"cannot start from this adapter: {_first_line(e)}", path=folder, field="init_adapter") from None
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
