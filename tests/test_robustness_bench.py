"""The robustness benchmark on a shrunken grid: result structure, gate rows, the DP row, threads."""

from __future__ import annotations

import torch

from cloudedge.bench import robustness


def test_robustness_bench_small_grid(tmp_path):
    before = torch.get_num_threads()
    out = robustness.run(quick=True, out_dir=tmp_path, aggregators=("mean", "median"), attacks=("scaled",),
                         rounds=2, pretrain_steps=20)
    assert torch.get_num_threads() == before  # the benchmark restores what it changed
    m = out["methods"]
    assert set(m) == {"mean/clean/0", "mean/scaled/0.2", "median/clean/0", "median/scaled/0.2",
                      "mean+gate/scaled/0.2", "mean+dp/clean/0"}
    assert all(0.0 <= row["final_acc"] <= 1.0 and len(row["accuracy_curve"]) == 3 for row in m.values())
    assert len(m["median/scaled/0.2"]["attackers"]) == 3  # 20% of 16 devices, rounded half up
    # No norm rule in aggregator rows: nothing is rejected, the aggregator alone decides...
    assert m["mean/scaled/0.2"]["rejected_updates"] == 0
    assert m["median/scaled/0.2"]["final_acc"] > m["mean/scaled/0.2"]["final_acc"]
    # ...while the default gate rejects each boosted update (3 attackers, 2 rounds).
    assert m["mean+gate/scaled/0.2"]["rejected_updates"] == 6
    assert out["dp"]["epsilon"] == m["mean+dp/clean/0"]["epsilon"] > 0
    assert out["dp"]["final_acc_no_dp"] == m["mean/clean/0"]["final_acc"]
    goal = out["goal"]["per_attack"]["scaled"]
    assert goal["best"] == "median" and goal["gap"] == out["goal"]["clean_acc"] - goal["final_acc"]
