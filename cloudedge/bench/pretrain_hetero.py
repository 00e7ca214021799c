"""Benchmark `pretrain-hetero`: batch adaptation and local updates on a heterogeneous fleet.

A small GPT learns on `pydocs` (byte-level, 32-byte sequences) while the virtual clock charges every
cost as GPT-2 small (``clock: {charge_as: gpt2-124m, seq_len: 512}``, docs/profiles.md "Charged
costs"): each trained sequence is charged as one 512-token GPT-2 sequence (408 GFLOPs to train),
every broadcast and update is GPT-2 small's 498 MB, and a node must hold its weights, gradients,
AdamW moments and activations. No per-benchmark scaling: profiles are the real ones.

Two regimes, each against its own ``sync-uniform`` baseline:

- ``compute``: the fleet's compute nodes on fast links (cloud A100, two T4 edge servers, two Jetson
  AGX Orin; every link 400 Gbit/s, 1 ms), throughputs spanning 14.7x. Two Raspberry Pi 4 are in the
  fleet too and are excluded by the memory model (GPT-2 small's 2 GB of weights and optimizer state
  leave no room for one sample in its usable 2 GB); the results list them under ``excluded``.
  Here the ideal speed-up of throughput-proportional batches over uniform ones is mean / min
  throughput (``ideal_speedup``): a uniform round waits for the slowest worker's B/n samples, a
  proportional one takes B over the summed throughput.
  Methods: sync with ``uniform``, ``proportional`` (data floor 0.5), ``proportional-nofloor``,
  ``reweighted``, ``goodput`` and ``learned`` batches.
- ``wan``: the same fleet with two mid-range phones per edge (5G) and an entry-level one (4G, which
  cannot hold the model), every node on its profile's own link. Methods: ``sync-uniform``,
  ``sync-reweighted`` and DiLoCo (``local``, Nesterov outer step) with H in {1, 8, 32} inner steps
  and ``reweighted`` batches (``local-H8`` ...).

Rules fixed before the runs: ``sync-uniform`` runs ``rounds`` rounds; its virtual end time is the
regime's budget and every other method runs until the budget is spent. Every method is scored on one
common grid of ``GRID_POINTS`` virtual instants (budget x k / GRID_POINTS): the loss at an instant is
that of the model in force then (every round's model is evaluated on ``EVAL_SEQUENCES`` held-out
sequences), so how often a method is evaluated cannot move its first crossing. The target is the
loss sync-uniform has at the end of its budget; ``time_to_target_s`` is a method's first grid
instant at or below it, ``speedup`` the baseline's time over it, ``final_val_loss`` the loss at the
budget. Seeds 0 .. seeds-1 (3 quick, 5 full) change the model, the data partition, batches and
availability; every number is the median over seeds, ``speedup_min`` / ``speedup_max`` the range,
``per_seed`` the rest.

``size="gpt-100m"`` (with ``device="cuda"``, ``precision="bf16"``) is the accelerator run: a GPT of
99 M parameters (GPT-2 small's width, 14 layers) on 256-byte sequences, charged as itself. It
measures how fast the host trains it: ``tokens_per_s`` and the rows' MFU (``mfu_measured``: FLOPs
over the engine calls' wall time; ``mfu_compute``: over the workers' own compute seconds).
"""

from __future__ import annotations

import json
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from cloudedge.config import config_from_dict
from cloudedge.errors import InputError
from cloudedge.fleet import Fleet
from cloudedge.perf import peak_gpu_mb
from cloudedge.pretrain.stage import pretrain

CHARGE_AS = "gpt2-124m"  # the tiny model's costs are charged as GPT-2 small (clock.charge_as)
CHARGED_SEQ_LEN = 512  # tokens per charged sequence: one trained 32-byte sequence stands for one of these
GLOBAL_BATCH = {"compute": 128, "wan": 64}  # sequences per step: 65,536 / 32,768 charged tokens
GRID_POINTS = 40  # the common evaluation grid: budget x k / GRID_POINTS, k = 1 .. GRID_POINTS
EVAL_SEQUENCES = 512  # held-out sequences every model is scored on
ROUNDS = {"compute": 8, "wan": 6}  # sync-uniform's rounds (its budget), quick; the full run does 2x
MAX_ROUNDS_FACTOR = 60  # safety: no method runs more than this many times the baseline's rounds
FAST_LINK = {"uplink_Bps": 5e10, "downlink_Bps": 5e10, "latency_s": 0.001}  # 400 Gbit/s, 1 ms
REGIMES = ("compute", "wan")

