"""Experiment trackers (``--report-to``): the run's metrics.jsonl rows and resolved config, also sent to
TensorBoard, MLflow, Weights & Biases or Trackio, all offline by default; where each writes (W&B: files under
``<run>/wandb``) and how a matrix groups its cells: docs/metrics.md, "Trackers".

    preftune train ... --report-to tensorboard,mlflow --output runs/x
    tensorboard --logdir runs/x/tensorboard            # or a matrix: --logdir matrix/cells
    mlflow ui --backend-store-uri runs/x/mlruns          # a matrix: matrix/mlruns, one run per cell
"""

from __future__ import annotations

import importlib.util
import math
import os
import time
from pathlib import Path
from typing import Any

from .errors import InputError
from .layout import MLRUNS, TENSORBOARD, matrix_of

CHOICES = ("tensorboard", "mlflow", "wandb", "trackio", "none")  # a tracker's module and extra share its name


def check(names: list[str] | str | None) -> list[str]:
    """The trackers to open (``none`` dropped): unknown names and missing packages are InputErrors.

        check(["tensorboard", "mlflow"])   # -> ["tensorboard", "mlflow"], or InputError
    """
    if names is None:
        return []
    names = [n.strip().lower() for n in (names.split(",") if isinstance(names, str) else names) if n.strip()]
    for n in names:
        if n not in CHOICES:
            raise InputError(f"unknown tracker {n!r}; choose from {', '.join(CHOICES)}", field="report_to")
    chosen = list(dict.fromkeys(n for n in names if n != "none"))
    if chosen and "none" in names:
        raise InputError("'none' cannot be combined with a tracker", field="report_to")
    for n in chosen:
        if importlib.util.find_spec(n) is None:
            raise InputError(f"--report-to {n} needs the {n} package: pip install preftune[{n}]",
                             field="report_to")
    return chosen


def trl_name(key: str) -> str:
    """transformers' ``rewrite_logs``: ``eval_x`` -> ``eval/x``, anything else -> ``train/x``."""
    return f"eval/{key[5:]}" if key.startswith("eval_") else f"train/{key}"


def scalars(row: dict) -> dict[str, float]:
    """The numeric metrics of a metrics.jsonl row (``step`` is the x axis, not a metric)."""
    return {k: float(v) for k, v in row.items()
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}


class Trackers:
    """The run's open trackers; ``log(row)`` for every metrics.jsonl row, ``close()`` once at the end.

        trackers = Trackers(check(cfg.report_to), cfg, Path(cfg.output), resume_step=None)
    """

    def __init__(self, names: list[str], cfg: Any, out: Path, *, resume_step: int | None = None) -> None:
        self.backends: list[_Backend] = []
        out = Path(out).absolute()
        matrix = m.path if (m := matrix_of(out)) else None
        # config fields as tracker params: scalars kept, lists/dicts/None as their text
        params = {k: v if isinstance(v, (int, float, str, bool)) else str(v)
                  for k, v in cfg.to_dict().items()}
        try:
            for name in names:
                self.backends.append(BACKENDS[name](out, matrix, params, resume_step))
        except BaseException:
            self.close()
            raise

    def log(self, row: dict) -> None:
        values = scalars(row)
        if values and isinstance(row.get("step"), int):
            for b in self.backends:
                b.log(row["step"], values)

    def close(self) -> None:
        while self.backends:
            self.backends.pop().close()


class _Backend:
    """One open tracker; the default serves those that wrap a run object taking TRL's names (W&B, Trackio)."""

    run: Any

    def log(self, step: int, values: dict[str, float]) -> None:
        self.run.log({trl_name(k): v for k, v in values.items()}, step=step)

    def close(self) -> None:
        self.run.finish()


class _TensorBoard(_Backend):
    def __init__(self, out: Path, matrix: Path | None, params: dict, resume_step: int | None) -> None:
        from torch.utils.tensorboard import SummaryWriter
        from torch.utils.tensorboard.summary import hparams

        # on resume, events after the checkpoint are purged: they are about to be logged again
        self.writer = SummaryWriter(str(out / TENSORBOARD),
                                    purge_step=None if resume_step is None else resume_step + 1)
        if resume_step is None:
            for summary in hparams(params, {}):  # the HPARAMS tab, in this run's own event file
                self.writer.file_writer.add_summary(summary)

    def log(self, step: int, values: dict[str, float]) -> None:
        for k, v in values.items():
            self.writer.add_scalar(trl_name(k), v, step)

    def close(self) -> None:
        self.writer.close()


class _MLflow(_Backend):
    def __init__(self, out: Path, matrix: Path | None, params: dict, resume_step: int | None) -> None:
        uri = os.environ.get("MLFLOW_TRACKING_URI") or f"file:{(matrix or out) / MLRUNS}"
        if uri.startswith("file:"):
            # MLflow 3 keeps the file store behind this switch; a local folder is what works offline
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=uri)
        experiment = matrix.name if matrix else "preftune"
        exp_id = self._experiment(experiment)
        runs = self.client.search_runs([exp_id], filter_string=f"tags.`preftune.output` = '{out}'",
                                       max_results=1) if resume_step is not None and "'" not in str(out) else []
        if runs:  # a resumed run continues its MLflow run
            self.run_id = runs[0].info.run_id
            self.client.update_run(self.run_id, status="RUNNING")
        else:
            run = self.client.create_run(exp_id, run_name=out.name, tags={"preftune.output": str(out)})
            self.run_id = run.info.run_id
            items = [Param(k, str(v)[:6000]) for k, v in params.items()]
            for i in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
                self.client.log_batch(self.run_id, params=items[i:i + 100])

    def _experiment(self, name: str) -> str:
        from mlflow.exceptions import MlflowException

        found = self.client.get_experiment_by_name(name)
        if found:
            return found.experiment_id
        try:
            return self.client.create_experiment(name)
        except MlflowException:  # --parallel: another cell created it first
            return self.client.get_experiment_by_name(name).experiment_id

    def log(self, step: int, values: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in values.items()
                                                    if math.isfinite(v)])

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


class _WandB(_Backend):
    def __init__(self, out: Path, matrix: Path | None, params: dict, resume_step: int | None) -> None:
        import wandb

        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "preftune"), name=out.name,
                              group=matrix.name if matrix else None, dir=str(out), config=params,
                              mode=os.environ.get("WANDB_MODE", "offline"), reinit="create_new")

    def close(self) -> None:
        import wandb

        super().close()
        wandb.teardown()  # waits for W&B's writer process, so the offline file is complete when we return


class _Trackio(_Backend):
    def __init__(self, out: Path, matrix: Path | None, params: dict, resume_step: int | None) -> None:
        import trackio

        self.run = trackio.init(project=os.environ.get("TRACKIO_PROJECT", "preftune"), name=out.name,
                                group=matrix.name if matrix else None, config=params)


BACKENDS: dict[str, type[_Backend]] = {"tensorboard": _TensorBoard, "mlflow": _MLflow, "wandb": _WandB,
                                       "trackio": _Trackio}
