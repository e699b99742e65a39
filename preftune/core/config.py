"""One typed config for a run, every default in one place.

Keys mirror the flags; objective hyperparameters live per objective under ``objectives:`` (SimPO's beta differs
from DPO's by an order of magnitude), with shorthands (``--beta`` ...) and a precedence: docs/config.md, Config
files and Objective hyperparameters.

    preftune train --config run.yaml --lora-rank 16
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import math
import os
import re
import reprlib
from dataclasses import dataclass, field, fields
from pathlib import Path
from types import UnionType
from typing import Any, Union, get_args, get_origin, get_type_hints

import yaml

from .errors import InputError, did_you_mean


@dataclass
class Config:
    # --- model -----------------------------------------------------------------------------------
    model: str = ""                      # folder or hub id, loaded with AutoModelForCausalLM.from_pretrained
    tokenizer: str | None = None         # tokenizer folder or hub id; defaults to `model`
    dtype: str = "float32"               # float32 | bfloat16 | auto (bf16 where the hardware has it natively); log-probs and loss stay fp32
    device: str = "auto"                 # auto (cuda if available, else cpu) | cpu | cuda | cuda:N | mps
    trust_remote_code: bool = False      # run the model repo's own Python code; off unless you ask
    attn_implementation: str | None = None  # None = auto: sdpa where the model supports it, else its own (eager)
    # --- LoRA (lora_rank 0 = full fine-tuning) ---------------------------------------------------
    lora_rank: int = 8                   # adapter rank r; 0 = full fine-tuning
    lora_alpha: float | None = None      # LoRA scale numerator; None = 2 * rank
    lora_dropout: float = 0.0            # dropout on the adapter input
    lora_target_modules: list[str] = field(default_factory=lambda: ["all-linear"])  # module names to adapt, comma-separated
    init_adapter: str | None = None      # start the LoRA from this peft adapter's weights (iterate continues a round)
    # --- data ------------------------------------------------------------------------------------
    data: str = ""                       # training pairs: JSONL / JSON / Parquet file, or anything datasets.load_dataset takes
    data_split: str = "train"            # split of `data` for a datasets source
    eval_data: str | None = None         # held-out pairs; if absent, `eval_fraction` of prompts are held out
    eval_split: str = "test"             # split of `eval_data` for a datasets source
    eval_fraction: float = 0.1           # share of distinct prompts held out when no `eval_data` is given
    split_seed: int = 0                  # seed of the held-out split; separate from `seed` so a seed grid keeps one held-out set
    columns: dict[str, str] = field(default_factory=dict)  # your file's column names: prompt=question,chosen=answer_a
    bad_rows: str = "error"              # error (the first bad row stops the run) | skip (count, name and skip them)
    max_bad_rows: float = 0.01           # with bad_rows skip: most rows skipped, a count (>= 1) or a share of the rows (< 1)
    max_length: int | str = 512          # tokens of prompt + completion, per side; auto = what keeps 95% of training pairs whole
    max_prompt_length: int | None = None  # prompt tokens kept (cut from the left); None = half of max_length
    apply_chat_template: bool = False    # wrap plain-string pairs as user/assistant turns
    chat_template: str | None = None     # a Jinja chat template file (or a tokenizer folder with one) for a tokenizer without one
    max_train_pairs: int | None = None   # take the first N training pairs (after the split)
    audit: bool = True                   # check the data before training: one line, audit.json (preftune audit)
    # --- objective -------------------------------------------------------------------------------
    objective: str = "dpo"               # dpo, simpo, orpo, ... (`preftune objectives`), module:name for your own, or a mixture 0.8*dpo+0.2*bco_pair+1*sft
    nll_weight: float = 0.0              # extra NLL on chosen for any objective (RPO); 0 = off
    objectives: dict[str, dict[str, Any]] = field(default_factory=dict)  # per objective: {name: {param: value}}
    ld_alpha: float | None = None        # LD-DPO length desensitization α in [0, 1] on the tokens past the shorter completion; None = off
    use_weighting: bool = False          # WPO: weight each pair's loss by its policy probability
    f_divergence_type: str = "reverse_kl"  # f-DPO divergence: reverse_kl | forward_kl | js_divergence | alpha_divergence
    f_alpha_divergence_coef: float = 0.5  # α of alpha_divergence
    ref_sync_steps: int = 0              # TR-DPO: sync the reference to the policy every N steps (TRL's default 512); 0 = fixed reference; LoRA only
    ref_sync_alpha: float = 0.6          # TR-DPO: at each sync reference = alpha * policy + (1 - alpha) * reference; 1 = copy
    # --- optimisation ----------------------------------------------------------------------------
    lr: float = 5e-6                     # peak learning rate (AdamW)
    batch_size: int = 8                  # pairs per forward; pairs per optimizer step = batch_size * grad_accum
    grad_accum: int = 1                  # micro-batches accumulated per optimizer step
    max_steps: int | None = None         # optimizer steps; wins over `epochs` when set
    epochs: float = 1.0                  # passes over the training pairs when `max_steps` is unset
    scheduler: str = "linear"            # linear | cosine | constant, after warmup
    warmup_ratio: float = 0.1            # share of steps with a linear warmup from 0
    weight_decay: float = 0.0            # AdamW weight decay
    max_grad_norm: float = 1.0           # gradient clipping norm; 0 = measure only
    seed: int = 42                       # LoRA init, dropout and data order
    # --- evaluation ------------------------------------------------------------------------------
    eval_every: int = 50                 # held-out eval every N steps, also at step 0 and at the end; 0 = only those
    eval_batch_size: int = 16            # pairs per held-out forward
    eval_fp32: bool = False              # held-out pairs and their reference in fp32 arithmetic when training runs bf16 (exact; 2 more bytes per weight while scoring)
    judge: str | list[str] | None = None  # behavioural eval judge(s): reward-model:PATH | python:mod:fn | openai:MODEL@URL; repeat --judge (a YAML list) for several
    gen_eval_prompts: int = 0            # held-out prompts generated by policy and reference at the end (0 = off)
    gen_max_new_tokens: int = 32         # behavioural eval: tokens generated per completion
    gen_temperature: float = 0.0         # behavioural eval: 0 = greedy
    # --- output ----------------------------------------------------------------------------------
    output: str = "runs/run"             # run folder (must be new or empty unless --resume)
    log_every: int = 1                   # write a training line to metrics.jsonl every N steps
    save_every: int = 50                 # checkpoint every N steps (0 = only at the end)
    resume: bool = False                 # continue the run in `output` from its last checkpoint
    cache_dir: str | None = None         # every cache (reference log-probs, judge answers); default $PREFTUNE_CACHE or ~/.cache/preftune
    quiet: bool = False                  # no progress lines
    report_to: list[str] = field(default_factory=lambda: ["none"])  # trackers: tensorboard, mlflow, wandb, trackio or none
    # --- speed (each lever exact, each can be turned off) ---------------------------------------
    share_prompt: bool = True            # one sequence prompt+chosen+rejected per pair, prompt processed once
    group_by_length: bool = True         # batches of similar lengths: less padding
    logit_chunk: int = 1024              # completion positions per LM-head chunk (no full-vocab log-softmax kept)
    reference_tokens: int = 4096         # padded tokens per training-set reference forward (0 = 32 pairs each)
    autocast_bf16: bool = False          # bf16 matmuls (AMX / tensor cores) with fp32 weights, log-probs and loss
    threads: int | None = None           # torch intra-op threads; None = torch's default
    compile: bool = False                # torch.compile the decoder for training steps (one graph, dynamic length)
    gradient_checkpointing: bool = False  # recompute each layer in backward: less memory, one more forward (see `preftune plan`)

    # ---------------------------------------------------------------------------------------------
    def prompt_length(self, max_length: int | None = None) -> int:
        """Prompt tokens kept: ``max_prompt_length``, or half of ``max_length`` when unset (so it follows it).

        ``max_length``: the length ``auto`` resolved to (training resolves it from the data)."""
        length = max_length if max_length is not None else self.max_length
        if not isinstance(length, int):
            raise InputError("auto is resolved from the training data; give a number of tokens here",
                             field="max_length")
        return self.max_prompt_length if self.max_prompt_length is not None else max(1, length // 2)

    def resolved_alpha(self) -> float:
        return float(self.lora_alpha) if self.lora_alpha is not None else 2.0 * self.lora_rank

    def validate(self) -> Config:
        from . import objectives  # late: objectives imports nothing from here

        if not self.model:
            raise InputError("no model given (--model PATH_OR_HUB_ID)", field="model")
        if not self.data and self.eval_data is None:
            raise InputError("no data given (--data FILE)", field="data")
        obj = objectives.get(self.objective)  # InputError with a suggestion (imports a module:name objective)
        self.objective = objectives.canonical(self.objective)  # a mixture in one spelling
        checked: dict[str, dict[str, Any]] = {}
        for key, entry in self.objectives.items():  # every entry against its objective's schema, as numbers
            resolved = objectives.resolve_params(key, entry)
            checked[objectives.get(key).spec] = {k: resolved[k] for k in entry if k in resolved}
        self.objectives = checked
        self.objective_params()  # the modifiers: valid values, and an objective that takes them
        choices = {"dtype": ("float32", "bfloat16", "auto"), "scheduler": ("linear", "cosine", "constant"),
                   "bad_rows": ("error", "skip")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise InputError(f"{getattr(self, name)!r} is not one of {', '.join(allowed)}", field=name)
        fixed = isinstance(self.max_length, int)
        self.check_device()
        self.check_judges()
        opt = lambda v, ok: v is None or ok(v)  # noqa: E731  (unset optional values are fine)
        checks = [  # (field, holds, the rule in words)
            ("lora_rank", self.lora_rank >= 0, ">= 0 (0 = full fine-tuning)"),
            ("lora_alpha", opt(self.lora_alpha, lambda v: v > 0), "> 0"),
            ("lora_dropout", 0 <= self.lora_dropout < 1, "in [0, 1)"),
            ("eval_fraction", 0 <= self.eval_fraction < 1, "in [0, 1)"),
            ("split_seed", self.split_seed >= 0, ">= 0"),
            ("max_length", self.max_length == "auto" or fixed and self.max_length >= 2, ">= 2 or auto"),
            ("max_bad_rows", self.max_bad_rows >= 0, ">= 0 (a count, or a share below 1)"),
            ("max_train_pairs", opt(self.max_train_pairs, lambda v: v >= 1), ">= 1"),
            ("lr", self.lr > 0, "> 0"), ("batch_size", self.batch_size >= 1, ">= 1"),
            ("grad_accum", self.grad_accum >= 1, ">= 1"), ("max_steps", opt(self.max_steps, lambda v: v >= 1), ">= 1"),
            ("epochs", self.epochs > 0, "> 0"), ("warmup_ratio", 0 <= self.warmup_ratio <= 1, "in [0, 1]"),
            ("weight_decay", self.weight_decay >= 0, ">= 0"), ("max_grad_norm", self.max_grad_norm >= 0, ">= 0"),
            ("seed", self.seed >= 0, ">= 0"), ("eval_every", self.eval_every >= 0, ">= 0 (0 = start and end only)"),
            ("eval_batch_size", self.eval_batch_size >= 1, ">= 1"),
            ("gen_eval_prompts", self.gen_eval_prompts >= 0, ">= 0 (0 = off)"),
            ("gen_max_new_tokens", self.gen_max_new_tokens >= 1, ">= 1"),
            ("gen_temperature", self.gen_temperature >= 0, ">= 0 (0 = greedy)"),
            ("log_every", self.log_every >= 1, ">= 1"), ("save_every", self.save_every >= 0, ">= 0 (0 = end only)"),
            ("logit_chunk", self.logit_chunk >= 1, ">= 1"),
            ("reference_tokens", self.reference_tokens >= 0, ">= 0"), ("threads", opt(self.threads, lambda v: v >= 1), ">= 1"),
            ("ref_sync_steps", self.ref_sync_steps >= 0, ">= 0 (0 = off)"),
            ("ref_sync_alpha", 0 < self.ref_sync_alpha <= 1, "in (0, 1] (1 = copy the policy)"),
        ]
        for name, ok, rule in checks:
            if not ok:
                raise InputError(f"invalid value {getattr(self, name)!r}: must be {rule}", field=name)
        if self.batch_size < obj.min_batch_size:
            raise InputError(f"{self.batch_size}: must be at least {obj.min_batch_size} for '{obj.name}' (its reference "
                             f"point is estimated from the other rows of a micro-batch)", field="batch_size")
        if self.ref_sync_steps and not (self.lora_rank and obj.needs_reference):
            why = (f"'{obj.name}' has no reference to sync" if self.lora_rank else
                   "the synced reference is a second LoRA adapter: full fine-tuning (lora_rank 0) would need a second "
                   "copy of the model")
            raise InputError(f"{self.ref_sync_steps}: {why}; set ref_sync_steps 0", field="ref_sync_steps")
        below = self.max_length if fixed else math.inf  # auto: checked once it is resolved (training/prepare.py)
        if self.max_prompt_length is not None and not 1 <= self.max_prompt_length < below:
            given = "its default" if self.max_length == FIELDS["max_length"].default else "given"
            raise InputError(f"{self.max_prompt_length} must be at least 1 and below max_length ({self.max_length}, "
                             f"{given}); leave it unset to use half of max_length", field="max_prompt_length")
        return self

    def judges(self) -> list[str]:
        """The judge specs, first one first (its numbers are gen_eval's top level): ``judge`` as a list."""
        return [] if not self.judge else [self.judge] if isinstance(self.judge, str) else list(self.judge)

    def check_judges(self) -> None:
        """Judge names are unique, and no judge URL carries credentials (they would be written everywhere)."""
        specs = [s.strip() for s in self.judges()]
        for spec in specs:
            refuse_credentials(spec)
        twice = next((s for s in specs if specs.count(s) > 1), None)
        if twice:
            raise InputError(f"judge {twice!r} is given twice: each judge needs its own spec", field="judge")

    def check_device(self) -> None:
        if not (self.device in ("auto", "cpu", "mps") or self.device.split(":")[0] == "cuda"):
            raise InputError(f"{self.device!r} is not one of auto, cpu, cuda, cuda:N, mps", field="device")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def objective_params(self) -> dict[str, Any]:
        """What the objective is run with: its ``objectives`` entry over the schema's defaults (a mixture's terms
        each from their own entry), ``nll_weight``, and the modifiers that are on."""
        from . import objectives

        mods = {k: getattr(self, k) for m in objectives.MODIFIERS.values() for k in m.fields}
        return objectives.run_params(self.objective, self.objectives, nll_weight=self.nll_weight, modifiers=mods)

    def resolved_device(self) -> str:
        if self.device != "auto":
            return self.device
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"

    def resolved_cache_dir(self) -> Path:
        return Path(self.cache_dir or os.environ.get("PREFTUNE_CACHE") or Path.home() / ".cache" / "preftune")


FIELDS = {f.name: f for f in fields(Config)}
# The matrix `preftune ablate` runs without --grid (and `preftune plan` plans): objective x LoRA rank.
DEFAULT_GRID: dict[str, list[Any]] = {"objective": ["dpo", "simpo"], "lora_rank": [16, 8]}


def field_docs() -> dict[str, tuple[str, str]]:
    """(group, one line of help) per field, read from the class source above: the ``# --- group`` rule over the
    field and its trailing comment. One source for the flags' help, the docs and the code."""
    docs, group = {}, ""
    for line in inspect.getsource(Config).splitlines():
        rule = re.match(r"\s*# --- ([^-(]+?)\s*(\(.*)?-+$", line)
        if rule:
            group = rule.group(1)
            continue
        f = re.match(r"\s{4}(\w+): .*?=.*?(?:  # (.*))?$", line)
        if f and f.group(1) in FIELDS:
            docs[f.group(1)] = (group, (f.group(2) or "").strip())
    return docs


# Flags and top-level YAML keys that set a hyperparameter of the objective being run.
SHORTHANDS = ("beta", "gamma", "gamma_beta_ratio", "label_smoothing")
_HINTS = get_type_hints(Config)
_BOOLS = {**dict.fromkeys(("1", "true", "yes", "on"), True), **dict.fromkeys(("0", "false", "no", "off"), False)}


def repeatable(name: str) -> bool:
    """A field that takes text or a list of texts (judge): its flag is given once per value."""
    types = get_args(_HINTS[name])
    return str in types and any(get_origin(t) is list for t in types)


def refuse_credentials(spec: str) -> None:
    """A one-line InputError, quoting nothing of ``spec``, when a URL in it carries ``user:password@``: a judge
    spec is written to config.yaml, summary.json and the trackers, so a password in it would be too (and a
    URL with one never connects). The key belongs in the environment."""
    if re.search(r"[A-Za-z][A-Za-z0-9+.-]*://[^/?#\s]*@", spec):
        raise InputError("a judge URL with credentials (user:password@host) is refused: they would be written to "
                         "config.yaml and logs; give the key in $PREFTUNE_JUDGE_API_KEY", field="judge")


def coerce(key: str, value: Any, source: str = "config") -> Any:
    """Convert a YAML or command-line value to the field's type; InputError naming the key if it can't."""
    if key not in FIELDS:  # the shorthands (beta, ...) are keys too: a typo of one gets its suggestion
        raise InputError(f"unknown key{did_you_mean(key, list(FIELDS) + list(SHORTHANDS))}", path=source, field=key)
    hint = _HINTS[key]
    types = list(get_args(hint)) if get_origin(hint) in (Union, UnionType) else [hint]
    if value is None or (isinstance(value, str) and value.lower() in ("none", "null") and type(None) in types):
        if type(None) in types:
            return None
        raise InputError("must not be empty", path=source, field=key)
    bases = [t for t in types if t is not type(None)]
    lists = [t for t in bases if get_origin(t) is list]
    if str in bases and lists and isinstance(value, list) and len(value) <= 1:  # judge: one item is that text
        return str(value[0]) if value else None
    for base in bases:  # `int | str`: the first type that takes the value (max_length: 512 or auto)
        with contextlib.suppress(ValueError, TypeError, KeyError):  # KeyError: not a yes/no word
            return _convert(base, value, key, source)
    kind = " or ".join(getattr(b, "__name__", str(b)) for b in bases)
    raise InputError(f"{reprlib.repr(value)} is not a valid {kind}", path=source, field=key)


def _convert(base: Any, value: Any, key: str, source: str) -> Any:
    origin = get_origin(base)
    if base is bool:
        return value if isinstance(value, bool) else _BOOLS[str(value).lower()]
    if base in (int, float):  # a yes/no is not a number, and an int is whole
        if isinstance(value, bool) or (base is int and isinstance(value, float) and not value.is_integer()):
            raise ValueError
        return base(value)
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
    if origin is dict and get_args(base)[1] is str:  # columns: "prompt=question,chosen=a" or {prompt: question}
        if isinstance(value, str):
            value = dict(part.split("=", 1) for part in value.split(",") if part.strip())
        if not isinstance(value, dict) or not all(isinstance(v, str) and v.strip() for v in value.values()):
            raise ValueError
        return {str(k).strip(): v.strip() for k, v in value.items()}
    if origin is dict:
        if not isinstance(value, dict):
            raise ValueError
        for name, over in value.items():
            if not isinstance(over, dict):
                raise InputError("must map an objective name to {key: value}", path=source, field=f"{key}.{name}")
        # values are checked against each objective's schema in validate() (objectives.resolve_params)
        return {str(name): {str(k): v for k, v in over.items()} for name, over in value.items()}
    return value


MAX_CONFIG_BYTES = 1 << 20  # a config is a few hundred bytes; anything near a megabyte is not a config
MAX_NODES = 100_000         # values after expanding aliases: a config has tens; an alias bomb has billions


class _BoundedLoader(yaml.SafeLoader):
    """``yaml.safe_load`` that counts what the document expands to while composing it: an alias counts as
    everything it refers to, so a bomb of nested aliases is refused at once, before anything downstream (a
    repr, a JSON dump) would expand it. Anchors and aliases within reason are fine."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        node = super().compose_node(parent, index)
        sizes = self.__dict__.setdefault("_sizes", {})
        if id(node) not in sizes:
            children = node.value if isinstance(node, yaml.SequenceNode) else \
                [n for pair in node.value for n in pair] if isinstance(node, yaml.MappingNode) else []
            sizes[id(node)] = 1 + sum(sizes.get(id(c), 1) for c in children)
        self.__dict__["_total"] = self.__dict__.get("_total", 0) + sizes[id(node)]
        if self._total > MAX_NODES:
            raise yaml.YAMLError(f"expands to more than {MAX_NODES:,} values through its aliases (*name): refused")
        return node


def load_yaml(path: str | os.PathLike) -> dict[str, Any]:
    try:
        if Path(path).stat().st_size > MAX_CONFIG_BYTES:
            raise InputError(f"larger than {MAX_CONFIG_BYTES >> 20} MiB: not a config file", path=str(path))
        text = Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise InputError(f"cannot read config: {e.strerror}", path=str(path)) from None
    try:
        raw = yaml.load(text, Loader=_BoundedLoader)  # noqa: S506  (a SafeLoader)
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
    """Defaults < YAML values < explicit overrides (command line); shorthands (``beta``, ...) go into the entry
    of the objective being run: YAML shorthands < the YAML ``objectives`` entry < command-line shorthands."""
    from . import objectives

    yaml_values, overrides = dict(yaml_values or {}), dict(overrides or {})
    # the saved config.yaml of older versions has `beta: null` etc. at the top level: None is no value
    short_yaml = {k: v for k in SHORTHANDS if (v := yaml_values.pop(k, None)) is not None}
    short_cli = {k: overrides.pop(k) for k in SHORTHANDS if k in overrides}
    values = {k: coerce(k, v, source) for k, v in yaml_values.items()}
    values.update({k: coerce(k, v, "command line") for k, v in overrides.items()})
    if short_yaml or short_cli:
        name = values.get("objective", Config.objective)
        entries = dict(values.get("objectives", {}))
        low, high = objectives.spread(name, short_yaml), objectives.spread(name, short_cli)
        for spec in {**low, **high}:
            entries[spec] = {**low.get(spec, {}), **entries.get(spec, {}), **high.get(spec, {})}
        values["objectives"] = entries
    return Config(**values)


def from_file(path: str | os.PathLike, **overrides: Any) -> Config:
    return build(load_yaml(path), overrides, source=str(path))


def dump_yaml(cfg: Config) -> str:
    """The resolved config: the run's own ``objectives`` entry holds every hyperparameter it ran with
    (defaults filled in), so loading this file back gives the same run."""
    from . import objectives

    d = cfg.to_dict()
    own = objectives.entries_of(cfg.objective, cfg.objective_params())
    names = {objectives.get(spec).name for spec in own}
    d["objectives"] = {**{k: v for k, v in d["objectives"].items() if k not in names}, **own}
    return yaml.safe_dump(d, sort_keys=False)
