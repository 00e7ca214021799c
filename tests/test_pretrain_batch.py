"""Batch controllers: decisions on constructed situations (no training involved)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cloudedge.errors import InputError
from cloudedge.pretrain.batch import (
    GoodputController,
    LearnedController,
    Observation,
    ProportionalController,
    UniformController,
    WorkerInfo,
    finish_together,
    get_controller,
    noise_regression,
    split_integer,
)


def _workers(caps=(1000, 1000), flops=(1.0, 1.0)) -> list[WorkerInfo]:
    return [WorkerInfo(f"w{i}", f, c) for i, (c, f) in enumerate(zip(caps, flops, strict=True))]


def _observe(ctl, rates: dict[str, float], batches: dict[str, int], overhead: float = 0.0) -> None:
    obs = [Observation(w, b, compute_s=b / rates[w], comm_s=overhead) for w, b in batches.items()]
    ctl.observe(0, obs, max(o.compute_s + o.comm_s for o in obs), 1.0)


def test_split_integer_deals_the_total_exactly() -> None:
    out = split_integer(10, {"a": 1.0, "b": 1.0, "c": 1.0})
    assert sum(out.values()) == 10 and sorted(out.values()) == [3, 3, 4]
    assert split_integer(5, {"a": 0.0, "b": 2.0}) == {"b": 5}


def test_uniform_gives_equal_batches_to_available_workers() -> None:
    workers = [*_workers((8, 8)), WorkerInfo("w2", 1.0, 8, available=False)]
    plan = UniformController(20).plan(0, workers)
    assert plan.batches == {"w0": 10, "w1": 10}


def test_proportional_gives_twice_the_batch_to_a_twice_faster_worker() -> None:
    ctl = ProportionalController(30)
    _observe(ctl, {"w0": 200.0, "w1": 100.0}, {"w0": 15, "w1": 15})
    plan = ctl.plan(1, _workers())
    assert plan.batches == {"w0": 20, "w1": 10}


def test_proportional_accounts_for_fixed_overhead_so_workers_finish_together() -> None:
    b = finish_together(30.0, {"a": 10.0, "b": 10.0}, {"a": 0.0, "b": 1.0})
    # a: 20 / 10 + 0 == b: 10 / 10 + 1 == 2 seconds
    assert b["a"] == pytest.approx(20.0) and b["b"] == pytest.approx(10.0)
    # An overhead longer than the whole round leaves a worker out.
    assert finish_together(10.0, {"a": 10.0, "b": 10.0}, {"a": 0.0, "b": 5.0})["b"] == 0.0


def test_proportional_caps_by_memory_and_gives_the_excess_to_others() -> None:
    ctl = ProportionalController(30)
    _observe(ctl, {"w0": 200.0, "w1": 100.0}, {"w0": 15, "w1": 15})
    plan = ctl.plan(1, _workers(caps=(12, 1000)))
    assert plan.batches == {"w0": 12, "w1": 18}


def test_proportional_dead_band_holds_small_changes_and_follows_big_ones() -> None:
    ctl = ProportionalController(30, dead_band=0.1, smoothing=0.0)
    _observe(ctl, {"w0": 200.0, "w1": 100.0}, {"w0": 15, "w1": 15})
    first = ctl.plan(1, _workers()).batches
    _observe(ctl, {"w0": 190.0, "w1": 104.0}, first)  # ~5% drift: noise
    assert ctl.plan(2, _workers()).batches == first
    _observe(ctl, {"w0": 100.0, "w1": 200.0}, first)  # the speeds swapped
    assert ctl.plan(3, _workers()).batches == {"w0": 10, "w1": 20}


def test_noise_regression_recovers_signal_and_variance_from_synthetic_gradients() -> None:
    gen = torch.Generator().manual_seed(0)
    dim, sigma = 400, 0.5
    true_g = torch.randn(dim, generator=gen) * 0.1  # |G|^2 ~ 4
    batches = [2, 4, 8, 16, 64]
    ctl = GoodputController(16, ema=0.9)
    for _ in range(200):
        obs = []
        for i, b in enumerate(batches):
            g = true_g + (torch.randn(b, dim, generator=gen) * sigma).mean(0)
            obs.append(Observation(f"w{i}", b, compute_s=b / 10.0, comm_s=0.0, grad_sq_norm=float(g.pow(2).sum())))
        ctl.observe(0, obs, 1.0, 1.0)
    assert ctl.g2 == pytest.approx(float(true_g.pow(2).sum()), rel=0.15)
    assert ctl.trace == pytest.approx(dim * sigma**2, rel=0.15)
    assert ctl.noise_scale == pytest.approx(dim * sigma**2 / float(true_g.pow(2).sum()), rel=0.25)
    assert noise_regression([8, 8], [1.0, 2.0]) is None  # equal batches: no information


def test_goodput_grows_the_batch_when_noise_is_high_and_scales_lr_by_adascale_gain() -> None:
    workers = _workers(flops=(1.0, 1.0))
    noisy, clean = GoodputController(16, max_global_batch=256), GoodputController(16, max_global_batch=256)
    for ctl, (g2, tr) in ((noisy, (1.0, 1000.0)), (clean, (1.0, 0.01))):
        _observe(ctl, {"w0": 100.0, "w1": 100.0}, {"w0": 8, "w1": 8}, overhead=0.05)
        ctl.g2, ctl.trace = g2, tr
    big, small = noisy.plan(1, workers), clean.plan(1, workers)
    assert big.global_batch > 16 >= small.global_batch
    m = big.global_batch
    assert big.lr_scale == pytest.approx((1000.0 / 16 + 1.0) / (1000.0 / m + 1.0))
    assert big.lr_scale > 1.0


def _toy_round(plan_batches: dict[str, int], rates: dict[str, float]) -> tuple[list[Observation], float, float]:
    obs = [Observation(w, b, compute_s=b / rates[w], comm_s=0.01) for w, b in plan_batches.items()]
    round_s = max(o.compute_s + o.comm_s for o in obs)
    progress = 0.05 * np.log1p(sum(plan_batches.values()))
    return obs, round_s, progress


def _sim_fleet() -> list[WorkerInfo]:
    """Two fast workers and two 100x slower ones, priors from the clock (seconds per sample)."""
    return [WorkerInfo(w, 1.0, 10_000, samples=100, sample_s=s, overhead_s=0.01)
            for w, s in (("w0", 0.01), ("w1", 0.01), ("w2", 1.0), ("w3", 1.0))]


def test_learned_agent_plans_valid_actions() -> None:
    ctl = LearnedController(32, seed=0, episodes=20, cache=False)
    workers = [*_workers((4, 64), (1.0, 2.0)), WorkerInfo("w2", 1.0, 8, available=False)]
    for r in range(5):
        plan = ctl.plan(r, workers)
        assert plan.batches and set(plan.batches) <= {"w0", "w1"}
        assert all(isinstance(b, int) and b >= 1 for b in plan.batches.values())
        obs, round_s, _ = _toy_round(plan.batches, {"w0": 10.0, "w1": 20.0, "w2": 1.0})
        ctl.observe(r, obs, round_s, 5.0 - r * 0.1)
    assert len(ctl.curve) == 20 and ctl.describe()["learning_curve"]["episodes"] == 20


def test_learned_agent_trained_offline_shrinks_stragglers_and_beats_uniform() -> None:
    ctl = LearnedController(32, seed=1, lr=0.05, horizon=5, episodes=1000, noise_scale=8, cache=False)
    workers = _sim_fleet()
    ctl.prepare(workers)
    curve = ctl.curve
    assert len(curve) == 1000
    # Returns are relative to uniform batches: it starts near them and ends well ahead.
    assert np.mean(curve[-100:]) > 1.5 * np.mean(curve[:50]) and np.mean(curve[-100:]) > 1.5
    plan = ctl.plan(0, workers)  # frozen, greedy
    assert plan.batches.get("w2", 0) < plan.batches["w0"] and plan.batches.get("w3", 0) < plan.batches["w1"]


def test_learned_policy_is_cached_by_its_setup(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    first = LearnedController(32, seed=2, horizon=3, episodes=30)
    first.prepare(_sim_fleet())
    assert not first.from_cache and len(list((tmp_path / "cloudedge" / "learned").glob("*.safetensors"))) == 1
    again = LearnedController(32, seed=2, horizon=3, episodes=30)
    again.prepare(_sim_fleet())
    assert again.from_cache and again.curve == first.curve
    for a, b in zip(first.policy.parameters(), again.policy.parameters(), strict=True):
        assert torch.equal(a, b)
    other = LearnedController(64, seed=2, horizon=3, episodes=30)  # another setup trains anew
    other.prepare(_sim_fleet())
    assert not other.from_cache and len(list((tmp_path / "cloudedge" / "learned").glob("*.safetensors"))) == 2


def test_controller_state_round_trips() -> None:
    ctl = LearnedController(32, seed=3, episodes=10, cache=False)
    workers = _workers((16, 16), (1.0, 3.0))
    for r in range(3):
        plan = ctl.plan(r, workers)
        obs, round_s, _ = _toy_round(plan.batches, {"w0": 10.0, "w1": 30.0})
        ctl.observe(r, obs, round_s, 5.0 - r)
    tensors, state = ctl.get_state()
    twin = LearnedController(32, seed=99, episodes=10, cache=False)
    twin.set_state({k: v.clone() for k, v in tensors.items()}, state)
    assert twin.trained and twin.curve == ctl.curve
    assert [ctl.plan(3, workers).batches for _ in range(3)] == [twin.plan(3, workers).batches for _ in range(3)]


def test_get_controller_rejects_unknown_names_and_arguments() -> None:
    assert isinstance(get_controller("proportional", 8, dead_band=0.2), ProportionalController)
    with pytest.raises(InputError, match="unknown batch controller 'no-such'"):
        get_controller("no-such", 8)
    with pytest.raises(InputError, match=r"pretrain.controller: deadband: not a parameter of batch controller "
                                         r"'proportional' \(known: min_batch, dead_band, smoothing, memory_cap, data_floor\)"):
        get_controller("proportional", 8, deadband=0.2)


def test_data_floor_keeps_every_shard_in_the_objective():
    from cloudedge.pretrain.batch import ProportionalController, fill_with_floor, finish_together

    # A fast worker with no overhead would take the whole batch from slow workers with latency.
    rate, overhead = {"fast": 1000.0, "slow": 10.0}, {"fast": 0.0, "slow": 1.0}
    assert finish_together(100.0, rate, overhead)["slow"] == 0.0
    floored = fill_with_floor(100.0, rate, overhead, {"fast": 25.0, "slow": 25.0})
    assert abs(sum(floored.values()) - 100.0) < 1e-6 and floored["slow"] >= 25.0 - 1e-9
    assert fill_with_floor(100.0, rate, overhead, {"fast": 0.0, "slow": 0.0}) == pytest.approx(
        finish_together(100.0, rate, overhead), abs=1e-4)
    ctl = ProportionalController(global_batch=100, data_floor=0.5)
    infos = [WorkerInfo("fast", 1e12, 1000, samples=300), WorkerInfo("slow", 1e9, 1000, samples=100)]
    plan = ctl.plan(0, infos)
    assert plan.global_batch == 100 and plan.batches["slow"] >= int(0.5 * 100 * 100 / 400)
    no_floor = ProportionalController(global_batch=100, data_floor=0.0).plan(0, infos)
    assert no_floor.batches.get("slow", 0) < plan.batches["slow"]


def _non_iid_shards() -> tuple[list[WorkerInfo], dict[str, np.ndarray]]:
    """Worker "slow" holds 300 samples around 0, "fast" 100 around 4: the full objective's mean is 1."""
    rng = np.random.default_rng(0)
    data = {"slow": rng.normal(0.0, 1.0, 300), "fast": rng.normal(4.0, 2.0, 100)}
    infos = [WorkerInfo("slow", 1.0, 1000, samples=300, sample_s=0.1),
             WorkerInfo("fast", 1.0, 1000, samples=100, sample_s=0.001)]
    return infos, data


