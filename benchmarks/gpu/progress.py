"""Run a ``cloudedge`` command, printing each pre-training round as it ends, under cProfile.

The prepared GPU run calls the bench through this, so that a run cut short by its timeout still
says how far it got and where its time went: each round prints one line (wall seconds, the row's
compute and virtual times, validation loss, MFU), and the profile (cumulative, then internal time)
is written to ``$OUT/profile.txt`` when the command ends or on SIGTERM (what ``timeout`` sends).

    OUT=/tmp/x python benchmarks/gpu/progress.py bench pretrain-hetero --quick --out /tmp/x/hetero ...
"""

from __future__ import annotations

import cProfile
import io
import os
import pstats
import signal
import sys
import time

from cloudedge.cli import main
from cloudedge.pretrain.stage import PretrainRun

START = time.perf_counter()
SHOWN = ("work_wall_s", "compute_wall_s", "virtual_time_s", "val_loss", "mfu_compute")
_round = PretrainRun.round


def _timed_round(self: PretrainRun, r: int):  # type: ignore[no-untyped-def]
    t0 = time.perf_counter()
    row = _round(self, r)
    values = row.as_dict()
    shown = {k: round(v, 4) if isinstance(v, float) else v for k in SHOWN if (v := values.get(k)) is not None}
    print(f"[{time.perf_counter() - START:7.1f}s] {row.method} round {r}: {time.perf_counter() - t0:.2f}s {shown}",
          flush=True)
    return row


PretrainRun.round = _timed_round  # type: ignore[method-assign]
profile = cProfile.Profile()


def _dump(*_: object) -> None:
    profile.disable()
    text = io.StringIO()
    stats = pstats.Stats(profile, stream=text).sort_stats("cumulative")
    stats.print_stats(60)
    stats.sort_stats("tottime").print_stats(30)
    with open(os.path.join(os.environ.get("OUT", "."), "profile.txt"), "w") as f:
        f.write(text.getvalue())
    print(f"profile: {os.environ.get('OUT', '.')}/profile.txt ({time.perf_counter() - START:.1f}s)", flush=True)


def _on_term(*_: object) -> None:
    _dump()
    os._exit(124)


signal.signal(signal.SIGTERM, _on_term)
profile.enable()
code = main(sys.argv[1:])
_dump()
sys.exit(code)
