"""The stage skeleton: what every stage (pretrain, finetune, adapt) does the same way.

A stage's entry module (``cloudedge/<stage>/stage.py``) sets up its own parts and runs its rounds;
this module owns what they share:

- :class:`StageResult`: what every stage's API returns (rows, summary, artefacts, run directory).
- :class:`StageRun`: one stage's view of its run directory: the metric log (:class:`MetricRow`,
  in memory when there is no directory), checkpoints in one nested state format
  (:func:`cloudedge.checkpoint.save_state`: tensors anywhere in a tree of plain data) and the one
  resume rule (:meth:`StageRun.resume`), and a progress bar over the rounds on a terminal.
- :func:`drop_failed`: workers that failed this round leave it; the round goes on without them.
- :func:`run_stage_into`: the CLI's way to run a stage into a directory, mark it complete and
  write the report.

Pre-training (:mod:`cloudedge.pretrain.stage`), fine-tuning (:mod:`cloudedge.finetune.loop`) and
adaptation (:mod:`cloudedge.adapt.stage`) all run on it; docs/architecture.md, "Stage skeleton".
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cloudedge.checkpoint import load_latest_state, save_state
from cloudedge.track.progress import progress_bar
from cloudedge.track.run import RunDir


@dataclass
class StageResult:
    """What a stage's API (``pretrain``, ``finetune``, ``adapt``) returns.

    ``rows``: every metric row of the stage (as logged); ``summary``: its headline numbers;
    ``artefacts``: what it produced, by name (``model``; ``client_states`` of pre-training;
    ``adapters`` of fine-tuning; ``prompts`` of adaptation, per edge); ``run_dir``: where it logged.
    """

    rows: list[dict[str, Any]]
    summary: dict[str, Any]
    artefacts: dict[str, Any] = field(default_factory=dict)
    run_dir: RunDir | None = None

    @property
    def model(self) -> Any:
        """The trained model (``artefacts["model"]``), or None for a stage that trains none."""
        return self.artefacts.get("model")


@dataclass
class MetricRow:
    """One logged row: the names every stage shares, then the stage's own ``values``.

    ``failures`` / ``rejections`` (worker -> reason) add the counts ``failed`` / ``rejected``
    (and the reasons, when there are any); None leaves them out of the row.
    """

    stage: str
    method: str
    round: int
    virtual_time_s: float | None = None
    values: dict[str, Any] = field(default_factory=dict)
    failures: dict[str, str] | None = None
    rejections: dict[str, str] | None = None

    def as_dict(self) -> dict[str, Any]:
        row: dict[str, Any] = {"stage": self.stage, "method": self.method, "round": self.round}
        if self.virtual_time_s is not None:
            row["virtual_time_s"] = self.virtual_time_s
        for count, reasons, log in (("failed", "failures", self.failures), ("rejected", "rejections", self.rejections)):
            if log is not None:
                row[count] = len(log)
                if log:
                    row[reasons] = log
        return {**row, **self.values}


class StageRun:
    """One stage's run directory: metric rows, checkpoints and the resume rule.

    ``run_dir`` None keeps the rows in memory and writes no checkpoints.
    """

    def __init__(self, stage: str, run_dir: RunDir | None, method: str):
        self.stage, self.run_dir, self.method = stage, run_dir, method
        self.ckpt_dir = run_dir.checkpoint_dir(stage) if run_dir is not None else None
        self.logged = 0  # rows of this stage and method in the run directory (a checkpoint records it)

    @classmethod
    def open(cls, stage: str, run_dir: RunDir | str | Path | None, cfg: Any, method: str,
             resume: bool = False) -> StageRun:
        """A RunDir, a path (created, or reopened with ``resume``) or None (in memory)."""
        if isinstance(run_dir, str | Path):
            run_dir = RunDir.create(run_dir, cfg, resume=resume)
        return cls(stage, run_dir, method)

    def log(self, row: MetricRow | dict[str, Any]) -> dict[str, Any]:
        """Append a row to metrics.jsonl (when there is a directory); returns the row as logged."""
        values = row.as_dict() if isinstance(row, MetricRow) else row
        if self.run_dir is None:
            return values
        self.logged += 1
        return self.run_dir.log(**values)

    def checkpoint(self, round_label: int, state: dict[str, Any]) -> None:
        """Save ``state`` (nested; tensors anywhere) as the checkpoint after the row ``round_label``,
        with the number of rows logged so far (``rows``: what :meth:`resume` keeps)."""
        if self.ckpt_dir is not None:
            save_state(self.ckpt_dir, round_label, {"round": round_label, "rows": self.logged, **state})

    def _mine(self, row: dict[str, Any]) -> bool:
        return row.get("stage") == self.stage and row.get("method") == self.method

    def resume(self) -> tuple[dict[str, Any] | None, list[dict[str, Any]]]:
        """The last checkpoint's state (None: start over) and this stage's rows it covers.

        The one rule: the rows of this stage and method that were logged before the checkpoint
        (the first ``rows`` of them) stay; those logged after it are dropped (they will be logged
        again), whatever their ``round`` (fine-tuning's grid rows logged after checkpoint N carry
        round N). Rows of other stages and methods stay. Without a checkpoint (killed before the
        first one) the rows of this stage and method go. A checkpoint that predates the count keeps
        the rows whose ``round`` is not past its ``round``.
        """
        if self.run_dir is None or self.ckpt_dir is None:
            return None, []
        state = load_latest_state(self.ckpt_dir)
        if state is None:
            self.run_dir.truncate_metrics(lambda r: not self._mine(r))
            return None, []
        done, count = int(state["round"]), state.get("rows")
        seen = 0

        def keep(row: dict[str, Any]) -> bool:
            nonlocal seen
            if not self._mine(row):
                return True
            seen += 1
            return seen <= count if count is not None else row.get("round", -1) <= done

        self.run_dir.truncate_metrics(keep)
        rows = [r for r in self.run_dir.read_metrics() if self._mine(r)]
        self.logged = len(rows)
        return state, rows

    @contextmanager
    def progress(self, total: int, done: int = 0) -> Iterator[Any]:
        """A progress bar over the stage's rounds on a terminal (``bar.advance()`` per round);
        silent when stderr is not a terminal or ``CLOUDEDGE_QUIET`` is set."""
        with progress_bar(f"{self.stage} {self.method}", total) as bar:
            if done:
                bar.advance(done)
            yield bar

    def update_summary(self, summary: dict[str, Any]) -> None:
        """This stage's headline numbers into summary.json (not marking the run complete)."""
        if self.run_dir is not None:
            self.run_dir.update_summary(self.stage, summary)


