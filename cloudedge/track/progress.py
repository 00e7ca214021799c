"""Progress over long loops: a rich bar on a terminal, plain lines in logs, or nothing.

``CLOUDEDGE_PROGRESS`` chooses: ``auto`` (the default: a bar when stderr is a terminal, else
nothing), ``bar``, ``lines`` (one plain line to stderr per step, at most one every
``CLOUDEDGE_PROGRESS_EVERY`` seconds, default 10, and always the last: for logs, pipes, CI and
remote machines, where a long benchmark is otherwise silent until it ends) or ``off``.
``CLOUDEDGE_QUIET`` (set by the tests) turns every kind off.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from cloudedge.errors import InputError

MODES = ("auto", "bar", "lines", "off")
DEFAULT_EVERY_S = 10.0


def progress_mode() -> str:
    """``bar``, ``lines`` or ``off``: what ``CLOUDEDGE_PROGRESS`` asks for here (see the module docstring)."""
    mode = _asked_mode()
    if os.environ.get("CLOUDEDGE_QUIET"):
        return "off"
    if mode == "auto":
        return "bar" if sys.stderr.isatty() else "off"
    return mode


def _asked_mode() -> str:
    mode = os.environ.get("CLOUDEDGE_PROGRESS", "auto").strip().lower() or "auto"
    if mode not in MODES:
        raise InputError(f"CLOUDEDGE_PROGRESS must be one of {', '.join(MODES)}, got {mode!r}")
    return mode


def check_progress_settings() -> None:
    """Raise InputError naming a bad ``CLOUDEDGE_PROGRESS`` / ``CLOUDEDGE_PROGRESS_EVERY``: the CLI
    calls it before any command starts, so a typo never leaves a half-opened run directory."""
    _asked_mode()
    _every_s()


def _every_s() -> float:
    raw = os.environ.get("CLOUDEDGE_PROGRESS_EVERY", "")
    try:
        every = float(raw) if raw.strip() else DEFAULT_EVERY_S
    except ValueError:
        every = -1.0
    if not every >= 0:
        raise InputError(f"CLOUDEDGE_PROGRESS_EVERY must be a number of seconds >= 0, got {raw!r}")
    return every


class _Bar:
    def __init__(self, progress: Progress | None, task: int | None):
        self._p, self._t = progress, task

    def advance(self, n: int = 1, **fields: object) -> None:
        if self._p is not None:
            desc = fields.pop("description", None)
            self._p.update(self._t, advance=n, **({"description": desc} if desc else {}))


class _Lines:
    """``description: done/total (elapsed)`` lines on stderr, throttled to one per ``every_s``."""

    def __init__(self, description: str, total: int, every_s: float):
        self.description, self.total, self.every_s = description, total, every_s
        self.done, self.start = 0, time.monotonic()
        self.last_print: float | None = None
        self.printed_done = -1

    def advance(self, n: int = 1, **fields: object) -> None:
        self.done += n
        desc = fields.get("description")
        if desc:
            self.description = str(desc)
        now = time.monotonic()
        if self.last_print is None or now - self.last_print >= self.every_s or self.done >= self.total:
            self._print(now)

    def finish(self) -> None:
        if self.done != self.printed_done:
            self._print(time.monotonic())

    def _print(self, now: float) -> None:
        print(f"{self.description}: {self.done}/{self.total} ({now - self.start:.1f}s)", file=sys.stderr, flush=True)
        self.last_print, self.printed_done = now, self.done


@contextmanager
def progress_bar(description: str, total: int) -> Iterator[_Bar | _Lines]:
    """``with progress_bar("pretrain", rounds) as bar: ... bar.advance()``."""
    mode = progress_mode()
    if mode == "lines":
        lines = _Lines(description, total, _every_s())
        try:
            yield lines
        finally:
            lines.finish()
        return
    if mode == "off":
        yield _Bar(None, None)
        return
    progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TimeElapsedColumn(), transient=False)
    with progress:
        yield _Bar(progress, progress.add_task(description, total=total))
