"""A run directory: everything one user-facing run writes.

::

    RUN/config.yaml        the resolved config
    RUN/metrics.jsonl      one JSON object per logged row (stage, method, round, metrics...)
    RUN/summary.json       headline numbers; "complete": true only once the run has finished
    RUN/checkpoints/STAGE/ safetensors checkpoints (cloudedge.checkpoint)
    RUN/plots/*.png        matplotlib figures
    RUN/report.md          rendered by cloudedge.track.report
    RUN/tensorboard/, RUN/mlruns/   with a ``track`` config section (cloudedge.track.trackers)

A directory whose summary.json lacks ``"complete": true`` is an interrupted run: `--resume`
continues it; it is never mistaken for a finished one.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

from cloudedge.checkpoint import atomic_write_text
from cloudedge.errors import InputError


def _jsonable(value: Any) -> Any:
    """Numbers from torch/numpy become Python numbers; NaN/Inf become None (JSON has neither)."""
    if hasattr(value, "item") and callable(value.item) and getattr(value, "ndim", 0) == 0:
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if hasattr(value, "tolist"):
        return _jsonable(value.tolist())
    return value


class RunDir:
    """Create with :meth:`create`; log rows with :meth:`log`; finish with :meth:`write_summary`."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.metrics_path = self.path / "metrics.jsonl"
        self.summary_path = self.path / "summary.json"
        self._t0 = time.perf_counter()
        self.trackers: list = []  # cloudedge.track.trackers.MetricLogger, fed by log()

    @classmethod
    def create(cls, out_dir: str | Path, config: Any = None, resume: bool = False,
               overwrite: bool = False) -> RunDir:
        """Make (or reopen, with ``resume``) a run directory.

        An existing non-empty directory is only reused with ``resume``; with ``overwrite`` it is
        moved aside to ``NAME.old-TIMESTAMP`` (nothing written before is lost).
        """
        path = Path(out_dir)
        if path.exists() and not path.is_dir():
            raise InputError(f"{path}: output path exists and is not a directory")
        if path.is_dir() and any(path.iterdir()) and not resume:
            if not overwrite:
                raise InputError(f"{path}: output directory already holds a run; pass --resume to continue it, "
                                 "--overwrite to move it aside, or choose another --out")
            move_aside(path)
        try:
            path.mkdir(parents=True, exist_ok=True)
            probe = path / ".write-test"
            probe.write_text("ok")
            probe.unlink()
        except OSError as err:
            raise InputError(f"{path}: output directory is not writable ({err.strerror or err})") from None
        run = cls(path)
        for sub in ("checkpoints", "plots"):
            (path / sub).mkdir(exist_ok=True)
        if config is not None:
            from cloudedge.config import dump_config

            text = dump_config(config) if hasattr(config, "model_dump") else str(config)
            atomic_write_text(path / "config.yaml", text)
        if not resume:
            run.metrics_path.write_text("")
        else:
            run.repair_metrics()
        if config is not None:
            from cloudedge.track.trackers import open_trackers

            run.trackers = open_trackers(config, path, resume)
        return run

    def repair_metrics(self) -> None:
        """Drop a half-written last row (a crash mid-append), so resume can append after it."""
        if not self.metrics_path.is_file():
            return
        text = self.metrics_path.read_text(encoding="utf-8", errors="replace")
        if text and not text.endswith("\n"):
            atomic_write_text(self.metrics_path, text[: text.rfind("\n") + 1])

    # --- metrics -------------------------------------------------------------------------------
    def log(self, **row: Any) -> dict[str, Any]:
        """Append one row to metrics.jsonl (flushed at once, so a crash keeps what was logged)."""
        row = _jsonable({**row, "wall_s": round(time.perf_counter() - self._t0, 4)})
        with self.metrics_path.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(row) + "\n")
        for tracker in self.trackers:
            tracker.log_row(row)
        return row

    def finish_tracking(self) -> None:
        """Hand the run's report, summary and plots to the trackers and close them (call last)."""
        from cloudedge.track.trackers import run_artifacts

        artifacts = run_artifacts(self.path)
        for tracker in self.trackers:
            tracker.log_artifacts(artifacts)
            tracker.close(complete=self.complete)
        self.trackers = []

    def truncate_metrics(self, keep: callable) -> None:
        """Keep only rows for which ``keep(row)`` is true (resume drops rows past the checkpoint)."""
        rows = [r for r in self.read_metrics() if keep(r)]
        atomic_write_text(self.metrics_path, "".join(json.dumps(r) + "\n" for r in rows))

    def read_metrics(self) -> list[dict[str, Any]]:
        return read_metrics(self.path)

    # --- summary ---------------------------------------------------------------------------------
    def read_summary(self) -> dict[str, Any]:
        if not self.summary_path.is_file():
            return {}
        return json.loads(self.summary_path.read_text(encoding="utf-8"))

    def update_summary(self, section: str, values: dict[str, Any]) -> dict[str, Any]:
        """Merge one stage's headline numbers into summary.json (not marking it complete)."""
        summary = self.read_summary()
        summary[section] = _jsonable(values)
        summary.setdefault("complete", False)
        atomic_write_text(self.summary_path, json.dumps(summary, indent=2, sort_keys=False))
        return summary

    def write_summary(self, values: dict[str, Any], complete: bool = True) -> dict[str, Any]:
        summary = {**self.read_summary(), **_jsonable(values), "complete": complete}
        atomic_write_text(self.summary_path, json.dumps(summary, indent=2, sort_keys=False))
        return summary

    @property
    def complete(self) -> bool:
        return bool(self.read_summary().get("complete"))

    # --- places ----------------------------------------------------------------------------------
    def checkpoint_dir(self, stage: str) -> Path:
        d = self.path / "checkpoints" / stage
        d.mkdir(parents=True, exist_ok=True)
        return d

def move_aside(path: str | Path) -> Path | None:
    """Rename an existing non-empty run directory to ``NAME.old-TIMESTAMP`` (nothing is deleted)."""
    path = Path(path)
    if not path.is_dir() or not any(path.iterdir()):
        return None
    aside = path.with_name(f"{path.name}.old-{time.strftime('%Y%m%d-%H%M%S')}")
    n = 1
    while aside.exists():
        aside = path.with_name(f"{path.name}.old-{time.strftime('%Y%m%d-%H%M%S')}-{n}")
        n += 1
    path.rename(aside)
    return aside


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """Rows of a run's metrics.jsonl. A damaged line is an InputError naming file and line."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise InputError(f"{path}: no metrics file (is {run_dir} a cloudedge run directory?)")
    rows = []
    text = path.read_text(encoding="utf-8", errors="replace")
    lines = text.splitlines()
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if n == len(lines) and not text.endswith("\n"):
                break  # the last row was being written when the run was killed: it never happened
            raise InputError(f"{path}:{n}: not a JSON object") from None
    return rows
