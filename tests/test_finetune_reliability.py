"""Reliability in the fine-tuning loop: gate, robust aggregation, attacks, churn, DP, memory, resume."""

from __future__ import annotations

import math

import pytest
import torch

from cloudedge.config import config_from_dict
from cloudedge.engine import LocalEngine, WorkerSpec
from cloudedge.errors import InputError
from cloudedge.finetune import finetune
from cloudedge.finetune.loop import HierFinetune
from cloudedge.finetune.stage import prepare_task, settings_from_config
from cloudedge.finetune.workers import FinetuneWorker
from cloudedge.fleet import Fleet
from cloudedge.privacy import PrivacyAccountant
from cloudedge.track.run import RunDir

NO_NORM_RULE = {"norm_rule": "none"}  # structural checks only: the aggregator alone must resist


def _raw(rounds=4, devices=5, availability=1.0, memory=None, policy="hierfavg", **ft):
    dev = {"availability": availability, "latency_s": 0.0005, "flops": 1e8}
    if memory is not None:
        dev["memory_bytes"] = memory
    return {
        "seed": 3,
        "fleet": {"edges": [{"count": 2, "overrides": {"latency_s": 0.0005}, "devices": [
            {"count": devices, "profile": "phone-mid", "overrides": dev}]}]},
        "data": {"source": "digits", "partition": {"kind": "dirichlet", "alpha": 1.0}},
        "model": {"kind": "vit", "hidden": 16, "layers": 1, "heads": 2, "image_size": 8, "patch_size": 4,
                  "channels": 1},
        "finetune": {"lora": {"rank": 2, "alpha": 4.0, "mode": "fedavg"},
                     "sync": {"name": policy, "k1": 8, "k2": 1, "deadline_factor": None},
                     "batch_size": 16, "lr": 8e-2, "time_budget_s": 1e9, "max_cloud_rounds": rounds,
                     "eval_max": 200, **ft},
    }


def _loop(raw):
    torch.set_num_threads(1)
    cfg = config_from_dict(raw)
    fleet = Fleet.from_config(cfg.fleet, cfg.seed)
    task = prepare_task(cfg, fleet)
    return HierFinetune(fleet, task, settings_from_config(cfg), LocalEngine()), task


def _accs(loop):
    return [r["acc"] for r in loop.history]


class WrongShapeWorker(FinetuneWorker):
    """A device whose software is out of date: it sends its head weight with one row missing."""

    def train(self, *args, **kwargs):
        out = super().train(*args, **kwargs)
        key = next(k for k in out["update"] if k.startswith("head.") and out["update"][k].dim() == 2)
        out["update"][key] = out["update"][key][:-1]
        return out


def test_nan_and_wrong_shape_updates_are_rejected_logged_and_rounds_complete():
    raw = _raw(rounds=5, attack={"kind": "nan", "fraction": 0.1, "seed": 1})
    loop, task = _loop(raw)
    (nan_dev,) = loop.safeguards.attackers
    bad = next(d for d in task.device_data if d != nan_dev)
    loop.engine.register(bad, WorkerSpec(WrongShapeWorker, dict(spec=loop.spec, data=task.device_data[bad],
                                                                 batch_size=16, lr=8e-2)))
    summary = loop.run()
    assert summary["cloud_updates"] == 5 and len(loop.history) == 6
    assert summary["rejected_updates"] == 10  # both devices, every round
    listed = [r for row in loop.history for r in row["rejections"]]
    assert {r["from"] for r in listed} == {nan_dev, bad}
    assert all("non-finite values" in r["reason"] for r in listed if r["from"] == nan_dev)
    assert all("shape" in r["reason"] and "head." in r["reason"] for r in listed if r["from"] == bad)
    assert [row["rejected"] for row in loop.history[1:]] == [2] * 5
    assert all(torch.isfinite(v).all() for v in loop.global_state.values())
    assert _accs(loop)[-1] > _accs(loop)[0] + 0.1  # the honest devices still trained the model


def _attacked(aggregator, rounds=5, **knobs):
    raw = _raw(rounds=rounds, attack={"kind": {"name": "scaled", "scale": 50.0}, "fraction": 0.2, "seed": 1},
               robust={"aggregator": {"name": aggregator, **knobs}, "gate": NO_NORM_RULE})
    loop, _ = _loop(raw)
    loop.run()
    return loop


def test_median_and_trimmed_mean_resist_a_scaled_attacker_where_mean_does_not():
    clean, _ = _loop(_raw(rounds=8))
    clean.run()
    mean, median = _attacked("mean", rounds=8), _attacked("median", rounds=8)
    trimmed = _attacked("trimmed_mean", rounds=8, beta=0.2)
    assert len(mean.safeguards.attackers) == 2 and mean.summary()["rejected_updates"] == 0
    clean_acc = clean.history[-1]["acc"]
    assert clean_acc > 0.45
    assert mean.history[-1]["acc"] < clean_acc - 0.3  # the boosted update dominates the mean
    for robust in (median, trimmed):
        acc = _accs(robust)
        # They learn despite the attacker and end far above the mean. They trail the clean run:
        # with non-IID devices, a median of 5 is a biased estimate of their mean (robustness bench).
        assert acc[-1] > acc[0] + 0.2 and acc[-1] > mean.history[-1]["acc"] + 0.2
        assert robust.summary()["edge_aggregator"] in ("median", "trimmed_mean")


