"""Fine-tuning's metric rows: what is counted between rows (:class:`Tally`) and the rows (:class:`MetricLog`).

Rows are :class:`cloudedge.stage.MetricRow` (``stage``, ``method``, ``round``, ``virtual_time_s``,
then the values), logged through the run's :class:`cloudedge.stage.StageRun`. A row is logged
after every cloud update (``round`` = cloud updates so far) with the virtual time,
the accuracy and loss of the global model (unless scoring is on a grid), the bytes per link tier,
the devices' energy, the counts since the last row (timed out, dropped, stale, rejected, failed,
surplus) and what the topology adds (``syncs``, ``k2``, the merged ``edge``...). With
``eval_every_s`` the global model in effect at each instant ``0, e, 2e, ...`` gets its own row
(``eval: grid``), so every method is scored at the same instants.

Failed and rejected updates are counted per row (``failed``, ``rejected``) and listed as
``{at, from, reason}`` items (``failures``, ``rejections``), not as MetricRow's ``{worker: reason}``:
a device can fail or be rejected at several aggregation points between two rows.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from cloudedge.device import PRECISIONS
from cloudedge.fleet import Fleet, VirtualClock
from cloudedge.fleet.traces import online_count
from cloudedge.perf import stage_peak_size, utilization_fields
from cloudedge.stage import MetricRow, StageRun

COUNTS = ("timed_out", "dropped", "stale", "rejected", "failed", "surplus")
_MAX_REJECTED_LISTED = 20  # per metric row; the count is always exact


class Tally:
    """Counts of the run: per metric row (``counts``, the rejected and failed updates listed) and in total."""

    def __init__(self) -> None:
        self.counts = dict.fromkeys(COUNTS, 0)  # since the last metric row
        self.totals = dict.fromkeys(COUNTS, 0)
        self.rejected_log: list[dict[str, str]] = []  # since the last metric row
        self.failures_log: list[dict[str, str]] = []  # workers that failed since the last row, and why
        self.dropped_total = 0  # updates that never arrived: timed out at a deadline or dropped out
        self.device_steps_total = 0  # local steps whose updates were aggregated
        self.host_flops, self.host_wall_s = 0.0, 0.0  # real work done on this host since the last row, for MFU

    def count(self, key: str, n: int = 1) -> None:
        self.counts[key] += n
        self.totals[key] += n

    def reject(self, at: str, rejected: dict[Any, str]) -> None:
        """Updates rejected at aggregation point ``at`` (sender -> reason)."""
        self.count("rejected", len(rejected))
        for cid, reason in rejected.items():
            self.rejected_log.append({"at": at, "from": str(cid), "reason": reason})

    def fail(self, at: str, failed: dict[str, str]) -> None:
        """Workers whose task failed at aggregation point ``at`` (device -> reason)."""
        self.count("failed", len(failed))
        self.failures_log.extend({"at": at, "from": d, "reason": r} for d, r in failed.items())

    def state_dict(self) -> dict[str, Any]:
        return {"counts": self.counts, "totals": self.totals, "rejected_log": self.rejected_log,
                "failures_log": self.failures_log, "dropped_total": self.dropped_total,
                "device_steps_total": self.device_steps_total}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.counts = {k: int(state["counts"][k]) for k in COUNTS}
        self.totals = {k: int(state["totals"][k]) for k in COUNTS}
        self.rejected_log = list(state["rejected_log"])
        self.failures_log = list(state["failures_log"])
        self.dropped_total, self.device_steps_total = int(state["dropped_total"]), int(state["device_steps_total"])


class MetricLog:
    """The run's metric rows (``history``: each as :meth:`StageRun.log` returned it), logged through
    ``run``; after each cloud update's row, ``on_round(round, row)``.

    ``evaluate(state)`` scores a global state on the cloud's test set; ``epsilon()`` is DP's epsilon
    so far (None without DP); ``device`` is this host's, for its MFU peak.
    """

    def __init__(self, settings: Any, fleet: Fleet, clock: VirtualClock, tally: Tally,
                 evaluate: Callable[[Any], dict[str, float]], epsilon: Callable[[], float | None],
                 device: Any, run: StageRun, on_round: Callable[[int, dict[str, Any]], None] | None = None):
        self.s, self.fleet, self.clock, self.tally = settings, fleet, clock, tally
        self.evaluate, self.epsilon, self.device = evaluate, epsilon, device
        self.run, self.on_round = run, on_round
        self.fastest_flops = max((p.flops for p, _, _ in fleet.device_profile_set()), default=1.0)
        self.history: list[dict[str, Any]] = []
        self.in_effect: Any = None  # grid mode: the global model since the last cloud update

    def log(self, t: float, cloud_round: int, global_state: Any, extra: dict[str, Any]) -> dict[str, Any]:
        """The row of a cloud update at ``t`` (after grid rows due before it); resets the tally's row counts."""
        tally = self.tally
        if self.s.eval_every_s:  # scored on the grid; the update row carries no accuracy
            self.score_grid(t)
            ev = {}
        else:
            ev = self.evaluate(global_state)
        links = self.clock.bytes_by_link
        row = {
            **{k: ev[k] for k in ("acc", "loss") if k in ev},
            "bytes_device_edge": int(links.get(("device", "edge"), 0)),
            "bytes_edge_cloud": int(links.get(("edge", "cloud"), 0)),
            "bytes_device_cloud": int(links.get(("device", "cloud"), 0)),
            "device_energy_j": self.clock.energy_by_tier()["device"],
            "online_devices": online_count(self.fleet, t),
            "dropped_total": tally.dropped_total, "device_steps_total": tally.device_steps_total,
            **tally.counts, "rejected_total": tally.totals["rejected"],
            "rejections": tally.rejected_log[:_MAX_REJECTED_LISTED],
            **extra,
        }
        if tally.host_wall_s > 0:  # this host's model-FLOPs utilization since the last row
            util = utilization_fields(tally.host_flops, tally.host_wall_s, self.fastest_flops, device=self.device,
                                      peak_size=stage_peak_size(self.device), dtype=PRECISIONS[self.s.precision])
            row.update({k: util[k] for k in ("mfu_measured", "mfu_profile", "achieved_flops")})
            tally.host_flops, tally.host_wall_s = 0.0, 0.0
        epsilon = self.epsilon()
        if epsilon is not None:
            row["epsilon"] = epsilon
        if tally.failures_log:
            row["failures"] = tally.failures_log
        tally.counts = dict.fromkeys(COUNTS, 0)
        tally.rejected_log = []
        tally.failures_log = []
        logged = self._log(cloud_round, t, row)
        self.in_effect = global_state
        if self.on_round is not None:
            self.on_round(cloud_round, logged)
        return logged

    def score_grid(self, until: float, inclusive: bool = False) -> None:
        """Grid mode: a row (``eval: grid``) for each instant of the grid before ``until`` (up to it
        when ``inclusive``) not scored yet, with the global model in effect then."""
        step = float(self.s.eval_every_s or 0.0)
        k = sum(r.get("eval") == "grid" for r in self.history)
        last_round = self.history[-1]["round"] if self.history else 0
        while k * step <= self.s.time_budget_s + 1e-9 and (k * step < until or (inclusive and k * step <= until + 1e-9)):
            ev = self.evaluate(self.in_effect)
            self._log(last_round, k * step, {"acc": ev["acc"], "loss": ev["loss"], "eval": "grid"})
            k += 1

    def _log(self, cloud_round: int, t: float, values: dict[str, Any]) -> dict[str, Any]:
        run = self.run
        logged = run.log(MetricRow(run.stage, run.method, cloud_round, t, values))
        self.history.append(logged)
        return logged
