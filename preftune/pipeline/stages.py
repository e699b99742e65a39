"""The pipeline's stages, one function each: (status, verdict) for the manifest, every file in the stage's own
normal preftune folder. Each is safe to call again after an interruption: it finishes what is missing.

    status, verdict = gate_stage(recipe, PipelineDir(Path("loop")))      # ("done", "hold")
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from ..core.config import Config
from ..core.errors import InputError
from ..core.files import atomic_write_json
from ..core.layout import (
    GATE_RECORD,
    MatrixDir,
    PipelineDir,
    RunDir,
    read_audit,
    read_decision,
    write_decision,
)
from ..core.runtime import crash_hook
from ..data.audit import headline
from ..data.rows import load_prompts
from ..evaluation.checks import answer_and_judge
from ..generation.judges import parse_judge
from ..verdict.gate import gate_verdict
from ..verdict.pipeline_page import evidence_card
from .recipe import Recipe

SFT_MERGED = "sft-model"  # a LoRA SFT stage's adapter merged into its base: the matrix's model


def sft_stage(recipe: Recipe, out: PipelineDir) -> tuple[str, str | None]:
    """SFT on the chosen answers; a LoRA SFT is merged, so the matrix starts from a plain model folder."""
    from ..training.export import export
    from ..training.loop import train

    assert recipe.sft is not None
    summary = train(replace(recipe.sft, output=str(out.sft), resume=True))
    if recipe.sft.lora_rank and not (out.path / SFT_MERGED / "config.json").exists():
        export(out.sft, out.path / SFT_MERGED, merge=True)
    first, last = summary.step0_eval or {}, summary.final_eval or {}
    key = "eval_lennorm/accuracy"
    return "done", f"held-out {key[5:]} {first.get(key, float('nan')):.3f} -> {last.get(key, float('nan')):.3f}"


def sft_model(recipe: Recipe, out: PipelineDir) -> Path:
    assert recipe.sft is not None
    return out.path / SFT_MERGED if recipe.sft.lora_rank else RunDir(out.sft).full_model


def base_config(recipe: Recipe, out: PipelineDir) -> Config:
    """The matrix's base config, its model the SFT stage's result when there is one."""
    model = sft_model(recipe, out) if recipe.sft is not None else Path(recipe.matrix.model)
    return replace(recipe.matrix, model=str(model), output=str(out.matrix), resume=True)


def matrix_stage(recipe: Recipe, out: PipelineDir) -> tuple[str, str | None]:
    from ..training.matrix import run_matrix

    result = run_matrix(base_config(recipe, out), recipe.grid)
    return "done", f"{result['finished']} finished, {result['failed']} failed"


def decide_stage(recipe: Recipe, out: PipelineDir) -> tuple[str, str | None]:
    from ..verdict.decide import decide
    from ..verdict.report import write_report

    d = decide(out.matrix, alpha=recipe.alpha, baseline=recipe.baseline)
    write_decision(out.matrix, d)
    crash_hook("pipeline decide")
    write_report(out.matrix)
    return "done", f"{d.verdict} -> {d.objective} r={d.lora_rank}"


def chosen_cell(out: PipelineDir) -> RunDir:
    """The run folder of the matrix cell the decision recommends (its first seed)."""
    d = read_decision(out.matrix)
    for c in d.cells:
        if c.finished and (c.objective, c.lora_rank) == (d.objective, d.lora_rank):
            return MatrixDir(out.matrix).cell(c.name)
    raise InputError(f"the decision recommends {d.objective} r={d.lora_rank}, which has no finished cell",
                     path=str(out.matrix))


def gate_stage(recipe: Recipe, out: PipelineDir) -> tuple[str, str | None]:
    """The candidate (the chosen cell) and the model it would replace answer every check's prompts; the rules
    decide ship or hold (verdict/gate.py)."""
    cfg = base_config(recipe, out)
    candidate, reference, tok = _models(cfg, chosen_cell(out))
    evidence = []
    for check in recipe.checks:
        prompts = load_prompts(check.prompts)[:check.max_prompts]
        judges = [parse_judge(spec, cfg) for spec in check.judges]
        rows = answer_and_judge(candidate, tok, prompts, judges, max_new_tokens=recipe.max_new_tokens,
                                out=out.check_rows(check.name), reference_model=reference, seed=cfg.seed,
                                batch_size=cfg.eval_batch_size)
        evidence.append((check, rows))
        crash_hook(f"pipeline gate {check.name}")
    record = gate_verdict(evidence)
    atomic_write_json(out.gate / GATE_RECORD, record)
    return "done", record["verdict"]


def _models(cfg: Config, cell: RunDir) -> tuple[Any, Any, Any]:
    """(candidate, the model it replaces or None when that is the candidate with its adapter off, tokenizer)."""
    from ..modeling.model import load_adapter, load_model, load_tokenizer

    tok, base = load_tokenizer(cfg), load_model(cfg)
    if cell.adapter.exists():
        return load_adapter(base, str(cell.adapter)), None, tok
    return load_model(replace(cfg, model=str(cell.full_model))), base, tok


def ship_stage(recipe: Recipe, out: PipelineDir) -> tuple[str, str | None]:
    """The chosen cell exported (merged or its adapter) with its evidence, unless the gate held it."""
    from ..training.export import export

    gate = out.read_gate() if recipe.checks else None
    if gate is not None and gate["verdict"] != "ship":
        return "held", "held by the gate: nothing exported"
    if not (out.ship / "README.md").exists():  # export writes the folder in one rename: present means whole
        shipped = evidence(recipe, out, gate)
        export(chosen_cell(out).path, out.ship, merge=recipe.merge, dtype=recipe.dtype,
               evidence=shipped, evidence_md=evidence_card(shipped))
        crash_hook("pipeline ship")
    return "done", "merged model" if recipe.merge else "adapter"


def evidence(recipe: Recipe, out: PipelineDir, gate: dict[str, Any] | None) -> dict[str, Any]:
    """What the shipped model carries (ship/evidence.json, and its model card)."""
    d = read_decision(out.matrix)
    sft = RunDir(out.sft).read_summary() if recipe.sft is not None else None
    audit = read_audit(out.matrix)
    return {"base_model": recipe.raw.get("model"), "data": None if audit is None else {
                "headline": headline(audit), "counts": audit.counts,
                "findings": [{"code": f["code"], "severity": f.get("severity")} for f in audit.findings]},
            "sft": None if sft is None else {
                k: getattr(sft, k) for k in ("objective", "lora_rank", "steps", "step0_eval", "final_eval")},
            "candidate": chosen_cell(out).name,
            "matrix": {"verdict": d.verdict, "objective": d.objective, "lora_rank": d.lora_rank, "summary": d.summary,
                       "reasons": [r["code"] for r in d.reasons], "explanation": d.explanation},
            "gate": None if gate is None else {k: gate[k] for k in ("verdict", "checks", "explanation")}}


def iterate_stage(recipe: Recipe, out: PipelineDir) -> tuple[str, str | None]:
    """On-policy rounds from the chosen cell, when the recipe asks and the gate passed."""
    from ..training.rounds import iterate

    gate = out.read_gate() if recipe.checks else None
    if gate is not None and gate["verdict"] != "ship":
        return "held", "held by the gate: no rounds"
    s = dict(recipe.iterate or {})
    base = replace(base_config(recipe, out), output=str(out.rounds), init_adapter=str(chosen_cell(out).adapter))
    result = iterate(base, prompts=str(s.pop("prompts", base.data)), judge_spec=str(s.pop("judge", base.judge)),
                     rounds=int(s.pop("rounds", 1)), **s)
    last = result["rounds"][-1]
    return "done", f"{len(result['rounds'])} round(s); last win rate {last['win_rate']:.3f}"
