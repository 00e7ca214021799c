"""Benchmark `finetune-hier`: hierarchical LoRA fine-tuning under five synchronization policies.

Setting (fixed before the measured runs; docs/finetuning.md, "Benchmark `finetune-hier`"):

- Fleet: 3 edges x 8 devices; each edge's devices 3 phone-mid (100 GFLOP/s), 3 phone-low
  (20 GFLOP/s), 2 raspberry-pi-4 (8 GFLOP/s): a 12.5x speed spread, availability from the profiles.
- Data: digits, 20% test; the training split dealt over the 24 devices by Dirichlet(0.3) on labels.
- Base: a small ViT pre-trained by the real pre-training stage (``cloudedge.pretrain.pretrain``,
  task ``classify``, the cloud as the only worker) on *another domain*: the training split rotated
  by 90 degrees. The test images are never seen, in any form, before evaluation.
- Devices fine-tune rank-2 LoRA on query/value (``ffa``) and a new 10-class head.
- Target accuracy: ``TARGET_FRACTION`` x the accuracy that *centralized* fine-tuning (the same
  model, optimizer, batch size and learning rate, on the union of all devices' data, through the
  same worker code) reaches in ``central_steps`` steps. It is computed before any method runs and
  is the same for every method, as are the data, base, seed, deadline rule and virtual time budget.
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
# A method "reaches the target" at 90% of what centralized fine-tuning reaches: the usual way to
# make time-to-accuracy comparable when federated training on non-IID data converges lower.
TARGET_FRACTION = 0.9


def bench_settings(quick: bool) -> dict[str, Any]:
    """The benchmark's own knobs (besides the run config): pre-training and the target's reference."""
    return {
        "target_fraction": TARGET_FRACTION,
        "central_steps": 400 if quick else 800,  # steps of the centralized reference
        "pretrain_rounds": 200 if quick else 400,
    }


def bench_config(quick: bool) -> dict[str, Any]:
    """The run config (as a dict) every method shares; ``target_accuracy`` is set at run time."""
    b = bench_settings(quick)
    return {
        "name": "finetune-hier",
        "seed": 0,
        "fleet": {"edges": [{"count": 3, "devices": [
            {"count": 8, "mix": {"phone-mid": 3, "phone-low": 3, "raspberry-pi-4": 2}}]}]},
        "data": {"source": "digits", "test_fraction": 0.2, "partition": {"kind": "dirichlet", "alpha": 0.3}},
        "model": {"kind": "vit", "hidden": 96, "layers": 1, "heads": 4, "image_size": 8, "patch_size": 2,
                  "channels": 1},
        "pretrain": {
            "task": "classify", "workers": ["cloud"], "rounds": b["pretrain_rounds"], "global_batch": 32,
            "lr": 3e-3, "eval_every": b["pretrain_rounds"], "checkpoint_every": b["pretrain_rounds"],
            "data": {"source": "rotated", "degrees": 90.0, "test_fraction": 0.2},
        },
        "finetune": {
            "lora": {"rank": 2, "alpha": 4.0, "mode": "ffa"},
            "sync": {"k1": 5, "k2": 2, "deadline_factor": 2.0, "max_steps": 20},
            "batch_size": 16, "optimizer": "adamw", "lr": 1e-2,
            "time_budget_s": 2.5 if quick else 6.0, "max_cloud_rounds": 400,  # eval: the whole test split
        },
    }


def pretrain_base(cfg: Any) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The base model from the pre-training stage (its ``pretrain`` section); tensors and summary."""
    from cloudedge.pretrain import pretrain

    result = pretrain(cfg, run_dir=None)
    tensors = {k: v.detach().clone() for k, v in result.model.state_dict().items()}
    return tensors, result.summary


def central_reference(task: TaskData, lora_mode: str, batch_size: int, lr: float, steps: int, seed: int,
                      eval_max: int | None) -> float:
    """Test accuracy of centralized fine-tuning: one worker holding every device's data trains the
    same adapters and head for ``steps`` steps from the same initial state (the target's reference)."""
    spec = {**task.spec, "mode": lora_mode}
    union = {k: torch.cat([d[k] for d in task.device_data.values()]) for k in next(iter(task.device_data.values()))}
    central = FinetuneWorker(spec, union, batch_size=batch_size, optimizer="adamw", lr=lr)
    judge = FinetuneWorker(spec, task.test_data, batch_size=batch_size)
    state = central.initial_state()
    update = central.train(state, steps=steps, seed=seed)["update"]
    trained = {**state, **{k: state[k] + v for k, v in update.items()}}
    return float(judge.evaluate(trained, max_samples=eval_max)["acc"])


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
    central_acc = central_reference(task, ft.lora.mode, ft.batch_size, ft.lr, b["central_steps"], cfg.seed, ft.eval_max)
    central_s = time.perf_counter() - t1
    target = round(b["target_fraction"] * central_acc, 4)
    results: dict[str, Any] = {}
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
        summary["accuracy_curve"] = [(round(r["virtual_time_s"], 4), round(r["acc"], 4)) for r in loop.history]
        merges = [r for r in loop.history if "staleness" in r]
        if merges:  # asynchronous merges: how stale they were, how many the staleness rule discounted
            summary["staleness_max"] = max(r["staleness"] for r in merges)
            summary["merges_discounted"] = sum(r["staleness"] > len(fleet.edges) - 1 for r in merges)
        summary["availability"] = run_fleet.availability.kind
        summary["online_devices_mean"] = sum(r["online_devices"] for r in loop.history) / len(loop.history)
        results[label] = summary
    return {
        "benchmark": "finetune-hier",
        "config": {**raw, **b, "quick": quick, "availability": availability, "devices": len(fleet.devices), "edges": len(fleet.edges),
                   "device_flops": sorted({d.profile.flops for d in fleet.devices}),
                   "lora_mode": ft.lora.mode, "hardware": "virtual clock; real work on this machine's CPU"},
        "pretrain": {"wall_s": round(pretrain_s, 2), "final_val_loss": pre_summary.get("final_val_loss"),
                     "virtual_time_s": pre_summary.get("virtual_time_s")},
        "reference": {"central_steps": b["central_steps"], "central_acc": central_acc,
                      "target_fraction": b["target_fraction"], "target_accuracy": target,
                      "wall_s": round(central_s, 2)},
        "methods": results,
        "ratios": _ratios(results),
    }


def _ratios(results: dict[str, Any]) -> dict[str, float | None]:
    """Autonomous' time to target over each baseline's (None when either did not reach it)."""
    auto = results.get("autonomous", {}).get("time_to_target_s")
    out: dict[str, float | None] = {}
    for ref in ("hierfavg", "fedavg2"):
        other = results.get(ref, {}).get("time_to_target_s")
        out[f"autonomous_vs_{ref}_time"] = (auto / other) if auto and other else None
    return out
