"""Benchmark `finetune-hier`: hierarchical LoRA fine-tuning under five synchronization policies, in
the regime where the hierarchy pays (docs/finetuning.md, "Benchmark `finetune-hier`").

The regime, fixed before the measured runs and the same for every method:

- Costs charged as ViT-B/16 (``clock.charge_as: vit-b16``) with the run's LoRA (rank 8 on
  query/value, ``ffa``): one device update is B + head of that model, ~0.6 MB, 0.18% of its 344 MB.
- Three edges that differ in their device mix, their WAN link to the cloud and their data
  (:data:`EDGES`): Jetson AGX Orin and Orin Nano devices on Wi-Fi (100 Mbit/s, 5 ms) to their
  edge; WAN links of tens of Mbit/s and tens of ms; Dirichlet alpha 1.0 / 0.3 / 0.1 per edge
  (``data.partition.edge_alpha``).
- Data: ``glyphs`` digits, 28x28, with at least 2,000 test images (every evaluation uses all).
- Base: a small ViT pre-trained by the pre-training stage itself on *glyph letters* (another
  task), so the digits are new to it; its encoder becomes the backbone (new head).
- Every method is scored on one virtual-time grid (``finetune.eval_every_s``): the same instants.
- Targets, by a rule fixed before the runs: 0.9 (``time_to_target_s``) and 0.8 (``time_to_080_s``)
  x the test accuracy of *centralized* fine-tuning (the same model, adapters, optimizer, batch and
  learning rate; one worker holding every device's data) after ``central_steps`` steps.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from cloudedge.config import config_from_dict
from cloudedge.config.fleet import AvailabilitySpec
from cloudedge.engine import LocalEngine
from cloudedge.errors import InputError
from cloudedge.finetune.loop import HierFinetune, TaskData
from cloudedge.finetune.stage import prepare_task, settings_from_config
from cloudedge.finetune.workers import FinetuneWorker
from cloudedge.fleet import Fleet

METHODS = ("fedavg2", "hierfavg", "tempo", "adaptive-interval", "autonomous")
# A method "reaches the target" at 90% of what centralized fine-tuning reaches (and the lower
# level at 80%): the usual way to compare time-to-accuracy when federated training on non-IID data
# converges lower. Both fixed before any method runs.
TARGET_FRACTION = 0.9
LOW_FRACTION = 0.8
MBIT = 1e6 / 8  # bytes/s per Mbit/s
# Per edge: its devices (AGX Orin, Orin Nano), its WAN link to the cloud, its data's Dirichlet alpha.
# The edge with the fastest devices sits behind the slowest link (a sync costs it the most edge
# rounds) and has the least skewed data; the one with the slowest devices has the fastest link and
# the most skewed data: link cost and drift both vary across edges, in opposite directions.
EDGES: tuple[dict[str, float], ...] = (
    {"agx": 6, "nano": 2, "wan_mbit": 20, "wan_ms": 60, "alpha": 1.0},
    {"agx": 4, "nano": 4, "wan_mbit": 25, "wan_ms": 40, "alpha": 0.3},
    {"agx": 2, "nano": 6, "wan_mbit": 50, "wan_ms": 20, "alpha": 0.1},
)
WIFI = {"uplink_Bps": 100 * MBIT, "downlink_Bps": 100 * MBIT, "latency_s": 0.005}


def bench_settings(quick: bool) -> dict[str, Any]:
    """The benchmark's own knobs (besides the run config): pre-training, the reference, the grid."""
    return {
        "target_fraction": TARGET_FRACTION,
        "low_fraction": LOW_FRACTION,
        "central_steps": 1200,  # steps of the centralized reference
        "pretrain_rounds": 300 if quick else 600,
        "time_budget_s": 30.0 if quick else 90.0,
        "grid_points": 15 if quick else 30,
        "train_size": 4000 if quick else 8000,
        "test_size": 2000,
    }


