"""The fleet: one cloud, its edges, each edge's devices; built from a `FleetConfig`.

Nodes are small frozen records sharing `Profile` objects, so a fleet of 10,000 devices is cheap.
Ids are "cloud", "edge0", "edge0/dev0", ...; edges are numbered across all `EdgeSpec`s in order,
devices per edge across all of that edge's groups in order.
"""

from __future__ import annotations

from dataclasses import dataclass

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


class Fleet:
    """A tree of nodes: `cloud`, `edges`, `devices`, and `nodes` (id -> Node, in index order)."""

    def __init__(self, cloud: Node, edges: list[Node], devices: list[Node]):
        self.cloud = cloud
        self.edges = edges
        self.devices = devices
        self.nodes: dict[str, Node] = {n.id: n for n in (cloud, *edges, *devices)}
        self._devices_of: dict[str, list[Node]] = {e.id: [] for e in edges}
        for d in devices:
            self._devices_of[d.parent].append(d)  # type: ignore[index]

    @classmethod
    def from_config(cls, cfg: FleetConfig, seed: int) -> Fleet:
        """Build the fleet a config describes. Profile mixes are placed by a seeded shuffle."""
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
        devices: list[Node] = []
        edge_number = 0
        for spec in cfg.edges:
            edge_profile = profile(spec.profile, spec.overrides)
            for _ in range(spec.count):
                edge_id = f"edge{edge_number}"
                edges.append(Node(edge_id, "edge", edge_profile, CLOUD_ID, 0.0, -1))
                dev_number = 0
                for g, group in enumerate(spec.devices):
                    names = _group_profiles(group, seed, edge_number, g)
                    for name in names:
                        devices.append(
                            Node(f"{edge_id}/dev{dev_number}", "device", profile(name, group.overrides),
                                 edge_id, group.data_share, -1)
                        )
                        dev_number += 1
                edge_number += 1
        # Indices follow `nodes` order: cloud, edges, devices.
        edges = [_with_index(n, 1 + i) for i, n in enumerate(edges)]
        devices = [_with_index(n, 1 + len(edges) + i) for i, n in enumerate(devices)]
        return cls(cloud, edges, devices)

    def devices_of(self, edge_id: str) -> list[Node]:
        """The devices under one edge, in id order."""
        try:
            return self._devices_of[edge_id]
        except KeyError:
            raise KeyError(f"no edge {edge_id!r} in this fleet") from None

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
        """
        rows: list[dict[str, object]] = []

        def row(label: str, node: Node) -> dict[str, object]:
            p = node.profile
            return {
                "node": label, "tier": node.tier, "profile": p.name, "compute": format_flops(p.flops),
                "memory": format_bytes(p.memory_bytes), "uplink": format_rate(p.uplink_Bps),
                "downlink": format_rate(p.downlink_Bps),
            }

        rows.append(row(self.cloud.id, self.cloud))
        for edge in self.edges:
            rows.append(row(edge.id, edge))
            devices = self.devices_of(edge.id)
            if not collapse:
                rows.extend(row(d.id, d) for d in devices)
                continue
            groups: dict[int, list[Node]] = {}  # keyed by profile identity, in first-seen order
            for d in devices:
                groups.setdefault(id(d.profile), []).append(d)
            for members in groups.values():
                label = members[0].id if len(members) == 1 else f"{edge.id}/* (x{len(members)})"
                rows.append(row(label, members[0]))
        return rows


def _with_index(node: Node, index: int) -> Node:
    return Node(node.id, node.tier, node.profile, node.parent, node.data_share, index)


def _group_profiles(group: DeviceGroup, seed: int, edge_number: int, group_number: int) -> list[str]:
    """Profile name of each device of a group, in device order."""
    if group.mix is None:
        return [group.profile] * group.count  # type: ignore[list-item]
    counts = mix_counts(group.count, group.mix)
    names = [name for name, n in counts.items() for _ in range(n)]
    # Seeded per (edge, group) so editing one group does not reshuffle the others.
    rng = np.random.default_rng([_seed_words(seed), edge_number, group_number])
    return [names[i] for i in rng.permutation(len(names))]


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
