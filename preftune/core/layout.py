"""The on-disk layout in one place: every folder preftune writes, its file names, what kind a folder is, and the
typed records that stages hand each other through those files (summary.json, matrix.json, decision.json,
iterate.json). No other module spells a file name. The formats are in docs/formats.md; folders written by
earlier versions load unchanged.

    run = RunDir(Path("runs/x"))
    summary = run.read_summary()          # RunSummary; InputError naming the file if it is missing or garbled
    folder_kind(Path("matrix"))           # "matrix" | "rounds" | "run" | "other"
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from .errors import InputError
from .files import DamagedFile, atomic_write_json, clean_json, json_digest

# --- a run folder (preftune train --output; a matrix cell; a round) -----------------------------------------
CONFIG = "config.yaml"             # the resolved Config
METRICS = "metrics.jsonl"          # one line per logged step and per eval
EVAL_PAIRS = "eval_pairs.jsonl"    # one row per held-out pair at the final eval
SUMMARY = "summary.json"           # RunSummary
GEN_EVAL = "gen_eval.jsonl"        # behavioural evaluation, one row per prompt
ADAPTER = "adapter"                # peft adapter (LoRA runs)
FULL_MODEL = "model"               # the whole model + tokenizer (full fine-tuning)
CHECKPOINTS = "checkpoints"        # step-NNNNNNN/ folders, the newest complete one kept
REVIEW = "review.json"             # preftune review
AUDIT = "audit.json"               # the data audit (train's preflight, preftune audit); a matrix and rounds folder too
REPORT_MD, REPORT_HTML = "report.md", "report.html"
EVAL_METRICS = "metrics.json"      # preftune eval's own folder
TENSORBOARD, MLRUNS, WANDB = "tensorboard", "mlruns", "wandb"
# --- one checkpoint --------------------------------------------------------------------------------------------
TRAINABLE, OPTIMIZER, STATE = "trainable.safetensors", "optimizer.safetensors", "state.json"
REFERENCE_ADAPTER = "reference_adapter.safetensors"  # TR-DPO's synced reference (--ref-sync-steps), once it has one
# --- a matrix folder (preftune ablate --output) -------------------------------------------------------------------
MATRIX = "matrix.json"             # MatrixIndex
BASE_CONFIG = "base_config.yaml"   # the config before per-cell values
CELLS = "cells"                    # one run folder per cell
CHILD_CONFIGS = ".cells"           # the exact config (and stderr) of each cell run in another process
DECISION = "decision.json"         # Decision (matrices and rounds)
# --- a rounds folder (preftune iterate --output) ---------------------------------------------------------------
ROUNDS = "iterate.json"            # settings and the starting model
ROUND_PREFIX = "round-"
SAMPLES, SAMPLES_PARTIAL = "samples.jsonl", "samples.partial.jsonl"
PAIRS, PAIR_STATS = "pairs.jsonl", "pairs.stats.json"
START = "start"                    # --reference round: the previous round merged
# --- a pipeline folder (preftune pipeline RECIPE --output) --------------------------------------------------
MANIFEST = "pipeline.json"         # the recipe and every stage's state
SFT, MATRIX_DIR, GATE, SHIP, ITERATE_DIR = "sft", "matrix", "gate", "ship", "rounds"  # one folder per stage
GATE_RECORD = "gate.json"          # the gate's verdict (ship / hold), its reasons and every check's numbers
EVIDENCE = "evidence.json"         # what a shipped model carries: base, SFT, data audit, verdict, gate table
# --- the cache folder (--cache-dir, $PREFTUNE_CACHE or ~/.cache/preftune), shared by runs ---------------------
REFERENCE_CACHE = "reference"      # reference log-probs, one .safetensors per (model, pairs, arithmetic, layout)
JUDGE_CACHE = "judges"             # judge answers, one append-only .jsonl per judge identity
FINGERPRINTS = "fingerprints.json"  # content hashes of model files, memoized by (path, size, mtime)
# --- other tools' files preftune reads -----------------------------------------------------------------------
TRL_STATE = "trainer_state.json"


def _read_json(path: Path, what: str) -> Any:
    """A JSON file preftune wrote, parsed; a missing or garbled one is one line naming it."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"missing: not {what}", path=str(path)) from None
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"cannot read: {e}", path=str(path)) from None
    except json.JSONDecodeError as e:
        raise DamagedFile(f"not valid JSON ({e.msg}): a damaged file", path=str(path), line=e.lineno) from None


