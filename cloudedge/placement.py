"""Which samples live on which device: a dataset's labels dealt over a fleet's devices.

Every stage places its data the same way, so `cloudedge fleet` shows what a stage will train on.
Data stays where it is placed: a worker is built with its own indices and never sees others'.
"""

from __future__ import annotations

import numpy as np

from cloudedge.config.data import PartitionConfig


def place_data(fleet, labels: np.ndarray, partition_cfg: PartitionConfig, seed: int,
               domains: np.ndarray | list | None = None) -> dict[str, np.ndarray]:
    """Partition sample indices over ``fleet.devices`` (weighted by each device's data_share).

    Returns ``{device_id: indices}``. Deterministic under ``seed``.
    """
    from cloudedge.data.partition import partition

    devices = fleet.devices
    if devices:
        weights = np.array([getattr(d, "data_share", 1.0) for d in devices], dtype=float)
    else:
        # A fleet without devices trains on its edge servers: each edge holds an equal shard (an
        # edge's own data_share is 0: it holds no device data).
        devices = fleet.edges
        weights = np.ones(len(devices))
    if partition_cfg.edge_alpha is not None and fleet.devices:
        from cloudedge.data.partition import partition_by_edge

        devices = [d for e in fleet.edges for d in fleet.devices_of(e.id)]
        weights = np.array([getattr(d, "data_share", 1.0) for d in devices], dtype=float)
        parts = partition_by_edge(np.asarray(labels), [len(fleet.devices_of(e.id)) for e in fleet.edges],
                                  partition_cfg.edge_alpha, seed, min_samples=partition_cfg.min_samples,
                                  weights=weights)
        return {d.id: np.asarray(p, dtype=np.int64) for d, p in zip(devices, parts, strict=True)}
    parts = partition(np.asarray(labels), len(devices), partition_cfg.kind, seed,
                      alpha=partition_cfg.alpha, domains=domains,
                      min_samples=partition_cfg.min_samples, weights=weights)
    return {d.id: np.asarray(p, dtype=np.int64) for d, p in zip(devices, parts, strict=True)}
