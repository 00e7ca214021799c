"""Benchmark `pretrain-hetero`: batch adaptation on a heterogeneous fleet (LM on pydocs).

One small GPT is pre-trained by every node of a fleet whose compute spans > 1000x (an A100 cloud,
two T4 edge servers, Jetson Orins, mid-range and entry-level phones) with memory caps that bind on
the entry-level phones.
Six methods share the data, model, seed and a target validation loss fixed here, before any run:

    sync-uniform, sync-proportional, local-uniform, local-proportional, goodput (sync), learned (sync)

Metrics per method: ``time_to_target_s`` (virtual seconds until the held-out loss first reaches
``TARGET_VAL_LOSS``), ``final_val_loss``, ``bytes_total``, ``energy_j``, ``utilization`` (share of
the participants' round time spent computing), plus the round count and wall seconds.

Scale: the model is tiny so the benchmark runs on a laptop CPU, and the virtual clock charges every
cost as GPT-2 small (``clock.charge_as: CHARGE_AS``, docs/profiles.md "Charged costs"): each
32-token sequence costs GPT-2 small's FLOPs, every broadcast and update is GPT-2 small's 124M
float32 parameters on the wire, and a node's memory must hold GPT-2 small's weights, gradients,
AdamW moments and activations. Profiles are the real ones. Compute and communication therefore
keep the ratio they would have on that fleet, and a phone that cannot hold GPT-2 small
(``phone-low``) sits out, as it would in reality.

``size="gpt-100m"`` (with ``device="cuda"``, ``precision="bf16"``) is the accelerator run: a GPT of
99 M parameters (GPT-2 small's width, 14 layers) on 256-byte sequences, profiles at their real
FLOP/s and memory (no scaling: the model is as large as the profiles assume). It measures how fast
the host trains it through the stage: ``tokens_per_s`` (trained tokens over the run's wall
seconds) and the rows' MFU (``mfu_measured``: FLOPs over the engine calls' wall time;
``mfu_compute``: over the workers' own forward/backward/optimizer seconds), against a matmul peak
measured on the same device in the same precision. Its time-to-target figures are not comparable
with the tiny model's.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

import torch

from cloudedge.config import config_from_dict
from cloudedge.errors import InputError
from cloudedge.perf import peak_gpu_mb
from cloudedge.pretrain.loop import pretrain

CHARGE_AS = "gpt2-124m"  # the tiny model's costs are charged as GPT-2 small (clock.charge_as)
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


# Model sizes: the tiny CPU models (quick / full) and the ~100M-parameter accelerator run.
GPT_100M = {"kind": "gpt", "hidden": 768, "layers": 14, "heads": 12, "context": 256}
SIZES = ("tiny", "gpt-100m")


def bench_config(quick: bool, size: str = "tiny", device: str = "cpu", precision: str = "fp32") -> dict[str, Any]:
    """The run config shared by every method (a plain dict, as a YAML file would hold it)."""
    if size not in SIZES:
        raise InputError(f"pretrain-hetero: size must be one of {', '.join(SIZES)}, got {size!r}")
    big = size == "gpt-100m"
    devices_per_kind = 1 if quick else 3
    return {
        "name": "pretrain-hetero",
        "seed": 0,
        "fleet": {
            "cloud": {"profile": "a100"},
            "edges": [{
                "count": 2, "profile": "edge-server",
                "devices": [
                    {"count": devices_per_kind, "profile": "jetson-orin"},
                    {"count": devices_per_kind, "profile": "phone-mid"},
                    {"count": devices_per_kind, "profile": "phone-low"},
                ],
            }],
        },
        # The 100M model is as large as the real profiles assume: it is charged as itself.
        **({} if big else {"clock": {"charge_as": CHARGE_AS}}),
        "data": {"source": "pydocs", "max_docs": 600 if quick else 4000, "partition": {"kind": "domain"},
                 "test_fraction": 0.1},
        "model": GPT_100M if big else {"kind": "gpt", "hidden": 32 if quick else 64, "layers": 2, "heads": 2,
                                       "context": 32},
        "pretrain": {"task": "lm", "rounds": SYNC_ROUNDS, "global_batch": 64, "local_steps": LOCAL_STEPS,
                     "lr": 6e-4 if big else 3e-3, "outer_lr": 0.7, "eval_every": 2, "eval_samples": 64,
                     "checkpoint_every": 1000, "target_val_loss": TARGET_VAL_LOSS,
                     "device": device, "precision": precision},
    }


def run(quick: bool, out_dir: Path, *, size: str = "tiny", device: str = "cpu", precision: str = "fp32",
        methods: list[str] | str | None = None, rounds: int | None = None, seeds: int = 1) -> dict[str, Any]:
    """Run every method (or ``methods``); returns the results dict the CLI writes to results.json.

    ``size``: ``tiny`` (default) or ``gpt-100m``; ``device`` / ``precision``: the ``pretrain``
    fields of the same names; ``rounds``: sync rounds per method (local methods run
    ``LOCAL_ROUNDS / SYNC_ROUNDS`` = 0.3 as many, each of ``LOCAL_STEPS`` steps; default 40, 160 without ``quick``); ``seeds``: repeat
    everything with seeds 0 .. seeds-1 (model, data partition, batches, availability). With more
    than one seed each method reports the median over seeds of every number, the per-seed values
    under ``per_seed``, and its speed-up's ``speedup_min`` / ``speedup_max``.
    """
    if seeds < 1:
        raise InputError(f"pretrain-hetero: seeds must be >= 1, got {seeds}")
    raw = bench_config(quick, size, device, precision)
    names = methods.split(",") if isinstance(methods, str) else list(methods or METHODS)
    unknown = [m for m in names if m not in METHODS]
    if unknown or not names:
        raise InputError(f"pretrain-hetero: methods must be among {', '.join(METHODS)}, got {names}")
    sync_rounds = rounds or SYNC_ROUNDS * (1 if quick else 4)
    runs: list[dict[str, dict[str, Any]]] = []
    # Tiny matrices on a CPU: one thread is fastest, and far faster than two on a busy shared
    # machine. The 100M model's matmuls use every thread the host has.
    threads = torch.get_num_threads()
    if size == "tiny":
        torch.set_num_threads(1)
    try:
        for seed in range(seeds):
            cfg = config_from_dict({**raw, "seed": seed}, source="pretrain-hetero")
            one: dict[str, dict[str, Any]] = {}
            for name in names:
                overrides = METHODS[name]
                n_rounds = (sync_rounds if overrides["algorithm"] == "sync"
                            else max(1, sync_rounds * LOCAL_ROUNDS // SYNC_ROUNDS))
                one[name] = _run_method(cfg, name, {**overrides, "rounds": n_rounds})
            base = one.get("sync-uniform", {}).get("time_to_target_s")
            for m in one.values():
                t = m["time_to_target_s"]
                m["speedup_vs_sync_uniform"] = (base / t) if (base and t) else None
            runs.append(one)
    finally:
        torch.set_num_threads(threads)
    methods_out = runs[0] if seeds == 1 else {name: _over_seeds([r[name] for r in runs]) for name in names}
    return {"benchmark": "pretrain-hetero",
            "config": {**raw, "quick": quick, "size": size, "seeds": seeds},
            "cost_model": runs[0][names[0]]["cost_model"],
            "methods": methods_out}


def _over_seeds(per_seed: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians over seeds of every numeric field (a seed that never reached the target counts as
    slower than any that did: None sorts last for times and first for speed-ups)."""
    out: dict[str, Any] = {}
    for key in per_seed[0]:
        values = [m[key] for m in per_seed]
        if not all(v is None or isinstance(v, int | float) for v in values):
            continue
        if key == "speedup_vs_sync_uniform":
            ranked = sorted(values, key=lambda v: -1.0 if v is None else v)
        else:
            ranked = sorted(values, key=lambda v: float("inf") if v is None else v)
        middle = ranked[(len(ranked) - 1) // 2: len(ranked) // 2 + 1]  # one value, or the middle two
        out[key] = None if None in middle else (middle[0] if len(middle) == 1 else sum(middle) / 2)
    speedups = [m["speedup_vs_sync_uniform"] for m in per_seed]
    reached = [v for v in speedups if v is not None]
    out["speedup_min"] = min(reached) if len(reached) == len(speedups) else None
    out["speedup_max"] = max(reached) if reached else None
    out["per_seed"] = per_seed
    return out


def _run_method(cfg: Any, name: str, overrides: dict[str, Any]) -> dict[str, Any]:
    """One method's run and its metrics."""
    device = cfg.pretrain.device
    if device != "cpu" and torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    result = pretrain(cfg, None, method=name, **overrides)
    wall_s = time.perf_counter() - t0
    s, rows = result.summary, result.metrics
    return {
        "time_to_target_s": s["time_to_target_s"], "final_val_loss": s["final_val_loss"],
        "bytes_total": s["bytes_total"], "energy_j": s["energy_j"], "utilization": s["utilization"],
        "virtual_time_s": s["virtual_time_s"], "mean_batch_per_step": s["mean_batch_per_step"],
        "rounds": s["rounds"], "wall_s": round(wall_s, 2),
        **host_speed(rows, cfg.pretrain.seq_len or cfg.stage_model("pretrain").context, wall_s),
        "peak_gpu_mb": peak_gpu_mb(), "excluded": s["excluded"], "cost_model": s["cost_model"],
    }


def host_speed(rows: list[dict[str, Any]], seq_len: int, wall_s: float) -> dict[str, Any]:
    """How fast this host trained: tokens per second over the run's wall time (everything: setup,
    evaluation, the clock), over the engine calls only, and over the workers' own compute; the
    rows' MFU as medians (the first round, which builds the models, is left out when there are more)."""
    tokens = sum(r["effective_batch"] for r in rows) * seq_len
    work = sum(r.get("work_wall_s", 0.0) for r in rows)
    compute = sum(r.get("compute_wall_s", 0.0) for r in rows)
    steady = rows[1:] if len(rows) > 1 else rows

    def median(key: str) -> float | None:
        values = [r[key] for r in steady if r.get(key) is not None]
        return float(statistics.median(values)) if values else None

    return {"tokens": tokens, "tokens_per_s": tokens / wall_s if wall_s > 0 else None,
            "tokens_per_s_engine": tokens / work if work > 0 else None,
            "tokens_per_s_compute": tokens / compute if compute > 0 else None,
            "mfu_measured_median": median("mfu_measured"), "mfu_compute_median": median("mfu_compute"),
            "peak_flops_measured": steady[-1].get("peak_flops_measured") if steady else None}


if __name__ == "__main__":  # python -m cloudedge.bench.pretrain_hetero [--full]
    import json
    import sys

    res = run("--full" not in sys.argv, Path("."))
    print(json.dumps(res["methods"], indent=1))
