"""Named profiles, overrides, custom profiles, and unknown-name errors naming the field path."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from cloudedge.config import config_from_dict
from cloudedge.config.fleet import CustomProfile, ProfileOverride
from cloudedge.errors import InputError
from cloudedge.fleet import PROFILES, Fleet, Profile, resolve_profile

DOCS = Path(__file__).resolve().parents[1] / "docs" / "profiles.md"
REQUIRED = ("a100", "h100", "t4", "edge-server", "jetson-orin", "raspberry-pi-4", "phone-mid", "phone-low")


def test_required_profiles_exist_with_plausible_order():
    for name in REQUIRED:
        assert PROFILES[name].name == name
    f = {name: PROFILES[name].flops for name in REQUIRED}
    assert f["h100"] > f["a100"] > f["t4"] > f["jetson-orin"] > f["phone-mid"] > f["phone-low"] > f["raspberry-pi-4"]
    # Phones send slower than they receive; datacenter links are symmetric and fastest.
    for phone in ("phone-mid", "phone-low"):
        assert PROFILES[phone].uplink_Bps < PROFILES[phone].downlink_Bps < PROFILES["edge-server"].downlink_Bps
    assert PROFILES["a100"].uplink_Bps == max(p.uplink_Bps for p in PROFILES.values())
    assert PROFILES["a100"].tier == "cloud" and PROFILES["edge-server"].tier == "edge"
    assert PROFILES["phone-low"].tier == "device"


def test_energy_per_flop_is_board_power_over_sustained_throughput():
    # docs/profiles.md: A100 400 W, H100 700 W, T4 70 W, Orin 60 W.
    for name, watts in (("a100", 400), ("h100", 700), ("t4", 70), ("jetson-orin", 60)):
        p = PROFILES[name]
        assert p.joules_per_flop * p.flops == pytest.approx(watts)
    # A newer datacenter GPU does a FLOP for less energy than an older one and than a phone.
    assert PROFILES["h100"].joules_per_flop < PROFILES["a100"].joules_per_flop < PROFILES["phone-mid"].joules_per_flop


def test_every_profile_is_documented_with_its_source():
    text = DOCS.read_text(encoding="utf-8")
    for p in PROFILES.values():
        assert re.search(rf"\|\s*`{re.escape(p.name)}`\s*\|", text), f"{p.name} missing from the table"
        assert p.source in text, f"source key {p.source} not explained in docs/profiles.md"


def test_overrides_replace_only_the_given_fields():
    base = PROFILES["t4"]
    p = resolve_profile("t4", {}, ProfileOverride(flops=1e12, availability=0.5))
    assert (p.name, p.flops, p.availability) == ("t4", 1e12, 0.5)
    assert p.memory_bytes == base.memory_bytes and p.uplink_Bps == base.uplink_Bps
    assert "flops" in p.source and "availability" in p.source
    assert resolve_profile("t4", {}, None) is base
    assert resolve_profile("t4", {}, ProfileOverride()) is base


def test_custom_profiles_build_on_a_base_and_on_each_other():
    custom = {
        "phone-5g-fast": CustomProfile(base="phone-mid", uplink_Bps=1e7),
        "phone-5g-fast-flaky": CustomProfile(base="phone-5g-fast", availability=0.3),
    }
    p = resolve_profile("phone-5g-fast-flaky", custom, ProfileOverride(latency_s=0.1))
    assert p.name == "phone-5g-fast-flaky"
    assert (p.uplink_Bps, p.availability, p.latency_s) == (1e7, 0.3, 0.1)
    assert p.flops == PROFILES["phone-mid"].flops and p.tier == "device"
    with pytest.raises(InputError, match=r"unknown profile 'nope' \(known: a100, .*phone-5g-fast"):
        resolve_profile("nope", custom)


def test_profile_rejects_impossible_figures():
    with pytest.raises(ValueError, match="flops"):
        Profile("x", "device", 0.0, 1, 1, 1, 0, 1, 0, 0, "s")


def _fleet(**fleet):
    return {"fleet": fleet}


@pytest.mark.parametrize(
    ("fleet", "path", "name"),
    [
        (_fleet(cloud={"profile": "tpu"}), "fleet.cloud.profile", "tpu"),
        (_fleet(edges=[{"profile": "edge-box"}]), "fleet.edges.0.profile", "edge-box"),
        (
            _fleet(edges=[{"devices": [{"count": 2, "profile": "t4"}, {"count": 3, "profile": "x"}]}]),
            "fleet.edges.0.devices.1.profile", "x",
        ),
        (
            _fleet(edges=[{}, {"devices": [{"count": 5, "mix": {"phone-mid": 0.5, "iphone": 0.5}}]}]),
            "fleet.edges.1.devices.0.mix.iphone", "iphone",
        ),
        (_fleet(profiles={"mine": {"base": "a1000"}}), "fleet.profiles.mine.base", "a1000"),
    ],
)
def test_unknown_profile_error_names_the_field(fleet, path, name):
    with pytest.raises(InputError) as err:
        config_from_dict(fleet, source="configs/x.yaml")
    msg = str(err.value)
    assert msg.startswith(f"configs/x.yaml: {path}: unknown profile '{name}' (known: a100, h100, t4, ")
    assert "\n" not in msg


def test_custom_profile_names_are_known_to_the_check_and_the_fleet():
    cfg = config_from_dict(_fleet(
        profiles={"slow-phone": {"base": "phone-low", "flops": 1e9}},
        edges=[{"count": 2, "devices": [{"count": 3, "profile": "slow-phone", "overrides": {"latency_s": 0.2}}]}],
    ))
    fleet = Fleet.from_config(cfg.fleet, seed=0)
    dev = fleet.nodes["edge1/dev2"]
    assert (dev.profile.name, dev.profile.flops, dev.profile.latency_s) == ("slow-phone", 1e9, 0.2)


def test_custom_profile_cycle_and_shadowing_are_errors():
    with pytest.raises(InputError, match=r"fleet\.profiles\.a\.base: profile cycle: a -> b -> a"):
        config_from_dict(_fleet(profiles={"a": {"base": "b"}, "b": {"base": "a"}}), source="c.yaml")
    with pytest.raises(InputError, match=r"c\.yaml: fleet\.profiles\.t4: the name is a built-in profile"):
        config_from_dict(_fleet(profiles={"t4": {"base": "t4", "flops": 1.0}}), source="c.yaml")


def test_out_of_range_override_is_a_config_error():
    with pytest.raises(InputError, match=r"fleet\.cloud\.overrides\.availability"):
        config_from_dict(_fleet(cloud={"overrides": {"availability": 1.5}}))


def test_the_config_package_does_not_import_the_fleet() -> None:
    """Profiles are plain data in cloudedge.config.profiles: checking a config's profile names needs
    no simulation code (fleet imports config, never the other way round)."""
    import subprocess
    import sys

    code = ("import sys; from cloudedge.config import config_from_dict; "
            "config_from_dict({'fleet': {'cloud': {'profile': 'h100'}, 'profiles': {'slow': {'base': 'phone-low'}},"
            " 'edges': [{'count': 1, 'devices': [{'count': 2, 'profile': 'slow'}]}]}}); "
            "print(sorted(m for m in sys.modules if m.startswith('cloudedge.fleet')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.stdout.strip() == "[]"
    from cloudedge.config import profiles as data
    from cloudedge.fleet import profiles as fleet_profiles

    assert fleet_profiles.PROFILES is data.PROFILES and fleet_profiles.resolve_profile is data.resolve_profile
