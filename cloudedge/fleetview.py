"""`cloudedge fleet`: the fleet a config describes, with the data each device would hold."""

from __future__ import annotations

from collections import Counter

import numpy as np
from rich.table import Table

from cloudedge.config import RunConfig


def _labels_of(dataset) -> np.ndarray:
    y = getattr(dataset, "y", None)
    if y is not None:
        return np.asarray(y)
    labels = getattr(dataset, "labels", None)
    if labels is not None:
        return np.asarray(labels)
    # Unlabelled text (language modelling): the domain is what the partition keys on.
    domains = getattr(dataset, "domains", None) or []
    names = sorted(set(domains))
    return np.asarray([names.index(d) for d in domains])


def _class_names(dataset, n: int) -> list[str]:
    classes = list(getattr(dataset, "classes", []) or [])
    if len(classes) >= n:
        return classes
    domains = getattr(dataset, "domains", None)
    if isinstance(domains, list) and domains:
        return sorted(set(domains))
    return [str(i) for i in range(n)]


def label_mix(labels: np.ndarray, names: list[str], top: int = 3) -> str:
    """The most common labels on a device, e.g. 'seven 41%, one 30%, two 12%'."""
    if len(labels) == 0:
        return "-"
    counts = Counter(labels.tolist()).most_common(top)
    return ", ".join(f"{names[k] if k < len(names) else k} {100 * c / len(labels):.0f}%" for k, c in counts)


def fleet_table(cfg: RunConfig, limit: int = 60) -> Table:
    """A rich table: node, tier, profile, compute, memory, links, samples, label mix.

    Devices beyond ``limit`` rows are summarized per edge so a 10,000-device fleet stays readable.
    """
    from cloudedge.data import build_dataset
    from cloudedge.fleet import Fleet, format_bytes, format_flops, format_rate
    from cloudedge.placement import place_data

    fleet = Fleet.from_config(cfg.fleet, seed=cfg.seed)
    train, _ = build_dataset(cfg.data, cfg.base_dir, cfg.seed)
    labels = _labels_of(train)
    domains = getattr(train, "domains", None)
    if domains is not None and not isinstance(domains, list):
        domains = domains.tolist()  # image datasets keep domains as a tensor
    placed = place_data(fleet, labels, cfg.data.partition, cfg.seed,
                        domains=np.asarray(domains) if domains else None)
    names = _class_names(train, int(labels.max()) + 1 if len(labels) else 0)

    table = Table(title=f"fleet of {cfg.name}: 1 cloud, {len(fleet.edges)} edges, {len(fleet.devices)} devices; "
                        f"data {cfg.data.source} ({len(labels)} train samples, partition {cfg.data.partition.kind})")
    for col, justify in [("node", "left"), ("tier", "left"), ("profile", "left"), ("compute", "right"),
                         ("memory", "right"), ("up / down", "right"), ("latency", "right"),
                         ("avail", "right"), ("samples", "right"), ("label mix", "left")]:
        table.add_column(col, justify=justify)

    def row(node, samples: str = "-", mix: str = "-") -> None:
        p = node.profile
        table.add_row(node.id, node.tier, p.name, format_flops(p.flops), format_bytes(p.memory_bytes),
                      f"{format_rate(p.uplink_Bps)} / {format_rate(p.downlink_Bps)}", f"{p.latency_s * 1e3:.0f} ms",
                      f"{p.availability:.2f}", samples, mix)

    row(fleet.cloud)
    shown = 1
    for edge in fleet.edges:
        devs = fleet.devices_of(edge.id)
        edge_idx = np.concatenate([placed[d.id] for d in devs]) if devs else placed.get(edge.id, np.array([], int))
        row(edge, str(len(edge_idx)), label_mix(labels[edge_idx], names))
        shown += 1
        for i, dev in enumerate(devs):
            if shown >= limit:
                rest = devs[i:]
                idx = np.concatenate([placed[d.id] for d in rest])
                profiles = Counter(d.profile.name for d in rest)
                table.add_row(f"{edge.id}/... ({len(rest)} more)", "device",
                              ", ".join(f"{k} x{v}" for k, v in profiles.items()), "", "", "", "", "",
                              str(len(idx)), label_mix(labels[idx], names))
                break
            idx = placed[dev.id]
            row(dev, str(len(idx)), label_mix(labels[idx], names))
            shown += 1
    return table
