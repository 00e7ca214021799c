"""Building the fleet tree from config: ids, parents, mixes, determinism, scale, tables."""

from __future__ import annotations

from collections import Counter

import pytest

from cloudedge.config import config_from_dict
from cloudedge.fleet import PROFILES, Fleet, format_bytes, format_flops, format_rate, mix_counts


def _fleet(seed: int = 0, **fleet) -> Fleet:
    return Fleet.from_config(config_from_dict({"fleet": fleet}).fleet, seed=seed)


def test_ids_parents_and_indices():
    fleet = _fleet(edges=[
        {"count": 2, "devices": [{"count": 2, "profile": "phone-mid"}, {"count": 1, "profile": "jetson-orin", "data_share": 3}]},
        {"profile": "t4", "devices": [{"count": 1, "profile": "phone-low"}]},
    ])
    assert [e.id for e in fleet.edges] == ["edge0", "edge1", "edge2"]
    assert [d.id for d in fleet.devices_of("edge1")] == ["edge1/dev0", "edge1/dev1", "edge1/dev2"]
    assert [n.id for n in fleet.nodes.values()][:4] == ["cloud", "edge0", "edge1", "edge2"]
    assert [n.index for n in fleet.nodes.values()] == list(range(len(fleet)))
    assert len(fleet) == 1 + 3 + 7
    assert fleet.cloud.parent is None and fleet.cloud.profile.name == "a100"
    assert all(e.parent == "cloud" for e in fleet.edges)
    assert fleet.edges[2].profile.name == "t4" and fleet.edges[0].profile.name == "edge-server"
    dev = fleet.nodes["edge1/dev2"]
    assert (dev.tier, dev.parent, dev.profile.name, dev.data_share) == ("device", "edge1", "jetson-orin", 3.0)
    assert fleet.edge_of("edge2/dev0") is fleet.edges[2]
    assert fleet.devices_of("edge2")[0].profile.name == "phone-low"
    with pytest.raises(KeyError):
        fleet.devices_of("edge9")
    with pytest.raises(KeyError):
        fleet.edge_of("edge0")


def test_default_fleet_is_cloud_and_one_edge():
    fleet = _fleet()
    assert list(fleet.nodes) == ["cloud", "edge0"] and fleet.devices == []


@pytest.mark.parametrize(
    ("count", "mix", "expected"),
    [
        (10, {"a": 0.5, "b": 0.3, "c": 0.2}, {"a": 5, "b": 3, "c": 2}),
        (7, {"a": 1, "b": 1, "c": 1}, {"a": 3, "b": 2, "c": 2}),  # tie: the first listed gets the extra
        (3, {"a": 0.45, "b": 0.45, "c": 0.1}, {"a": 2, "b": 1, "c": 0}),
        (9, {"a": 0.1, "b": 0.9}, {"a": 1, "b": 8}),  # remainders .9/.1 -> a gets the leftover
        (1, {"a": 0.2, "b": 0.8}, {"a": 0, "b": 1}),
    ],
)
def test_mix_counts_largest_remainder(count, mix, expected):
    assert mix_counts(count, mix) == expected
    assert sum(mix_counts(count, mix).values()) == count


def test_mix_assignment_counts_per_edge_and_determinism():
    spec = {"edges": [{"count": 3, "devices": [
        {"count": 100, "mix": {"phone-mid": 0.55, "phone-low": 0.3, "raspberry-pi-4": 0.15}}]}]}
    a, b, c = _fleet(seed=1, **spec), _fleet(seed=1, **spec), _fleet(seed=2, **spec)
    for edge in a.edges:
        counts = Counter(d.profile.name for d in a.devices_of(edge.id))
        assert counts == {"phone-mid": 55, "phone-low": 30, "raspberry-pi-4": 15}
    names = lambda f: [d.profile.name for d in f.devices]  # noqa: E731
    assert names(a) == names(b)
    assert names(a) != names(c)
    # Placement is shuffled, not blocked by profile.
    first = names(a)[:100]
    assert first != sorted(first, key=["phone-mid", "phone-low", "raspberry-pi-4"].index)


def test_negative_seed_is_fine():
    fleet = _fleet(seed=-5, edges=[{"devices": [{"count": 4, "mix": {"t4": 1, "phone-low": 1}}]}])
    assert Counter(d.profile.name for d in fleet.devices) == {"t4": 2, "phone-low": 2}


def test_ten_thousand_devices_build_and_share_profiles():
    fleet = _fleet(edges=[{"count": 10, "devices": [
        {"count": 600, "mix": {"phone-mid": 0.5, "phone-low": 0.5}},
        {"count": 400, "profile": "raspberry-pi-4"}]}])
    assert len(fleet.devices) == 10_000 and len(fleet) == 10_011
    assert fleet.devices[-1].id == "edge9/dev999"
    # Devices are light records pointing at shared profiles, not copies.
    assert len({id(d.profile) for d in fleet.devices}) == 3
    assert len(fleet.devices_of("edge7")) == 1000
    rows = fleet.summary_rows()
    assert len(rows) == 1 + 10 * (1 + 3)
    assert sum(int(r["node"].split("(x")[1].rstrip(")")) for r in rows if r["tier"] == "device") == 10_000


def test_summary_rows_format_figures():
    fleet = _fleet(edges=[{"devices": [{"count": 1, "profile": "phone-mid"}]}])
    rows = fleet.summary_rows()
    assert rows[0] == {
        "node": "cloud", "tier": "cloud", "profile": "a100", "compute": format_flops(PROFILES["a100"].flops),
        "memory": "80 GiB", "uplink": "100 Gbit/s", "downlink": "100 Gbit/s",
    }
    assert rows[2]["node"] == "edge0/dev0" and rows[2]["uplink"] == "20 Mbit/s"
    assert len(fleet.summary_rows(collapse=False)) == 3


def test_format_helpers():
    assert format_flops(1.248e14) == "125 TFLOP/s"
    assert format_flops(8e9) == "8 GFLOP/s"
    assert format_flops(999.96e3) == "1 MFLOP/s"
    assert format_flops(5) == "5 FLOP/s"
    assert format_bytes(80 * 1024**3) == "80 GiB"
    assert format_bytes(1536) == "1.5 KiB"
    assert format_bytes(0) == "0 B"
    assert format_rate(12.5e6) == "100 Mbit/s"
    assert format_rate(2.5e6) == "20 Mbit/s"
