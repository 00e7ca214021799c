"""The fleet: one cloud, its edges, each edge's devices; built from a `FleetConfig`.

Nodes are small frozen records sharing `Profile` objects; devices are built only when read (a fleet
of a million devices holds per-group records, not a million nodes: docs/performance.md, "Scale").
Ids are "cloud", "edge0", "edge0/dev0", ...; edges are numbered across all `EdgeSpec`s in order,
devices per edge across all of that edge's groups in order.
"""

from __future__ import annotations

import bisect
import dataclasses
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from cloudedge.config.fleet import DeviceGroup, FleetConfig, ProfileOverride
from cloudedge.fleet.profiles import Profile, Tier, resolve_profile

CLOUD_ID = "cloud"


@dataclass(frozen=True, slots=True)
class Node:
    """One place in the fleet.

    `parent` is the id of the node above ("cloud" for an edge, the edge for a device, None for
    the cloud). `data_share` is the relative amount of data the node holds (devices; 0 for the
    cloud and edges unless a stage gives them data). `index` is the position in `Fleet.nodes`, for
    stage code that keeps per-node arrays.
    """

    id: str
    tier: Tier
    profile: Profile
    parent: str | None
    data_share: float
    index: int


def mix_counts(count: int, mix: dict[str, float]) -> dict[str, int]:
    """How many of `count` devices get each profile: largest-remainder apportionment.

    Fractions are normalized (they need not sum to 1). Ties in the remainder go to the profile
    listed first, so the result depends only on the inputs.
    """
    total = sum(mix.values())
    quotas = {name: count * frac / total for name, frac in mix.items()}
    counts = {name: int(q) for name, q in quotas.items()}
    left = count - sum(counts.values())
    order = sorted(mix, key=lambda name: -(quotas[name] - counts[name]))  # stable: first listed wins ties
    for name in order[:left]:
        counts[name] += 1
    return counts


def _seed_words(seed: int) -> int:
    # SeedSequence wants a non-negative entropy; config seeds may be any int.
    return seed % (2**63)


class DeviceSeq(Sequence):
    """Devices ``lo .. hi-1`` (by device number) of a fleet, made into `Node`s only when read.

    A fleet of a million devices holds no million `Node`s: indexing builds the one asked for, so
    code that touches the devices of a round costs what those devices cost."""

    def __init__(self, fleet: Fleet, lo: int, hi: int):
        self.fleet, self.lo, self.hi = fleet, lo, hi

    def __len__(self) -> int:
        return self.hi - self.lo

    def __getitem__(self, i):  # type: ignore[override]
        if isinstance(i, slice):
            start, stop, step = i.indices(len(self))
            if step != 1:
                return [self[j] for j in range(start, stop, step)]
            return DeviceSeq(self.fleet, self.lo + start, self.lo + max(start, stop))
        n = len(self)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"device {i} out of range ({n} devices)")
        return self.fleet.device(self.lo + i)

    def __iter__(self) -> Iterator[Node]:
        for number in range(self.lo, self.hi):
            yield self.fleet.device(number)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, DeviceSeq):
            return (self.fleet, self.lo, self.hi) == (other.fleet, other.lo, other.hi)
        return isinstance(other, list) and list(self) == other

    def __repr__(self) -> str:
        return f"<{len(self)} devices {self.lo}..{self.hi - 1}>"


class NodeMap(Mapping):
    """``id -> Node`` over the whole fleet in index order (cloud, edges, devices), built lazily."""

    def __init__(self, fleet: Fleet):
        self.fleet = fleet

    def __getitem__(self, node_id: str) -> Node:
        f = self.fleet
        if node_id == f.cloud.id:
            return f.cloud
        edge = f._edge_by_id.get(node_id)
        if edge is not None:
            return edge
        number = f.device_number(node_id)
        if number is None:
            raise KeyError(node_id)
        return f.device(number)

    def __contains__(self, node_id: object) -> bool:
        return isinstance(node_id, str) and (node_id == self.fleet.cloud.id or node_id in self.fleet._edge_by_id
                                             or self.fleet.device_number(node_id) is not None)

    def __iter__(self) -> Iterator[str]:
        yield self.fleet.cloud.id
        yield from (e.id for e in self.fleet.edges)
        yield from (d.id for d in self.fleet.devices)

    def __len__(self) -> int:
        return 1 + len(self.fleet.edges) + len(self.fleet.devices)