# Batches above a worker's memory cap run as accumulated micro-batches (same FLOPs, same charged
# time), so no controller here shrinks the global batch to what fits at once (``memory_cap: false``).
ACCUMULATE = {"memory_cap": False}
METHODS: dict[str, dict[str, Any]] = {
    "compute/sync-uniform": {"algorithm": "sync", "controller": "uniform"},
    "compute/sync-proportional": {"algorithm": "sync", "controller": {"name": "proportional", **ACCUMULATE}},
    "compute/sync-proportional-nofloor": {"algorithm": "sync",
                                          "controller": {"name": "proportional", **ACCUMULATE, "data_floor": 0.0}},
    "compute/sync-reweighted": {"algorithm": "sync", "controller": {"name": "reweighted", **ACCUMULATE}},
    "compute/goodput": {"algorithm": "sync", "controller": {"name": "goodput", **ACCUMULATE, "lr_power": 0.5}},
    "compute/learned": {"algorithm": "sync", "controller": "learned"},
    "wan/sync-uniform": {"algorithm": "sync", "controller": "uniform"},
    "wan/sync-reweighted": {"algorithm": "sync", "controller": {"name": "reweighted", **ACCUMULATE}},
    **{f"wan/local-H{h}": {"algorithm": "local", "controller": {"name": "reweighted", **ACCUMULATE}, "local_steps": h}
       for h in (1, 8, 32)},
}

# Model sizes: the tiny CPU models (quick / full) and the ~100M-parameter accelerator run.
GPT_100M = {"kind": "gpt", "hidden": 768, "layers": 14, "heads": 12, "context": 256}
SIZES = ("tiny", "gpt-100m")


def fleet_config(regime: str) -> dict[str, Any]:
    """The fleet of a regime (see the module docstring)."""
    if regime == "compute":
        fast = {"overrides": FAST_LINK}
        return {"cloud": {"profile": "a100", **fast},
                "edges": [{"count": 2, "profile": "edge-server", **fast,
                           "devices": [{"count": 1, "profile": "jetson-orin", **fast},
                                       {"count": 1, "profile": "raspberry-pi-4", **fast}]}]}
    return {"cloud": {"profile": "a100"},
            "edges": [{"count": 2, "profile": "edge-server",
                       "devices": [{"count": 1, "profile": "jetson-orin"}, {"count": 1, "profile": "raspberry-pi-4"},
                                   {"count": 2, "profile": "phone-mid"}, {"count": 1, "profile": "phone-low"}]}]}


def bench_config(quick: bool, size: str = "tiny", device: str = "cpu", precision: str = "fp32",
                 regime: str = "compute") -> dict[str, Any]:
    """The run config of a regime, shared by its methods (a plain dict, as a YAML file would hold it)."""
    if size not in SIZES:
        raise InputError(f"pretrain-hetero: size must be one of {', '.join(SIZES)}, got {size!r}")
    big = size == "gpt-100m"
    return {
        "name": f"pretrain-hetero-{regime}",
        "seed": 0,
        "fleet": fleet_config(regime),
        # The 100M model is as large as the real profiles assume: it is charged as itself.
        **({} if big else {"clock": {"charge_as": CHARGE_AS, "seq_len": CHARGED_SEQ_LEN}}),
        "data": {"source": "pydocs", "max_docs": 600 if quick else 2000, "partition": {"kind": "domain"},
                 "test_fraction": 0.1},
        "model": GPT_100M if big else {"kind": "gpt", "hidden": 32, "layers": 2, "heads": 2, "context": 32},
        "pretrain": {"task": "lm", "rounds": ROUNDS[regime], "global_batch": GLOBAL_BATCH[regime], "local_steps": 8,
                     "lr": 6e-4 if big else 3e-3, "outer_lr": 0.7, "eval_every": 1, "eval_samples": EVAL_SEQUENCES,
                     "checkpoint_every": 100_000, "device": device, "precision": precision},
    }


