"""One typed config for a run, every default in one place.

Keys are flat and mirror the command-line flags (``lora_rank`` <-> ``--lora-rank``), so a saved
``config.yaml`` can be passed back with ``--config`` and reproduces the run. Per-objective overrides live
under ``objectives:`` (SimPO's beta differs from DPO's by an order of magnitude)::

    objective: simpo
    objectives:
      dpo: {beta: 0.1}
      simpo: {beta: 2.0, gamma_beta_ratio: 0.5}

Precedence: defaults < YAML < ``objectives[<objective>]`` from YAML < command line.

    preftune train --config run.yaml --lora-rank 16
"""

from __future__ import annotations

import dataclasses
import difflib
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from types import UnionType
from typing import Any, Union, get_args, get_origin, get_type_hints

import yaml

from .errors import InputError


@dataclass
class Config:
    # --- model -----------------------------------------------------------------------------------
    model: str = ""                      # folder or hub id, loaded with AutoModelForCausalLM.from_pretrained
    tokenizer: str | None = None         # defaults to `model`
    dtype: str = "float32"               # float32 | bfloat16 (weights and matmuls; log-prob sums and loss stay fp32)
    device: str = "auto"                 # auto (cuda if available, else cpu) | cpu | cuda | cuda:N | mps
    trust_remote_code: bool = False      # off unless the user asks
    # --- LoRA (lora_rank 0 = full fine-tuning) ---------------------------------------------------
    lora_rank: int = 8
    lora_alpha: float | None = None      # None = 2 * rank
    lora_dropout: float = 0.0
    lora_target_modules: list[str] = field(default_factory=lambda: ["all-linear"])
    # --- data ------------------------------------------------------------------------------------
    data: str = ""                       # JSONL / JSON / Parquet file, or anything datasets.load_dataset takes
    data_split: str = "train"
    eval_data: str | None = None         # held-out pairs; if absent, `eval_fraction` of prompts are held out
    eval_split: str = "test"
    eval_fraction: float = 0.1
    split_seed: int = 0                  # held-out split by prompt; separate from `seed` so a seed grid keeps one held-out set
    max_length: int = 512                # prompt + completion, per side
    max_prompt_length: int = 256         # prompt is cut from the left
    apply_chat_template: bool = False    # wrap plain-string pairs as user/assistant turns
    max_train_pairs: int | None = None   # take the first N training pairs (after the split)
    # --- objective -------------------------------------------------------------------------------
    objective: str = "dpo"
    beta: float | None = None            # None = the objective's own default (see `preftune objectives`)
    gamma: float | None = None           # SimPO margin, absolute (reward units)
    gamma_beta_ratio: float | None = None  # SimPO margin as gamma/beta (the paper's table form)
    label_smoothing: float | None = None  # robust / cdpo epsilon; None = the objective's default (0.1)
    nll_weight: float = 0.0              # extra NLL on chosen for any objective (RPO); 0 = off
    objectives: dict[str, dict[str, Any]] = field(default_factory=dict)
    # --- optimisation ----------------------------------------------------------------------------
    lr: float = 5e-6
    batch_size: int = 8                  # pairs per optimizer step = batch_size * grad_accum
    grad_accum: int = 1
    max_steps: int | None = None         # wins over `epochs` when set
    epochs: float = 1.0
    scheduler: str = "linear"            # linear | cosine | constant
    warmup_ratio: float = 0.1
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    seed: int = 42
    # --- evaluation, logging, checkpoints --------------------------------------------------------
    eval_every: int = 50                 # steps; held-out eval also at step 0 and at the end
    eval_batch_size: int = 16
    log_every: int = 1
    save_every: int = 50                 # checkpoint every N steps (0 = only at the end)
    output: str = "runs/run"
    cache_dir: str | None = None         # reference log-prob cache; default $PREFTUNE_CACHE or ~/.cache/preftune
    resume: bool = False
    quiet: bool = False
    # --- speed levers (each exact, each can be turned off) --------------------------------------
    share_prompt: bool = True            # one sequence prompt+chosen+rejected per pair, prompt processed once
    group_by_length: bool = True         # batches of similar lengths: less padding
    logit_chunk: int = 1024              # positions per LM-head chunk (no full-vocab log-softmax kept)
    autocast_bf16: bool = False          # bf16 matmuls (AMX / tensor cores) with fp32 weights, log-probs and loss
    threads: int | None = None           # torch intra-op threads; None = torch's default

    # ---------------------------------------------------------------------------------------------
    def resolved_alpha(self) -> float:
        return float(self.lora_alpha) if self.lora_alpha is not None else 2.0 * self.lora_rank

    def validate(self) -> Config:
        from . import objectives  # late: objectives imports nothing from here

        if not self.model:
            raise InputError("no model given (--model PATH_OR_HUB_ID)", field="model")
        if not self.data and self.eval_data is None:
            raise InputError("no data given (--data FILE)", field="data")
        objectives.get(self.objective)  # raises InputError with a suggestion
        for key in self.objectives:
            objectives.get(key)
        _choice("dtype", self.dtype, ("float32", "bfloat16"))
        _choice("scheduler", self.scheduler, ("linear", "cosine", "constant"))
        if not (self.device in ("auto", "cpu", "mps") or self.device.split(":")[0] == "cuda"):
            raise InputError(f"{self.device!r} is not one of auto, cpu, cuda, cuda:N, mps", field="device")
        checks = [
            ("lora_rank", self.lora_rank >= 0), ("batch_size", self.batch_size >= 1),
            ("grad_accum", self.grad_accum >= 1), ("lr", self.lr > 0),
            ("eval_fraction", 0 <= self.eval_fraction < 1), ("max_length", self.max_length >= 2),
            ("max_prompt_length", 1 <= self.max_prompt_length < self.max_length),
            ("warmup_ratio", 0 <= self.warmup_ratio <= 1), ("label_smoothing", self.label_smoothing is None or 0 <= self.label_smoothing < 0.5),
            ("eval_every", self.eval_every >= 0), ("save_every", self.save_every >= 0),
            ("epochs", self.epochs > 0), ("logit_chunk", self.logit_chunk >= 1),
        ]
        for name, ok in checks:
            if not ok:
                raise InputError(f"invalid value {getattr(self, name)!r}", field=name)
        if self.max_steps is not None and self.max_steps < 1:
            raise InputError(f"invalid value {self.max_steps!r}", field="max_steps")
        if self.gamma is not None and self.gamma_beta_ratio is not None:
            raise InputError("give SimPO's margin as gamma OR gamma_beta_ratio, not both", field="gamma")
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def objective_params(self) -> dict[str, Any]:
        """Hyperparameters handed to the objective function, defaults filled in from the registry."""
        from . import objectives

        given = {"beta": self.beta, "gamma": self.gamma, "gamma_beta_ratio": self.gamma_beta_ratio,
                 "label_smoothing": self.label_smoothing, "nll_weight": self.nll_weight}
        for k, v in self.objectives.get(self.objective, {}).items():  # a Config built in Python, not via build()
            if k in given and given[k] is None:
                given[k] = v
        return objectives.resolve_params(self.objective, given)

    def resolved_device(self) -> str:
        if self.device != "auto":
            return self.device
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"

    def resolved_cache_dir(self) -> Path:
        if self.cache_dir:
            return Path(self.cache_dir)
        return Path(os.environ.get("PREFTUNE_CACHE", Path.home() / ".cache" / "preftune"))


