"""The `fleet` section: one cloud, N edges, each with groups of devices."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from cloudedge.config.base import StrictModel

# A bound on one group's size: far above any simulated fleet (the scale benchmark uses 10,000),
# low enough that a typo cannot make `cloudedge fleet` allocate without end.
MAX_COUNT = 1_000_000


class ProfileOverride(StrictModel):
    """Figures that replace a named profile's (any subset). Units as in `cloudedge.fleet.Profile`."""

    flops: float | None = Field(default=None, gt=0)
    memory_bytes: float | None = Field(default=None, gt=0)
    uplink_Bps: float | None = Field(default=None, gt=0)
    downlink_Bps: float | None = Field(default=None, gt=0)
    latency_s: float | None = Field(default=None, ge=0)
    availability: float | None = Field(default=None, ge=0, le=1)
    joules_per_flop: float | None = Field(default=None, ge=0)
    radio_joules_per_byte: float | None = Field(default=None, ge=0)
    # An edge's link to the cloud when it differs from its access link (docs/profiles.md, "Links").
    wan_uplink_Bps: float | None = Field(default=None, gt=0)
    wan_downlink_Bps: float | None = Field(default=None, gt=0)
    wan_latency_s: float | None = Field(default=None, ge=0)


class CustomProfile(ProfileOverride):
    """A profile defined in config: based on a named one (`base`), with overrides."""

    base: str


class DeviceGroup(StrictModel):
    """`count` devices of one profile, or a `mix` of profiles by fraction."""

    count: int = Field(ge=1, le=MAX_COUNT)
    profile: str | None = None
    mix: dict[str, float] | None = None
    data_share: float = Field(default=1.0, gt=0, description="relative amount of data per device")
    overrides: ProfileOverride | None = None

    @model_validator(mode="after")
    def _profile_or_mix(self) -> DeviceGroup:
        if (self.profile is None) == (self.mix is None):
            raise ValueError("give exactly one of 'profile' or 'mix'")
        if self.mix is not None:
            if not self.mix or any(v <= 0 for v in self.mix.values()):
                raise ValueError("'mix' needs positive fractions")
        return self


class EdgeSpec(StrictModel):
    """`count` edge servers alike, each with the same device groups."""

    count: int = Field(default=1, ge=1, le=MAX_COUNT)
    profile: str = "edge-server"
    overrides: ProfileOverride | None = None
    devices: list[DeviceGroup] = Field(default_factory=list)


class CloudSpec(StrictModel):
    profile: str = "a100"
    overrides: ProfileOverride | None = None


class AvailabilitySpec(StrictModel):
    """When devices are online (cloudedge.fleet.traces; docs/profiles.md, "Availability and speed traces").

    bernoulli: one draw per round against each profile's availability; trace: online intervals from
    ``path`` (CSV/JSONL ``device, start_s, end_s``); diurnal: the bundled generator."""

    kind: Literal["bernoulli", "trace", "diurnal"] = "bernoulli"
    path: str | None = Field(default=None, description="trace: the intervals file")
    repeat_s: float | None = Field(default=None, gt=0, description="trace: repeat it with this period")
    low: float = Field(default=0.05, ge=0, le=1, description="diurnal: online chance at the quietest local hour")
    high: float = Field(default=0.30, ge=0, le=1, description="diurnal: online chance at the peak local hour")
    peak_hour: float = Field(default=2.0, ge=0, lt=24, description="diurnal: local hour of the peak")
    median_session_s: float = Field(default=1200.0, gt=0, description="diurnal: median session length")
    sigma: float = Field(default=1.0, gt=0, description="diurnal: log-normal shape of session lengths")
    max_session_s: float = Field(default=14400.0, gt=0, description="diurnal: longest session")
    timezones: dict[float, float] | None = Field(default=None, description="diurnal: UTC offset (h) -> weight")

    @model_validator(mode="after")
    def _needs(self) -> AvailabilitySpec:
        if self.kind == "trace" and not self.path:
            raise ValueError("kind 'trace' needs 'path'")
        if self.low > self.high:
            raise ValueError("'low' must be <= 'high'")
        return self


class SpeedSpec(StrictModel):
    """Per-device compute and link rates: profile figures times multipliers (cloudedge.fleet.traces)."""

    kind: Literal["lognormal", "file"] = "lognormal"
    compute_sigma: float = Field(default=0.5, ge=0, description="lognormal: spread of compute multipliers")
    link_sigma: float = Field(default=0.5, ge=0, description="lognormal: spread of link multipliers")
    path: str | None = Field(default=None, description="file: CSV/JSONL device, compute_scale, uplink_scale, downlink_scale")

    @model_validator(mode="after")
    def _needs(self) -> SpeedSpec:
        if self.kind == "file" and not self.path:
            raise ValueError("kind 'file' needs 'path'")
        return self


class FleetConfig(StrictModel):
    cloud: CloudSpec = Field(default_factory=CloudSpec)
    edges: list[EdgeSpec] = Field(default_factory=lambda: [EdgeSpec()])
    profiles: dict[str, CustomProfile] = Field(default_factory=dict, description="extra named profiles")
    availability: AvailabilitySpec = Field(default_factory=AvailabilitySpec)
    speed: SpeedSpec | None = Field(default=None, description="per-device speed; null: every device is its profile")

    @field_validator("edges")
    @classmethod
    def _some_edges(cls, v: list[EdgeSpec]) -> list[EdgeSpec]:
        if not v:
            raise ValueError("at least one edge is needed")
        return v
