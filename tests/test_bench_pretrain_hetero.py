"""The `pretrain-hetero` benchmark's options: methods, rounds, seeds, host speed."""

from __future__ import annotations

import pytest

from cloudedge.bench.pretrain_hetero import run as run_hetero
from cloudedge.errors import InputError


def test_hetero_bench_reports_host_speed_for_the_methods_asked() -> None:
    res = run_hetero(True, None, methods="sync-uniform", rounds=2)
    (method,) = res["methods"].values()
    assert list(res["methods"]) == ["sync-uniform"] and method["rounds"] == 2
    # 2 rounds x 64 sequences x 32 bytes
    assert method["tokens"] == 2 * 64 * 32
    assert method["tokens_per_s_compute"] >= method["tokens_per_s_engine"] >= method["tokens_per_s"] > 0
    with pytest.raises(InputError, match="methods"):
        run_hetero(True, None, methods="sync-uniform,nope")
    with pytest.raises(InputError, match="size"):
        run_hetero(True, None, size="gpt-1t")


def test_hetero_bench_over_seeds_reports_medians_and_the_spread() -> None:
    res = run_hetero(True, None, methods="sync-uniform,local-uniform", rounds=4, seeds=2)
    assert res["config"]["seeds"] == 2
    for m in res["methods"].values():
        a, b = (s["final_val_loss"] for s in m["per_seed"])
        assert a != b  # the seed changes the model, the partition and the batches
        assert m["final_val_loss"] == pytest.approx((a + b) / 2)
        assert m["per_seed"][0]["rounds"] == m["rounds"]
    with pytest.raises(InputError, match="seeds"):
        run_hetero(True, None, seeds=0)


def test_results_say_what_ran_them_and_how_loaded_the_host_was(tmp_path) -> None:
    import json

    from cloudedge.bench import run_benchmark

    path = run_benchmark("pretrain-hetero", tmp_path, quick=True, methods="sync-uniform", rounds=1)
    machine = json.loads(path.read_text())["machine"]
    assert machine["cpu_count"] >= 1 and machine["torch"] and machine["python"]
    assert "cuda" in machine and "cpu" in machine
    for key in ("load_average", "load_average_at_start"):
        assert machine[key] is None or (len(machine[key]) == 3 and all(x >= 0 for x in machine[key]))