def test_default_gate_rejects_boosted_updates_even_under_the_mean():
    raw = _raw(rounds=3, attack={"kind": {"name": "scaled", "scale": 50.0}, "fraction": 0.2, "seed": 0})
    loop, _ = _loop(raw)
    s = loop.run()
    assert s["rejected_updates"] == 2 * 3  # two attackers, three rounds, none of them honest
    assert {r["from"] for row in loop.history for r in row["rejections"]} == set(loop.safeguards.attackers)
    assert all("norms per unit of work" in r["reason"] for row in loop.history for r in row["rejections"])


def test_krum_runs_and_multi_krum_falls_back_when_too_few_updates():
    loop = _attacked("multi_krum", rounds=2, n_byzantine=1)
    assert loop.summary()["cloud_aggregator"] == "multi_krum"  # 2 edges at the cloud: falls back to median
    assert all(math.isfinite(r["loss"]) for r in loop.history)


def test_dropped_timed_out_and_stale_are_counted_per_round():
    raw = _raw(rounds=5, churn={"dropout": 0.25, "stale_prob": 0.6, "max_staleness": 1})
    loop, _ = _loop(raw)
    s = loop.run()
    rows = loop.history[1:]
    assert sum(r["dropped"] for r in rows) == s["dropped_out_updates"] > 0
    assert sum(r["stale"] for r in rows) == s["stale_updates"] > 0
    assert sum(r["timed_out"] for r in rows) == s["timed_out_updates"] == 0  # no deadline here
    assert s["dropped_updates"] == s["dropped_out_updates"] + s["timed_out_updates"]
    reasons = [r["reason"] for row in rows for r in row["rejections"]]
    too_old = [x for x in reasons if x.startswith("stale:")]
    assert too_old and all("> churn.max_staleness 1" in x for x in too_old)
    assert len(too_old) < s["stale_updates"]  # one round stale: accepted (down-weighted)


def test_availability_half_still_converges():
    loop, fleet = _loop(_raw(rounds=8, availability=0.5))
    loop.run()
    assert all(d.profile.availability == 0.5 for d in loop.fleet.devices)
    accs = _accs(loop)
    assert accs[-1] > accs[0] + 0.2 and max(accs[-3:]) > 0.35


def _dp(z=1.0, mode="central", **ft):
    return {"clip_norm": 0.5, "noise_multiplier": z, "mode": mode, **ft}


def test_dp_epsilon_is_reported_per_round_and_grows():
    loop, _ = _loop(_raw(rounds=4, privacy=_dp()))
    s = loop.run()
    eps = [r["epsilon"] for r in loop.history]
    assert eps[0] == 0.0 and all(b > a for a, b in zip(eps, eps[1:], strict=False))
    # Each edge ran 4 rounds; every device is available (q = 1): the plain composition of 4 rounds.
    ref = PrivacyAccountant(1.0, 1.0)
    ref.step(4)
    assert s["epsilon"] == pytest.approx(ref.epsilon(1e-5)) and s["privacy"]["delta"] == 1e-5
    assert s["privacy"]["rounds"] == {"edge0": 4, "edge1": 4}
    more_noise, _ = _loop(_raw(rounds=2, privacy=_dp(z=2.0, delta=1e-6)))
    s2 = more_noise.run()
    assert s2["privacy"]["delta"] == 1e-6 and s2["epsilon"] < eps[2]


def test_local_dp_allows_a_robust_aggregator_and_central_does_not():
    loop, _ = _loop(_raw(rounds=2, privacy=_dp(mode="local"), robust={"aggregator": "median"}))
    s = loop.run()
    assert s["privacy"]["mode"] == "local" and s["epsilon"] > 0
    with pytest.raises(InputError, match="robust.aggregator"):
        config_from_dict(_raw(privacy=_dp(), robust={"aggregator": "median"}))
    with pytest.raises(InputError, match="robust.aggregator"):
        config_from_dict(_raw(lora={"mode": "product"}, robust={"aggregator": "median"}))


@pytest.mark.parametrize("policy", ["hierfavg", "autonomous"])
def test_resume_with_dp_churn_and_attack_gives_the_same_result(tmp_path, policy):
    torch.set_num_threads(1)
    extra = dict(privacy=_dp(), churn={"dropout": 0.2, "stale_prob": 0.5}, attack={"kind": "nan", "fraction": 0.1})

    def cfg(rounds):
        return config_from_dict(_raw(rounds=rounds, policy=policy, devices=4, **extra))

    full = finetune(cfg(4), RunDir.create(tmp_path / "full"), LocalEngine())
    finetune(cfg(2), RunDir.create(tmp_path / "part"), LocalEngine())
    resumed = finetune(cfg(4), RunDir.create(tmp_path / "part", resume=True), LocalEngine(), resume=True)
    keys = ("acc", "virtual_time_s", "epsilon", "dropped", "stale", "rejected", "rejections")
    assert [[r[k] for k in keys] for r in resumed.rows] == [[r[k] for k in keys] for r in full.rows]
    assert resumed.summary["epsilon"] == full.summary["epsilon"]
    for k, v in full.artefacts["adapters"].items():
        assert torch.equal(v, resumed.artefacts["adapters"][k]), k


def test_model_too_large_for_a_device_is_an_error_naming_it():
    with pytest.raises(InputError) as err:
        _loop(_raw(memory=100_000))
    msg = str(err.value)
    assert "edge0/dev0" in msg and "phone-mid" in msg and "activations of one batch of 16" in msg
    assert "memory_fraction 0.5" in msg and "9 more device" in msg
    loop, _ = _loop(_raw(memory=2e7))  # enough: no error, and the estimate is in the summary
    need = loop.safeguards.memory_need
    assert need["total"] == need["weights"] + need["training_state"] + need["activations"]
    assert need["activations"] > 0 and need["training_state"] == 3 * loop.info["trainable_bytes"]