@dataclass(frozen=True)
class _Group:
    """A run of devices of one edge from one config group: numbers ``first .. first+count-1``."""

    edge: int
    first: int
    local_first: int
    count: int
    profiles: tuple[Profile, ...]
    choice: np.ndarray | None  # index into `profiles` per device (a mix), or None (one profile)
    data_share: float


class Fleet:
    """A tree of nodes: `cloud`, `edges`, `devices` (a lazy sequence), and `nodes` (id -> Node).

    Devices are numbered 0..N-1 in id order (edge by edge); `device(number)` builds one. The
    fleet's `availability` (a model of cloudedge.fleet.traces) says who is online when; `speed`
    (or None) scales each device's compute and link rates.
    """

    def __init__(self, cloud: Node, edges: list[Node], groups: list[_Group], availability: Any = None,
                 speed: Any = None):
        from cloudedge.fleet.traces import BernoulliAvailability

        self.cloud = cloud
        self.edges = edges
        self._groups = groups
        self._group_firsts = [g.first for g in groups]
        self._edge_by_id = {e.id: e for e in edges}
        self._edge_number = {e.id: i for i, e in enumerate(edges)}
        n = groups[-1].first + groups[-1].count if groups else 0
        bounds = [0] * (len(edges) + 1)
        for g in groups:
            bounds[g.edge + 1] = g.first + g.count
        for i in range(1, len(bounds)):
            bounds[i] = max(bounds[i], bounds[i - 1])
        self._edge_bounds = bounds
        self.devices = DeviceSeq(self, 0, n)
        self.nodes = NodeMap(self)
        self.availability = availability or BernoulliAvailability()
        self.speed = speed
        self.materialized = 0  # device Nodes built so far (tests check it stays with the participants)

    @classmethod
    def from_config(cls, cfg: FleetConfig, seed: int) -> Fleet:
        """Build the fleet a config describes. Profile mixes are placed by a seeded shuffle.

        Only per-group records are built (and, for a mix, one byte per device saying its profile);
        trace files are read here, so a bad trace fails before any work starts."""
        custom = cfg.profiles
        resolved: dict[tuple[str, int], Profile] = {}

        def profile(name: str, overrides: ProfileOverride | None) -> Profile:
            # One Profile object per (name, overrides) so thousands of devices share it.
            key = (name, id(overrides))
            if key not in resolved:
                resolved[key] = resolve_profile(name, custom, overrides)
            return resolved[key]

        cloud = Node(CLOUD_ID, "cloud", profile(cfg.cloud.profile, cfg.cloud.overrides), None, 0.0, 0)
        edges: list[Node] = []
        groups: list[_Group] = []
        first = 0
        for spec in cfg.edges:
            edge_profile = profile(spec.profile, spec.overrides)
            for _ in range(spec.count):
                edge_number = len(edges)
                edges.append(Node(f"edge{edge_number}", "edge", edge_profile, CLOUD_ID, 0.0, 1 + edge_number))
                local = 0
                for g, group in enumerate(spec.devices):
                    names, choice = _group_profiles(group, seed, edge_number, g)
                    groups.append(_Group(edge_number, first, local, group.count,
                                         tuple(profile(nm, group.overrides) for nm in names), choice,
                                         group.data_share))
                    first += group.count
                    local += group.count
        fleet = cls(cloud, edges, groups)
        from cloudedge.fleet.traces import build_models

        fleet.availability, fleet.speed = build_models(cfg, fleet, seed)
        return fleet

    # -- devices by number ------------------------------------------------------------------------

    def _group_of(self, number: int) -> _Group:
        return self._groups[bisect.bisect_right(self._group_firsts, number) - 1]

    def base_profile(self, number: int) -> Profile:
        """Device ``number``'s profile before any speed scaling."""
        g = self._group_of(number)
        return g.profiles[0] if g.choice is None else g.profiles[int(g.choice[number - g.first])]

    def base_profiles(self, numbers: np.ndarray) -> list[Profile]:
        """`base_profile` of many devices."""
        return [self.base_profile(int(n)) for n in numbers]

    def device(self, number: int) -> Node:
        """The device numbered ``number`` (0-based, in id order) as a `Node`."""
        g = self._group_of(number)
        prof = g.profiles[0] if g.choice is None else g.profiles[int(g.choice[number - g.first])]
        if self.speed is not None:
            c, up, down = self.speed.scales(number)
            if (c, up, down) != (1.0, 1.0, 1.0):
                prof = dataclasses.replace(prof, flops=prof.flops * c, uplink_Bps=prof.uplink_Bps * up,
                                           downlink_Bps=prof.downlink_Bps * down)
        self.materialized += 1
        return Node(f"edge{g.edge}/dev{g.local_first + number - g.first}", "device", prof, f"edge{g.edge}",
                    g.data_share, 1 + len(self.edges) + number)

    def device_number(self, device_id: str) -> int | None:
        """The number of the device called ``device_id`` (None: no such device)."""
        edge_id, sep, rest = device_id.partition("/dev")
        e = self._edge_number.get(edge_id)
        if not sep or e is None or not rest.isdigit() or (len(rest) > 1 and rest[0] == "0"):
            return None
        number = self._edge_bounds[e] + int(rest)
        return number if number < self._edge_bounds[e + 1] else None

    def device_range(self, edge_id: str) -> tuple[int, int]:
        """The device numbers ``(lo, hi)`` of one edge's devices."""
        e = self._edge_number[edge_id]
        return self._edge_bounds[e], self._edge_bounds[e + 1]

    def device_profile_set(self) -> list[tuple[Profile, str, int]]:
        """Each distinct device profile (before speed scaling), the id of its first device and how
        many devices have it; no nodes are built."""
        seen: dict[int, list] = {}
        for g in self._groups:
            if g.choice is None:
                triples = [(g.profiles[0], 0, g.count)]
            else:
                uniq, first, n = np.unique(g.choice, return_index=True, return_counts=True)
                triples = [(g.profiles[int(u)], int(f), int(c)) for u, f, c in zip(uniq, first, n, strict=True)]
            for p, offset, count in triples:
                entry = seen.setdefault(id(p), [p, f"edge{g.edge}/dev{g.local_first + offset}", 0])
                entry[2] += count
        return [tuple(e) for e in seen.values()]  # type: ignore[misc]

    def data_shares(self) -> np.ndarray:
        """Every device's data_share, by device number (one float each; no nodes built)."""
        return np.concatenate([np.full(g.count, g.data_share) for g in self._groups]) if self._groups else np.zeros(0)

    def devices_of(self, edge_id: str) -> DeviceSeq:
        """The devices under one edge, in id order."""
        try:
            lo, hi = self.device_range(edge_id)
        except KeyError:
            raise KeyError(f"no edge {edge_id!r} in this fleet") from None
        return DeviceSeq(self, lo, hi)

    def edge_of(self, device_id: str) -> Node:
        """The edge a device belongs to."""
        node = self.nodes[device_id]
        if node.tier != "device":
            raise KeyError(f"{device_id!r} is not a device")
        return self.nodes[node.parent]  # type: ignore[index]

    def __len__(self) -> int:
        return len(self.nodes)

    def summary_rows(self, collapse: bool = True) -> list[dict[str, object]]:
        """Rows for a table of the fleet: node, tier, profile, compute, memory, uplink, downlink.

        With `collapse`, each edge's devices are grouped by profile, one row per group
        ("edge0/* (x500)"), so a 10k-device fleet stays readable; otherwise one row per node.
        With per-device speeds, a collapsed row shows the profile's (median) figures.
        """
        rows: list[dict[str, object]] = []

        def row(label: str, node: Node, p: Profile | None = None) -> dict[str, object]:
            p = p or node.profile
            return {
                "node": label, "tier": node.tier, "profile": p.name, "compute": format_flops(p.flops),
                "memory": format_bytes(p.memory_bytes), "uplink": format_rate(p.uplink_Bps),
                "downlink": format_rate(p.downlink_Bps),
            }

        rows.append(row(self.cloud.id, self.cloud))
        for edge in self.edges:
            rows.append(row(edge.id, edge))
            lo, hi = self.device_range(edge.id)
            if not collapse:
                rows.extend(row(d.id, d) for d in self.devices_of(edge.id))
                continue
            counts: dict[int, list] = {}  # keyed by profile identity, in first-seen order
            for g in self._groups:
                if g.edge != self._edge_number[edge.id]:
                    continue
                if g.choice is None:
                    per = [(0, g.count, 0)]
                else:
                    uniq, first, n = np.unique(g.choice, return_index=True, return_counts=True)
                    per = sorted(zip(uniq.tolist(), n.tolist(), first.tolist(), strict=True), key=lambda x: x[2])
                for u, n_u, offset in per:
                    p = g.profiles[int(u)]
                    entry = counts.setdefault(id(p), [p, 0, g.first + offset])
                    entry[1] += int(n_u)
            for p, n_p, number in counts.values():
                label = self.device(number).id if n_p == 1 else f"{edge.id}/* (x{n_p})"
                rows.append(row(label, self.device(number), p))
            del lo, hi
        return rows


