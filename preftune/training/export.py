"""``preftune export``: a run's result in a form any tool loads, with a model card.

    preftune export runs/x --merge --output merged/        # base + adapter merged: plain transformers loads it
    preftune export runs/x --output adapter/               # the peft adapter, as it is
    preftune export matrix/cells/objective=simpo,lora_rank=8 --merge --output best/ --dtype bfloat16

The forms and the model card: docs/export.md. ``--merge`` merges in fp32, then casts to ``--dtype``. The
output folder appears in one rename (files.atomic_dir): a failed export leaves nothing behind.
"""

from __future__ import annotations

import json
import re
import shutil
import warnings
from pathlib import Path
from typing import Any

import yaml

from ..core.errors import InputError, one_line
from ..core.files import atomic_dir, atomic_write_json
from ..core.layout import EVIDENCE, RunDir, RunSummary, matrix_of, read_decision


def export(run: str | Path, output: str | Path, *, merge: bool = False, dtype: str | None = None,
           evidence: dict[str, Any] | None = None, evidence_md: str = "") -> Path:
    """Write ``output`` (see the module docstring). Raises InputError before writing anything on bad input.

    ``evidence`` (the pipeline's: base and SFT models, the data audit, the matrix verdict, the gate table) goes
    into the same folder as evidence.json; ``evidence_md``, the same in words, ends the model card."""
    run, output = Path(run), Path(output)
    if not run.is_dir():
        raise InputError("no such run folder", path=str(run))
    cfg = _read_yaml(RunDir(run).config)
    summary = RunDir(run).read_summary()
    adapter, full = RunDir(run).adapter, RunDir(run).full_model
    if (adapter / "adapter_config.json").exists():
        kind = "merged" if merge else "adapter"
    elif (full / "config.json").exists():
        kind = "full"
    else:
        raise InputError("the run has no adapter (adapter/adapter_config.json) and no model/ folder: "
                         "export a finished run", path=str(run))
    if dtype is not None and kind != "merged":
        raise InputError("--dtype applies to a merged export (add --merge)", field="dtype")
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise InputError("output exists and is not empty; choose another --output", path=str(output))
    if output.resolve() == run.resolve() or run.resolve() in output.resolve().parents:
        raise InputError("write the export outside the run folder", path=str(output))
    base = str(cfg.get("model") or "")
    if kind != "full" and not base:
        raise InputError("config.yaml names no base model", path=str(RunDir(run).config), field="model")

    for key in ("model", "tokenizer"):  # a relative path in config.yaml is relative to where training ran
        name = str(cfg.get(key) or "")
        if kind != "full" and name and not Path(name).is_absolute() and not Path(name).exists() and \
                (name.startswith(".") or name.count("/") > 1):
            raise InputError(f"config.yaml's {key} {name!r} is a relative path that does not exist from here; "
                             "run export from the folder training ran in", path=str(run), field=key)
    card = model_card(run, cfg, summary, kind=kind, dtype=dtype or "float32") + evidence_md
    if kind == "merged":
        model, tok = _merged(cfg, adapter, dtype or "float32")
    with atomic_dir(output) as tmp:
        if kind == "merged":
            model.save_pretrained(tmp, safe_serialization=True)
            tok.save_pretrained(tmp)
        else:
            src = adapter if kind == "adapter" else full
            for f in src.iterdir():
                if f.is_file() and f.suffix not in (".bin", ".pt", ".pth", ".pkl"):  # safetensors only
                    shutil.copy2(f, tmp / f.name)
            if kind == "adapter":
                _tokenizer(cfg).save_pretrained(tmp)
        if evidence is not None:
            atomic_write_json(tmp / EVIDENCE, evidence)
        (tmp / "README.md").write_text(card, encoding="utf-8")
    return output


