"""The simulated fleet: hardware profiles, the cloud -> edge -> device tree, and the virtual clock."""

from cloudedge.fleet.clock import (
    ClockMark,
    VirtualClock,
    available,
    available_nodes,
    compute_seconds,
    link_key,
    transfer_seconds,
)
from cloudedge.fleet.profiles import PROFILES, TIERS, Profile, Tier, check_fleet_profiles, resolve_profile
from cloudedge.fleet.topology import (
    CLOUD_ID,
    Fleet,
    Node,
    format_bytes,
    format_flops,
    format_rate,
    mix_counts,
)

__all__ = [
    "CLOUD_ID", "PROFILES", "TIERS", "ClockMark", "Fleet", "Node", "Profile", "Tier", "VirtualClock",
    "available", "available_nodes", "check_fleet_profiles", "compute_seconds", "format_bytes",
    "format_flops", "format_rate", "link_key", "mix_counts", "resolve_profile", "transfer_seconds",
]
