"""Fine-tuning's metric rows: what is counted between rows (:class:`Tally`) and the rows (:class:`MetricLog`).

A row is logged after every cloud update (``round`` = cloud updates so far) with the virtual time,
the accuracy and loss of the global model (unless scoring is on a grid), the bytes per link tier,
the devices' energy, the counts since the last row (timed out, dropped, stale, rejected, failed,
surplus) and what the topology adds (``syncs``, ``k2``, the merged ``edge``...). With
``eval_every_s`` the global model in effect at each instant ``0, e, 2e, ...`` gets its own row
(``eval: grid``), so every method is scored at the same instants.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from cloudedge.fleet import Fleet, VirtualClock
from cloudedge.fleet.traces import online_count
from cloudedge.perf import stage_peak_size, utilization_fields

COUNTS = ("timed_out", "dropped", "stale", "rejected", "failed", "surplus")
_MAX_REJECTED_LISTED = 20  # per metric row; the count is always exact
STAGE = "finetune"


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
                "failures_log": self.failures_log}

    def load_state_dict(self, rel: dict[str, Any]) -> None:
        # .get: checkpoints written before `failed` was counted still load.
        self.counts = {k: int(rel["counts"].get(k, 0)) for k in COUNTS}
        self.totals = {k: int(rel["totals"].get(k, 0)) for k in COUNTS}
        self.rejected_log = list(rel["rejected_log"])
        self.failures_log = list(rel.get("failures_log", []))


class MetricLog:
    """The run's metric rows (``history``), also written to ``run_dir`` and passed to ``progress``.

    ``evaluate(state)`` scores a global state on the cloud's test set; ``epsilon()`` is DP's epsilon
    so far (None without DP); ``device`` is this host's, for its MFU peak.
    """

    def __init__(self, settings: Any, fleet: Fleet, clock: VirtualClock, tally: Tally,
                 evaluate: Callable[[Any], dict[str, float]], epsilon: Callable[[], float | None],
                 device: Any, method: str, run_dir: Any = None, progress: Any = None):
        self.s, self.fleet, self.clock, self.tally = settings, fleet, clock, tally
        self.evaluate, self.epsilon, self.device = evaluate, epsilon, device
        self.method, self.run_dir, self.progress = method, run_dir, progress
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
            "round": cloud_round, "virtual_time_s": t, **{k: ev[k] for k in ("acc", "loss") if k in ev},
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
                                      peak_size=stage_peak_size(self.device))
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
        self.history.append(row)
        self.in_effect = global_state
        self._write(row)
        if self.progress is not None:
            self.progress(row)
        return row

    def score_grid(self, until: float, inclusive: bool = False) -> None:
        """Grid mode: a row (``eval: grid``) for each instant of the grid before ``until`` (up to it
        when ``inclusive``) not scored yet, with the global model in effect then."""
        step = float(self.s.eval_every_s or 0.0)
        k = sum(r.get("eval") == "grid" for r in self.history)
        last_round = self.history[-1]["round"] if self.history else 0
        while k * step <= self.s.time_budget_s + 1e-9 and (k * step < until or (inclusive and k * step <= until + 1e-9)):
            ev = self.evaluate(self.in_effect)
            row = {"round": last_round, "virtual_time_s": k * step, "acc": ev["acc"], "loss": ev["loss"],
                   "eval": "grid"}
            self.history.append(row)
            self._write(row)
            k += 1

    def _write(self, row: dict[str, Any]) -> None:
        if self.run_dir is not None:
            self.run_dir.log(stage=STAGE, method=self.method, **row)

    def drop_rows_after_restart(self, restored: bool) -> None:
        """Resume: keep the run directory's rows of the rounds in ``history`` (all of them are
        dropped when the run was killed before its first checkpoint, ``restored`` False)."""
        if self.run_dir is None:
            return
        rounds = {r["round"] for r in self.history} if restored else set()
        self.run_dir.truncate_metrics(lambda r: r.get("stage") != STAGE or r.get("method") != self.method
                                      or r.get("round") in rounds)