def test_reweighted_gradient_is_unbiased_for_the_full_objective_and_its_variance_is_as_logged() -> None:
    from cloudedge.pretrain.batch import ReweightedController

    infos, data = _non_iid_shards()
    plan = ReweightedController(64).plan(0, infos)
    # Batches follow speed (100x faster takes almost all), yet the slow shard keeps its data share.
    assert plan.batches["fast"] > 10 * plan.batches["slow"] >= 10 and plan.global_batch == 64
    assert plan.weights == pytest.approx({"slow": 0.75, "fast": 0.25})
    # Loss 0.5 (theta - x)^2 per sample: the gradient at theta = 0 is -mean(x) over the data.
    full = -float(np.concatenate(list(data.values())).mean())
    rng = np.random.default_rng(1)
    draws = {w: rng.choice(x, size=(20_000, plan.batches[w])).mean(axis=1) for w, x in data.items()}
    weighted = -sum(plan.weights[w] * draws[w] for w in data)
    units = -sum(plan.batches[w] * draws[w] for w in data) / plan.global_batch
    se = weighted.std() / np.sqrt(len(weighted))
    assert abs(weighted.mean() - full) < 4 * se  # unbiased
    assert abs(units.mean() - full) > 100 * se  # the union batch over-weights the fast shard
    # Its variance is sum w_i^2 var_i / b_i; with equal per-sample variance that is var / effective_batch.
    expected = sum(plan.weights[w] ** 2 * data[w].var() / plan.batches[w] for w in data)
    assert weighted.var() == pytest.approx(expected, rel=0.05)
    from cloudedge.pretrain.batch import effective_batch

    assert plan.info["effective_batch"] == pytest.approx(effective_batch(plan.batches, plan.weights))
    assert effective_batch({"a": 48, "b": 16}, {"a": 0.75, "b": 0.25}) == pytest.approx(64)  # b ~ w: no loss
    assert plan.info["variance_inflation"] > 1