FIELDS = {f.name: f for f in fields(Config)}
_HINTS = get_type_hints(Config)


def _choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise InputError(f"{value!r} is not one of {', '.join(allowed)}", field=name)


def _suggest(key: str) -> str:
    close = difflib.get_close_matches(key, list(FIELDS), n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def coerce(key: str, value: Any, source: str = "config") -> Any:
    """Convert a YAML or command-line value to the field's type; InputError naming the key if it can't."""
    if key not in FIELDS:
        raise InputError(f"unknown key{_suggest(key)}", path=source, field=key)
    hint = _HINTS[key]
    types = list(get_args(hint)) if get_origin(hint) in (Union, UnionType) else [hint]
    if value is None or (isinstance(value, str) and value.lower() in ("none", "null") and type(None) in types):
        if type(None) in types:
            return None
        raise InputError("must not be empty", path=source, field=key)
    base = next(t for t in types if t is not type(None))
    origin = get_origin(base)
    try:
        if base is bool:
            if isinstance(value, bool):
                return value
            if str(value).lower() in ("1", "true", "yes", "on"):
                return True
            if str(value).lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if base is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if base is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if base is str:
            if isinstance(value, (dict, list)):
                raise ValueError
            return str(value)
        if origin is list:
            if isinstance(value, str):
                value = [v.strip() for v in value.split(",") if v.strip()]
            if not isinstance(value, list):
                raise ValueError
            return [str(v) for v in value]
        if origin is dict:
            if not isinstance(value, dict):
                raise ValueError
            out = {}
            for name, over in value.items():
                if not isinstance(over, dict):
                    raise InputError("must map an objective name to {key: value}", path=source, field=f"{key}.{name}")
                out[str(name)] = {k: coerce(k, v, source) for k, v in over.items()}
            return out
    except (ValueError, TypeError):
        raise InputError(f"{value!r} is not a valid {getattr(base, '__name__', base)}", path=source,
                         field=key) from None
    return value


def load_yaml(path: str | os.PathLike) -> dict[str, Any]:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise InputError(f"cannot read config: {e.strerror}", path=str(path)) from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        raise InputError(f"invalid YAML: {getattr(e, 'problem', e)}", path=str(path),
                         line=mark.line + 1 if mark else None) from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise InputError("a config file must be a mapping of key: value", path=str(path))
    return raw


def build(yaml_values: dict[str, Any] | None = None, overrides: dict[str, Any] | None = None,
          source: str = "config") -> Config:
    """Defaults < YAML values < per-objective YAML overrides < explicit overrides (command line)."""
    values: dict[str, Any] = {}
    for k, v in (yaml_values or {}).items():
        values[k] = coerce(k, v, source)
    cli = {k: coerce(k, v, "command line") for k, v in (overrides or {}).items()}
    objective = cli.get("objective", values.get("objective", Config.objective))
    per_objective = cli.get("objectives", values.get("objectives", {})).get(objective, {})
    values.update(per_objective)
    values.update(cli)
    return Config(**values)


def from_file(path: str | os.PathLike, **overrides: Any) -> Config:
    return build(load_yaml(path), overrides, source=str(path))


def dump_yaml(cfg: Config) -> str:
    """The resolved config. The run's own ``objectives`` entry is already applied at the top level, so it is
    left out: loading this file back gives the same run even when the command line overrode that entry."""
    d = cfg.to_dict()
    d["objectives"] = {k: v for k, v in d["objectives"].items() if k != cfg.objective}
    return yaml.safe_dump(d, sort_keys=False)
