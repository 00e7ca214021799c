"""Human units in reports and the CLI; the summary JSON keeps raw numbers."""

from __future__ import annotations

import json

from cloudedge.config import config_from_dict
from cloudedge.track import RunDir
from cloudedge.track.report import render_report
from cloudedge.track.units import better, format_value, method_table


def test_values_take_the_unit_their_name_says():
    assert format_value("bytes_total", 222321512) == "222 MB"
    assert format_value("bytes_edge_cloud", 950) == "950 B"
    assert format_value("utilization", 0.001359) == "0.136 %"
    assert format_value("final_acc", 0.8751) == "87.5 %"
    assert format_value("virtual_time_s", 0.0123) == "12.3 ms"
    assert format_value("time_to_target_s", 312.0) == "5.2 min"
    assert format_value("wall_s", 4.5) == "4.5 s"
    assert format_value("energy_j", 2250.0) == "2.25 kJ"
    assert format_value("device_energy_j", 0.004) == "4 mJ"
    assert format_value("ms_per_image", 12.5) == "12.5 ms"
    assert format_value("peak_mem_mb", 1536.0) == "1.54 GB"
    assert format_value("pretrain_speedup", 1.3456) == "1.35x"
    assert format_value("ood_gain_points", 4.25) == "4.25"
    assert format_value("rounds", 12000) == "12,000"
    assert format_value("final_val_loss", 2.93215) == "2.932"
    assert format_value("acc_per_shift", {"noise": 0.5, "blur": 0.25}) == "noise: 50.0 %, blur: 25.0 %"
    assert format_value("time_to_target_s", None) == "–"


def test_direction_of_each_metric():
    assert [better(k) for k in ("final_acc", "utilization", "pretrain_speedup", "final_val_loss", "bytes_total",
                                "energy_j", "peak_mem_mb", "time_to_target_s", "method", "accumulating")] == \
        ["higher", "higher", "higher", "lower", "lower", "lower", "lower", "lower", None, None]


def test_method_table_is_sorted_best_first_with_the_best_of_each_column_marked():
    rows = method_table({
        "fedavg2": {"final_acc": 0.6, "bytes_device_edge": 3_000_000, "time_to_target_s": None},
        "autonomous": {"final_acc": 0.8, "bytes_device_edge": 5_000_000, "time_to_target_s": 12.0},
        "hierfavg": {"final_acc": 0.7, "bytes_device_edge": 4_000_000, "time_to_target_s": 20.0},
    })
    assert rows[0] == ["method", "bytes_device_edge", "final_acc", "time_to_target_s"]
    assert [r[0] for r in rows[1:]] == ["autonomous", "hierfavg", "fedavg2"]
    assert rows[1] == ["autonomous", "5 MB", "80.0 % ★", "12 s ★"]
    assert rows[3] == ["fedavg2", "3 MB ★", "60.0 %", "–"]


def test_report_shows_units_while_summary_keeps_raw_numbers(tmp_path):
    run = RunDir.create(tmp_path / "r", config_from_dict({"name": "units"}))
    run.log(stage="pretrain", method="a", round=0, train_loss=1.0)
    raw = {"methods": {"a": {"bytes_total": 222321512, "utilization": 0.001359},
                       "b": {"bytes_total": 1000, "utilization": 0.5}}, "energy_j": 3.5}
    run.write_summary({"pretrain": raw})
    md = render_report(run.path)[0].read_text()
    assert "| b | 1 kB ★ | 50.0 % ★ |" in md and "| a | 222 MB | 0.136 % |" in md
    assert "| energy_j | 3.5 J |" in md
    assert json.loads((run.path / "summary.json").read_text())["pretrain"] == raw