def _need_dict(obj: Any, path: Path) -> dict:
    if not isinstance(obj, dict):
        raise InputError("must be a JSON object", path=str(path))
    return obj


# --- records -----------------------------------------------------------------------------------------------------

@dataclass
class RunSummary:
    """summary.json: what one run did and how it ended (docs/formats.md, "summary.json")."""

    objective: str
    lora_rank: int
    seed: int
    steps: int
    status: str                             # finished | diverged
    params: dict[str, float]
    final_eval: dict[str, Any] | None = None
    step0_eval: dict[str, Any] | None = None
    train_last: dict[str, float] = field(default_factory=dict)
    data: dict[str, Any] | None = None
    length_bias: dict[str, Any] | None = None
    timing: dict[str, Any] = field(default_factory=dict)
    model: dict[str, Any] | None = None
    gen_eval: dict[str, Any] | None = None  # runs with a behavioural evaluation only
    ref_sync: dict[str, Any] | None = None  # TR-DPO runs only: {steps, alpha, syncs, rank}

    @property
    def finished(self) -> bool:
        return self.status == "finished"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for key in ("gen_eval", "ref_sync"):  # absent, as in every summary.json from before they existed
            if d[key] is None:
                del d[key]
        return {**d, "sha256": json_digest(d)}  # checked on read: a damaged summary is never trusted

    @staticmethod
    def verify(d: Any, path: Path) -> dict[str, Any]:
        """``d`` when it is the object that was written (its sha256 matches; summaries of older versions carry
        none); DamagedFile otherwise."""
        d = _need_dict(d, path)
        if "sha256" in d and json_digest({k: v for k, v in d.items() if k != "sha256"}) != d["sha256"]:
            raise DamagedFile("damaged: its content does not match the checksum written with it", path=str(path))
        return d

    @classmethod
    def from_dict(cls, d: Any, path: Path) -> RunSummary:
        d = cls.verify(d, path)
        known = {f.name for f in fields(cls)}
        for key, kind in (("objective", str), ("status", str), ("lora_rank", int), ("steps", int), ("seed", int),
                          ("params", dict)):
            if not isinstance(d.get(key), kind) or isinstance(d.get(key), bool):
                raise InputError(f"missing or not {kind.__name__}", path=str(path), field=key)
        return cls(**{k: v for k, v in d.items() if k in known})


@dataclass
class Audit:
    """audit.json: what the data audit found, each finding a code with its numbers and a few escaped-on-render
    examples (docs/formats.md, "audit.json")."""

    sources: dict[str, Any]                 # data, eval_data (or the split that made the held-out side), model, judge
    counts: dict[str, Any]                  # rows, pairs, prompts, heldout_pairs, heldout_prompts, skipped
    findings: list[dict[str, Any]]          # {"code", "severity": info | warn, <numbers>, "examples": [...]}

    def find(self, code: str) -> dict[str, Any] | None:
        return next((f for f in self.findings if f.get("code") == code), None)

    def to_dict(self) -> dict[str, Any]:
        return clean_json(asdict(self))

    @classmethod
    def from_dict(cls, d: Any, path: Path) -> Audit:
        d = _need_dict(d, path)
        if not isinstance(d.get("findings"), list) or not all(isinstance(f, dict) and "code" in f
                                                                for f in d["findings"]):
            raise InputError("needs a 'findings' list of objects with a 'code'", path=str(path), field="findings")
        return cls(d.get("sources") or {}, d.get("counts") or {}, d["findings"])


def read_audit(folder: Path) -> Audit | None:
    """The folder's audit.json, or None when it has none (folders from before the audit, ``--no-audit``)."""
    file = Path(folder) / AUDIT
    return Audit.from_dict(_read_json(file, "an audit"), file) if file.is_file() else None


def write_audit(folder: Path, audit: Audit) -> Path:
    file = Path(folder) / AUDIT
    atomic_write_json(file, audit.to_dict())
    return file


