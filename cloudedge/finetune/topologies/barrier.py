"""Barrier (``hierfavg``, ``tempo``, ``adaptive-interval``): the cloud waits for every edge.

All edges pull the global state, run their periods of edge rounds side by side (each starts when
it has received the model) and upload; the cloud gates and aggregates the edges' states (weights:
their samples; ``robust.cloud_aggregator``) and applies the server optimizer. Each edge's report
carries Tempo's layer divergence for the policy.
"""

from __future__ import annotations

import dataclasses

from cloudedge.finetune.lora import BASE_DELTA_SUFFIX
from cloudedge.finetune.messages import CLOUD, Upload
from cloudedge.finetune.topologies.base import TOPOLOGIES, Tensors, Topology


@TOPOLOGIES.register("barrier")
class Barrier(Topology):
    """One cloud update = one period of every edge, aggregated when the last edge's upload is in."""

    def step(self) -> bool:
        run = self.run
        if run.done(run.t_cloud):
            return True
        states, weights, reports = [], [], {}
        pulled, down_bytes = run.messages.send_state(run.global_state)
        periods = run.rounds.edge_periods({e.id: (pulled, run.messages.transfer(CLOUD, e.id, down_bytes,
                                                                                 start=run.t_cloud))
                                           for e in run.fleet.edges})
        sends = []
        for e in run.fleet.edges:
            state, t, obs = periods[e.id]
            edge_state, nbytes = run.messages.edge_upload(state, pulled)
            sends.append(Upload(e.id, CLOUD, nbytes, t))
            states.append(edge_state)
            weights.append(float(run.agg_samples[e.id]))
            reports[e.id] = obs
        # Booked in the order the edges send, not in fleet order: none waits at the cloud behind
        # an edge that finished its period later.
        ends = [a.at for a in run.messages.uploads(sends)]
        total = sum(weights)
        candidate = run.safeguards.aggregate_edges(pulled, list(reports), states, weights,
                                                   [float(o.rounds_done) for o in reports.values()],
                                                   run.next_reinit_seed)
        if candidate is not None:
            run.apply_server(candidate)
        for (e_id, obs), st, w in zip(reports.items(), states, weights, strict=True):
            layer_div = layer_divergence(st, run.global_state) * w / total
            reports[e_id] = dataclasses.replace(obs, layer_divergence=layer_div)
        run.policy.on_cloud_sync(reports)
        run.t_cloud = run.clock.advance_to(max(ends))
        run.cloud_round += 1
        run.log_update(run.t_cloud, {"syncs": run.cloud_round, "k2": {e: r.rounds_done for e, r in reports.items()}})
        return False


def layer_divergence(a: Tensors, b: Tensors) -> float:
    """Tempo's per-layer L1 divergence summed: ``sum_layers |a - b|_1`` (a layer = one tensor)."""
    return sum(float((a[k].double() - b[k].double()).abs().sum()) for k in a if not k.endswith(BASE_DELTA_SUFFIX))

