"""The one way a stage command runs: into a run directory, through an engine, marked complete, then reported."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cloudedge.track.run import RunDir


def run_stage_into(stage: str, cfg: Any, out_dir: str | Path, resume: bool, engine_kind: str,
                   train: Callable[..., Any], save: Callable[[Any, Path], None] | None = None) -> dict[str, Any]:
    """Run ``train(cfg, run_dir, engine, resume=...)`` into ``out_dir``; return the stage's summary.

    A run already complete is not run again on ``resume``. ``save(result, run_path)`` writes the
    stage's artefact (a model, adapters) before summary.json is marked complete, so a complete run
    directory always holds it; then the report is written (:func:`write_report`). The engine is
    closed whatever happens.
    """
    from cloudedge.engine import make_engine

    t0 = time.perf_counter()
    run = RunDir.create(out_dir, cfg, resume=resume)
    if resume and run.complete:
        return run.read_summary().get(stage, {})
    engine = make_engine(engine_kind, cfg.engine.address, cfg.engine.threads)
    try:
        result = train(cfg, run, engine, resume=resume)
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