@dataclass
class CellEntry:
    """One cell of matrix.json: its factor values and where it stands."""

    name: str
    values: dict[str, Any]
    status: str = "pending"                 # pending | running | finished | failed
    error: str | None = None

    def mark(self, status: str, error: str | None = None) -> None:
        self.status, self.error = status, error


@dataclass
class MatrixIndex:
    """matrix.json: the factors and every cell, in grid order."""

    factors: dict[str, list[Any]]
    cells: list[CellEntry]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, obj: Any, path: Path) -> MatrixIndex:
        cells = obj.get("cells") if isinstance(obj, dict) else None
        if not isinstance(cells, list) or not all(isinstance(c, dict) and isinstance(c.get("name"), str)
                                                  for c in cells):
            raise InputError("needs a 'cells' list of objects with a 'name'", path=str(path), field="cells")
        factors = obj.get("factors") or {}
        if not isinstance(factors, dict):
            raise InputError("must be an object of factor: [values]", path=str(path), field="factors")
        return cls(factors, [CellEntry(c["name"], c.get("values") or {}, c.get("status", "finished"), c.get("error"))
                             for c in cells])


@dataclass
class CellResult:
    """One cell (or round) as decision.json records it: identity and status, plus its held-out statistics and
    review findings when it finished (docs/formats.md, "decision.json")."""

    name: str
    status: str
    error: str | None = None
    objective: str | None = None
    lora_rank: int | None = None
    seed: int | None = None
    accuracy: float | None = None
    ci: list[float] | None = None
    pairs: int | None = None
    margin: float | None = None
    margin_gap: float | None = None
    train_margin: float | None = None
    margin_std: float | None = None
    unstable: bool | None = None
    findings: list[dict[str, Any]] | None = None
    gen_eval: dict[str, Any] | None = None
    round: int | None = None                # rounds only

    @property
    def finished(self) -> bool:
        return self.status == "finished"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        head = ("name", "status", "error", "objective", "lora_rank", "seed")
        if not self.finished:
            return {k: d[k] for k in head}
        return {k: v for k, v in d.items() if v is not None or k in head or k in ("margin", "margin_gap",
                "train_margin", "margin_std")}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CellResult:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


@dataclass
class Decision:
    """decision.json: a matrix's verdict (switch / keep / not_decisive / fallback_orpo) or a rounds folder's
    (continue / stop), the reasons behind it as data, their sentences, every comparison and every cell."""

    verdict: str
    summary: str
    basis: dict[str, Any]
    reasons: list[dict[str, Any]]
    explanation: list[str]
    comparisons: list[dict[str, Any]]
    cells: list[CellResult]
    objective: str | None = None            # a matrix: the recommended objective and rank, and the baseline
    lora_rank: int | None = None
    baseline: dict[str, Any] | None = None
    groups: list[dict[str, Any]] | None = None  # a seed grid: the (objective, rank) groups
    last_beats_first: bool | None = None    # rounds
    best_round: str | None = None

    @property
    def rounds(self) -> bool:
        return self.best_round is not None

    def to_dict(self) -> dict[str, Any]:
        tail = {"reasons": self.reasons, "explanation": self.explanation, "comparisons": self.comparisons}
        cells = [c.to_dict() for c in self.cells]
        if self.rounds:
            return {"verdict": self.verdict, "last_beats_first": self.last_beats_first, "best_round": self.best_round,
                    "summary": self.summary, "basis": self.basis, **tail, "rounds": cells}
        return {"verdict": self.verdict, "objective": self.objective, "lora_rank": self.lora_rank,
                "baseline": self.baseline, "summary": self.summary, "basis": self.basis, **tail, "cells": cells,
                **({"groups": self.groups} if self.groups is not None else {})}

    @classmethod
    def from_dict(cls, d: Any, path: Path) -> Decision:
        d = _need_dict(d, path)
        rounds = "best_round" in d
        need = ("verdict", "summary", "reasons", "explanation", "comparisons", "rounds" if rounds else "cells")
        missing = [k for k in need if k not in d]
        if missing or not isinstance(d.get("rounds" if rounds else "cells"), list):
            raise InputError(f"not a decision (missing {', '.join(missing) or 'cells'}): rerun preftune decide",
                             path=str(path))
        cells = [CellResult.from_dict(c) for c in d["rounds" if rounds else "cells"]]
        given = {f.name: d.get(f.name) for f in fields(cls)}
        return cls(**{**given, "basis": d.get("basis") or {}, "cells": cells})


