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
continues it; it is never mistaken for a finished one. One whose metrics.jsonl has no row and that
holds no checkpoint and no summary.json (a start that failed on its data or model) is no run yet:
a new run starts in it, with or without `--resume` (docs/tracking.md, "Run directories").
"""

from __future__ import annotations

import json
import math
import sys
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
        self.resumed = False  # did create() reopen a run (False: a new run, also when asked to resume)
        self.trackers: list = []  # cloudedge.track.trackers.MetricLogger, fed by log()

    @classmethod
    def create(cls, out_dir: str | Path, config: Any = None, resume: bool = False,
               overwrite: bool = False) -> RunDir:
        """Make (or reopen, with ``resume``) a run directory.

        An existing directory that holds a run (or anything else) is only reused with ``resume``;
        with ``overwrite`` it is moved aside to ``NAME.old-TIMESTAMP`` (nothing written before is
        lost). A directory that holds no run yet (:func:`holds_run`) takes a new run, also with
        ``resume`` (said on stderr; :attr:`resumed` is then False). A resume checks ``config``
        against the run's own config.yaml (:func:`config_differences`) and keeps that file.
        """
        path = Path(out_dir)
        if path.exists() and not path.is_dir():
            raise InputError(f"{path}: output path exists and is not a directory")
        held = holds_run(path)
        if resume and held is None:
            raise InputError(f"{path}: --resume: no cloudedge run here (no metrics.jsonl) and the directory is "
                             "not empty; choose another --out, or --overwrite to move it aside")
        if resume and not held:
            print(f"note: {path} holds no run to resume yet; starting a new one", file=sys.stderr)
            resume = False
        if held is False:
            # What a start that failed before its first row left (its config, trackers' files) is
            # moved aside whole, not reused: a new run's TensorBoard or MLflow must not mix with it.
            aside = move_aside(path)
            if aside is not None:
                print(f"note: {path} held only a start that never logged a row; moved it aside to {aside.name}",
                      file=sys.stderr)
        if not resume and held is not False:
            if not overwrite and held:
                raise InputError(f"{path}: output directory already holds a run; pass --resume to continue it, "
                                 "--overwrite to move it aside, or choose another --out")
            if not overwrite:
                raise InputError(f"{path}: output directory is not empty and holds no cloudedge run (no "
                                 "metrics.jsonl); choose another --out, or --overwrite to move it aside")
            move_aside(path)
        if resume:
            # Everything a resume reads is checked before anything is written: bad input loses nothing.
            read_summary(path)
            read_metrics(path)
            if config is not None and hasattr(config, "model_dump"):
                _check_resumed_config(path, config)
        try:
            path.mkdir(parents=True, exist_ok=True)
            probe = path / ".write-test"
            probe.write_text("ok")
            probe.unlink()
        except OSError as err:
            raise InputError(f"{path}: output directory is not writable ({err.strerror or err})") from None
        run = cls(path)
        run.resumed = resume
        for sub in ("checkpoints", "plots"):
            (path / sub).mkdir(exist_ok=True)
        # A resumed run keeps the config.yaml it started with (the config was checked against it).
        if config is not None and not (resume and (path / "config.yaml").is_file()):
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
        return read_summary(self.path)

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
            row = json.loads(line)
        except json.JSONDecodeError:
            if n == len(lines) and not text.endswith("\n"):
                break  # the last row was being written when the run was killed: it never happened
            raise InputError(f"{path}:{n}: not a JSON object (not valid JSON)") from None
        if not isinstance(row, dict):
            raise InputError(f"{path}:{n}: not a JSON object (a JSON {_json_kind(row)})")
        rows.append(row)
    return rows


def _json_kind(value: Any) -> str:
    return {list: "array", str: "string", bool: "boolean", type(None): "null"}.get(type(value), "number")


def read_summary(run_dir: str | Path) -> dict[str, Any]:
    """A run's summary.json ({} when there is none). A damaged one is an InputError naming it."""
    path = Path(run_dir) / "summary.json"
    if not path.is_file():
        return {}
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise InputError(f"{path}: damaged: not UTF-8 text") from None
    except json.JSONDecodeError as err:
        raise InputError(f"{path}: damaged: not valid JSON ({err.msg} at line {err.lineno} "
                         f"column {err.colno})") from None
    if not isinstance(summary, dict):
        raise InputError(f"{path}: damaged: not a JSON object (a JSON {_json_kind(summary)})")
    return summary


def read_run_config(run_dir: str | Path) -> dict[str, Any] | None:
    """A run's config.yaml as a mapping (None when there is none). A damaged one is an InputError."""
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        return None
    import yaml

    try:
        config = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise InputError(f"{path}: damaged: not UTF-8 text") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise InputError(f"{path}: damaged: not valid YAML{where} ({getattr(err, 'problem', None) or err})") from None
    if not isinstance(config, dict):
        got = "empty" if config is None else f"a {type(config).__name__}"
        raise InputError(f"{path}: damaged: not a mapping of config sections ({got})")
    return config


