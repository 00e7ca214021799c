"""finetune-hier's measurement: one evaluation grid for every policy, the curve metrics, the regime,
and autonomous edges that choose different sync intervals when their link costs differ."""

from __future__ import annotations

import pytest
import torch

from cloudedge.bench import finetune_hier as fh
from cloudedge.config import config_from_dict
from cloudedge.engine import LocalEngine
from cloudedge.finetune.loop import HierFinetune
from cloudedge.finetune.stage import prepare_task, settings_from_config
from cloudedge.fleet import Fleet


def _cfg(edges: list[dict], budget: float, eval_every: float | None, alpha: list[float] | None = None):
    partition = {"kind": "dirichlet", "alpha": 0.5, **({"edge_alpha": alpha} if alpha else {})}
    raw = {
        "seed": 1,
        "fleet": {"edges": edges},
        "data": {"source": "digits", "partition": partition},
        "model": {"kind": "vit", "hidden": 16, "layers": 1, "heads": 2, "image_size": 8, "patch_size": 4,
                  "channels": 1},
        "finetune": {"lora": {"rank": 2, "alpha": 4.0, "mode": "ffa"},
                     "sync": {"name": "autonomous", "k1": 3, "k2": 2, "max_steps": 6, "k2_max": 12},
                     "batch_size": 8, "lr": 1e-2, "time_budget_s": budget, "max_cloud_rounds": 200,
                     "eval_max": 64, "eval_every_s": eval_every},
    }
    return config_from_dict(raw)


DEVICE = {"availability": 1.0, "latency_s": 0.001, "flops": 2e7, "uplink_Bps": 1e7, "downlink_Bps": 1e7}


def _edge(wan_Bps: float) -> dict:
    return {"count": 1, "overrides": {"latency_s": 0.001, "wan_uplink_Bps": wan_Bps, "wan_downlink_Bps": wan_Bps,
                                      "wan_latency_s": 0.001},
            "devices": [{"count": 3, "profile": "jetson-orin", "overrides": DEVICE}]}


def _run(cfg, policy: str, target: float | None = None) -> HierFinetune:
    torch.set_num_threads(1)
    fleet = Fleet.from_config(cfg.fleet, cfg.seed)
    settings = settings_from_config(cfg, policy=policy)
    settings.target_accuracy = target
    loop = HierFinetune(fleet, prepare_task(cfg, fleet), settings, LocalEngine())
    loop.run()
    return loop


def test_every_policy_is_scored_at_the_same_instants():
    cfg = _cfg([_edge(1e6), _edge(1e6)], budget=0.4, eval_every=0.1)
    grids = {}
    for policy in ("fedavg2", "hierfavg", "autonomous"):
        loop = _run(cfg, policy, target=0.3)
        grid = [r for r in loop.history if r.get("eval") == "grid"]
        updates = [r for r in loop.history if r.get("eval") != "grid"]
        grids[policy] = [r["virtual_time_s"] for r in grid]
        assert updates and all("acc" not in r for r in updates)  # only the grid is scored
        summary = loop.summary()
        assert summary["time_to_target_s"] == next((r["virtual_time_s"] for r in grid if r["acc"] >= 0.3), None)
        assert summary["final_acc"] == grid[-1]["acc"]
        # Devices online are counted at the cloud updates, not at the grid's score rows.
        assert all("online_devices" not in r for r in grid)
        counts = [r["online_devices"] for r in updates]
        assert fh.online_devices_mean(loop.history) == pytest.approx(sum(counts) / len(counts))
        # Each instant scores the model in effect then: before the first cloud update, the initial one.
        first_update = min(r["virtual_time_s"] for r in updates if r["round"] > 0)
        early = [r["acc"] for r in grid if r["virtual_time_s"] < first_update]
        assert early and len(set(early)) == 1
    assert grids["fedavg2"] == grids["hierfavg"] == grids["autonomous"] == pytest.approx([0.0, 0.1, 0.2, 0.3, 0.4])


def test_autonomous_edges_behind_costlier_links_sync_less_often():
    """A constructed case: two edges alike but for their WAN link (the second's is 3,000x slower,
    so a sync costs it several edge rounds): the rule gives them different intervals, logged per edge."""
    cfg = _cfg([_edge(3e7), _edge(1e4)], budget=1.5, eval_every=None)
    loop = _run(cfg, "autonomous")
    k2 = fh.k2_by_edge(loop.history)
    fast, slow = [k for _, k in k2["edge0"]], [k for _, k in k2["edge1"]]
    assert len(fast) >= 3 and len(slow) >= 2
    assert max(fast) < min(slow[1:])  # after its first answer from the cloud, the slow-link edge waits longer
    assert all(r.get("disagreement") is None or 0.0 <= r["disagreement"] <= 2.0 for r in loop.history)


def test_curve_metrics_by_hand():
    curve = [(0.0, 0.1), (1.0, 0.5), (2.0, 0.7), (3.0, 0.9)]
    m = fh.curve_metrics(curve, {"time_to_080_s": 0.7, "never": 0.95}, budget=3.0)
    assert m["time_to_080_s"] == 2.0 and m["never"] is None
    assert m["auc"] == pytest.approx(((0.1 + 0.5) / 2 + (0.5 + 0.7) / 2 + (0.7 + 0.9) / 2) / 3)


def test_the_benchmark_regime_is_the_one_documented():
    for quick in (True, False):
        raw = fh.bench_config(quick)
        cfg = config_from_dict(raw, source="finetune-hier")
        fleet = Fleet.from_config(cfg.fleet, cfg.seed)
        assert cfg.clock.charge_as == "vit-b16" and cfg.finetune.lora.rank == 8
        assert cfg.data.source == "glyphs" and cfg.data.glyphs.test_size >= 2000
        assert cfg.data.partition.edge_alpha == [1.0, 0.3, 0.1]
        wans = [e.profile.wan_uplink_Bps * 8 / 1e6 for e in fleet.edges]
        assert all(10 <= w < 100 for w in wans) and len(set(wans)) == 3  # tens of Mbit/s, all different
        assert all(10 <= e.profile.wan_latency_s * 1e3 < 100 for e in fleet.edges)
        mixes = [sorted(d.profile.name for d in fleet.devices_of(e.id)) for e in fleet.edges]
        assert len({tuple(m) for m in mixes}) == 3
        assert cfg.finetune.eval_every_s * fh.bench_settings(quick)["grid_points"] == pytest.approx(
            cfg.finetune.time_budget_s)