# --- folders -------------------------------------------------------------------------------------------------------

def _in(name: str) -> Any:
    """A path inside the folder: ``config = _in(CONFIG)`` makes ``run.config`` the folder's config.yaml."""
    return property(lambda folder: folder.path / name)


@dataclass(frozen=True)
class _Folder:
    path: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path))

    @property
    def name(self) -> str:
        return self.path.name


class RunDir(_Folder):
    """A run folder and the paths of its files."""

    config, metrics, eval_pairs, summary = _in(CONFIG), _in(METRICS), _in(EVAL_PAIRS), _in(SUMMARY)
    gen_eval, adapter, full_model, checkpoints = _in(GEN_EVAL), _in(ADAPTER), _in(FULL_MODEL), _in(CHECKPOINTS)
    audit = _in(AUDIT)

    def file(self, name: str) -> Path:
        return self.path / name

    def checkpoint(self, step: int) -> Path:
        return self.checkpoints / f"step-{step:07d}"

    def read_summary(self) -> RunSummary:
        return RunSummary.from_dict(_read_json(self.summary, "a finished run (no summary.json)"), self.summary)

    def verify_summary(self) -> None:
        """DamagedFile when summary.json is garbled or not what was written (no check of its fields)."""
        RunSummary.verify(_read_json(self.summary, "a finished run (no summary.json)"), self.summary)

    def write_summary(self, summary: RunSummary) -> None:
        atomic_write_json(self.summary, summary.to_dict())

    def finished(self) -> bool:
        """Whether summary.json says so (False when there is none or it can't be read)."""
        try:
            return self.read_summary().finished
        except InputError:
            return False

    def has_log(self) -> bool:
        return self.metrics.is_file()


class RoundDir(RunDir):
    """One round of ``preftune iterate``: a run folder plus its samples and pairs."""

    samples, samples_partial = _in(SAMPLES), _in(SAMPLES_PARTIAL)
    pairs, pair_stats, start = _in(PAIRS), _in(PAIR_STATS), _in(START)

    @property
    def number(self) -> int:
        return int(self.path.name.removeprefix(ROUND_PREFIX))


class MatrixDir(_Folder):
    """A matrix folder: matrix.json, the base config, one run folder per cell, the decision."""

    index, base_config, decision, audit = _in(MATRIX), _in(BASE_CONFIG), _in(DECISION), _in(AUDIT)

    def cell(self, name: str) -> RunDir:
        return RunDir(self.path / CELLS / name)

    def child_config(self, name: str) -> Path:
        return self.path / CHILD_CONFIGS / f"{name}.yaml"

    def child_stderr(self, name: str) -> Path:
        return self.path / CHILD_CONFIGS / f"{name}.err"

    def read_index(self) -> MatrixIndex:
        return MatrixIndex.from_dict(_read_json(self.index, "a matrix folder (no matrix.json)"), self.index)

    def write_index(self, index: MatrixIndex) -> None:
        atomic_write_json(self.index, index.to_dict())


class RoundsDir(_Folder):
    """A rounds folder (``preftune iterate``): iterate.json, summary.json with one line per round, round-N/."""

    meta, summary, decision, audit = _in(ROUNDS), _in(SUMMARY), _in(DECISION), _in(AUDIT)

    def round(self, r: int) -> RoundDir:
        return RoundDir(self.path / f"{ROUND_PREFIX}{r}")

    def rounds(self) -> list[RoundDir]:
        """Every round folder, in round order."""
        found = [RoundDir(p) for p in self.path.glob(f"{ROUND_PREFIX}*") if p.name[len(ROUND_PREFIX):].isdigit()]
        return sorted(found, key=lambda d: d.number)

    def read_meta(self) -> dict[str, Any]:
        meta = _need_dict(_read_json(self.meta, "a rounds folder (no iterate.json)"), self.meta)
        if not isinstance(meta.get("settings"), dict):
            raise InputError("needs a 'settings' object", path=str(self.meta), field="settings")
        return meta

    def read_lines(self) -> list[dict[str, Any]]:
        """summary.json's one line per finished round."""
        rounds = _need_dict(_read_json(self.summary, "a rounds folder (no summary.json)"), self.summary).get("rounds")
        if not isinstance(rounds, list):
            raise InputError("needs a 'rounds' list", path=str(self.summary), field="rounds")
        return rounds