def _merged(cfg: dict, adapter: Path, dtype: str) -> tuple[Any, Any]:
    """Base model in fp32 + adapter, merged; then cast. Loading errors become one line."""
    import os
    import sys

    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    if not sys.stderr.isatty() or os.environ.get("CI"):
        hf_logging.disable_progress_bar()  # as model.load_model: a bar redrawn per shard is noise in a log
    base = str(cfg["model"])
    remote = bool(cfg.get("trust_remote_code", False))
    try:
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32, use_safetensors=True,
                                                     trust_remote_code=remote)
    except Exception as e:
        raise InputError(f"cannot load the base model: {one_line(e)}", path=base, field="model") from None
    try:
        with warnings.catch_warnings():  # peft calls a transformers API deprecated in v5: noise, not news
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            model = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    except Exception as e:
        raise InputError(f"cannot apply the adapter: {one_line(e)}", path=str(adapter)) from None
    model = model.to(getattr(torch, dtype))
    model.config.use_cache = True  # training turned it off; generation wants it
    return model, _tokenizer(cfg)


def _tokenizer(cfg: dict) -> Any:
    from transformers import AutoTokenizer

    name = str(cfg.get("tokenizer") or cfg.get("model"))
    try:
        return AutoTokenizer.from_pretrained(name, trust_remote_code=bool(cfg.get("trust_remote_code", False)))
    except Exception as e:
        raise InputError(f"cannot load the tokenizer: {one_line(e)}", path=name, field="tokenizer") from None


# ------------------------------------------------------------------------------------------------ model card
def model_card(run: Path, cfg: dict, summary: RunSummary, *, kind: str, dtype: str) -> str:
    """README.md: Hugging Face YAML header (base_model, library_name, tags) + what the run was and how it did."""
    objective, rank = summary.objective, summary.lora_rank
    base = str(cfg.get("model", ""))
    header: dict[str, Any] = {"base_model": base} if hub_id(base, summary) else {}
    header.update({"library_name": "peft" if kind == "adapter" else "transformers",
                   "pipeline_tag": "text-generation",
                   "tags": ["preftune", str(objective)] + (["lora"] if rank else []) +
                           (["merged"] if kind == "merged" else [])})
    lines = ["---", yaml.safe_dump(header, sort_keys=False).strip(), "---", "",
             f"# {objective} {'LoRA r=' + str(rank) if rank else 'full fine-tuning'} ({kind})", "",
             f"Trained with preftune; exported from `{run}`.", "", base_line(base, summary)]
    if kind == "adapter":
        lines += ["", "```python", "from transformers import AutoModelForCausalLM", "from peft import PeftModel", "",
                  f"model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained({str(cfg.get('model'))!r}), "
                  "\"THIS_FOLDER\")", "```"]
    else:
        lines += ["", "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
                  "model = AutoModelForCausalLM.from_pretrained(\"THIS_FOLDER\")",
                  "tokenizer = AutoTokenizer.from_pretrained(\"THIS_FOLDER\")", "```"]
        if kind == "merged":
            lines += ["", f"The adapter is merged into the weights (fp32 merge, saved as {dtype})."]
    hyper = {"objective": objective, **(summary.params or {})}
    keys = ("lora_rank", "lora_alpha", "lora_dropout", "lora_target_modules", "lr", "batch_size",
            "grad_accum", "max_steps", "epochs", "scheduler", "warmup_ratio", "max_length",
            "max_prompt_length", "seed", "dtype")
    hyper.update({k: cfg[k] for k in keys if k in cfg})
    if hyper.get("lora_alpha") is None and rank:
        hyper["lora_alpha"] = 2 * rank  # Config: None means 2 x rank
    hyper["steps_done"] = summary.steps
    lines += ["", "## Hyperparameters", "", "| key | value |", "|---|---|"]
    lines += [f"| `{k}` | {_cell(v)} |" for k, v in hyper.items()]
    data = summary.data or {}
    if data:
        lines += ["", "## Data", "", f"Training data `{cfg.get('data', '')}`, held-out `{cfg.get('eval_data') or 'split from the training data'}`.",
                  "", "| split | rows | kept | truncated | dropped |", "|---|---|---|---|---|"]
        for split, st in data.items():
            lines.append(f"| {split} | {st.get('rows', '')} | {st.get('kept', '')} | {st.get('truncated', '')} | "
                         f"{st.get('dropped', '')} |")
    final, first = summary.final_eval or {}, summary.step0_eval or {}
    if final:
        lines += ["", "## Held-out results", "", "| metric | step 0 | final |", "|---|---|---|"]
        for key, label in (("eval_accuracy", "accuracy (own reward)"),
                           ("eval_refrel/accuracy", "reference-relative yardstick"),
                           ("eval_lennorm/accuracy", "length-normalized yardstick"),
                           ("eval_rewards/margins", "reward margin"), ("eval_loss", "loss"),
                           ("eval_pairs", "held-out pairs")):
            if key in final:
                lines.append(f"| {label} | {_cell(first.get(key, ''))} | {_cell(final[key])} |")
    matrix = matrix_of(run)
    decision = read_decision(matrix.path) if matrix is not None and matrix.decision.exists() else None
    if decision is not None:
        chosen = (decision.objective == objective and decision.lora_rank == rank)
        lines += ["", "## Matrix verdict", "",
                  f"This run is cell `{run.name}` of the matrix `{run.parent.parent}`. `preftune decide`: "
                  f"**{decision.verdict}** -> {decision.objective} r={decision.lora_rank}"
                  f" ({'this cell' if chosen else 'another cell'}).", ""]
        if decision.summary:
            lines += [str(decision.summary), ""]
        # decision.json: "explanation" holds the rendered sentences ("reasons" the same as data records)
        sentences = decision.explanation or [r for r in decision.reasons if isinstance(r, str)]
        lines += [f"- {r}" for r in sentences]
    elif matrix is not None:
        lines += ["", "## Matrix verdict", "", f"Cell `{run.name}` of `{run.parent.parent}`; no decision.json yet "
                  "(run `preftune decide` on the matrix)."]
    return "\n".join(lines).rstrip() + "\n"