def bench_fleet(devices_per_edge: int = 8) -> dict[str, Any]:
    """The ``fleet`` section: one edge-server per :data:`EDGES` entry, its WAN link and devices
    (``devices_per_edge`` of them, in the entry's AGX : Nano proportion; the demo uses 4)."""
    edges = []
    for e in EDGES:
        agx = max(1, round(e["agx"] * devices_per_edge / (e["agx"] + e["nano"])))
        edges.append({
            "count": 1, "profile": "edge-server",
            "overrides": {"wan_uplink_Bps": e["wan_mbit"] * MBIT, "wan_downlink_Bps": e["wan_mbit"] * MBIT,
                          "wan_latency_s": e["wan_ms"] / 1000},
            "devices": [{"count": agx, "profile": "jetson-orin", "overrides": WIFI},
                        {"count": max(1, devices_per_edge - agx), "profile": "jetson-orin-nano", "overrides": WIFI}],
        })
    # Orin Nano 8 GB: half the AGX Orin's GPU (1,024 CUDA / 32 tensor cores vs 2,048 / 64) at about
    # half its clock (625 MHz vs 1.3 GHz): a quarter of its throughput; 8 GB shared memory.
    nano = {"base": "jetson-orin", "flops": 8.5e12 / 4, "memory_bytes": 8 * 1024**3}
    return {"cloud": {"profile": "a100"}, "edges": edges, "profiles": {"jetson-orin-nano": nano}}


def bench_config(quick: bool) -> dict[str, Any]:
    """The run config (as a dict) every method shares; ``target_accuracy`` is set at run time."""
    b = bench_settings(quick)
    regime = regime_sections(b["time_budget_s"], b["grid_points"])
    glyphs = {"classes": "digits", "train_size": b["train_size"], "test_size": b["test_size"]}
    return {
        "name": "finetune-hier",
        "seed": 0,
        "fleet": regime["fleet"],
        "clock": regime["clock"],
        "data": {"source": "glyphs", "image_size": 28, "glyphs": glyphs, "partition": regime["partition"]},
        "model": {"kind": "vit", "hidden": 64, "layers": 2, "heads": 4, "image_size": 28, "patch_size": 7,
                  "channels": 1},
        "pretrain": {
            "task": "classify", "workers": ["cloud"], "rounds": b["pretrain_rounds"], "global_batch": 64,
            "lr": 3e-3, "eval_every": b["pretrain_rounds"], "checkpoint_every": b["pretrain_rounds"],
            "data": {"source": "glyphs", "image_size": 28, "test_fraction": 0.2,
                     "glyphs": {"classes": "letters", "train_size": 4000, "test_size": 500}},
        },
        "finetune": regime["finetune"],
    }


def regime_sections(budget_s: float, grid_points: int, devices_per_edge: int = 8,
                    charge_as: str = "vit-b16") -> dict[str, Any]:
    """The regime as config sections to lay over a run config (the benchmark's, or the demo's
    fine-tuning stage at demo size): fleet, charged model, per-edge skew, LoRA, sync, evaluation grid."""
    return {
        "fleet": bench_fleet(devices_per_edge),
        "clock": {"charge_as": charge_as},
        "partition": {"kind": "dirichlet", "edge_alpha": [e["alpha"] for e in EDGES], "min_samples": 8},
        "finetune": {
            "lora": {"rank": 8, "alpha": 16.0, "mode": "ffa"},  # default targets: query/value
            "sync": {"name": "autonomous", "k1": 5, "k2": 2, "deadline_factor": 2.0, "max_steps": 20},
            "batch_size": 8, "optimizer": "adamw", "lr": 1e-2,
            "time_budget_s": budget_s, "max_cloud_rounds": 1000, "eval_every_s": budget_s / grid_points,
        },
    }