def matrix_of(run: Path) -> MatrixDir | None:
    """The matrix when ``run`` is one of its cells (``<matrix>/cells/<name>``), else None."""
    run = Path(run).absolute()
    if run.parent.name == CELLS and (run.parent.parent / MATRIX).exists():
        return MatrixDir(run.parent.parent)
    return None


STAGE_STATES = ("pending", "running", "done", "held", "skipped", "failed")


@dataclass
class Stage:
    """One stage of a pipeline as the manifest records it."""

    name: str
    status: str = "pending"        # one of STAGE_STATES
    verdict: str | None = None     # decide: switch / keep / ...; gate: ship / hold
    error: str | None = None


class PipelineDir(_Folder):
    """A pipeline folder: the manifest, and one normal preftune folder per stage (every command works on them)."""

    manifest, sft, matrix, gate, ship, rounds = map(_in, (MANIFEST, SFT, MATRIX_DIR, GATE, SHIP, ITERATE_DIR))

    def check_rows(self, check: str) -> Path:
        """The gate check's generations and judgements, one row per prompt."""
        return self.gate / f"{check}.jsonl"

    def read_manifest(self) -> tuple[dict[str, Any], dict[str, Stage]]:
        """(the recipe's identity, the stages by name), checked: a damaged manifest is one line naming it."""
        raw = _need_dict(_read_json(self.manifest, "a pipeline folder (no pipeline.json)"), self.manifest)
        recipe, stages, known = raw.get("recipe"), raw.get("stages"), {f.name for f in fields(Stage)}
        if not isinstance(recipe, dict) or not isinstance(recipe.get("sha256"), str):
            raise DamagedFile("needs a 'recipe' object with its 'sha256'", path=str(self.manifest), field="recipe")
        if not isinstance(stages, list) or not all(isinstance(s, dict) and isinstance(s.get("name"), str)
                                                   and set(s) <= known and s.get("status") in STAGE_STATES
                                                   for s in stages):
            raise DamagedFile("needs a 'stages' list of {name, status, verdict, error}", path=str(self.manifest),
                              field="stages")
        return recipe, {s["name"]: Stage(**s) for s in stages}

    def write_manifest(self, recipe: dict[str, Any], stages: dict[str, Stage]) -> None:
        atomic_write_json(self.manifest, {"recipe": recipe, "stages": [asdict(s) for s in stages.values()]})

    def read_gate(self) -> dict[str, Any]:
        file = self.gate / GATE_RECORD
        gate = _need_dict(_read_json(file, "a gated pipeline (no gate.json)"), file)
        if gate.get("verdict") not in ("ship", "hold") or not all(isinstance(gate.get(k), list) for k in
                                                                   ("checks", "explanation")):
            raise DamagedFile("needs 'verdict' (ship or hold), 'checks' and 'explanation'", path=str(file),
                              field="verdict")
        return gate


def folder_kind(path: Path) -> str:
    """``pipeline`` (pipeline.json), ``rounds`` (iterate.json), ``matrix`` (matrix.json), ``run`` (metrics.jsonl)
    or ``other``."""
    for marker, kind in ((MANIFEST, "pipeline"), (ROUNDS, "rounds"), (MATRIX, "matrix")):
        if (Path(path) / marker).exists():
            return kind
    return "run" if (Path(path) / METRICS).is_file() else "other"


def read_decision(path: Path) -> Decision:
    """decision.json of a matrix or rounds folder (``path``: the folder)."""
    file = Path(path) / DECISION
    return Decision.from_dict(_read_json(file, "a decided folder (no decision.json)"), file)


def write_decision(path: Path, decision: Decision) -> Path:
    """Write decision.json into the folder (atomically, strict JSON: NaN/inf become null); returns its path."""
    file = Path(path) / DECISION
    atomic_write_json(file, clean_json(decision.to_dict()))
    return file
