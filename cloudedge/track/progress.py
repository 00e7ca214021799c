"""Progress bars for long loops (rich), quiet when not on a terminal or when asked."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn


def progress_enabled() -> bool:
    return sys.stderr.isatty() and not os.environ.get("CLOUDEDGE_QUIET")


class _Bar:
    def __init__(self, progress: Progress | None, task: int | None):
        self._p, self._t = progress, task

    def advance(self, n: int = 1, **fields: object) -> None:
        if self._p is not None:
            desc = fields.pop("description", None)
            self._p.update(self._t, advance=n, **({"description": desc} if desc else {}))


@contextmanager
def progress_bar(description: str, total: int) -> Iterator[_Bar]:
    """``with progress_bar("pretrain", rounds) as bar: ... bar.advance()``."""
    if not progress_enabled():
        yield _Bar(None, None)
        return
    progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TimeElapsedColumn(), transient=False)
    with progress:
        yield _Bar(progress, progress.add_task(description, total=total))