def ideal_speedup(throughputs: list[float]) -> float:
    """Throughput-proportional over uniform batches, compute only: a uniform round takes B/n samples
    at the slowest rate, a proportional one B over the summed rates: mean / min throughput."""
    return (sum(throughputs) / len(throughputs)) / min(throughputs)


def grid_losses(rows: list[dict[str, Any]], budget: float, points: int = GRID_POINTS) -> list[float | None]:
    """The validation loss in force at each grid instant budget x k / points (k = 1 .. points): that
    of the last evaluated model whose round ended at or before the instant (None before any)."""
    out: list[float | None] = []
    evaluated = [(r["virtual_time_s"], r["val_loss"]) for r in rows if r.get("val_loss") is not None]
    for k in range(1, points + 1):
        t = budget * k / points
        known = [loss for when, loss in evaluated if when <= t * (1 + 1e-12)]
        out.append(known[-1] if known else None)
    return out


def first_crossing(losses: list[float | None], budget: float, target: float) -> float | None:
    """The first grid instant whose loss is at or below ``target`` (None: never within the budget)."""
    for k, loss in enumerate(losses, start=1):
        if loss is not None and loss <= target + 1e-12:
            return budget * k / len(losses)
    return None


def run(quick: bool, out_dir: Path | None, *, size: str = "tiny", device: str = "cpu", precision: str = "fp32",
        methods: list[str] | str | None = None, rounds: int | None = None, seeds: int | None = None) -> dict[str, Any]:
    """Run every method (or ``methods``, names as ``compute/sync-reweighted``; a regime's
    sync-uniform always runs, it sets the budget and the target); returns the results dict.

    ``size``: ``tiny`` (default) or ``gpt-100m``; ``device`` / ``precision``: the ``pretrain``
    fields of the same names; ``rounds``: sync-uniform's rounds in every regime (default
    ``ROUNDS``, 2x without ``quick``); ``seeds``: 3 quick, 5 full.
    """
    seeds = seeds if seeds is not None else (3 if quick else 5)
    if seeds < 1:
        raise InputError(f"pretrain-hetero: seeds must be >= 1, got {seeds}")
    names = methods.split(",") if isinstance(methods, str) else list(methods or METHODS)
    unknown = [m for m in names if m not in METHODS]
    if unknown or not names:
        raise InputError(f"pretrain-hetero: methods must be among {', '.join(METHODS)}, got {names}")
    if size not in SIZES:
        raise InputError(f"pretrain-hetero: size must be one of {', '.join(SIZES)}, got {size!r}")
    # Tiny matrices on a CPU: one thread is fastest, and far faster than two on a busy shared
    # machine. The 100M model's matmuls use every thread the host has.
    threads = torch.get_num_threads()
    if size == "tiny":
        torch.set_num_threads(1)
    regimes: dict[str, Any] = {}
    out_methods: dict[str, Any] = {}
    partial = _Partial(Path(out_dir) / PARTIAL if out_dir is not None else None)
    try:
        for regime in REGIMES:
            wanted = [m for m in METHODS if m.startswith(f"{regime}/") and (m in names or m.endswith("/sync-uniform"))]
            if not any(m in names for m in wanted):
                continue
            raw = bench_config(quick, size, device, precision, regime)
            n_rounds = rounds or ROUNDS[regime] * (1 if quick else 2)
            per_seed = [_run_regime(raw, regime, seed, wanted, n_rounds, partial.add) for seed in range(seeds)]
            regimes[regime] = _regime_summary(raw, per_seed, n_rounds)
            for name in wanted:
                out_methods[name] = _over_seeds([one["methods"][name] for one in per_seed])
                if regime == "compute" and out_methods[name]["speedup"] is not None:
                    out_methods[name]["fraction_of_ideal"] = out_methods[name]["speedup"] / regimes[regime]["ideal_speedup"]
    finally:
        torch.set_num_threads(threads)
    partial.remove()  # the whole result follows (results.json)
    first = next(iter(out_methods.values()))["per_seed"][0]
    res = {"benchmark": "pretrain-hetero",
           "config": {"quick": quick, "size": size, "seeds": seeds, "global_batch": GLOBAL_BATCH,
                      "grid_points": GRID_POINTS, "eval_sequences": EVAL_SEQUENCES,
                      "regimes": {r: bench_config(quick, size, device, precision, r) for r in regimes}},
           "charged_model": None if size == "gpt-100m" else CHARGE_AS,
           "charged_seq_len": None if size == "gpt-100m" else CHARGED_SEQ_LEN,
           "ideal_speedup": regimes.get("compute", {}).get("ideal_speedup"),
           "cost_model": first["cost_model"], "regimes": regimes, "methods": out_methods}
    curves = {name: m["per_seed"][0]["learning_curve"] for name, m in out_methods.items()
              if m["per_seed"][0].get("learning_curve")}
    if curves:
        res["learned"] = {"learning_curves_seed0": curves}
        if out_dir is not None:
            res["learned"]["plot"] = _plot_curves(curves, Path(out_dir))
    return res


