"""Autonomous merges (``autonomous``): no barrier; each edge merges into the global model on its own.

Every edge runs its period of edge rounds until its policy says "sync", uploads, and the cloud
merges it when it arrives, ``global += w_e (edge - pulled)`` with the policy's merge weight (its
share of the samples, discounted for excess staleness), then answers with its disagreement (how the
edge's change agrees with what the others did meanwhile) and the new global model, which the edge
pulls at once. Edges that are waiting to merge are kept in arrival order (ties: by edge id).
"""

from __future__ import annotations

import dataclasses
import heapq
from dataclasses import dataclass
from typing import Any

from cloudedge.finetune.lora import aggregate_lora
from cloudedge.finetune.messages import CLOUD
from cloudedge.finetune.sync import DeviceObs, EdgeObs, disagreement
from cloudedge.finetune.topologies.base import TOPOLOGIES, Tensors, Topology


@dataclass(order=True)
class Pending:
    """An edge whose period of edge rounds is done, waiting to merge (ordered by time, then edge id)."""

    t_ready: float
    edge_id: str
    state: Tensors = dataclasses.field(compare=False)
    pulled: Tensors = dataclasses.field(compare=False)
    obs: EdgeObs = dataclasses.field(compare=False)


@TOPOLOGIES.register("autonomous")
class AutonomousMerges(Topology):
    """One cloud update = one edge's merge (the earliest to arrive)."""

    def __init__(self, run: Any):
        super().__init__(run)
        self.pending: list[Pending] = []

    def start(self) -> None:
        self._start_periods([e.id for e in self.run.fleet.edges], 0.0)

    def _start_periods(self, edge_ids: list[str], t: float) -> None:
        """The edges pull the global state at ``t`` and run until each decides to sync."""
        run = self.run
        pulled, down_bytes = run.messages.send_state(run.global_state)
        periods = run.rounds.edge_periods({e: (pulled, run.messages.transfer(CLOUD, e, down_bytes, start=t))
                                           for e in edge_ids})
        for edge_id, (state, t_ready, obs) in periods.items():
            state = run.safeguards.check_edge_alone(edge_id, state, pulled)
            heapq.heappush(self.pending, Pending(t_ready, edge_id, state, pulled, obs))

    def step(self) -> bool:
        run = self.run
        item = heapq.heappop(self.pending)
        if run.done(item.t_ready):
            return True
        edge_state, nbytes = run.messages.edge_upload(item.state, item.pulled)
        t = run.messages.transfer(item.edge_id, CLOUD, nbytes, start=item.t_ready)
        share = run.agg_samples[item.edge_id] / run.n_all
        # Staleness: merges the cloud applied since this edge pulled (it pulls right after its own
        # merge, or at the start), read from the logged rows so that a resumed run sees the same.
        staleness = 0
        for row in reversed(run.history):
            if row.get("edge") == item.edge_id:
                break
            staleness += "edge" in row
        w = run.policy.merge_weight(share, staleness, len(run.fleet.edges))
        candidate = aggregate_lora([run.global_state, edge_state, item.pulled], [1.0, w, -w], run.s.lora_mode,
                                   scaling=run.scaling, refactor=run.s.refactor, reinit_seed=run.next_reinit_seed())
        # The cloud's answer to the edge: how its change agrees with what the others did meanwhile.
        keys = run.safeguards.cloud_keys
        nu = disagreement({k: edge_state[k] - item.pulled[k] for k in keys},
                          {k: run.global_state[k] - item.pulled[k] for k in keys})
        run.apply_server(candidate)
        run.policy.on_cloud_sync({item.edge_id: dataclasses.replace(item.obs, disagreement=nu)})
        run.cloud_round += 1
        run.t_cloud = run.clock.advance_to(t)
        run.log_update(t, {"syncs": run.cloud_round, "edge": item.edge_id, "k2": item.obs.rounds_done,
                           "staleness": staleness, "merge_weight": w, "disagreement": nu})
        self._start_periods([item.edge_id], t)
        return False

    def state_dict(self) -> list[dict[str, Any]]:
        items = []
        for p in self.pending:
            obs = dataclasses.asdict(p.obs)
            obs["devices"] = [dataclasses.asdict(o) for o in p.obs.devices]
            items.append({"t_ready": p.t_ready, "edge_id": p.edge_id, "obs": obs, "state": p.state, "pulled": p.pulled})
        return items

    def load_state_dict(self, items: list[dict[str, Any]]) -> None:
        keys = list(self.run.global_state)  # a checkpoint sorts the keys; the run's order is the model's
        self.pending = []
        for p in items:
            obs = EdgeObs(**{**p["obs"], "devices": tuple(DeviceObs(**o) for o in p["obs"]["devices"])})
            heapq.heappush(self.pending, Pending(float(p["t_ready"]), p["edge_id"], {k: p["state"][k] for k in keys},
                                                 {k: p["pulled"][k] for k in keys}, obs))
