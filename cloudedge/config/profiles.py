"""Hardware profiles as plain data: what one node can compute, hold and send, and how a config's
profile names resolve (built-in, custom from ``fleet.profiles``, per-use overrides).

The table lives here, beside the config models, so checking a config's profile names needs nothing
from the simulation: ``cloudedge.config`` does not import ``cloudedge.fleet``, which imports this
module (``cloudedge.fleet.profiles`` re-exports it, with the link rule the clock uses).

Every figure is documented with its source in `docs/profiles.md`. In short: compute is a
*sustained* training throughput (the spec sheet's dense peak times an assumed utilization), energy
per FLOP is the board power over that sustained throughput (so `energy = power x compute time`),
links are typical access-network speeds, and radio energy per byte is a typical interface power over
its throughput. Figures marked "typical" there are typical values, not measurements of ours.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

from cloudedge.config.fleet import CustomProfile, FleetConfig, ProfileOverride
from cloudedge.errors import InputError

Tier = Literal["cloud", "edge", "device"]
TIERS: tuple[Tier, ...] = ("device", "edge", "cloud")  # lowest first: used to order link keys

GiB = 1024**3
TERA = 1e12
GIGA = 1e9


def _mbit(megabits_per_s: float) -> float:
    """Megabit/s (how links are quoted) to bytes/s."""
    return megabits_per_s * 1e6 / 8


@dataclass(frozen=True, slots=True)
class Profile:
    """One kind of node. Units: FLOP/s, bytes, bytes/s, seconds, probability, J/FLOP, J/byte.

    `flops` is sustained training throughput, not the datasheet peak. `latency_s` is the node's
    one-way access latency; a message pays the larger of its two ends'. `availability` is the
    chance the node is reachable in a round. `source` is a citation key into `docs/profiles.md`.
    """

    name: str
    tier: Tier
    flops: float
    memory_bytes: float
    uplink_Bps: float
    downlink_Bps: float
    latency_s: float
    availability: float
    joules_per_flop: float
    radio_joules_per_byte: float
    source: str
    # An edge's backhaul to the cloud, when it differs from its access link to devices (a site
    # with Wi-Fi/LAN to its devices and a WAN uplink of tens of Mbit/s): None = the access figures.
    wan_uplink_Bps: float | None = None
    wan_downlink_Bps: float | None = None
    wan_latency_s: float | None = None

    def __post_init__(self) -> None:
        # Built-in figures and config overrides are both checked upstream; this guards code that
        # builds a Profile by hand, where a zero rate would mean a division by zero much later.
        for field in ("flops", "memory_bytes", "uplink_Bps", "downlink_Bps"):
            if not getattr(self, field) > 0:
                raise ValueError(f"profile {self.name!r}: {field} must be > 0, got {getattr(self, field)}")
        if not 0.0 <= self.availability <= 1.0:
            raise ValueError(f"profile {self.name!r}: availability must be in [0, 1]")
        for field in ("wan_uplink_Bps", "wan_downlink_Bps"):
            if getattr(self, field) is not None and not getattr(self, field) > 0:
                raise ValueError(f"profile {self.name!r}: {field} must be > 0, got {getattr(self, field)}")
        if self.wan_latency_s is not None and self.wan_latency_s < 0:
            raise ValueError(f"profile {self.name!r}: wan_latency_s must be >= 0")
        for field in ("latency_s", "joules_per_flop", "radio_joules_per_byte"):
            if getattr(self, field) < 0:
                raise ValueError(f"profile {self.name!r}: {field} must be >= 0")
        if self.tier not in TIERS:
            raise ValueError(f"profile {self.name!r}: tier must be one of {TIERS}")


def _sustained(peak_flops: float, utilization: float) -> float:
    return peak_flops * utilization


# Utilization assumptions (docs/profiles.md, "Compute"): share of the dense tensor-core peak that
# training reaches in practice. Datacenter GPUs on large matmuls: ~40%; a T4 capped at 70 W: ~30%;
# an embedded GPU sharing LPDDR with its CPU: ~20%. CPUs and phones are given as sustained figures.
_DC_UTIL = 0.40
_T4_UTIL = 0.30
_EMBEDDED_UTIL = 0.20

_A100_FLOPS = _sustained(312 * TERA, _DC_UTIL)  # BF16 dense peak 312 TFLOP/s
_H100_FLOPS = _sustained(989.5 * TERA, _DC_UTIL)  # BF16 dense peak 989.5 TFLOP/s (1,979 sparse)
_T4_FLOPS = _sustained(65 * TERA, _T4_UTIL)  # FP16 mixed-precision peak 65 TFLOP/s
_ORIN_FLOPS = _sustained(42.5 * TERA, _EMBEDDED_UTIL)  # FP16 dense 42.5 (170 sparse INT8 TOPS / 4)
_PI4_FLOPS = 8 * GIGA  # typical sustained FP32 on 4x Cortex-A72 (HPL FP64 ~12 GFLOP/s)
_PHONE_MID_FLOPS = 100 * GIGA  # typical sustained on a mid-range SoC (GPU ~1 TFLOP/s FP32 peak)
_PHONE_LOW_FLOPS = 20 * GIGA  # typical sustained on an entry-level SoC, CPU only

_DATACENTER_LINK = _mbit(100_000)  # 100 Gbit/s server NIC (typical)
_CLOUD_INSTANCE_LINK = _mbit(25_000)  # "up to 25 Gbit/s" class of a single-GPU cloud instance
_FIBRE_LINK = _mbit(1_000)  # 1 Gbit/s symmetric business fibre (typical)
_WIFI_LINK = _mbit(100)  # typical real Wi-Fi 5 throughput
_ETHERNET_RADIO_J_PER_BYTE = 8e-9  # ~1 W per 1 GbE port / 125 MB/s (typical)
_DATACENTER_RADIO_J_PER_BYTE = 1.2e-9  # ~15 W 100 GbE NIC / 12.5 GB/s (typical)

PROFILES: dict[str, Profile] = {
    p.name: p
    for p in (
        Profile(
            name="a100", tier="cloud", flops=_A100_FLOPS, memory_bytes=80 * GiB,
            uplink_Bps=_DATACENTER_LINK, downlink_Bps=_DATACENTER_LINK, latency_s=0.001,
            availability=1.0, joules_per_flop=400 / _A100_FLOPS,
            radio_joules_per_byte=_DATACENTER_RADIO_J_PER_BYTE, source="nvidia-a100-datasheet",
        ),
        Profile(
            name="h100", tier="cloud", flops=_H100_FLOPS, memory_bytes=80 * GiB,
            uplink_Bps=_DATACENTER_LINK, downlink_Bps=_DATACENTER_LINK, latency_s=0.001,
            availability=1.0, joules_per_flop=700 / _H100_FLOPS,
            radio_joules_per_byte=_DATACENTER_RADIO_J_PER_BYTE, source="nvidia-h100-datasheet",
        ),
        Profile(
            name="t4", tier="cloud", flops=_T4_FLOPS, memory_bytes=16 * GiB,
            uplink_Bps=_CLOUD_INSTANCE_LINK, downlink_Bps=_CLOUD_INSTANCE_LINK, latency_s=0.001,
            availability=1.0, joules_per_flop=70 / _T4_FLOPS,
            radio_joules_per_byte=_DATACENTER_RADIO_J_PER_BYTE, source="nvidia-t4-datasheet",
        ),
        Profile(
            # One T4 in a Xeon host: the GPU does the training; power counts the host too (~200 W).
            name="edge-server", tier="edge", flops=_T4_FLOPS, memory_bytes=16 * GiB,
            uplink_Bps=_FIBRE_LINK, downlink_Bps=_FIBRE_LINK, latency_s=0.010,
            availability=0.99, joules_per_flop=200 / _T4_FLOPS,
            radio_joules_per_byte=_ETHERNET_RADIO_J_PER_BYTE, source="edge-server-typical",
        ),
        Profile(
            name="jetson-orin", tier="device", flops=_ORIN_FLOPS, memory_bytes=64 * GiB,
            uplink_Bps=_FIBRE_LINK, downlink_Bps=_FIBRE_LINK, latency_s=0.002,
            availability=0.95, joules_per_flop=60 / _ORIN_FLOPS,
            radio_joules_per_byte=_ETHERNET_RADIO_J_PER_BYTE, source="nvidia-jetson-agx-orin-brief",
        ),
        Profile(
            name="raspberry-pi-4", tier="device", flops=_PI4_FLOPS, memory_bytes=4 * GiB,
            uplink_Bps=_WIFI_LINK, downlink_Bps=_WIFI_LINK, latency_s=0.005,
            availability=0.9, joules_per_flop=6.4 / _PI4_FLOPS,
            radio_joules_per_byte=1.6e-7, source="raspberry-pi-4-docs",
        ),
        Profile(
            name="phone-mid", tier="device", flops=_PHONE_MID_FLOPS, memory_bytes=8 * GiB,
            uplink_Bps=_mbit(20), downlink_Bps=_mbit(150), latency_s=0.015,
            availability=0.8, joules_per_flop=5 / _PHONE_MID_FLOPS,
            radio_joules_per_byte=5e-7, source="phone-mid-typical",
        ),
        Profile(
            name="phone-low", tier="device", flops=_PHONE_LOW_FLOPS, memory_bytes=3 * GiB,
            uplink_Bps=_mbit(8), downlink_Bps=_mbit(30), latency_s=0.025,
            availability=0.6, joules_per_flop=3 / _PHONE_LOW_FLOPS,
            radio_joules_per_byte=1e-6, source="phone-low-typical",
        ),
    )
}

_OVERRIDE_FIELDS = tuple(ProfileOverride.model_fields)


def _known(custom: dict[str, CustomProfile]) -> str:
    return ", ".join([*PROFILES, *custom])


def _apply(profile: Profile, overrides: ProfileOverride | None, *, name: str | None, source: str | None) -> Profile:
    changes: dict[str, object] = {}
    if overrides is not None:
        changes = {f: v for f in _OVERRIDE_FIELDS if (v := getattr(overrides, f)) is not None}
    if name is not None:
        changes["name"] = name
    if source is not None:
        changes["source"] = source
    elif changes:
        changes["source"] = f"{profile.source}; config overrides {', '.join(sorted(changes))}"
    return dataclasses.replace(profile, **changes) if changes else profile


def resolve_profile(
    name: str,
    custom: dict[str, CustomProfile] | None = None,
    overrides: ProfileOverride | None = None,
) -> Profile:
    """The profile called `name` (built-in or custom from config), with `overrides` applied.

    A custom profile is its `base` (itself resolved, so custom profiles may build on each other)
    with its own figures applied; its name is the custom name. Unknown names and cycles are
    `InputError`s (config checks report them with the field path first).
    """
    custom = custom or {}
    return _apply(_resolve_named(name, custom, ()), overrides, name=None, source=None)


def _resolve_named(name: str, custom: dict[str, CustomProfile], seen: tuple[str, ...]) -> Profile:
    if name in PROFILES:
        return PROFILES[name]
    if name not in custom:
        raise InputError(f"unknown profile {name!r} (known: {_known(custom)})")
    if name in seen:
        raise InputError(f"profile cycle: {' -> '.join((*seen, name))}")
    spec = custom[name]
    base = _resolve_named(spec.base, custom, (*seen, name))
    return _apply(base, spec, name=name, source=f"config (based on {base.name}: {base.source})")


def check_fleet_profiles(fleet_cfg: FleetConfig, source: str) -> None:
    """Raise `InputError("<source>: fleet.<path>: unknown profile ...")` for the first bad name.

    Checks every place a profile is named: the cloud, each edge, each device group's `profile` and
    `mix` keys, and each custom profile's `base` (and that custom profiles neither shadow a
    built-in name nor build on themselves in a cycle).
    """
    custom = fleet_cfg.profiles

    def check(name: str, path: str) -> None:
        if name not in PROFILES and name not in custom:
            raise InputError(f"{source}: fleet.{path}: unknown profile {name!r} (known: {_known(custom)})")

    for name, spec in custom.items():
        if name in PROFILES:
            raise InputError(
                f"{source}: fleet.profiles.{name}: the name is a built-in profile; pick another name, "
                "or use 'overrides' where the profile is used"
            )
        check(spec.base, f"profiles.{name}.base")
    for name in custom:
        try:
            _resolve_named(name, custom, ())
        except InputError as err:
            raise InputError(f"{source}: fleet.profiles.{name}.base: {err}") from None
    check(fleet_cfg.cloud.profile, "cloud.profile")
    for e, edge in enumerate(fleet_cfg.edges):
        check(edge.profile, f"edges.{e}.profile")
        for g, group in enumerate(edge.devices):
            if group.profile is not None:
                check(group.profile, f"edges.{e}.devices.{g}.profile")
            for key in group.mix or {}:
                check(key, f"edges.{e}.devices.{g}.mix.{key}")
