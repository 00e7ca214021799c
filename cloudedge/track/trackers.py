"""Experiment trackers (TensorBoard, MLflow) fed from the metric rows a run logs.

Every stage and the demo log through :meth:`cloudedge.track.run.RunDir.log`; a run directory made
with a config whose ``track`` section turns a tracker on hands each row to it as well, so all of
them log the same way. One interface, :class:`MetricLogger`; one mapping of rows to scalars,
:func:`row_scalars`:

* a row's *series* is ``STAGE/METHOD`` (TensorBoard: one run folder per series, so methods are
  compared as runs; MLflow: one child run per series under a parent run named after the run
  directory, tagged ``stage`` and ``method``);
* its step is ``round``;
* its scalars are its numeric fields, nested dicts flattened with ``/`` (``clients/edge0/acc``),
  prefixed by the row's ``edge`` when it has one (adaptation logs one row per edge and round).

Both libraries are optional (``pip install 'cloudedge[tracking]'``) and imported only when the
config asks for them; nothing is fetched: TensorBoard writes event files under
``RUN/tensorboard/``, MLflow writes to ``track.mlflow_uri`` or a file store in ``RUN/mlruns``.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections import Counter
from pathlib import Path
from typing import Any, Protocol

from cloudedge.errors import InputError

# Row fields that say which series a row belongs to, never plotted.
_KEY_FIELDS = ("stage", "method", "round")
# A string field that splits a series into named sub-series (one per edge).
_SUB_SERIES_FIELD = "edge"
_MLFLOW_PARAM_MAX = 6000  # MLflow's limit on a parameter value's length
_MLFLOW_BATCH = 100  # MLflow's limit on params per log_batch call
_MLFLOW_METRICS_BATCH = 1000  # and on metrics


class MetricLogger(Protocol):
    """What a tracker does with a run: one call per metric row, artifacts at the end, close."""

    def log_row(self, row: dict[str, Any]) -> None: ...

    def log_artifacts(self, paths: list[Path]) -> None: ...

    def close(self, complete: bool) -> None: ...


def _flatten(prefix: str, value: Any, out: dict[str, float]) -> None:
    if isinstance(value, bool) or value is None:
        return
    if isinstance(value, int | float):
        if math.isfinite(value):
            out[prefix] = float(value)
    elif isinstance(value, dict):
        for k, v in value.items():
            _flatten(f"{prefix}/{k}" if prefix else str(k), v, out)


def row_scalars(row: dict[str, Any]) -> tuple[str, int | None, dict[str, float]]:
    """``(series, step, {tag: value})`` of one metric row (see the module docstring)."""
    stage, method = str(row.get("stage", "run")), row.get("method")
    series = f"{stage}/{method}" if method is not None else stage
    step = row.get("round")
    scalars: dict[str, float] = {}
    for key, value in row.items():
        if key not in _KEY_FIELDS and key != _SUB_SERIES_FIELD:
            _flatten(key, value, scalars)
    sub = row.get(_SUB_SERIES_FIELD)
    if isinstance(sub, str):
        scalars = {f"{sub}/{k}": v for k, v in scalars.items()}
    return series, int(step) if isinstance(step, int | float) else None, scalars


def flat_params(config: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """A nested config as ``{"pretrain.lr": "0.003", ...}`` (lists as JSON)."""
    out: dict[str, str] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flat_params(value, name + "."))
        else:
            out[name] = value if isinstance(value, str) else json.dumps(value)
    return out


class _Steps:
    """Rows without a ``round`` are numbered in order within their series (after its last step)."""

    def __init__(self) -> None:
        self._next: dict[str, int] = {}

    def of(self, series: str, step: int | None) -> int:
        if step is None:
            step = self._next.get(series, 0)
        self._next[series] = step + 1
        return step

    def resume(self, kept_rows: Path, series: str, step: int | None) -> tuple[int, list[tuple[int, dict[str, float]]]]:
        """On a resume: number ``series``' rows that ``kept_rows`` kept as the interrupted run did,
        so that its rows without a round go on from there. Returns the first step a tracker must
        drop what the interrupted run logged from, and the kept rows (step, scalars) at or past it,
        which it must log again.

        That step is one past the last kept step, or the step of the series' first row since the
        resume (``step``; None: numbered in order) when that is lower: what the interrupted run
        logged after its checkpoint began where the resume begins again, and a row logged again at
        a kept step (fine-tuning's grid rows logged after checkpoint N carry round N) would
        otherwise show twice.

        ``kept_rows``: the run's metrics.jsonl, cut back to what the resume keeps. Called while the
        series' first row since the resume is logged: that row is already the file's last line, so
        it is left out."""
        lines = kept_rows.read_text(encoding="utf-8").splitlines()[:-1] if kept_rows.is_file() else []
        kept = []
        for row in map(json.loads, filter(None, lines)):
            name, row_step, scalars = row_scalars(row)
            if name == series and scalars:  # a row without scalars reaches no tracker: no step
                kept.append((self.of(series, row_step), scalars))
        first_redone = max((s for s, _ in kept), default=-1) + 1
        if step is not None:
            first_redone = min(first_redone, step)
        return first_redone, [(s, scalars) for s, scalars in kept if s >= first_redone]


class TensorBoardLogger:
    """Event files in ``root/STAGE/METHOD/`` (one TensorBoard run per series), flushed every row.

    On a resume (``kept_rows``: the run's metrics.jsonl, already cut back to the rows the resume
    keeps), a series' writer opens with ``purge_step`` at the first step the resume redoes
    (:meth:`_Steps.resume`): TensorBoard then drops everything the interrupted run logged from that
    step on, the kept rows at that step are logged again, and each row shows once. A series without
    rounds goes on numbering its rows after the kept ones."""

    def __init__(self, root: Path, kept_rows: Path | None = None):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise InputError("track.tensorboard: the tensorboard package is not installed "
                             "(pip install 'cloudedge[tracking]')") from None
        self._writer_cls = SummaryWriter
        self.root = root
        self._writers: dict[str, Any] = {}
        self._steps = _Steps()
        self.kept_rows = kept_rows

    def log_row(self, row: dict[str, Any]) -> None:
        series, step, scalars = row_scalars(row)
        if not scalars:
            return
        writer = self._writers.get(series)
        if writer is None:
            purge, replay = self._steps.resume(self.kept_rows, series, step) if self.kept_rows is not None else (None, [])
            writer = self._writers[series] = self._writer_cls(log_dir=str(self.root / series), purge_step=purge)
            for kept_step, kept_scalars in replay:  # kept, but at or past the purge: logged again after it
                for tag, value in kept_scalars.items():
                    writer.add_scalar(tag, value, global_step=kept_step)
        step = self._steps.of(series, step)
        for tag, value in scalars.items():
            writer.add_scalar(tag, value, global_step=step)
        writer.flush()  # a killed run keeps every row it logged, as metrics.jsonl does

    def log_artifacts(self, paths: list[Path]) -> None:
        """TensorBoard shows scalars only; the report stays in the run directory."""

    def close(self, complete: bool) -> None:
        for writer in self._writers.values():
            writer.close()
        self._writers.clear()


class MLflowLogger:
    """A parent MLflow run per run directory (params, artifacts), a child run per series (metrics).

    Run ids are kept in ``RUN/mlflow.json`` so ``--resume`` continues the same MLflow runs. MLflow
    cannot delete a logged value, so when a resume redoes rows a series' child run already holds
    (values from the first redone step on, :meth:`_Steps.resume`, beyond those of the rows
    ``kept_rows`` kept), that child is replaced at the series' first row: a new child gets the kept
    rows' values copied over, and the old one is ended as KILLED, tagged with its replacement. Each
    row then shows once.
    """

    def __init__(self, uri: str, experiment: str, run_name: str, params: dict[str, str], state_file: Path,
                 resume: bool, kept_rows: Path | None = None):
        if uri.startswith("file:") or "://" not in uri:
            # MLflow 3 keeps its file store in maintenance mode and refuses it unless asked; a local
            # store needs no server and no database, which is what tracking a run offline needs.
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        try:
            from mlflow.tracking import MlflowClient
        except ImportError:
            raise InputError("track.mlflow: the mlflow package is not installed "
                             "(pip install 'cloudedge[tracking]')") from None
        self.client = MlflowClient(tracking_uri=uri)
        self.state_file = state_file
        self._steps = _Steps()
        self.kept_rows = kept_rows if resume else None
        self._checked: set[str] = set()  # series whose child was checked against kept_rows
        state = _read_mlflow_state(state_file) if resume and state_file.is_file() else {}
        if state:
            self.experiment_id, self.parent_id = state["experiment_id"], state["parent_id"]
            self.children: dict[str, str] = state.get("children", {})
            return
        found = self.client.get_experiment_by_name(experiment)
        self.experiment_id = found.experiment_id if found else self.client.create_experiment(experiment)
        self.parent_id = self.client.create_run(self.experiment_id, run_name=run_name,
                                                tags={"cloudedge.run": run_name}).info.run_id
        self.children = {}
        self._log_params(params)
        self._save_state()

    def _log_params(self, params: dict[str, str]) -> None:
        from mlflow.entities import Param

        items = [Param(k, v[:_MLFLOW_PARAM_MAX]) for k, v in params.items()]
        for i in range(0, len(items), _MLFLOW_BATCH):
            self.client.log_batch(self.parent_id, params=items[i: i + _MLFLOW_BATCH])

    def _save_state(self) -> None:
        self.state_file.write_text(json.dumps({"experiment_id": self.experiment_id, "parent_id": self.parent_id,
                                               "children": self.children}, indent=1))

    def _tags(self, series: str) -> dict[str, str]:
        stage, _, method = series.partition("/")
        return {"mlflow.parentRunId": self.parent_id, "stage": stage, "method": method or stage}

    def _child(self, series: str) -> str:
        if series not in self.children:
            self.children[series] = self.client.create_run(self.experiment_id, run_name=series,
                                                           tags=self._tags(series)).info.run_id
            self._save_state()
        return self.children[series]

    def _replace_redone(self, series: str, step: int | None) -> None:
        """At a series' first row after a resume (at ``step``): if its child holds values the
        resume redoes, replace it by a child with only the kept ones (see the class docstring)."""
        self._checked.add(series)
        old = self.children.get(series)
        if self.kept_rows is None:
            return
        first_redone, replay = self._steps.resume(self.kept_rows, series, step)
        if old is None:
            return
        from mlflow.entities import Metric

        keys = list(self.client.get_run(old).data.metrics)
        history = [m for key in keys for m in self.client.get_metric_history(old, key)]
        # At and past first_redone the child may hold kept values (a kept row at that step) beside
        # redone ones: it holds only kept ones when they are all among the replayed rows' values.
        wanted = Counter((_mlflow_key(tag), s, v) for s, scalars in replay for tag, v in scalars.items())
        tail = [m for m in history if m.step >= first_redone]
        if not Counter((m.key, m.step, m.value) for m in tail) - wanted:
            return
        new = self.client.create_run(self.experiment_id, run_name=series,
                                     tags={**self._tags(series), "cloudedge.replaces": old}).info.run_id
        kept = [Metric(m.key, m.value, m.timestamp, m.step) for m in history if m.step < first_redone]
        for m in tail:  # the kept values among them (logged first, so the first of equal ones)
            if wanted[(m.key, m.step, m.value)] > 0:
                wanted[(m.key, m.step, m.value)] -= 1
                kept.append(Metric(m.key, m.value, m.timestamp, m.step))
        for i in range(0, len(kept), _MLFLOW_METRICS_BATCH):
            self.client.log_batch(new, metrics=kept[i: i + _MLFLOW_METRICS_BATCH])
        # Only now does the state point at the new child: killed before this, the next resume finds
        # the old child as it was and replaces it again (the half-filled new one is left orphaned).
        self.children[series] = new
        self._save_state()
        self.client.set_tag(old, "cloudedge.replaced_by", new)
        self.client.set_terminated(old, status="KILLED")

    def log_row(self, row: dict[str, Any]) -> None:
        from mlflow.entities import Metric

        series, step, scalars = row_scalars(row)
        if not scalars:
            return
        if series not in self._checked:
            self._replace_redone(series, step)
        step = self._steps.of(series, step)
        now = int(time.time() * 1000)
        metrics = [Metric(_mlflow_key(k), v, now, step) for k, v in scalars.items()]
        run_id = self._child(series)
        for i in range(0, len(metrics), _MLFLOW_METRICS_BATCH):
            self.client.log_batch(run_id, metrics=metrics[i: i + _MLFLOW_METRICS_BATCH])

    def log_artifacts(self, paths: list[Path]) -> None:
        for path in paths:
            sub = path.parent.name if path.parent.name == "plots" else None
            self.client.log_artifact(self.parent_id, str(path), artifact_path=sub)

    def close(self, complete: bool) -> None:
        status = "FINISHED" if complete else "KILLED"
        for run_id in [*self.children.values(), self.parent_id]:
            self.client.set_terminated(run_id, status=status)


def _read_mlflow_state(path: Path) -> dict[str, Any]:
    """``RUN/mlflow.json`` (the MLflow run ids a resume continues); a damaged one is an InputError."""
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        state = None
    if not (isinstance(state, dict) and isinstance(state.get("experiment_id"), str)
            and isinstance(state.get("parent_id"), str) and isinstance(state.get("children", {}), dict)):
        raise InputError(f"{path}: damaged: not the JSON object of MLflow run ids a run writes "
                         "(experiment_id, parent_id, children); restore it, or delete it to log to new MLflow runs")
    return state


def _mlflow_key(tag: str) -> str:
    """MLflow allows letters, digits, ``_ - . / space`` in metric names; anything else becomes ``_``."""
    return "".join(c if c.isalnum() or c in "_-./ " else "_" for c in tag)


def open_trackers(config: Any, run_path: Path, resume: bool) -> list[MetricLogger]:
    """The trackers ``config.track`` turns on, for the run in ``run_path`` (none by default)."""
    track = getattr(config, "track", None)
    if track is None or not track.enabled:
        return []
    loggers: list[MetricLogger] = []
    if track.tensorboard:
        loggers.append(TensorBoardLogger(run_path / "tensorboard", run_path / "metrics.jsonl" if resume else None))
    if track.mlflow:
        import yaml

        from cloudedge.config import dump_config

        uri = track.mlflow_uri or (run_path / "mlruns").resolve().as_uri()
        params = flat_params(yaml.safe_load(dump_config(config)))
        loggers.append(MLflowLogger(uri, track.experiment or config.name, run_path.name, params,
                                    run_path / "mlflow.json", resume, run_path / "metrics.jsonl"))
    return loggers


def run_artifacts(run_path: Path) -> list[Path]:
    """What a tracker keeps of a finished run: the report, the summary, the config and the plots."""
    named = [run_path / n for n in ("report.md", "report.html", "summary.json", "config.yaml")]
    return [p for p in named if p.is_file()] + sorted((run_path / "plots").glob("*.png"))