def pretrain_base(cfg: Any) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The base model from the pre-training stage (its ``pretrain`` section); tensors and summary."""
    from cloudedge.pretrain import pretrain

    result = pretrain(cfg, run_dir=None)
    tensors = {k: v.detach().clone() for k, v in result.model.state_dict().items()}
    return tensors, result.summary


def central_reference(task: TaskData, lora_mode: str, batch_size: int, lr: float, steps: int, seed: int,
                      eval_max: int | None, device: str = "cpu", precision: str = "fp32") -> float:
    """Test accuracy of centralized fine-tuning: one worker holding every device's data trains the
    same adapters and head for ``steps`` steps from the same initial state (the target's reference),
    on the run's ``finetune.device`` and in its ``precision``."""
    spec = {**task.spec, "mode": lora_mode}
    union = {k: torch.cat([d[k] for d in task.device_data.values()]) for k in next(iter(task.device_data.values()))}
    central = FinetuneWorker(spec, union, batch_size=batch_size, optimizer="adamw", lr=lr, device=device,
                             precision=precision)
    judge = FinetuneWorker(spec, task.test_data, batch_size=batch_size, device=device, precision=precision)
    state = central.initial_state()
    update = central.train(state, steps=steps, seed=seed)["update"]
    trained = {**state, **{k: state[k] + v for k, v in update.items()}}
    return float(judge.evaluate(trained, max_samples=eval_max)["acc"])


def curve_metrics(curve: list[tuple[float, float]], levels: dict[str, float], budget: float) -> dict[str, Any]:
    """From a grid curve ``[(t, acc)]``: the first instant at or above each level (None: never) and
    ``auc``, the trapezoid area under accuracy over ``[0, budget]`` divided by ``budget`` (the mean
    accuracy over the run: 1.0 = perfect from the start)."""
    out: dict[str, Any] = {name: next((t for t, a in curve if a >= level), None) for name, level in levels.items()}
    area = sum((t1 - t0) * (a0 + a1) / 2 for (t0, a0), (t1, a1) in zip(curve, curve[1:], strict=False))
    out["auc"] = area / budget if budget > 0 else None
    return out


def k2_by_edge(history: list[dict[str, Any]]) -> dict[str, list[tuple[float, int]]]:
    """Per edge, ``(virtual time, k2)`` at each of its cloud syncs (async merges and barrier syncs)."""
    from cloudedge.track.plots import k2_series

    series = k2_series([{**r, "method": "m"} for r in history]).get("m", {})
    return {e: [(round(t, 3), k) for t, k in zip(xs, ys, strict=True)] for e, (xs, ys) in sorted(series.items())}


def online_devices_mean(history: list[dict[str, Any]]) -> float | None:
    """Mean devices online over a run's cloud-update rows (the grid's score rows carry no device
    counts); None when there are none."""
    updates = [r["online_devices"] for r in history if "online_devices" in r]
    return sum(updates) / len(updates) if updates else None


def run(quick: bool, out_dir: Path, methods: tuple[str, ...] = METHODS, availability: str = "bernoulli",
        diurnal_methods: tuple[str, ...] = ("hierfavg", "autonomous")) -> dict[str, Any]:
    """Run every method on the same setting; returns the results dict (also what the CLI writes).

    ``availability``: ``bernoulli`` (the profiles' per-round draws), ``diurnal`` (every method under
    the bundled diurnal model instead) or ``both`` (the Bernoulli rows, plus ``diurnal_methods``
    again under the diurnal model as rows ``NAME (diurnal)``; same data, base and target)."""
    if availability not in ("bernoulli", "diurnal", "both"):
        raise InputError(f"finetune-hier: availability must be bernoulli, diurnal or both, not {availability!r}")
    torch.set_num_threads(1)  # tiny models: one thread is faster than two contending ones
    b = bench_settings(quick)
    raw = bench_config(quick)
    cfg = config_from_dict(raw, source="finetune-hier")
    t0 = time.perf_counter()
    base, pre_summary = pretrain_base(cfg)
    pretrain_s = time.perf_counter() - t0
    fleet = Fleet.from_config(cfg.fleet, cfg.seed)
    task = prepare_task(cfg, fleet, base_tensors=base)
    ft = cfg.finetune
    assert ft is not None
    t1 = time.perf_counter()
    central_acc = central_reference(task, ft.lora.mode.name, ft.batch_size, ft.lr, b["central_steps"], cfg.seed, ft.eval_max,
                                    ft.device, ft.precision)
    central_s = time.perf_counter() - t1
    target = round(b["target_fraction"] * central_acc, 4)
    low = round(b["low_fraction"] * central_acc, 4)
    results: dict[str, Any] = {}
    histories: dict[str, list[dict[str, Any]]] = {}
    diurnal = Fleet.from_config(cfg.fleet.model_copy(update={"availability": AvailabilitySpec(kind="diurnal")}),
                                cfg.seed)  # the same devices (ids, profiles, data) online by the diurnal model
    runs = [(name, name, diurnal if availability == "diurnal" else fleet) for name in methods]
    if availability == "both":
        runs += [(f"{name} (diurnal)", name, diurnal) for name in diurnal_methods]
    for label, name, run_fleet in runs:
        t2 = time.perf_counter()
        settings = settings_from_config(cfg, policy=name)
        settings.target_accuracy = target
        loop = HierFinetune(run_fleet, task, settings, LocalEngine(copy=False, check=False), method=label)
        summary = loop.run()
        summary["wall_s"] = round(time.perf_counter() - t2, 2)
        curve = [(round(r["virtual_time_s"], 4), round(r["acc"], 4)) for r in loop.history if r.get("eval") == "grid"]
        summary.update(curve_metrics(curve, {"time_to_080_s": low}, ft.time_budget_s))
        summary["accuracy_curve"] = curve
        summary["k2_by_edge"] = k2_by_edge(loop.history)
        merges = [r for r in loop.history if "staleness" in r]
        if merges:  # asynchronous merges: how stale they were, how many the staleness rule discounted
            summary["staleness_max"] = max(r["staleness"] for r in merges)
            summary["merges_discounted"] = sum(r["staleness"] > len(fleet.edges) - 1 for r in merges)
        summary["availability"] = run_fleet.availability.kind
        summary["online_devices_mean"] = online_devices_mean(loop.history)
        results[label] = summary
        histories[label] = loop.history
    _plot(histories, out_dir)
    n_test = int(task.test_data["labels"].shape[0])
    return {
        "benchmark": "finetune-hier",
        "config": {**raw, **b, "quick": quick, "availability": availability, "devices": len(fleet.devices),
                   "edges": len(fleet.edges), "edge_regime": list(EDGES), "lora_mode": ft.lora.mode.name,
                   "hardware": "virtual clock; real work on this machine's CPU"},
        "charged_model": next(iter(results.values()))["cost_model"] if results else None,
        "pretrain": {"wall_s": round(pretrain_s, 2), "final_val_loss": pre_summary.get("final_val_loss"),
                     "virtual_time_s": pre_summary.get("virtual_time_s")},
        "reference": {"central_steps": b["central_steps"], "central_acc": central_acc,
                      "target_fraction": b["target_fraction"], "target_accuracy": target,
                      "low_fraction": b["low_fraction"], "low_accuracy": low, "test_images": n_test,
                      # the standard error of one accuracy measured on n_test images, at the reference
                      "standard_error": round((central_acc * (1 - central_acc) / n_test) ** 0.5, 4),
                      "wall_s": round(central_s, 2)},
        "methods": results,
        "ratios": _ratios(results),
    }


def _plot(histories: dict[str, list[dict[str, Any]]], out_dir: Path) -> None:
    """``plots/``: accuracy on the grid and each edge's k2 over virtual time, a line per method/edge."""
    from cloudedge.track.plots import curve_plots, k2_plot

    rows = [{**r, "stage": "finetune", "method": m} for m, h in histories.items() for r in h]
    curve_plots([r for r in rows if r.get("eval") == "grid" or "k2" not in r and "acc" in r], out_dir / "plots")
    k2_plot(rows, out_dir / "plots")


def _ratios(results: dict[str, Any]) -> dict[str, float | None]:
    """The goal's ratios of time to target (None when either did not reach it)."""
    def ratio(a: str, b: str) -> float | None:
        ta, tb = results.get(a, {}).get("time_to_target_s"), results.get(b, {}).get("time_to_target_s")
        return round(ta / tb, 3) if ta is not None and tb else None

    return {"hierfavg_vs_fedavg2_time": ratio("hierfavg", "fedavg2"),
            "autonomous_vs_hierfavg_time": ratio("autonomous", "hierfavg"),
            "autonomous_vs_fedavg2_time": ratio("autonomous", "fedavg2")}
