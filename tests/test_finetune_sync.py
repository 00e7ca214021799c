"""Sync policies' decisions on constructed situations."""

from __future__ import annotations

import math

import pytest
import torch

from cloudedge.errors import InputError
from cloudedge.finetune.sync import (
    AdaptiveInterval,
    Autonomous,
    DeviceObs,
    DeviceStats,
    EdgeObs,
    EdgeRoundStats,
    HierFAVG,
    Tempo,
    disagreement,
    make_policy,
    wang_tau,
)


def _edge(edge_id="edge0", rounds=1, divergence=1.0, drift=0.0, round_s=1.0, sync_s=1.0, devices=(), sync_bytes=0.0):
    return EdgeObs(edge_id, rounds, divergence, drift, round_s, sync_s, 0.0, 0.0, tuple(devices), sync_bytes=sync_bytes)


def test_autonomous_slow_device_does_fewer_steps():
    pol = Autonomous(k1=5, max_steps=50)
    fast = DeviceObs("fast", sec_per_step=0.01, comm_s=0.1, n_samples=50)
    slow = DeviceObs("slow", sec_per_step=0.1, comm_s=0.1, n_samples=50)
    mid = DeviceObs("mid", sec_per_step=0.05, comm_s=0.1, n_samples=50)
    deadline = pol.deadline(_edge(devices=[fast, slow, mid]))
    assert deadline == pytest.approx((0.1 + 5 * 0.05) / 0.9)  # the median device's k1-step time
    n_fast, n_slow = pol.device_steps("edge0", fast, deadline), pol.device_steps("edge0", slow, deadline)
    assert 0 < n_slow < pol.device_steps("edge0", mid, deadline) == 5 < n_fast
    for d in (fast, slow, mid):  # everyone fits the deadline
        assert pol.device_steps("edge0", d, deadline) * d.sec_per_step + d.comm_s <= deadline
    assert n_fast == math.floor(0.9 * (deadline - 0.1) / 0.01)
    hopeless = DeviceObs("hopeless", sec_per_step=10.0, comm_s=0.1, n_samples=50)
    assert pol.device_steps("edge0", hopeless, deadline) == 0  # sits out rather than straggles


def test_autonomous_drifting_edge_syncs_sooner():
    pol = Autonomous(k2_max=20)
    # The cloud's answers: e0 moves with the fleet (nu 0.1), e1 at right angles to it (nu 1.0).
    pol.on_cloud_sync({"e0": EdgeObs("e0", 2, 1.0, 0.0, 1.0, 4.0, 0.0, 0.0, disagreement=0.1),
                       "e1": EdgeObs("e1", 2, 1.0, 0.0, 1.0, 4.0, 0.0, 0.0, disagreement=1.0)})
    calm, drifting = _edge("e0", sync_s=4.0), _edge("e1", sync_s=4.0)
    assert pol.edge_k2(drifting) < pol.edge_k2(calm)
    # Absolute: kappa = 4 rounds per sync, g = nu / k: sqrt(2 * 4 / (1.0 / 2)) = 4 and sqrt(2 * 4 / 0.05) = 12.6.
    assert pol.edge_k2(drifting) == 4 and pol.edge_k2(calm) == 13
    # Costlier links make an edge sync less often.
    assert pol.edge_k2(_edge("e1", sync_s=16.0)) > pol.edge_k2(_edge("e1", sync_s=1.0))
    # Before any answer nu = 1 (nothing known); an edge that moves exactly with the fleet syncs rarely.
    assert pol.edge_k2(_edge("e9", sync_s=2.0)) == 2
    pol.on_cloud_sync({"e2": EdgeObs("e2", 1, 1.0, 0.0, 1.0, 1.0, 0.0, 0.0, disagreement=0.0)})
    assert pol.edge_k2(_edge("e2", sync_s=0.01)) == 20
    # No answer (no other change to compare with) keeps the last one.
    pol.on_cloud_sync({"e1": EdgeObs("e1", 5, 1.0, 0.0, 1.0, 4.0, 0.0, 0.0, disagreement=None)})
    assert pol.edge_k2(drifting) == 4
    other = Autonomous(k2_max=20)
    other.load_state_dict(pol.state_dict())
    assert [other.edge_k2(e) for e in (calm, drifting)] == [13, 4]


