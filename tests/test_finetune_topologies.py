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
