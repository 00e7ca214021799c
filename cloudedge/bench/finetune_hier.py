"""Benchmark `finetune-hier`: hierarchical LoRA fine-tuning under five synchronization policies.

Setting (fixed before any run; see docs/finetuning.md, "Benchmark"): 3 edges x 8 devices, each
edge's devices a mix of phone-mid (100 GFLOP/s), phone-low (20 GFLOP/s) and raspberry-pi-4
(8 GFLOP/s): a 12.5x spread in speed, availability from the profiles. Digits, labels over devices
by Dirichlet(0.3). The base is a small ViT pre-trained centrally (at the cloud) on the digits 0-4
of the training split; devices then fine-tune LoRA adapters (rank 2 on query/value, `ffa`) and a new
10-class head. Every method gets the same data, base, seed, deadline rule and virtual time budget;
the target accuracy (0.80) was set before the first run.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from cloudedge.config import config_from_dict
from cloudedge.engine import LocalEngine
from cloudedge.finetune.loop import HierFinetune
from cloudedge.finetune.stage import prepare_task, settings_from_config
from cloudedge.fleet import Fleet

METHODS = ("fedavg2", "hierfavg", "tempo", "adaptive-interval", "autonomous")
TARGET_ACCURACY = 0.80


def bench_config(quick: bool) -> dict[str, Any]:
    """The run config (as a dict) every method shares."""
    return {
        "name": "finetune-hier",
        "seed": 0,
        "fleet": {"edges": [{"count": 3, "devices": [
            {"count": 8, "mix": {"phone-mid": 3, "phone-low": 3, "raspberry-pi-4": 2}}]}]},
        "data": {"source": "digits", "test_fraction": 0.2, "partition": {"kind": "dirichlet", "alpha": 0.3}},
        "model": {"kind": "vit", "hidden": 64, "layers": 2, "heads": 4, "image_size": 8, "patch_size": 2,
                  "channels": 1},
        "finetune": {
            "lora": {"rank": 2, "alpha": 4.0, "mode": "ffa"},
            "sync": {"k1": 3 if quick else 5, "k2": 2, "deadline_factor": 2.0, "max_steps": 10 if quick else 20},
            "batch_size": 16, "optimizer": "adamw", "lr": 1e-2,
            "time_budget_s": 1.5 if quick else 4.0, "max_cloud_rounds": 200,
            "target_accuracy": TARGET_ACCURACY, "eval_max": 360,
        },
    }


def pretrain_base(model_cfg: Any, train: dict[str, torch.Tensor], steps: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Central pre-training of the ViT on digits 0-4 only (a stand-in for a pre-trained checkpoint)."""
    from cloudedge.models import build_model

    model = build_model(model_cfg, num_labels=5, seed=seed)
    keep = train["labels"] < 5
    x, y = train["pixel_values"][keep], train["labels"][keep]
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, len(y), (32,), generator=gen)
        loss = F.cross_entropy(model(pixel_values=x[idx]).logits, y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def run(quick: bool, out_dir: Path) -> dict[str, Any]:
    """Run every method on the same setting; returns the results dict (also what the CLI writes)."""
    torch.set_num_threads(1)  # tiny models: one thread is faster than two contending ones
    raw = bench_config(quick)
    cfg = config_from_dict(raw, source="finetune-hier")
    fleet = Fleet.from_config(cfg.fleet, cfg.seed)
    task = prepare_task(cfg, fleet)
    all_train = {k: torch.cat([d[k] for d in task.device_data.values()]) for k in ("pixel_values", "labels")}
    t0 = time.perf_counter()
    base = pretrain_base(cfg.model, all_train, steps=150 if quick else 300, seed=cfg.seed)
    task.spec["base_tensors"] = base
    pretrain_s = time.perf_counter() - t0
    methods: dict[str, Any] = {}
    for name in METHODS:
        t1 = time.perf_counter()
        settings = settings_from_config(cfg, policy=name)
        loop = HierFinetune(fleet, task, settings, LocalEngine(copy=False, check=False), method=name)
        summary = loop.run()
        summary["wall_s"] = round(time.perf_counter() - t1, 2)
        summary["accuracy_curve"] = [(round(r["t"], 4), round(r["accuracy"], 4)) for r in loop.history]
        methods[name] = summary
    ref = methods["hierfavg"]["time_to_target_s"], methods["fedavg2"]["time_to_target_s"]
    auto = methods["autonomous"]["time_to_target_s"]
    ratios = {
        "autonomous_vs_hierfavg_time": (auto / ref[0]) if auto and ref[0] else None,
        "autonomous_vs_fedavg2_time": (auto / ref[1]) if auto and ref[1] else None,
    }
    return {
        "benchmark": "finetune-hier",
        "config": {**raw, "quick": quick, "pretrain_steps": 150 if quick else 300, "pretrain_wall_s": round(pretrain_s, 2),
                   "devices": len(fleet.devices), "edges": len(fleet.edges),
                   "device_flops": sorted({d.profile.flops for d in fleet.devices}),
                   "target_accuracy": TARGET_ACCURACY, "lora_mode": "ffa",
                   "hardware": "virtual clock; real work on this machine's CPU"},
        "methods": methods,
        "ratios": ratios,
    }
