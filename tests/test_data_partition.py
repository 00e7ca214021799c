"""Partitioners: every index once, seeded, and each kind skews what it should."""

from __future__ import annotations

import numpy as np
import pytest

from cloudedge.data import colored, load_digits, partition, partition_stats
from cloudedge.data.partition import split_sizes
from cloudedge.errors import InputError


@pytest.fixture(scope="module")
def labels() -> np.ndarray:
    return load_digits().y.numpy()


def _check_exact_cover(parts: list[np.ndarray], n: int) -> None:
    joined = np.concatenate(parts)
    assert joined.dtype == np.int64
    assert len(joined) == n and np.array_equal(np.sort(joined), np.arange(n))
    for p in parts:
        assert np.array_equal(p, np.sort(p))


@pytest.mark.parametrize("kind", ["iid", "dirichlet", "quantity", "domain"])
@pytest.mark.parametrize("n_clients", [1, 7, 40])
def test_every_index_once_and_deterministic(labels, kind, n_clients):
    domains = np.arange(len(labels)) % 13
    parts = partition(labels, n_clients, kind, seed=5, alpha=0.3, domains=domains)
    assert len(parts) == n_clients
    _check_exact_cover(parts, len(labels))
    assert all(len(p) >= 1 for p in parts)
    again = partition(labels, n_clients, kind, seed=5, alpha=0.3, domains=domains)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))
    if n_clients > 1 and kind != "domain" or (kind == "domain" and n_clients > 13):
        other = partition(labels, n_clients, kind, seed=6, alpha=0.3, domains=domains)
        assert any(not np.array_equal(a, b) for a, b in zip(parts, other, strict=True))


def test_iid_equal_sizes_and_mixed_labels(labels):
    parts = partition(labels, 10, "iid", seed=0)
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1
    stats = partition_stats(labels, parts, 10)
    assert stats["summary"]["tv_mean"] < 0.15 and stats["summary"]["classes_mean"] == 10


def test_weights_scale_sizes(labels):
    parts = partition(labels, 3, "iid", seed=0, weights=[1, 2, 3])
    sizes = np.array([len(p) for p in parts])
    assert np.allclose(sizes / sizes.sum(), [1 / 6, 2 / 6, 3 / 6], atol=2e-3)
    q = partition(labels, 3, "quantity", seed=0, alpha=1e4, weights=[1, 1, 4])
    assert len(q[2]) > 3 * len(q[0])


def test_dirichlet_small_alpha_more_skewed(labels):
    def skew(alpha: float) -> float:
        tvs = [partition_stats(labels, partition(labels, 10, "dirichlet", seed=s, alpha=alpha), 10)["summary"]["tv_mean"]
               for s in range(3)]
        return float(np.mean(tvs))

    tiny, mid, huge = skew(0.05), skew(0.5), skew(100.0)
    assert tiny > mid > huge
    assert tiny > 0.5 and huge < 0.1


def test_quantity_skews_sizes_not_labels(labels):
    skewed = partition_stats(labels, partition(labels, 10, "quantity", seed=0, alpha=0.3), 10)["summary"]
    even = partition_stats(labels, partition(labels, 10, "quantity", seed=0, alpha=1e3), 10)["summary"]
    assert skewed["size_cv"] > 0.5 > 0.1 > even["size_cv"]
    # Big clients still see the global label mix.
    parts = partition(labels, 10, "quantity", seed=0, alpha=0.3)
    big = max(parts, key=len)
    stats = partition_stats(labels, [big], 10)
    assert stats["clients"][0]["tv"] < 0.1


def test_domain_split_round_robin():
    ds = colored(load_digits(), 0.3, seed=1)
    dom = ds.domains.numpy()
    labels = ds.y.numpy()
    parts = partition(labels, 4, "domain", seed=0, domains=dom)
    # Sorted domains 0..9 dealt round-robin: client k holds colors k, k+4, k+8.
    for k, p in enumerate(parts):
        assert set(dom[p].tolist()) == set(range(k, 10, 4))
    # More clients than domains: client k holds domain k mod 3, domains split evenly.
    names = np.array(["b", "a", "c"])[np.arange(len(labels)) % 3]
    many = partition(labels, 7, "domain", seed=0, domains=names)
    for k, p in enumerate(many):
        assert set(names[p].tolist()) == {"abc"[k % 3]}
    a_sizes = [len(many[k]) for k in (0, 3, 6)]
    assert max(a_sizes) - min(a_sizes) <= 1


def test_min_samples_and_too_little_data(labels):
    parts = partition(labels, 30, "dirichlet", seed=0, alpha=0.01, min_samples=20)
    assert min(len(p) for p in parts) >= 20
    _check_exact_cover(parts, len(labels))
    q = partition(labels, 30, "quantity", seed=0, alpha=0.05, min_samples=10)
    assert min(len(p) for p in q) >= 10
    with pytest.raises(InputError, match="too little data for 100 clients"):
        partition(labels[:50], 100, "iid", seed=0)
    with pytest.raises(InputError, match="too little data"):
        partition(labels, 8, "domain", seed=0, domains=(np.arange(len(labels)) < 3).astype(int))


def test_bad_arguments(labels):
    with pytest.raises(InputError, match="unknown partition 'zipf'"):
        partition(labels, 3, "zipf", seed=0)
    with pytest.raises(InputError, match="needs per-sample domains"):
        partition(labels, 3, "domain", seed=0)
    with pytest.raises(InputError, match="weights"):
        partition(labels, 3, "iid", seed=0, weights=[1, -1, 1])


def test_split_sizes_rule():
    assert split_sizes(10, np.array([1.0, 1.0, 1.0]), 0).tolist() == [4, 3, 3]
    assert split_sizes(10, np.array([0.0, 0.0, 1.0]), 2).tolist() == [2, 2, 6]


def test_partition_stats_values():
    labels = np.array([0, 0, 1, 1])
    stats = partition_stats(labels, [np.array([0, 1]), np.array([2, 3])], 2)
    assert [c["size"] for c in stats["clients"]] == [2, 2]
    assert stats["clients"][0]["hist"] == [2, 0]
    assert stats["summary"]["tv_mean"] == pytest.approx(0.5)
    assert stats["summary"]["size_cv"] == 0.0 and stats["summary"]["total"] == 4


def _entropy(labels: np.ndarray) -> float:
    p = np.bincount(labels, minlength=10) / len(labels)
    p = p[p > 0]
    return float(-(p * np.log(p)).sum())


def test_partition_by_edge_covers_and_skews_each_edge_by_its_alpha(labels):
    from cloudedge.data import partition_by_edge

    parts = partition_by_edge(labels, [4, 4, 4], [1.0, 0.3, 0.05], seed=3, min_samples=5)
    _check_exact_cover(parts, len(labels))
    assert len(parts) == 12 and min(len(p) for p in parts) >= 5
    again = partition_by_edge(labels, [4, 4, 4], [1.0, 0.3, 0.05], seed=3, min_samples=5)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))
    # Over seeds: an edge's label mix is the less varied the smaller its alpha.
    ent = np.zeros(3)
    for seed in range(8):
        ps = partition_by_edge(labels, [4, 4, 4], [1.0, 0.3, 0.05], seed=seed)
        ent += [_entropy(labels[np.concatenate(ps[4 * e:4 * e + 4])]) for e in range(3)]
    assert ent[0] > ent[1] > ent[2]
    with pytest.raises(InputError, match="edge_alpha"):
        partition_by_edge(labels, [4, 4], [1.0, 0.3, 0.1], seed=0)
