"""Hardware profiles for the simulation: the table and name resolution (plain data, in
:mod:`cloudedge.config.profiles`) and which link a node uses to reach a peer."""

from __future__ import annotations

from cloudedge.config.profiles import (
    GIGA,
    PROFILES,
    TERA,
    TIERS,
    GiB,
    Profile,
    Tier,
    check_fleet_profiles,
    resolve_profile,
)

__all__ = ["GIGA", "PROFILES", "TERA", "TIERS", "GiB", "Profile", "Tier", "check_fleet_profiles", "link_figures",
           "resolve_profile"]


def link_figures(profile: Profile, peer_tier: str) -> tuple[float, float, float, bool]:
    """``(uplink_Bps, downlink_Bps, latency_s, wan)`` of the link ``profile`` uses to reach a node of
    ``peer_tier``: an edge's ``wan_*`` figures toward the cloud where given (``wan`` True: its own
    pipe, separate from the access link), else the access figures."""
    if profile.tier == "edge" and peer_tier == "cloud" and (
            profile.wan_uplink_Bps is not None or profile.wan_downlink_Bps is not None
            or profile.wan_latency_s is not None):
        return (profile.wan_uplink_Bps or profile.uplink_Bps, profile.wan_downlink_Bps or profile.downlink_Bps,
                profile.latency_s if profile.wan_latency_s is None else profile.wan_latency_s, True)
    return profile.uplink_Bps, profile.downlink_Bps, profile.latency_s, False