def test_autonomous_interval_does_not_depend_on_the_other_edges():
    """The fault this rule replaced: normalized to the fleet mean, divergence had no absolute cost,
    and every edge got k2 = 1. Here each edge's interval follows its own cost and drift, whatever
    the others report, and edges that differ in both get different intervals."""
    reports = {"cheap-iid": EdgeObs("cheap-iid", 2, 1.0, 0.0, 1.0, 0.5, 0.0, 0.0, disagreement=0.05),
               "costly-iid": EdgeObs("costly-iid", 2, 1.0, 0.0, 1.0, 3.0, 0.0, 0.0, disagreement=0.05),
               "costly-skewed": EdgeObs("costly-skewed", 2, 1.0, 0.0, 1.0, 3.0, 0.0, 0.0, disagreement=1.2)}
    alone = {}
    for e, r in reports.items():
        pol = Autonomous(k2_max=16)
        pol.on_cloud_sync({e: r})
        alone[e] = pol.edge_k2(_edge(e, sync_s=r.sync_s))
    together = Autonomous(k2_max=16)
    together.on_cloud_sync(reports)
    assert {e: together.edge_k2(_edge(e, sync_s=r.sync_s)) for e, r in reports.items()} == alone
    assert alone["costly-skewed"] < alone["cheap-iid"] < alone["costly-iid"]
    assert len(set(alone.values())) == 3


def test_disagreement_is_one_minus_cosine():
    a = {"w": torch.tensor([1.0, 0.0]), "head": torch.tensor([0.0])}
    assert disagreement(a, {"w": torch.tensor([2.0, 0.0]), "head": torch.tensor([0.0])}) == pytest.approx(0.0)
    assert disagreement(a, {"w": torch.tensor([0.0, 3.0]), "head": torch.tensor([0.0])}) == pytest.approx(1.0)
    assert disagreement(a, {"w": torch.tensor([-1.0, 0.0]), "head": torch.tensor([0.0])}) == pytest.approx(2.0)
    assert disagreement(a, {"w": torch.zeros(2), "head": torch.zeros(1)}) is None


def test_autonomous_budget_floor():
    pol = Autonomous(k2_max=50, sync_budget_bytes=1000.0, time_budget_s=100.0)
    # 10 syncs allowed over 100 rounds of 1 s: at least 10 rounds between syncs.
    assert pol.edge_k2(_edge(divergence=100.0, sync_s=0.01, sync_bytes=100.0)) == 10


def test_hierfavg_fixed_and_deadline():
    pol = HierFAVG(k1=4, k2=3, deadline_factor=2.0)
    devs = [DeviceObs(f"d{i}", s, 0.0, 10) for i, s in enumerate((0.1, 0.2, 1.0))]
    assert pol.device_steps("e", devs[2], None) == 4
    assert pol.deadline(_edge(devices=devs)) == pytest.approx(2.0 * 4 * 0.2)
    assert not pol.should_sync(_edge(rounds=2)) and pol.should_sync(_edge(rounds=3))
    assert HierFAVG(deadline_factor=None).deadline(_edge(devices=devs)) is None


def test_tempo_more_divergent_edge_gets_fewer_rounds():
    pol = Tempo(k2=4)
    reports = {e: EdgeObs(e, 4, 0.0, 0.0, 1.0, 1.0, 0.0, 0.0, layer_divergence=d)
               for e, d in (("e0", 1.0), ("e1", 1.0), ("e2", 10.0))}
    pol.on_cloud_sync(reports)
    assert pol.k2_of["e2"] < pol.k2_of["e0"]
    assert pol.should_sync(_edge("e2", rounds=pol.k2_of["e2"]))
    state = pol.state_dict()
    other = Tempo(k2=4)
    other.load_state_dict(state)
    assert other.k2_of == pol.k2_of


def test_wang_tau_hand_case():
    # No divergence (delta = 0 -> h = 0): gap = 1/(T eta phi) falls as T grows, and T grows with
    # tau when aggregation is costly (b >> c): the longest allowed interval wins.
    assert wang_tau(beta=1.0, rho=1.0, delta=0.0, eta=0.1, phi=0.025, c=0.01, b=1.0, remaining_s=100.0,
                    tau_prev=5) == 50
    # Large divergence: h grows exponentially in tau, so short intervals win.
    tau = wang_tau(beta=10.0, rho=10.0, delta=10.0, eta=0.1, phi=0.025, c=0.01, b=1.0, remaining_s=100.0,
                   tau_prev=5)
    assert 1 <= tau < 10
    # Brute force of the formula for that case.
    def gap(t):
        h = max(0.0, 10 / 10 * ((0.1 * 10 + 1) ** t - 1) - 0.1 * 10 * t)
        big_t = (100 - 0.01 - 1) * t / (0.01 * t + 1)
        return (1 + math.sqrt(1 + 4 * big_t**2 * 0.025 * 10 * 0.1 * h / t)) / (2 * big_t * 0.1 * 0.025) + 10 * h
    assert tau == min(range(1, 51), key=gap)
    # Budget spent: keep the previous interval.
    assert wang_tau(beta=1, rho=1, delta=1, eta=0.1, phi=0.025, c=1, b=1, remaining_s=1.0, tau_prev=7) == 7


def test_adaptive_interval_updates_tau_from_device_stats():
    pol = AdaptiveInterval(k1=5, max_steps=50, lr=0.1, time_budget_s=100.0)
    same = torch.ones(4)
    stats = [DeviceStats(10, same, 0.0, 0.0, 1.0), DeviceStats(10, same, 0.0, 0.0, 1.0)]
    pol.on_edge_round("e0", EdgeRoundStats(local_step_s=0.01, agg_s=1.0, devices=stats, now=0.0))
    assert pol.device_steps("e0", DeviceObs("d", 0.01, 0.0, 10), None) == 50  # no divergence: 10x tau_prev


