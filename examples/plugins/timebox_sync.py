"""A sync policy of one's own: every device trains for the same virtual time per edge round, so
a fast device runs more local steps than a slow one (docs/extending.md). Name it in a config's
``plugins:`` list, then ``finetune: {sync: {name: timebox, step_budget_s: 0.5, k2: 2}}``."""

from __future__ import annotations

import math
import statistics

from pydantic import Field

from cloudedge.finetune.sync import POLICIES, DeviceObs, EdgeObs, SyncParams, SyncPolicy


class TimeboxParams(SyncParams):
    """The shared schedule knobs (k1, k2, deadline_factor, min_steps, max_steps) plus this one."""

    step_budget_s: float = Field(default=1.0, gt=0, description="virtual seconds of local training per edge round")


@POLICIES.register("timebox", TimeboxParams)
class Timebox(SyncPolicy):
    """Steps = floor(step_budget_s / the device's seconds per step), clipped to [min_steps, max_steps];
    each edge syncs with the cloud every ``k2`` edge rounds (a barrier, as HierFAVG)."""

    name = "timebox"
    step_budget_s: float  # set from the validated knobs by SyncPolicy.__init__

    def deadline(self, edge: EdgeObs) -> float | None:
        if self.deadline_factor is None or not edge.devices:
            return None
        return self.deadline_factor * statistics.median(d.comm_s + self.step_budget_s for d in edge.devices)

    def device_steps(self, edge_id: str, device: DeviceObs, deadline_s: float | None) -> int:
        fit = math.floor(self.step_budget_s / device.sec_per_step) if device.sec_per_step > 0 else self.max_steps
        return int(min(self.max_steps, max(self.min_steps, fit)))