_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]*[A-Za-z0-9]")  # owner/name, as the Hub spells repo ids


def hub_id(base: str, summary: RunSummary) -> bool:
    """Whether ``base`` goes into the card's ``base_model``, which the Hub reads as a model id: "owner/name", not
    a folder at training (summary.json -> model.base_local) nor here. A local path there links to nothing."""
    local = (summary.model or {}).get("base_local")
    return (bool(_HUB_ID.fullmatch(base)) and ".." not in base and "--" not in base and not local
            and not Path(base).exists())


def base_line(base: str, summary: RunSummary) -> str:
    """Where the base came from, in words: a Hub id, or a local folder (never in the header) with the content
    fingerprint training recorded, so a reader can tell whether a folder of that name is the same model."""
    fp = (summary.model or {}).get("base_fingerprint")
    mark = (f" Fingerprint of its weights and config at training: `{fp}` (blake2b-160 over its `*.safetensors`, "
            "`config.json` and `generation_config.json`; `preftune.modeling.model.fingerprint`).") if fp else ""
    if hub_id(base, summary):
        return f"Base model: [`{base}`](https://huggingface.co/{base}) on the Hugging Face Hub.{mark}"
    where = str(Path(base).resolve()) if Path(base).exists() else base
    return (f"Base model: local folder `{where}` (a path, not a Hub id, so the header has no `base_model`)."
            f"{mark}")


def _cell(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, (list, dict)):
        return "`" + json.dumps(v) + "`"
    return str(v).replace("|", "\\|")


def _read_yaml(path: Path) -> dict:
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError:
        raise InputError("not a run folder: no config.yaml", path=str(path.parent)) from None
    except yaml.YAMLError:
        raise InputError("config.yaml is not valid YAML", path=str(path)) from None
    if not isinstance(raw, dict):
        raise InputError("config.yaml is not a mapping", path=str(path))
    return raw