def holds_run(path: str | Path) -> bool | None:
    """Does ``path`` hold a run? True: a run (metric rows, a checkpoint or a summary); False: no run
    yet (missing, empty, or what a start that failed before its first row leaves: config.yaml, an
    empty metrics.jsonl, empty checkpoints/ and plots/, its trackers' files); None: other files
    and no metrics.jsonl (not a cloudedge run directory)."""
    path = Path(path)
    if not path.is_dir() or not any(path.iterdir()):
        return False
    metrics = path / "metrics.jsonl"
    if not metrics.is_file():
        return None
    with metrics.open(encoding="utf-8", errors="replace") as fh:
        if any(line.strip() for line in fh):  # stops at the first row
            return True
    return (path / "summary.json").exists() or any(p.is_file() for p in (path / "checkpoints").rglob("*"))


# Config sections a resume may change: how and where the run executes and where its rows are also
# logged. Neither changes what the run computes; everything else must match the run's config.yaml.
RESUMABLE_CHANGES = ("engine", "track")


def config_differences(saved: Any, given: Any, prefix: str = "") -> list[str]:
    """``path: old -> new`` for each leaf that differs between two plain configs (dotted paths;
    list items as ``[i]``), leaving out the sections in :data:`RESUMABLE_CHANGES`."""
    if isinstance(saved, dict) and isinstance(given, dict):
        out = []
        for key in [*saved, *(k for k in given if k not in saved)]:
            name = f"{prefix}.{key}" if prefix else str(key)
            if not prefix and key in RESUMABLE_CHANGES:
                continue
            out += config_differences(saved.get(key, _ABSENT), given.get(key, _ABSENT), name)
        return out
    if isinstance(saved, list) and isinstance(given, list) and len(saved) == len(given):
        return [d for i, (a, b) in enumerate(zip(saved, given, strict=True))
                for d in config_differences(a, b, f"{prefix}[{i}]")]
    return [] if saved == given else [f"{prefix}: {_shown(saved)} -> {_shown(given)}"]


_ABSENT = object()
_SHOWN_MAX = 60  # characters of a value in a difference; the field's path says where to look


def _shown(value: Any) -> str:
    text = "(absent)" if value is _ABSENT else json.dumps(value)
    return text if len(text) <= _SHOWN_MAX else text[: _SHOWN_MAX - 3] + "..."


def _is_path_difference(difference: str) -> bool:
    """Whether a :func:`config_differences` line is about where the run's files or its model are: the
    plug-ins, a field called ``path`` (data, model, traces), or a stage's ``device`` (an interrupted
    CPU run continued on a GPU; the resume says so)."""
    field = difference.split(": ", 1)[0]
    last = field.split(".")[-1].split("[")[0]
    return field.startswith("plugins") or last == "path" or (field.count(".") == 1 and last == "device")


def _check_resumed_config(path: Path, config: Any) -> None:
    """A resume continues the run its config.yaml describes: ``config`` must match it (but for
    :data:`RESUMABLE_CHANGES`), else an InputError naming each differing field."""
    saved = read_run_config(path)
    if saved is None:
        return  # nothing to compare with: the resume writes it
    import yaml

    from cloudedge.config import config_from_dict, dump_config

    given = yaml.safe_load(dump_config(config))
    differences = config_differences(saved, given)
    if [d for d in differences if not _is_path_difference(d)]:
        # A config.yaml written by an older version lacks fields added since: compare it as this
        # version reads it (their defaults). Its plug-ins are the given config's, already loaded.
        try:
            resolved = config_from_dict(saved, source=str(path / "config.yaml"), base_dir=config.base_dir)
        except InputError:
            pass  # it no longer validates: the raw differences say what changed
        else:
            differences = config_differences(yaml.safe_load(dump_config(resolved)), given)
    # Paths differ when the project moved (another checkout, mount or host): said, not refused.
    moved = [d for d in differences if _is_path_difference(d)]
    if moved:
        print(f"note: {path}: resuming with other paths or devices than the run's config.yaml: {'; '.join(moved)}",
              file=sys.stderr)
        differences = [d for d in differences if d not in moved]
    if differences:
        shown = "; ".join(differences[:8]) + (f"; and {len(differences) - 8} more" if len(differences) > 8 else "")
        raise InputError(f"{path / 'config.yaml'}: --resume: the config differs from the run's own ({shown}); "
                         "resume with the run's config, or start a new run in another --out "
                         f"(only {', '.join(f'{s}.*' for s in RESUMABLE_CHANGES)} may change)")
