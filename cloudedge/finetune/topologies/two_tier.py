"""Two-tier (``fedavg2``): devices exchange with the cloud directly, one round per cloud update.

Each message is relayed over the device's edge links (:class:`cloudedge.finetune.messages.Messages`),
so the WAN carries one copy per device; the cloud is the one aggregation point, over all devices.
"""

from __future__ import annotations

import numpy as np

from cloudedge.finetune.messages import CLOUD
from cloudedge.finetune.topologies.base import TOPOLOGIES, Topology
from cloudedge.fleet.topology import Node


@TOPOLOGIES.register("two_tier")
class TwoTier(Topology):
    """The cloud runs the edge round itself, over every device of the fleet."""

    def points(self) -> list[str]:
        return [CLOUD]

    def point_devices(self) -> dict[str, list[Node]]:
        return {CLOUD: list(self.run.fleet.devices)}

    def step(self) -> bool:
        run = self.run
        if run.done(run.t_cloud):
            return True
        state, t, info = run.rounds.edge_round(CLOUD, run.fleet.devices, run.global_state, run.t_cloud)
        run.apply_server(state)
        run.t_cloud = run.clock.advance_to(t)
        run.cloud_round += 1
        steps = info["steps"]
        run.log_update(t, {"syncs": run.cloud_round, "mean_steps": float(np.mean(steps)) if steps else None})
        return False