def _run_regime(raw: dict[str, Any], regime: str, seed: int, names: list[str], rounds: int,
                done: Callable[[int, str, dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """One seed of a regime: sync-uniform sets the budget and the target, then every method
    (``done(seed, name, metrics)`` after each, for the partial results)."""
    cfg = config_from_dict({**raw, "seed": seed}, source=f"pretrain-hetero ({regime})")
    base_name = f"{regime}/sync-uniform"
    base = _run_method(cfg, base_name, {**METHODS[base_name], "rounds": rounds})
    budget = base["virtual_time_s"]
    results = {base_name: base}
    if done:
        done(seed, base_name, base)
    for name in names:
        if name != base_name:
            results[name] = _run_method(cfg, name, {**METHODS[name], "rounds": rounds * MAX_ROUNDS_FACTOR,
                                                    "time_budget_s": budget})
            if done:
                done(seed, name, results[name])
    grids = {name: grid_losses(m.pop("rows"), budget) for name, m in results.items()}
    target = grids[base_name][-1]
    t_base = first_crossing(grids[base_name], budget, target) if target is not None else None
    for name, m in results.items():
        t = first_crossing(grids[name], budget, target) if target is not None else None
        m.update(time_to_target_s=t, speedup=(t_base / t) if (t_base and t) else None,
                 final_val_loss=grids[name][-1], grid_val_loss=grids[name])
    return {"methods": results, "budget_s": budget, "target_val_loss": target,
            "excluded": base["excluded"], "workers": base["workers"]}


def _regime_summary(raw: dict[str, Any], per_seed: list[dict[str, Any]], rounds: int) -> dict[str, Any]:
    """The rule's numbers per seed, who trained and who was excluded, and the ideal speed-up."""
    cfg = config_from_dict(raw, source="pretrain-hetero")
    fleet = Fleet.from_config(cfg.fleet, 0)
    workers = per_seed[0]["workers"]
    throughputs = [fleet.nodes[w].profile.flops for w in workers]  # samples/s up to one FLOPs/sample
    return {"baseline_rounds": rounds, "budget_s": [s["budget_s"] for s in per_seed],
            "target_val_loss": [s["target_val_loss"] for s in per_seed],
            "workers": workers, "excluded": per_seed[0]["excluded"],
            "throughput_span": max(throughputs) / min(throughputs), "ideal_speedup": ideal_speedup(throughputs)}


def _over_seeds(per_seed: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians over seeds of every numeric field (a seed that never reached the target counts as
    slower than any that did: None sorts last for times and first for speed-ups)."""
    out: dict[str, Any] = {}
    for key in per_seed[0]:
        values = [m[key] for m in per_seed]
        if not all(v is None or isinstance(v, int | float) for v in values) or isinstance(values[0], bool):
            continue
        if key == "speedup":
            ranked = sorted(values, key=lambda v: -1.0 if v is None else v)
        else:
            ranked = sorted(values, key=lambda v: float("inf") if v is None else v)
        middle = ranked[(len(ranked) - 1) // 2: len(ranked) // 2 + 1]  # one value, or the middle two
        out[key] = None if None in middle else (middle[0] if len(middle) == 1 else sum(middle) / 2)
    speedups = [m["speedup"] for m in per_seed]
    reached = [v for v in speedups if v is not None]
    out["speedup_min"] = min(reached) if len(reached) == len(speedups) else None
    out["speedup_max"] = max(reached) if reached else None
    out["excluded"] = per_seed[0]["excluded"]
    out["per_seed"] = per_seed
    return out


def _run_method(cfg: Any, name: str, overrides: dict[str, Any]) -> dict[str, Any]:
    """One method's run: its rows (for the grid) and its metrics up to the budget."""
    device = cfg.pretrain.device
    if device != "cpu" and torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    result = pretrain(cfg, None, method=name, **overrides)
    wall_s = time.perf_counter() - t0
    s, rows = result.summary, result.rows
    budget = overrides.get("time_budget_s") or s["virtual_time_s"]
    within = [r for r in rows if r["virtual_time_s"] <= budget * (1 + 1e-12)] or rows[:1]
    inflation = [r["ctl_variance_inflation"] for r in rows if r.get("ctl_variance_inflation") is not None]
    return {
        "rows": rows, "utilization": s["utilization"], "virtual_time_s": s["virtual_time_s"],
        # Bytes and energy up to the budget (the last round may end past it).
        "bytes_total": within[-1]["bytes_total"], "energy_j": within[-1]["energy_j"],
        "mean_batch_per_step": s["mean_batch_per_step"], "rounds": s["rounds"], "wall_s": round(wall_s, 2),
        "variance_inflation": statistics.mean(inflation) if inflation else None,
        **host_speed(rows, cfg.pretrain.seq_len or cfg.stage_model("pretrain").context, wall_s),
        "peak_gpu_mb": peak_gpu_mb(), "excluded": s["excluded"], "cost_model": s["cost_model"],
        "workers": sorted({w for w in _trained(cfg, s)}),
        "learning_curve": s.get("controller", {}).get("learning_curve"),
    }


PARTIAL = "partial.json"


class _Partial:
    """``out_dir/partial.json``: every method run finished so far (its measures, not its rows),
    rewritten after each one, so a run stopped part-way (a timeout on a lent GPU) keeps what it
    measured. Removed once the whole result is ready."""

    def __init__(self, path: Path | None):
        self.path, self.finished = path, []

    def add(self, seed: int, name: str, metrics: dict[str, Any]) -> None:
        if self.path is None:
            return
        rows = metrics.get("rows") or []
        last_loss = next((r["val_loss"] for r in reversed(rows) if r.get("val_loss") is not None), None)
        self.finished.append({"method": name, "seed": seed, "last_val_loss": last_loss,
                              **{k: v for k, v in metrics.items() if k not in ("rows", "learning_curve")}})
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"benchmark": "pretrain-hetero", "complete": False, "finished": self.finished},
                                  indent=1, default=float))
        os.replace(tmp, self.path)

    def remove(self) -> None:
        if self.path is not None:
            self.path.unlink(missing_ok=True)


def _trained(cfg: Any, summary: dict[str, Any]) -> list[str]:
    """The nodes that could train (not excluded), in fleet order."""
    fleet = Fleet.from_config(cfg.fleet, cfg.seed)
    return [n for n in fleet.nodes if n not in summary["excluded"]]


def _plot_curves(curves: dict[str, dict[str, Any]], out_dir: Path) -> str | None:
    """The learned controller's offline learning curve(s) as out_dir/learned_curve.png."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    out_dir.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for name, c in curves.items():
        xs = [c["window"] * (i + 1) for i in range(len(c["mean_return"]))]
        ax.plot(xs, c["mean_return"], label=name)
    ax.axhline(1.0, color="grey", lw=0.8, ls="--", label="uniform batches")
    ax.set_xlabel("training episode (offline, on the virtual clock)")
    ax.set_ylabel("progress per second / uniform's")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = out_dir / "learned_curve.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path.name


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
    print(json.dumps({k: {m: v for m, v in x.items() if m != "per_seed"} for k, x in res["methods"].items()}, indent=1))
