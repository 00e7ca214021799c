"""Availability traces, the diurnal generator, speed models, FedScale conversion, lazy fleets."""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml

from cloudedge.cli import main
from cloudedge.config import config_from_dict
from cloudedge.config.fleet import FleetConfig
from cloudedge.data.partition import partition, partition_view
from cloudedge.errors import InputError
from cloudedge.fleet import Fleet
from cloudedge.fleet.traces import DiurnalAvailability, hash_uniform, online_mask, online_until, sample_online


def _fleet(tmp_path, rows: str | None = None, suffix=".csv", per_edge=3, **availability) -> Fleet:
    spec: dict = dict(availability)
    if rows is not None:
        path = tmp_path / f"trace{suffix}"
        path.write_text(rows)
        spec = {"kind": "trace", "path": str(path), **availability}
    cfg = FleetConfig.model_validate({
        "edges": [{"count": 2, "devices": [{"count": per_edge, "mix": {"phone-mid": 2, "phone-low": 1}}]}],
        "availability": spec})
    return Fleet.from_config(cfg, seed=0)


def test_csv_and_jsonl_traces_give_online_intervals(tmp_path):
    csv_rows = "device,start_s,end_s\nedge0/dev0,0,100\nedge0/dev0,200,300\nedge1/dev2,50,60\n"
    fleet = _fleet(tmp_path, csv_rows)
    numbers = np.arange(len(fleet.devices))
    rng = np.random.default_rng(0)
    assert online_mask(fleet, numbers, 10.0, rng).tolist() == [True, False, False, False, False, False]
    assert online_mask(fleet, numbers, 55.0, rng).tolist() == [True, False, False, False, False, True]
    assert not online_mask(fleet, numbers, 100.0, rng)[0]  # end_s is exclusive
    assert online_until(fleet, 0, 250.0) == 300.0
    jsonl = "\n".join(json.dumps(r) for r in (
        {"device": "edge0/dev0", "start_s": 0, "end_s": 100}, {"device": "edge0/dev0", "start_s": 200, "end_s": 300},
        {"device": "edge1/dev2", "start_s": 50, "end_s": 60}))
    same = _fleet(tmp_path, jsonl, suffix=".jsonl")
    for t in (10.0, 55.0, 150.0, 250.0):
        assert online_mask(same, numbers, t, rng).tolist() == online_mask(fleet, numbers, t, rng).tolist()


def test_profile_rows_apply_to_that_profile_and_the_trace_can_repeat(tmp_path):
    fleet = _fleet(tmp_path, "device,start_s,end_s\nphone-low,0,10\nedge0/dev0,5,20\n", repeat_s=100.0)
    low = [d.id for d in fleet.devices if d.profile.name == "phone-low"]
    numbers = np.arange(len(fleet.devices))
    on = {fleet.devices[int(i)].id for i in numbers[online_mask(fleet, numbers, 103.0, np.random.default_rng(0))]}
    assert on == set(low) - {"edge0/dev0"}  # edge0/dev0 has rows of its own: only those apply
    assert online_until(fleet, fleet.device_number(low[-1]), 203.0) == 210.0


@pytest.mark.parametrize("rows, fragment", [
    ("device,start_s,end_s\nedge0/dev0,0,100\nedge0/dev0,50,120\n", "trace.csv:3: interval starting at 50 overlaps line 2"),
    ("device,start_s,end_s\nedge0/dev0,-5,10\n", "trace.csv:2: negative time"),
    ("device,start_s,end_s\nedge0/dev0,0,10\nedge7/dev0,0,10\n", "trace.csv:3: unknown device 'edge7/dev0'"),
    ("device,start_s,end_s\nedge0/dev9,0,10\n", "trace.csv:2: unknown device 'edge0/dev9'"),
    ("device,start_s,end_s\nedge0/dev0,10,10\n", "trace.csv:2: end_s 10 is not after start_s 10"),
    ("device,start_s,end_s\nedge0/dev0,x,10\n", "trace.csv:2: 'start_s' is not a number"),
    ("device,start_s\nedge0/dev0,1\n", "trace.csv:2: missing 'end_s'"),
])
def test_bad_traces_are_input_errors_naming_the_line(tmp_path, rows, fragment):
    with pytest.raises(InputError, match=fragment.replace("(", r"\(")):
        _fleet(tmp_path, rows)