def _group_profiles(group: DeviceGroup, seed: int, edge_number: int, group_number: int) -> tuple[list[str], np.ndarray | None]:
    """The group's profile names and, for a mix, each device's index into them (in device order)."""
    if group.mix is None:
        return [group.profile], None  # type: ignore[list-item]
    counts = mix_counts(group.count, group.mix)
    names = list(counts)
    ordered = np.repeat(np.arange(len(names), dtype=np.uint8), [counts[nm] for nm in names])
    # Seeded per (edge, group) so editing one group does not reshuffle the others.
    rng = np.random.default_rng([_seed_words(seed), edge_number, group_number])
    return names, ordered[rng.permutation(len(ordered))]


def format_flops(flops_per_s: float) -> str:
    """1.25e14 -> '125 TFLOP/s'."""
    return _scaled(flops_per_s, ("", "k", "M", "G", "T", "P", "E"), 1000.0) + "FLOP/s"


def format_bytes(nbytes: float) -> str:
    """Binary units: 80 * 2**30 -> '80 GiB'."""
    return _scaled(nbytes, ("", "Ki", "Mi", "Gi", "Ti", "Pi"), 1024.0) + "B"


def format_rate(bytes_per_s: float) -> str:
    """Link speeds as quoted for networks: bits per second, decimal (12.5e6 B/s -> '100 Mbit/s')."""
    return _scaled(bytes_per_s * 8, ("", "k", "M", "G", "T"), 1000.0) + "bit/s"


def _scaled(value: float, prefixes: tuple[str, ...], step: float) -> str:
    i = 0
    # Compare the rounded figure, so 999.96 k becomes '1 M' rather than '1e+03 k'.
    while abs(float(f"{value:.3g}")) >= step and i < len(prefixes) - 1:
        value /= step
        i += 1
    text = f"{value:.3g}" if value < 1000 else f"{value:.0f}"
    return f"{text} {prefixes[i]}"
