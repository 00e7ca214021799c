"""Deal a dataset's samples to clients: iid, label-skewed (Dirichlet), by domain, quantity-skewed.

Every partitioner returns one sorted int64 index array per client; every index appears in exactly
one client. All randomness comes from ``numpy.random.default_rng(seed)``. The exact rules are in
``docs/data.md``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from cloudedge.errors import InputError

PARTITION_KINDS = ("iid", "dirichlet", "domain", "quantity")


def _check_enough(n: int, n_clients: int, min_samples: int) -> None:
    if n < n_clients * min_samples:
        raise InputError(
            f"data.partition: too little data for {n_clients} clients: {n} samples, "
            f"need at least {min_samples} per client ({n_clients * min_samples})"
        )


def _normalized_weights(weights: Sequence[float] | None, n_clients: int) -> np.ndarray:
    if weights is None:
        return np.full(n_clients, 1.0 / n_clients)
    w = np.asarray(weights, dtype=np.float64)
    if w.shape != (n_clients,) or not np.all(np.isfinite(w)) or np.any(w < 0) or w.sum() <= 0:
        raise InputError(
            f"data.partition: weights must be {n_clients} non-negative numbers, not all zero; got {list(w.ravel())}"
        )
    return w / w.sum()


def split_sizes(n: int, shares: np.ndarray, min_samples: int) -> np.ndarray:
    """Integer sizes summing to ``n``: ``min_samples`` each, the rest in proportion to ``shares``.

    The remainder after flooring goes one each to the clients with the largest fractional parts
    (ties to the lower client id), so sizes are deterministic given ``shares``.
    """
    k = len(shares)
    base = np.full(k, min_samples, dtype=np.int64)
    rest = n - int(base.sum())
    exact = shares / shares.sum() * rest
    sizes = np.floor(exact).astype(np.int64)
    short = rest - int(sizes.sum())
    # Stable sort on the negated fraction: largest fraction first, lower id first among equals.
    order = np.argsort(-(exact - sizes), kind="stable")
    sizes[order[:short]] += 1
    return base + sizes


def _cut(indices: np.ndarray, sizes: np.ndarray) -> list[np.ndarray]:
    bounds = np.cumsum(sizes)[:-1]
    return list(np.split(indices, bounds))


def _iid(n: int, n_clients: int, rng: np.random.Generator, shares: np.ndarray, min_samples: int) -> list[np.ndarray]:
    return _cut(rng.permutation(n), split_sizes(n, shares, min_samples))


def _dirichlet(
    labels: np.ndarray, n_clients: int, rng: np.random.Generator, alpha: float, shares: np.ndarray, min_samples: int
) -> list[np.ndarray]:
    """Per class, proportions ~ Dirichlet(alpha * 1) (times ``shares``, renormalized) over clients."""
    buckets: list[list[np.ndarray]] = [[] for _ in range(n_clients)]
    for cls in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == cls))
        props = rng.dirichlet(np.full(n_clients, alpha)) * shares
        props = props / props.sum()
        # Cut points at the rounded cumulative proportions: sizes sum to the class size exactly.
        cuts = np.round(np.cumsum(props)[:-1] * len(idx)).astype(np.int64)
        for client, piece in enumerate(np.split(idx, cuts)):
            buckets[client].append(piece)
    parts = [np.concatenate(b) if b else np.empty(0, dtype=np.int64) for b in buckets]
    return _repair_min(parts, rng, min_samples)


def _repair_min(parts: list[np.ndarray], rng: np.random.Generator, min_samples: int) -> list[np.ndarray]:
    """Top up clients below ``min_samples`` with random samples of the currently largest client.

    Clients are topped up in id order, one sample at a time from whichever client is largest then
    (lowest id on ties), so the skew of the draw is kept as far as the minimum allows.
    """
    parts = [p.copy() for p in parts]
    for client in range(len(parts)):
        while len(parts[client]) < min_samples:
            donor = int(np.argmax([len(p) for p in parts]))
            pick = int(rng.integers(len(parts[donor])))
            parts[client] = np.append(parts[client], parts[donor][pick])
            parts[donor] = np.delete(parts[donor], pick)
    return parts


def _domain(
    domains: np.ndarray, n_clients: int, rng: np.random.Generator, min_samples: int
) -> list[np.ndarray]:
    """Round-robin over sorted domain names; see docs/data.md for the two cases."""
    names = sorted({str(d) for d in domains}) if domains.dtype.kind in "OUS" else sorted(set(domains.tolist()))
    keys = np.asarray([str(d) for d in domains]) if domains.dtype.kind in "OUS" else domains
    parts: list[list[np.ndarray]] = [[] for _ in range(n_clients)]
    if len(names) >= n_clients:
        # Each domain goes whole to one client: domain j -> client j mod n_clients.
        for j, name in enumerate(names):
            parts[j % n_clients].append(np.flatnonzero(keys == name))
    else:
        # More clients than domains: client k holds domain k mod n_domains, and a domain's samples
        # are shuffled and split evenly among the clients that hold it.
        for j, name in enumerate(names):
            holders = list(range(j, n_clients, len(names)))
            idx = rng.permutation(np.flatnonzero(keys == name))
            for client, piece in zip(holders, np.array_split(idx, len(holders)), strict=True):
                parts[client].append(piece)
    out = [np.concatenate(p) if p else np.empty(0, dtype=np.int64) for p in parts]
    small = [k for k, p in enumerate(out) if len(p) < min_samples]
    if small:
        sizes = {k: len(out[k]) for k in small}
        raise InputError(
            f"data.partition: too little data for {n_clients} clients by domain: clients {sizes} "
            f"get fewer than {min_samples} samples ({len(names)} domains)"
        )
    return out


def partition(
    labels: np.ndarray | Sequence[int],
    n_clients: int,
    kind: str,
    seed: int,
    alpha: float = 0.5,
    domains: np.ndarray | Sequence[Any] | None = None,
    min_samples: int = 1,
    weights: Sequence[float] | None = None,
) -> list[np.ndarray]:
    """Split sample indices ``0..N-1`` over ``n_clients`` clients.

    Kinds: ``iid`` (a random permutation cut into equal, or ``weights``-proportional, pieces),
    ``dirichlet`` (label skew: each class is split over clients by Dirichlet(``alpha``)
    proportions; smaller alpha, more skew), ``domain`` (whole domains per client, round-robin over
    sorted domain names; needs ``domains``), ``quantity`` (size skew: client sizes from
    Dirichlet(``alpha``) shares, labels iid). ``weights`` (relative data share per client) scales
    the shares of iid, quantity and dirichlet. Each client gets at least ``min_samples`` samples,
    or :class:`InputError` says there is too little data. Returns sorted int64 index arrays.
    """
    labels = np.asarray(labels).reshape(-1)
    n = len(labels)
    if n_clients < 1:
        raise InputError(f"data.partition: need at least one client, got {n_clients}")
    if kind not in PARTITION_KINDS:
        raise InputError(f"data.partition.kind: unknown partition '{kind}' (known: {', '.join(PARTITION_KINDS)})")
    if alpha <= 0:
        raise InputError(f"data.partition.alpha: must be > 0, got {alpha}")
    if min_samples < 0:
        raise InputError(f"data.partition.min_samples: must be >= 0, got {min_samples}")
    _check_enough(n, n_clients, min_samples)
    shares = _normalized_weights(weights, n_clients)
    rng = np.random.default_rng(seed)

    if kind == "iid":
        parts = _iid(n, n_clients, rng, shares, min_samples)
    elif kind == "quantity":
        drawn = rng.dirichlet(np.full(n_clients, alpha)) * shares
        parts = _iid(n, n_clients, rng, drawn / drawn.sum(), min_samples)
    elif kind == "dirichlet":
        parts = _dirichlet(labels, n_clients, rng, alpha, shares, min_samples)
    else:
        if domains is None:
            raise InputError("data.partition.kind: 'domain' needs per-sample domains, and this data has none")
        dom = np.asarray(domains).reshape(-1)
        if len(dom) != n:
            raise InputError(f"data.partition: {len(dom)} domains for {n} samples")
        parts = _domain(dom, n_clients, rng, min_samples)
    return [np.sort(p.astype(np.int64)) for p in parts]


def partition_by_edge(
    labels: np.ndarray | Sequence[int],
    devices_per_edge: Sequence[int],
    edge_alpha: Sequence[float],
    seed: int,
    min_samples: int = 1,
    weights: Sequence[float] | None = None,
) -> list[np.ndarray]:
    """Label skew that differs by edge: one index array per device, edges' devices in order.

    Edge ``e`` draws its class mix ``q_e ~ Dirichlet(edge_alpha[e] * 1)``; each class is split over
    the edges in proportion to ``s_e q_e[c]`` (``s_e``: the edge's share of the devices' ``weights``);
    then edge ``e`` deals its samples over its devices by :func:`partition` ``dirichlet`` with the
    same ``edge_alpha[e]``. Small alpha: an edge dominated by a few classes, and devices that are
    more skewed still; large alpha: an edge close to the overall mix.
    """
    labels = np.asarray(labels).reshape(-1)
    if len(devices_per_edge) != len(edge_alpha):
        raise InputError(f"data.partition.edge_alpha: {len(edge_alpha)} values for {len(devices_per_edge)} edges")
    n_dev = int(sum(devices_per_edge))
    w = _normalized_weights(weights, n_dev)
    _check_enough(len(labels), n_dev, min_samples)
    rng = np.random.default_rng(seed)
    bounds = np.cumsum([0, *devices_per_edge])
    share = np.array([w[bounds[e]:bounds[e + 1]].sum() for e in range(len(devices_per_edge))])
    mixes = np.stack([rng.dirichlet(np.full(int(labels.max()) + 1, float(a))) for a in edge_alpha])
    edge_parts: list[list[np.ndarray]] = [[] for _ in devices_per_edge]
    for cls in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == cls))
        props = share * mixes[:, cls]
        props = props / props.sum() if props.sum() > 0 else share / share.sum()
        cuts = np.round(np.cumsum(props)[:-1] * len(idx)).astype(np.int64)
        for e, piece in enumerate(np.split(idx, cuts)):
            edge_parts[e].append(piece)
    out: list[np.ndarray] = []
    for e, count in enumerate(devices_per_edge):
        mine = np.concatenate(edge_parts[e])
        if len(mine) < count * max(1, min_samples):
            raise InputError(f"data.partition.edge_alpha: edge {e} drew {len(mine)} samples for {count} devices")
        local = partition(labels[mine], count, "dirichlet", seed + 1 + e, alpha=float(edge_alpha[e]),
                          min_samples=min_samples, weights=w[bounds[e]:bounds[e + 1]])
        out.extend(np.sort(mine[p]) for p in local)
    return out


def partition_stats(labels: np.ndarray | Sequence[int], parts: Sequence[np.ndarray], n_classes: int) -> dict[str, Any]:
    """Per-client size and label histogram, and fleet-level skew summaries (plain JSON-able data).

    Returns ``{"clients": [{"size", "hist", "tv", "n_classes_present"}], "summary": {...}}``
    where ``tv`` is the total-variation distance between the client's label distribution and the
    global one (0 = same mix, 1 = disjoint), and the summary holds ``n_clients``, ``total``,
    ``size_min``, ``size_max``, ``size_mean``, ``size_cv`` (std/mean of sizes: quantity skew),
    ``tv_mean`` and ``tv_max`` (label skew; empty clients are left out) and ``classes_mean``.
    """
    labels = np.asarray(labels).reshape(-1)
    global_hist = np.bincount(labels, minlength=n_classes).astype(np.float64)
    global_p = global_hist / max(global_hist.sum(), 1.0)
    clients = []
    for p in parts:
        hist = np.bincount(labels[np.asarray(p, dtype=np.int64)], minlength=n_classes)
        size = int(hist.sum())
        tv = 0.5 * float(np.abs(hist / size - global_p).sum()) if size else None
        clients.append({"size": size, "hist": hist.tolist(), "tv": tv, "n_classes_present": int((hist > 0).sum())})
    sizes = np.asarray([c["size"] for c in clients], dtype=np.float64)
    tvs = [c["tv"] for c in clients if c["tv"] is not None]
    summary = {
        "n_clients": len(clients),
        "total": int(sizes.sum()),
        "size_min": int(sizes.min()) if len(sizes) else 0,
        "size_max": int(sizes.max()) if len(sizes) else 0,
        "size_mean": float(sizes.mean()) if len(sizes) else 0.0,
        "size_cv": float(sizes.std() / sizes.mean()) if len(sizes) and sizes.mean() > 0 else 0.0,
        "tv_mean": float(np.mean(tvs)) if tvs else 0.0,
        "tv_max": float(np.max(tvs)) if tvs else 0.0,
        "classes_mean": float(np.mean([c["n_classes_present"] for c in clients])) if clients else 0.0,
    }
    return {"clients": clients, "summary": summary}


def partition_view(labels: np.ndarray | Sequence[int], n_clients: int, kind: str, seed: int, alpha: float = 0.5,
                   min_samples: int = 1, weights: Sequence[float] | np.ndarray | None = None) -> Any:
    """The shards of :func:`partition` for ``iid`` and ``quantity``, as a
    :class:`cloudedge.finetune.devicedata.ShardView` (one permutation and ``n_clients + 1`` cut
    points) instead of ``n_clients`` index arrays: ``view.indices(i)`` equals ``partition(...)[i]``.
    A million clients cost two arrays, not a million."""
    from cloudedge.finetune.devicedata import ShardView

    if kind not in ("iid", "quantity"):
        raise ValueError(f"partition_view: only iid and quantity cut one permutation, not {kind!r}")
    n = len(np.asarray(labels).reshape(-1))
    if n_clients < 1:
        raise InputError(f"data.partition: need at least one client, got {n_clients}")
    if alpha <= 0:
        raise InputError(f"data.partition.alpha: must be > 0, got {alpha}")
    _check_enough(n, n_clients, min_samples)
    shares = _normalized_weights(weights, n_clients)
    rng = np.random.default_rng(seed)
    if kind == "quantity":
        drawn = rng.dirichlet(np.full(n_clients, alpha)) * shares
        shares = drawn / drawn.sum()
    return ShardView(rng.permutation(n), split_sizes(n, shares, min_samples))