def drop_failed(ids: Sequence[str], results: Sequence[Any]) -> tuple[list[str], list[Any], dict[str, str]]:
    """Leave the workers whose result is a ``WorkerError`` out of the round.

    Returns the remaining ids and results and ``{worker: reason}`` of those that failed; the caller
    decides what a round with no one left means.
    """
    from cloudedge.engine import WorkerError

    failed = {wid: str(res) for wid, res in zip(ids, results, strict=True) if isinstance(res, WorkerError)}
    kept = [(wid, res) for wid, res in zip(ids, results, strict=True) if wid not in failed]
    return [w for w, _ in kept], [res for _, res in kept], failed


def run_stage_into(stage: str, cfg: Any, out_dir: str | Path, resume: bool, engine_kind: str,
                   train: Callable[..., Any], save: Callable[[Any, Path], None] | None = None) -> dict[str, Any]:
    """Run ``train(cfg, run_dir, engine, resume=...)`` into ``out_dir``; return the stage's summary.

    A run already complete is not run again on ``resume``; ``resume`` where there is no run yet
    starts one (:meth:`RunDir.create`). ``save(result, run_path)`` writes the
    stage's artefact (a model, adapters) before summary.json is marked complete, so a complete run
    directory always holds it; then the report is written (:func:`write_report`). The engine is
    closed whatever happens.
    """
    from cloudedge.engine import make_engine

    t0 = time.perf_counter()
    run = RunDir.create(out_dir, cfg, resume=resume)
    if run.resumed and run.complete:
        return run.read_summary().get(stage, {})
    engine = make_engine(engine_kind, cfg.engine.address, cfg.engine.threads)
    try:
        result = train(cfg, run, engine, resume=run.resumed)
    finally:
        engine.close()
    if save is not None:
        save(result, run.path)
    summary = {**result.summary, "wall_s": round(time.perf_counter() - t0, 3)}
    run.write_summary({stage: summary}, complete=True)
    write_report(run.path)
    run.finish_tracking()  # after the report, so the trackers log it
    return summary


def write_report(run_path: Path) -> Path | None:
    """``plots/``, ``report.md`` and ``report.html`` of a finished run; the HTML's path, or None.

    Called once the run's results are on disk (artefact, metrics, complete summary): a report that
    cannot be written is a warning on stderr, never a lost or incomplete run, and ``cloudedge
    report RUN_DIR`` writes it again.
    """
    from cloudedge.track.report import render_report

    try:
        return render_report(run_path)[1]
    except Exception as err:  # noqa: BLE001 - the results are safe; whatever broke the report is named below
        reason = " ".join(f"{type(err).__name__}: {err}".split())
        print(f"warning: {run_path}: report not written ({reason}); retry with `cloudedge report {run_path}`",
              file=sys.stderr)
        return None
