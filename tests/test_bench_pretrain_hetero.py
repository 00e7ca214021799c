"""The `pretrain-hetero` benchmark: its rules (ideal speed-up, common grid, target) and its options."""

from __future__ import annotations

import pytest

from cloudedge.bench.pretrain_hetero import first_crossing, grid_losses, ideal_speedup
from cloudedge.bench.pretrain_hetero import run as run_hetero
from cloudedge.errors import InputError

KEYS = ("time_to_target_s", "speedup", "utilization", "final_val_loss", "bytes_total", "energy_j")


def test_ideal_speedup_is_mean_over_min_throughput() -> None:
    # Uniform: B/4 samples at the slowest rate 1 -> B/4 s; proportional: B / (4 + 2 + 1 + 1) = B/8 s.
    assert ideal_speedup([4.0, 2.0, 1.0, 1.0]) == pytest.approx(2.0)
    assert ideal_speedup([3.0, 3.0]) == pytest.approx(1.0)


def test_the_common_grid_does_not_reward_evaluating_often() -> None:
    # Method A is evaluated every 0.5 s and dips below the target between grid instants; method B
    # is evaluated once per 2 s. On the grid (every 2 s of a 10 s budget) both are scored by the
    # model in force at each instant, so A's short-lived dip at 2.5 s does not count.
    a = [{"virtual_time_s": 0.5 * k, "val_loss": 3.0 if k == 5 else 5.0 - 0.1 * k} for k in range(1, 21)]
    b = [{"virtual_time_s": 2.0 * k, "val_loss": 5.0 - 0.4 * k} for k in range(1, 6)]
    grid_a, grid_b = grid_losses(a, 10.0, points=5), grid_losses(b, 10.0, points=5)
    assert grid_a == pytest.approx([4.6, 4.2, 3.8, 3.4, 3.0])
    assert grid_b == pytest.approx([4.6, 4.2, 3.8, 3.4, 3.0])
    assert first_crossing(grid_a, 10.0, 3.5) == first_crossing(grid_b, 10.0, 3.5) == pytest.approx(8.0)
    assert first_crossing(grid_a, 10.0, 1.0) is None
    assert grid_losses([{"virtual_time_s": 3.0, "val_loss": 2.0}], 10.0, points=5)[0] is None  # none yet at 2 s


def test_hetero_bench_runs_a_regime_by_its_rules() -> None:
    res = run_hetero(True, None, methods="compute/sync-reweighted", rounds=2, seeds=1)
    assert set(res["methods"]) == {"compute/sync-uniform", "compute/sync-reweighted"}  # the baseline always runs
    assert res["charged_model"] == "gpt2-124m" and res["ideal_speedup"] > 1
    regime = res["regimes"]["compute"]
    assert regime["throughput_span"] >= 8 and regime["ideal_speedup"] == res["ideal_speedup"]
    assert len(regime["excluded"]) == 2 and all("do not fit" in why for why in regime["excluded"].values())
    base, rw = res["methods"]["compute/sync-uniform"], res["methods"]["compute/sync-reweighted"]
    for m in (base, rw):
        assert all(k in m for k in KEYS) and m["per_seed"][0]["rounds"] == m["rounds"]
    # The target is the baseline's loss at the end of its budget: it reaches it, by definition, there.
    assert base["final_val_loss"] == pytest.approx(regime["target_val_loss"][0]) and base["speedup"] == 1.0
    assert base["time_to_target_s"] <= regime["budget_s"][0]
    assert rw["rounds"] > base["rounds"]  # batches follow speed: more rounds in the same virtual time
    assert rw["variance_inflation"] > 1
    assert len(rw["per_seed"][0]["grid_val_loss"]) == 40


def test_hetero_bench_rejects_bad_options() -> None:
    with pytest.raises(InputError, match="methods"):
        run_hetero(True, None, methods="compute/sync-uniform,nope")
    with pytest.raises(InputError, match="size"):
        run_hetero(True, None, size="gpt-1t")
    with pytest.raises(InputError, match="seeds"):
        run_hetero(True, None, seeds=0)


def test_results_say_what_ran_them_and_how_loaded_the_host_was(tmp_path) -> None:
    import json

    from cloudedge.bench import run_benchmark

    path = run_benchmark("pretrain-hetero", tmp_path, quick=True, methods="wan/sync-uniform", rounds=1, seeds=1)
    res = json.loads(path.read_text())
    machine = res["machine"]
    assert machine["cpu_count"] >= 1 and machine["torch"] and machine["python"]
    assert "cuda" in machine and "cpu" in machine
    for key in ("load_average", "load_average_at_start"):
        assert machine[key] is None or (len(machine[key]) == 3 and all(x >= 0 for x in machine[key]))
    m = res["methods"]["wan/sync-uniform"]
    assert m["tokens"] == 64 * 32 and m["tokens_per_s_compute"] >= m["tokens_per_s_engine"] >= m["tokens_per_s"] > 0
    assert res["ideal_speedup"] is None  # no compute regime ran


def test_each_finished_method_is_kept_until_the_whole_result_is_ready(tmp_path, monkeypatch) -> None:
    import json

    from cloudedge.bench import pretrain_hetero as ph

    seen = []
    real = ph._run_method

    def stop_after_two(cfg, name, overrides):
        if len(seen) == 2:  # a timeout on a lent GPU, say: the third method run never ends
            raise KeyboardInterrupt
        seen.append(name)
        return real(cfg, name, overrides)

    monkeypatch.setattr(ph, "_run_method", stop_after_two)
    with pytest.raises(KeyboardInterrupt):
        run_hetero(True, tmp_path, methods="compute/sync-reweighted", rounds=2, seeds=2)
    kept = json.loads((tmp_path / ph.PARTIAL).read_text())
    assert kept["complete"] is False
    assert [(m["method"], m["seed"]) for m in kept["finished"]] == [
        ("compute/sync-uniform", 0), ("compute/sync-reweighted", 0)]
    assert all(m["rounds"] >= 2 and m["wall_s"] > 0 and m["last_val_loss"] > 0 and "rows" not in m
               for m in kept["finished"])
    monkeypatch.setattr(ph, "_run_method", real)
    run_hetero(True, tmp_path, methods="compute/sync-reweighted", rounds=2, seeds=1)
    assert not (tmp_path / ph.PARTIAL).exists()  # the whole result supersedes it