def test_make_policy_unknown_name_and_unknown_knob():
    with pytest.raises(InputError, match="finetune.sync: unknown sync policy 'nope'"):
        make_policy("nope")
    # No knob is swallowed: a misspelt one names the policy's own knobs.
    with pytest.raises(InputError, match=r"finetune.sync: k2max: not a parameter of sync policy 'autonomous' "
                                         r"\(known: k1, k2, deadline_factor, min_steps, max_steps, alpha, k2_max"):
        make_policy("autonomous", k2max=3)
    with pytest.raises(InputError, match="finetune.sync: phi: not a parameter of sync policy 'hierfavg'"):
        make_policy("hierfavg", phi=0.1)


def test_the_config_names_the_policy_with_its_knobs():
    from cloudedge.config import config_from_dict
    from cloudedge.finetune.stage import settings_from_config

    def load(sync, **ft):
        return config_from_dict({"name": "x", "finetune": {"sync": sync, **ft}}, source="c.yaml")

    cfg = load({"name": "adaptive-interval", "k1": 3, "phi": 0.05}, lr=0.2, time_budget_s=50.0)
    settings = settings_from_config(cfg)
    assert settings.policy == "adaptive-interval"
    assert settings.policy_kwargs == {"k1": 3, "k2": 2, "deadline_factor": 2.0, "min_steps": 1, "max_steps": 40,
                                      "phi": 0.05}
    assert load("tempo").finetune.sync.kwargs()["k2"] == 2
    # A bare-name override keeps the config's shared schedule; the other policy's knobs stay behind.
    switched = settings_from_config(cfg, policy="autonomous")
    assert switched.policy_kwargs["k1"] == 3 and switched.policy_kwargs["alpha"] == 1.0
    assert "phi" not in switched.policy_kwargs
    with pytest.raises(InputError, match=r"c.yaml: finetune.sync: phi: not a parameter of sync policy 'tempo'"):
        load({"name": "tempo", "phi": 0.1})
    with pytest.raises(InputError, match=r"c.yaml: finetune.sync: min_steps must be <= max_steps"):
        load({"name": "autonomous", "min_steps": 9, "max_steps": 3})
    with pytest.raises(InputError, match=r"c.yaml: finetune: sync.policy is no longer a key: name the policy"):
        load({"policy": "autonomous", "k1": 5})


def test_autonomous_merge_weight_discounts_only_excess_staleness():
    pol = Autonomous(staleness_exponent=0.5)
    # Up to E - 1 merges since the pull (3 edges: 2) is what edges at one pace see: no discount.
    for tau in (0, 1, 2):
        assert pol.merge_weight(0.3, tau, n_edges=3) == pytest.approx(0.3)
    # Beyond that, FedAsync's polynomial discount (1 + excess)^-a.
    assert pol.merge_weight(0.3, 5, n_edges=3) == pytest.approx(0.3 * 4 ** -0.5)
    weights = [pol.merge_weight(0.3, tau, n_edges=3) for tau in range(2, 12)]
    assert all(a > b for a, b in zip(weights, weights[1:], strict=False))  # staler: less
    # A larger data share weighs more at the same staleness; exponent 0 switches the discount off.
    assert pol.merge_weight(0.5, 6, 3) > pol.merge_weight(0.2, 6, 3)
    assert Autonomous(staleness_exponent=0.0).merge_weight(0.3, 9, 3) == pytest.approx(0.3)
    assert HierFAVG().merge_weight(0.3, 9, 3) == pytest.approx(0.3)  # barrier policies: the share


def test_autonomous_merges_at_one_pace_equal_the_barrier_average():
    # Three edges pull the same global model and finish together: merged one after the other
    # (staleness 0, 1, 2), their deltas add up to the sample-weighted average a barrier computes.
    gen = torch.Generator().manual_seed(0)
    pulled = torch.randn(6, generator=gen)
    edges = [pulled + torch.randn(6, generator=gen) for _ in range(3)]
    shares = [0.5, 0.3, 0.2]
    pol = Autonomous()
    glob = pulled.clone()
    for tau, (edge, share) in enumerate(zip(edges, shares, strict=True)):
        glob = glob + pol.merge_weight(share, tau, n_edges=3) * (edge - pulled)
    barrier = sum(s * e for s, e in zip(shares, edges, strict=True))
    assert torch.allclose(glob, barrier, atol=1e-6)
    # An edge that trained through many others' merges moves the global model less.
    fresh = pulled + pol.merge_weight(0.5, 2, 3) * (edges[0] - pulled)
    stale = pulled + pol.merge_weight(0.5, 10, 3) * (edges[0] - pulled)
    assert (stale - pulled).norm() < (fresh - pulled).norm()