def test_bad_trace_through_a_config_exits_2_naming_the_line(tmp_path, capsys):
    (tmp_path / "t.csv").write_text("device,start_s,end_s\nedge0/dev0,0,10\nedge0/dev0,5,20\n")
    cfg = tmp_path / "c.yaml"
    cfg.write_text("fleet:\n  edges: [{count: 1, devices: [{count: 2, profile: phone-mid}]}]\n"
                   "  availability: {kind: trace, path: t.csv}\n")  # relative to the config's folder
    assert main(["fleet", str(cfg)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "t.csv:3: interval starting at 5 overlaps line 2" in err[0]


def test_diurnal_model_follows_the_local_hour_and_is_a_function_of_the_seed():
    model = DiurnalAvailability(seed=1, timezones={0.0: 1.0})  # one time zone: the fleet's cycle shows
    numbers = np.arange(20_000)
    peak = model.online(numbers, 2.5 * 3600).mean()
    trough = model.online(numbers, 14.5 * 3600).mean()
    assert peak > 2 * trough and 0.1 < peak < 0.4 and trough < 0.12
    again = DiurnalAvailability(seed=1, timezones={0.0: 1.0}).online(numbers[:500], 3.3 * 3600)
    assert again.tolist() == model.online(numbers[:500], 3.3 * 3600).tolist()
    on = numbers[:2000][model.online(numbers[:2000], 3.0 * 3600)]
    for n in on[:50].tolist():
        end = model.online_until(n, 3.0 * 3600)
        assert end > 3.0 * 3600 and model.online(np.array([n]), end - 1e-6)[0] and not model.online(np.array([n]), end)[0]
    u = hash_uniform(7, np.arange(100_000), 3)
    assert 0.0 <= u.min() and u.max() < 1.0 and abs(u.mean() - 0.5) < 0.01


def test_sample_online_looks_only_at_candidates_and_draws_online_devices():
    cfg = FleetConfig.model_validate({"edges": [{"count": 10, "devices": [{"count": 100_000, "profile": "phone-mid"}]}],
                                      "availability": {"kind": "diurnal"}})
    fleet = Fleet.from_config(cfg, seed=0)
    assert len(fleet.devices) == 1_000_000 and fleet.materialized == 0
    lo, hi = fleet.device_range("edge3")
    got = sample_online(fleet, lo, hi, 5 * 3600.0, 50, np.random.default_rng(0))
    assert len(got) == 50 and lo <= got.min() and got.max() < hi
    assert fleet.availability.online(got, 5 * 3600.0).all()
    assert fleet.materialized == 0  # no device node was built to find them


def test_speed_models_scale_rates_per_device(tmp_path):
    cfg = FleetConfig.model_validate({"edges": [{"count": 1, "devices": [{"count": 400, "profile": "phone-mid"}]}],
                                      "speed": {"kind": "lognormal", "compute_sigma": 0.5, "link_sigma": 0.3}})
    fleet = Fleet.from_config(cfg, seed=0)
    flops = np.array([d.profile.flops for d in fleet.devices])
    base = fleet.base_profile(0).flops
    assert len(set(flops.tolist())) == 400 and 0.8 < np.median(flops) / base < 1.25
    assert fleet.devices[5].profile.flops == Fleet.from_config(cfg, seed=0).devices[5].profile.flops
    (tmp_path / "s.csv").write_text("device,compute_scale,uplink_scale,downlink_scale\nedge0/dev1,2,0.5,0.25\n")
    table = FleetConfig.model_validate({"edges": [{"count": 1, "devices": [{"count": 3, "profile": "phone-mid"}]}],
                                        "speed": {"kind": "file", "path": str(tmp_path / "s.csv")}})
    f2 = Fleet.from_config(table, seed=0)
    p0, p1 = f2.devices[0].profile, f2.devices[1].profile
    assert p1.flops == 2 * p0.flops and p1.uplink_Bps == 0.5 * p0.uplink_Bps and p1.downlink_Bps == 0.25 * p0.downlink_Bps
    (tmp_path / "bad.csv").write_text("device,compute_scale,uplink_scale,downlink_scale\nedge0/dev1,0,1,1\n")
    with pytest.raises(InputError, match="bad.csv:2: scales must be > 0"):
        Fleet.from_config(FleetConfig.model_validate({**table.model_dump(), "speed": {
            "kind": "file", "path": str(tmp_path / "bad.csv")}}), seed=0)


@pytest.mark.parametrize("kind", ["iid", "quantity"])
def test_partition_view_cuts_the_same_shards_without_an_array_per_client(kind):
    labels = np.arange(1000) % 10
    weights = np.linspace(1, 3, 40)
    eager = partition(labels, 40, kind, seed=5, alpha=0.7, min_samples=2, weights=weights)
    view = partition_view(labels, 40, kind, seed=5, alpha=0.7, min_samples=2, weights=weights)
    assert all(np.array_equal(view.indices(i), eager[i]) for i in range(40))
    assert view.sizes.tolist() == [len(p) for p in eager]


def test_fedscale_conversion_reads_json_and_refuses_pickles(tmp_path, capsys):
    behave = {"3": {"duration": 100, "active": [0, 50], "inactive": [10, 60], "finish_time": 100, "model": "x"},
              "1": {"duration": 100, "active": [20], "inactive": [30], "finish_time": 40, "model": "y"}}
    (tmp_path / "b.json").write_text(json.dumps(behave))
    cfg = tmp_path / "c.yaml"
    cfg.write_text("fleet:\n  edges: [{count: 1, devices: [{count: 2, profile: phone-mid}]}]\n")
    out = tmp_path / "trace.csv"
    assert main(["fedscale-trace", "behave", str(tmp_path / "b.json"), str(out), "--config", str(cfg),
                 "--horizon-s", "120"]) == 0
    lines = out.read_text().splitlines()
    # client 1 (first by id) -> edge0/dev0, repeating every 40 s; client 3 -> edge0/dev1 every 100 s
    assert lines[0] == "device,start_s,end_s"
    assert lines[1:] == ["edge0/dev0,20,30", "edge0/dev0,60,70", "edge0/dev0,100,110",
                         "edge0/dev1,0,10", "edge0/dev1,50,60", "edge0/dev1,100,110"]
    cfg.write_text(cfg.read_text() + f"  availability: {{kind: trace, path: {out}}}\n")
    loaded = Fleet.from_config(config_from_dict(yaml.safe_load(cfg.read_text())).fleet, 0)
    assert online_until(loaded, 0, 61.0) == 70.0
    cap = {"1": {"computation": 100.0, "communication": 1000.0}, "2": {"computation": 50.0, "communication": 4000.0}}
    (tmp_path / "cap.json").write_text(json.dumps(cap))
    assert main(["fedscale-trace", "capacity", str(tmp_path / "cap.json"), str(tmp_path / "s.csv"),
                 "--config", str(cfg)]) == 0
    rows = (tmp_path / "s.csv").read_text().splitlines()
    assert rows[1] == "edge0/dev0,0.75,0.4,0.4" and rows[2] == "edge0/dev1,1.5,1.6,1.6"
    (tmp_path / "client_behave_trace").write_bytes(b"\x80\x04\x95...")
    capsys.readouterr()
    assert main(["fedscale-trace", "behave", str(tmp_path / "client_behave_trace"), str(out), "--config", str(cfg)]) == 2
    assert "does not unpickle" in capsys.readouterr().err


def test_bundled_diurnal_config_builds_a_lazy_fleet_with_a_goal():
    from pathlib import Path

    from cloudedge.config import load_config
    from cloudedge.finetune.stage import settings_from_config

    cfg = load_config(Path(__file__).parents[1] / "configs" / "finetune-diurnal.yaml")
    fleet = Fleet.from_config(cfg.fleet, cfg.seed)
    assert fleet.availability.kind == "diurnal" and fleet.speed is not None and len(fleet.devices) == 1200
    assert fleet.materialized == 0
    settings = settings_from_config(cfg)
    assert settings.goal == 5 and settings.over_selection == 1.3


def test_sample_online_over_a_given_list_of_devices(tmp_path):
    fleet = _fleet(tmp_path, "device,start_s,end_s\nedge1/dev0,0,50\nedge1/dev2,0,50\nedge0/dev0,0,50\n")
    numbers = np.array([fleet.device_number(i) for i in ("edge1/dev0", "edge1/dev1", "edge1/dev2")])
    got = sample_online(fleet, 0, 0, 10.0, 5, np.random.default_rng(0), numbers=numbers)
    assert [fleet.devices[int(n)].id for n in got] == ["edge1/dev0", "edge1/dev2"]