def test_reweighted_rejects_a_data_floor() -> None:
    with pytest.raises(InputError, match="data_floor: not a parameter of batch controller 'reweighted'"):
        get_controller("reweighted", 8, data_floor=0.5)


def test_goodput_time_model_counts_the_floor_and_the_caps_it_applies() -> None:
    infos, _ = _non_iid_shards()
    floored = GoodputController(64, data_floor=0.5)
    free = GoodputController(64, data_floor=0.0)
    dealt_f, t_f = floored.round_time(64, infos)
    dealt_n, t_n = free.round_time(64, infos)
    # The floor holds the slow worker at 0.5 * 64 * 3/4 = 24 samples of 0.1 s: the round takes 2.4 s.
    assert dealt_f == pytest.approx(64) and t_f == pytest.approx(24 * 0.1, rel=1e-6)
    assert t_n < t_f / 5
    split = floored.real_split(64.0, infos)
    assert t_f == pytest.approx(max(split[w.worker_id] * w.sample_s for w in infos))
    capped = [WorkerInfo(w.worker_id, 1.0, 8, samples=w.samples, sample_s=w.sample_s) for w in infos]
    dealt_c, t_c = GoodputController(64, data_floor=0.0).round_time(64, capped)
    assert dealt_c == pytest.approx(16) and t_c == pytest.approx(8 * 0.1)  # both at their memory cap


