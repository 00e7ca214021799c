"""Topologies are chosen by the sync policy's ``topology`` name, through the TOPOLOGIES registry."""

from __future__ import annotations

import pytest
import torch

from cloudedge.config import config_from_dict
from cloudedge.engine import LocalEngine
from cloudedge.errors import InputError
from cloudedge.finetune.loop import HierFinetune
from cloudedge.finetune.messages import CLOUD
from cloudedge.finetune.stage import prepare_task, settings_from_config
from cloudedge.finetune.sync import POLICIES
from cloudedge.finetune.topologies import TOPOLOGIES, AutonomousMerges, Barrier, TwoTier
from cloudedge.fleet import Fleet

EXPECTED = {"fedavg2": TwoTier, "hierfavg": Barrier, "tempo": Barrier, "adaptive-interval": Barrier,
            "autonomous": AutonomousMerges}


def _loop(policy: str) -> HierFinetune:
    torch.set_num_threads(1)
    cfg = config_from_dict({
        "seed": 1,
        "fleet": {"edges": [{"count": 2, "devices": [{"count": 2, "profile": "phone-mid"}]}]},
        "data": {"source": "digits", "partition": {"kind": "iid"}},
        "model": {"kind": "vit", "hidden": 16, "layers": 1, "heads": 2, "image_size": 8, "patch_size": 4,
                  "channels": 1},
        "finetune": {"lora": {"rank": 2, "alpha": 4.0}, "sync": {"name": policy, "k1": 2, "k2": 1},
                     "batch_size": 8, "time_budget_s": 1e9, "max_cloud_rounds": 2, "eval_max": 32},
    })
    fleet = Fleet.from_config(cfg.fleet, cfg.seed)
    return HierFinetune(fleet, prepare_task(cfg, fleet), settings_from_config(cfg), LocalEngine())


def test_every_policy_names_a_registered_topology():
    assert set(EXPECTED) <= set(POLICIES)  # plus any plug-in another test registered (docs/extending.md)
    for name in POLICIES:
        topology = TOPOLOGIES.get(POLICIES.get(name).topology)  # every policy names a known topology
        assert name not in EXPECTED or topology is EXPECTED[name], name


@pytest.mark.parametrize("policy", ["fedavg2", "hierfavg", "autonomous"])
def test_the_loop_runs_the_topology_its_policy_names(policy):
    loop = _loop(policy)
    assert type(loop.topology) is EXPECTED[policy]
    # Two-tier aggregates at the cloud over every device; the others at each edge.
    points = [CLOUD] if policy == "fedavg2" else ["edge0", "edge1"]
    assert loop.topology.points() == points and list(loop.agg_samples) == points
    summary = loop.run()
    assert summary["cloud_updates"] == 2 and [r["round"] for r in loop.history] == [0, 1, 2]
    merges = [r for r in loop.history if "edge" in r]  # only autonomous merges edges one at a time
    assert bool(merges) == (policy == "autonomous")
    assert (summary["bytes_device_edge"] > 0) and (summary["bytes_edge_cloud"] > 0)


def test_an_unknown_topology_is_an_input_error_listing_the_known_ones():
    with pytest.raises(InputError, match="unknown fine-tuning topology 'ring'.*barrier"):
        TOPOLOGIES.get("ring")


def test_barrier_books_the_edges_uploads_in_the_order_they_are_sent():
    """Edge0's devices are 20x slower than edge1's, and the cloud's downlink takes a quarter second per
    edge update: edge1's upload, sent first, arrives before edge0 even finishes its period (booked in
    fleet order, it waited at the cloud behind edge0's later upload)."""
    torch.set_num_threads(1)
    device = {"profile": "phone-mid", "overrides": {"availability": 1.0, "flops": 1e8}}
    slow = {**device, "overrides": {**device["overrides"], "flops": 5e6}}
    cfg = config_from_dict({
        "seed": 1,
        "fleet": {"cloud": {"profile": "a100", "overrides": {"downlink_Bps": 10_000.0}},
                  "edges": [{"count": 1, "devices": [{"count": 2, **slow}]},
                            {"count": 1, "devices": [{"count": 2, **device}]}]},
        "data": {"source": "digits", "partition": {"kind": "iid"}},
        "model": {"kind": "vit", "hidden": 16, "layers": 1, "heads": 2, "image_size": 8, "patch_size": 4,
                  "channels": 1},
        "finetune": {"lora": {"rank": 2, "alpha": 4.0},
                     "sync": {"name": "hierfavg", "k1": 8, "k2": 1, "deadline_factor": None},
                     "batch_size": 8, "time_budget_s": 1e9, "max_cloud_rounds": 1, "eval_max": 32},
    })
    fleet = Fleet.from_config(cfg.fleet, cfg.seed)
    loop = HierFinetune(fleet, prepare_task(cfg, fleet), settings_from_config(cfg), LocalEngine())
    period_end, nbytes = {}, {}
    edge_periods, edge_upload = loop.rounds.edge_periods, loop.messages.edge_upload

    def record_periods(*args, **kwargs):
        out = edge_periods(*args, **kwargs)
        period_end.update({e: t for e, (_, t, _) in out.items()})
        return out

    def record_upload(state, pulled):
        got, n = edge_upload(state, pulled)
        nbytes[len(nbytes)] = n
        return got, n

    loop.rounds.edge_periods, loop.messages.edge_upload = record_periods, record_upload
    loop.run()
    cloud = loop.fleet.nodes[CLOUD]
    one_upload = loop.messages.link_s(loop.fleet.nodes["edge1"], cloud, nbytes[1])
    assert one_upload > 0.1  # the setting this test needs: an edge update takes a while to reach the cloud
    assert period_end["edge0"] > period_end["edge1"] + one_upload
    # The round ends when edge0's update is in, alone on the cloud's downlink (edge1's went first).
    assert loop.history[-1]["virtual_time_s"] == pytest.approx(period_end["edge0"] + one_upload, rel=1e-6)
