"""Benchmark `pretrain-hetero`: batch adaptation on a heterogeneous fleet (LM on pydocs).

One small GPT is pre-trained by every node of a fleet whose compute spans > 1000x (an A100 cloud,
two T4 edge servers, Jetson Orins, mid-range and entry-level phones) with memory caps that bind on
the entry-level phones.
Six methods share the data, model, seed and a target validation loss fixed here, before any run:

    sync-uniform, sync-proportional, local-uniform, local-proportional, goodput (sync), learned (sync)

Metrics per method: ``time_to_target_s`` (virtual seconds until the held-out loss first reaches
``TARGET_VAL_LOSS``), ``final_val_loss``, ``bytes_total``, ``energy_j``, ``utilization`` (share of
the participants' round time spent computing), plus the round count and wall seconds.

Scale: the model is tiny so the benchmark runs on a laptop CPU. Profiles keep their bandwidths but
their FLOP/s and memory are divided by ``SCALE`` (1000): each of our 32-token sequences then
costs what 1000 sequences cost on the real hardware, i.e. a global batch of 64 stands for ~2M
tokens, the batch size of LLM pre-training, and compute and communication keep a realistic ratio.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from cloudedge.config import config_from_dict
from cloudedge.fleet.profiles import PROFILES
from cloudedge.pretrain.loop import pretrain

SCALE = 1000.0
TARGET_VAL_LOSS = 3.6  # nats per byte, fixed before the runs (a uniform byte model scores ln 259 = 5.56)
SYNC_ROUNDS, LOCAL_ROUNDS = 40, 12  # quick; the full run does 4x. Local rounds do LOCAL_STEPS steps each
LOCAL_STEPS = 4

METHODS: dict[str, dict[str, Any]] = {
    "sync-uniform": {"algorithm": "sync", "controller": "uniform"},
    "sync-proportional": {"algorithm": "sync", "controller": "proportional"},
    "local-uniform": {"algorithm": "local", "controller": "uniform"},
    "local-proportional": {"algorithm": "local", "controller": "proportional"},
    "goodput": {"algorithm": "sync", "controller": "goodput", "controller_args": {"lr_power": 0.5}},
    "learned": {"algorithm": "sync", "controller": "learned"},
}


def _scaled(name: str) -> dict[str, float]:
    p = PROFILES[name]
    return {"flops": p.flops / SCALE, "memory_bytes": p.memory_bytes / SCALE}


def bench_config(quick: bool) -> dict[str, Any]:
    """The run config shared by every method (a plain dict, as a YAML file would hold it)."""
    devices_per_kind = 1 if quick else 3
    return {
        "name": "pretrain-hetero",
        "seed": 0,
        "fleet": {
            "cloud": {"profile": "a100", "overrides": _scaled("a100")},
            "edges": [{
                "count": 2, "profile": "edge-server", "overrides": _scaled("edge-server"),
                "devices": [
                    {"count": devices_per_kind, "profile": "jetson-orin", "overrides": _scaled("jetson-orin")},
                    {"count": devices_per_kind, "profile": "phone-mid", "overrides": _scaled("phone-mid")},
                    {"count": devices_per_kind, "profile": "phone-low", "overrides": _scaled("phone-low")},
                ],
            }],
        },
        "data": {"source": "pydocs", "max_docs": 600 if quick else 4000, "partition": {"kind": "domain"},
                 "test_fraction": 0.1},
        "model": {"kind": "gpt", "hidden": 32 if quick else 64, "layers": 2, "heads": 2, "context": 32},
        "pretrain": {"task": "lm", "rounds": SYNC_ROUNDS, "global_batch": 64, "local_steps": LOCAL_STEPS,
                     "lr": 3e-3, "outer_lr": 0.7, "eval_every": 2, "eval_samples": 64,
                     "checkpoint_every": 1000, "target_val_loss": TARGET_VAL_LOSS},
    }


def run(quick: bool, out_dir: Path) -> dict[str, Any]:
    """Run every method; returns the results dict the CLI writes to results.json."""
    raw = bench_config(quick)
    cfg = config_from_dict(raw, source="pretrain-hetero")
    methods: dict[str, dict[str, Any]] = {}
    # Tiny matrices: one thread is fastest, and far faster than two on a busy shared machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for name, overrides in METHODS.items():
            rounds = SYNC_ROUNDS if overrides["algorithm"] == "sync" else LOCAL_ROUNDS
            methods[name] = _run_method(cfg, name, {**overrides, "rounds": rounds * (1 if quick else 4)})
    finally:
        torch.set_num_threads(threads)
    base = methods["sync-uniform"]["time_to_target_s"]
    for m in methods.values():
        t = m["time_to_target_s"]
        m["speedup_vs_sync_uniform"] = (base / t) if (base and t) else None
    return {"benchmark": "pretrain-hetero", "config": {**raw, "scale": SCALE, "quick": quick}, "methods": methods}


def _run_method(cfg: Any, name: str, overrides: dict[str, Any]) -> dict[str, Any]:
    """One method's run and its metrics."""
    t0 = time.perf_counter()
    s = pretrain(cfg, None, method=name, **overrides).summary
    return {
        "time_to_target_s": s["time_to_target_s"], "final_val_loss": s["final_val_loss"],
        "bytes_total": s["bytes_total"], "energy_j": s["energy_j"], "utilization": s["utilization"],
        "virtual_time_s": s["virtual_time_s"], "mean_batch_per_step": s["mean_batch_per_step"],
        "rounds": s["rounds"], "wall_s": round(time.perf_counter() - t0, 2),
    }


if __name__ == "__main__":  # python -m cloudedge.bench.pretrain_hetero [--full]
    import json
    import sys

    res = run("--full" not in sys.argv, Path("."))
    print(json.dumps(res["methods"], indent=1))