def test_controller_knobs_are_checked_when_the_config_loads() -> None:
    from cloudedge.config import config_from_dict

    def load(controller: object, **extra: object) -> None:
        config_from_dict({"name": "x", "pretrain": {"controller": controller, **extra}}, source="c.yaml")

    load({"name": "reweighted", "memory_cap": False})
    load("goodput")
    with pytest.raises(InputError, match=r"c.yaml: pretrain.controller: data_floor: not a parameter of batch "
                                         r"controller 'reweighted' \(known: min_batch, dead_band, smoothing, memory_cap\)"):
        load({"name": "reweighted", "data_floor": 0.5})
    with pytest.raises(InputError, match=r"c.yaml: pretrain.controller: episode: not a parameter"):
        load({"name": "learned", "episode": 10})
    with pytest.raises(InputError, match=r"c.yaml: pretrain.controller: episodes: Input should be greater than or equal to 0"):
        load({"name": "learned", "episodes": -1})
    with pytest.raises(InputError, match=r"c.yaml: pretrain.controller: unknown batch controller 'no-such' "
                                         r"\(known: uniform, proportional, reweighted, goodput, learned"):
        load("no-such")
    # The old key says where its knobs went.
    with pytest.raises(InputError, match=r"c.yaml: pretrain: 'controller_args' is no longer a key here: give the "
                                         r"parameters with the controller, e.g. controller: \{name: goodput"):
        load("goodput", controller_args={"lr_power": 0.5})


def test_a_controller_choice_builds_the_controller_with_its_knobs_and_dumps_back() -> None:
    from cloudedge.config import config_from_dict, dump_config

    cfg = config_from_dict({"name": "x", "pretrain": {"controller": {"name": "goodput", "lr_power": 0.5}}})
    ctl = get_controller(cfg.pretrain.controller.name, 16, **cfg.pretrain.controller.kwargs())
    assert isinstance(ctl, GoodputController) and ctl.lr_power == 0.5 and ctl.data_floor == 0.5
    assert "lr_power: 0.5" in dump_config(cfg)
    assert config_from_dict({"name": "x", "pretrain": {"controller": "uniform"}}).pretrain.controller.as_config() == "uniform"
