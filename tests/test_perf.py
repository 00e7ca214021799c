"""cloudedge.perf helpers and the overhead / scale benchmarks at toy sizes (behaviour, not speed)."""

from __future__ import annotations

import math
import mmap

import pytest
import torch

from cloudedge import perf
from cloudedge.bench import overhead, scale


def test_matmul_peak_is_positive_finite_and_cached() -> None:
    first = perf.measure_matmul_peak(size=128, repeats=2)
    assert math.isfinite(first) and first > 0
    # Cached per process: the same arguments give the identical number without re-measuring.
    assert perf.measure_matmul_peak(size=128, repeats=2) == first
    assert (128, torch.float32, "cpu", 2, "wall") in perf._PEAK_CACHE
    per_cpu_second = perf.measure_matmul_peak(size=128, repeats=2, clock="cpu")
    assert math.isfinite(per_cpu_second) and per_cpu_second > 0
    with pytest.raises(ValueError):
        perf.measure_matmul_peak(size=0)
    with pytest.raises(ValueError):
        perf.measure_matmul_peak(size=128, clock="gpu")


def test_mfu_arithmetic() -> None:
    assert perf.mfu(flops=4e9, seconds=2.0, peak=4e9) == pytest.approx(0.5)
    assert perf.mfu(flops=1e12, seconds=0.5, peak=1e13) == pytest.approx(0.2)
    with pytest.raises(ValueError):
        perf.mfu(1.0, 0.0, 1.0)
    with pytest.raises(ValueError):
        perf.mfu(1.0, 1.0, -1.0)


def test_throughput_counts_samples_and_tokens() -> None:
    meter = perf.Throughput()
    assert meter.samples_per_s == 0.0
    meter.add(samples=32, tokens=32 * 128, seconds=2.0)
    meter.add(samples=32, tokens=32 * 128, seconds=2.0)
    assert meter.samples_per_s == pytest.approx(16.0)
    assert meter.tokens_per_s == pytest.approx(16.0 * 128)
    with meter.timed(samples=8, tokens=8):
        sum(range(1000))
    assert meter.samples == 72 and meter.seconds > 4.0


def test_peak_rss_is_at_least_the_current_rss_and_sees_an_allocation() -> None:
    perf.reset_peak_rss()
    before = perf.peak_rss_mb()
    assert before >= perf.current_rss_mb() * 0.99 > 0
    # 64 MiB of fresh pages, every one touched. An anonymous mapping is never memory the allocator
    # freed earlier and kept resident (a torch tensor can be, late in a long test session).
    size = 64 * 2**20
    block = mmap.mmap(-1, size)
    block.write(b"\x01" * size)
    assert perf.peak_rss_mb() >= before + 50
    block.close()


def test_utilization_fields_against_both_peaks() -> None:
    peak = perf.measure_matmul_peak(size=128)
    fields = perf.utilization_fields(flops_done=peak, wall_s=2.0, profile_flops=peak / 4, peak_size=128)
    assert fields["peak_flops_measured"] == peak
    assert fields["achieved_flops"] == pytest.approx(peak / 2)
    assert fields["mfu_measured"] == pytest.approx(0.5)
    assert fields["mfu_profile"] == pytest.approx(2.0)
    assert "mfu_profile" not in perf.utilization_fields(1.0, 1.0, peak_size=128)
    assert perf.utilization_fields(1.0, 0.0) == {}


def test_overhead_benchmark_runs_end_to_end(tmp_path) -> None:
    res = overhead.run(quick=True, out_dir=tmp_path, steps=2, batch=2, max_docs=40, peak_size=128, threads=1,
                       model={"hidden": 16, "layers": 1, "heads": 2, "context": 16})
    assert res["benchmark"] == "overhead"
    for name in ("cloudedge", "plain_torch"):
        m = res["methods"][name]
        assert m["samples_per_s"] > 0 and 0 < m["mfu_measured"]
        assert len(m["step_seconds"]) == 2
    assert res["ratio"] == pytest.approx(res["methods"]["cloudedge"]["samples_per_s"]
                                         / res["methods"]["plain_torch"]["samples_per_s"])
    assert res["config"]["batch"] == 2 and res["config"]["seq_len"] == 16
    assert set(res["goals"]) == {"ratio>=0.95", "mfu>=0.40"}


def test_scale_benchmark_trains_the_sampled_share(tmp_path) -> None:
    res = scale.run(quick=True, out_dir=tmp_path, devices=[100], rounds=1, isolate=False, samples_per_device=4,
                    local_steps=1, threads=1)
    m = res["methods"]["N=100"]
    assert m["devices"] == 100 and m["rounds"] == 1
    # Diurnal availability with a goal of 100 per edge (above each edge's 10 devices): every device
    # online at the round's start trains, and nobody drops out of a round this short.
    online = m["online_devices"][0]
    assert 0 < online < 100 and m["dropped"] == [0]
    assert m["participants_per_round"] == pytest.approx(online) == m["distinct_devices_trained"]
    assert m["seconds_per_round"] > 0 and m["peak_mem_mb"] >= m["baseline_mb"] > 0
    assert m["data_mb"] == pytest.approx(online * 4 * (64 * 4 + 8) / 2**20)  # only participants' data
    assert m["devices_holding_a_model"] == 0
    assert len(m["live_workers_per_round"]) == 1
    with pytest.raises(ValueError):
        scale.measure(15)


def test_training_stages_log_model_flops_utilization():
    from cloudedge.config import config_from_dict
    from cloudedge.pretrain import pretrain

    cfg = config_from_dict({
        "fleet": {"edges": [{"count": 1, "devices": [{"count": 2, "profile": "jetson-orin"}]}]},
        "model": {"kind": "gpt", "hidden": 16, "layers": 1, "heads": 2, "context": 16},
        "data": {"source": "pydocs", "max_docs": 60},
        "pretrain": {"task": "lm", "rounds": 2, "global_batch": 8, "eval_every": 2},
    })
    row = pretrain(cfg).rows[-1]
    assert 0 < row["mfu_measured"] < 1.5 and row["achieved_flops"] > 0
    assert 0 < row["mfu_profile"] < row["mfu_measured"]  # the profile's A100-class peak is far above this host
