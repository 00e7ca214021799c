"""Random streams and seeds keyed by node id: the same in every process, and restored on resume.

Each aggregation point (an edge, or the cloud for two-tier policies) draws from its own streams, so
its draws do not depend on how its rounds interleave with other points' rounds; a checkpoint saves
each stream's state under its key.
"""

from __future__ import annotations

import zlib

import numpy as np


def stable_index(node_id: str) -> int:
    """A number of the whole node id, the same in every process (unlike ``hash``)."""
    return zlib.crc32(node_id.encode()) % 1_000_003


def stream(streams: dict[str, np.random.Generator], seed: list[int], key: str) -> np.random.Generator:
    """``streams[key]``, created from ``seed`` on first use (a checkpoint restores it by key)."""
    if key not in streams:
        streams[key] = np.random.default_rng(seed)
    return streams[key]
