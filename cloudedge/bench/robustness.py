"""Benchmark `robustness`: robust aggregators in hierarchical fine-tuning against hostile devices.

Setting (fixed before any run; docs/reliability.md, "Benchmark"): 2 edges x 8 devices (phone-mid,
always available, low latency, 100 MFLOP/s so compute is cheap on the clock), digits split over
devices by Dirichlet(1.0), 20% test. A tiny ViT (hidden 16, 1 layer, 8x8 images, patch 4) is
pre-trained at the cloud on the digits 0-4; devices fine-tune rank-2 LoRA (``fedavg`` mode) and a new
10-class head with ``hierfavg`` (k1 = 8 local steps, the cloud averages after every edge round).

Each ``AGGREGATOR/ATTACK/FRACTION`` run uses the aggregator at the edge (over its devices) and at
the cloud (over edges), with the update gate's statistical norm rule **off** (structural checks
only), so the aggregator alone is measured; ``mean+gate`` rows add the default norm rule to the mean.
Attackers (``cloudedge.attacks``) are chosen once among all devices with a fixed seed and send, every
round, ``signflip`` (-4 x their honest update), ``scaled`` (10 x) or ``random`` (Gaussian noise of
their honest update's norm). One DP row measures the utility cost of central DP-FedAvg at the edge.

This is a simulation: attackers and their updates are produced in-process; accuracy is measured on
the real held-out digits.
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

AGGREGATORS: dict[str, dict[str, Any]] = {
    "mean": {},
    "trimmed_mean": {"beta": 0.3},  # 8 devices per edge: trims 2 at each end
    "median": {},
    "multi_krum": {"n_byzantine": 2},  # averages the n - 2 best-scored updates
}
ATTACKS: dict[str, dict[str, Any]] = {
    "signflip": {"kind": {"name": "signflip", "scale": 4.0}},
    "scaled": {"kind": {"name": "scaled", "scale": 10.0}},
    "random": {"kind": "random"},
}
FRACTIONS = (0.1, 0.2, 0.3)
QUICK_FRACTIONS = (0.2,)
ATTACKER_SEED = 1
DP = {"clip_norm": 0.5, "noise_multiplier": 1.0, "mode": "central", "delta": 1e-5}
GOAL_POINTS = 0.03  # at 20% attackers the best aggregator within 3 points of clean


def bench_config(quick: bool, rounds: int | None = None) -> dict[str, Any]:
    """The run config (as a dict) every case shares; cases add ``robust``/``attack``/``privacy``."""
    dev = {"availability": 1.0, "latency_s": 0.0005, "flops": 1e8}
    return {
        "name": "robustness",
        "seed": 0,
        "fleet": {"edges": [{"count": 2, "overrides": {"latency_s": 0.0005}, "devices": [
            {"count": 8, "profile": "phone-mid", "overrides": dev}]}]},
        "data": {"source": "digits", "test_fraction": 0.2, "partition": {"kind": "dirichlet", "alpha": 1.0}},
        "model": {"kind": "vit", "hidden": 16, "layers": 1, "heads": 2, "image_size": 8, "patch_size": 4,
                  "channels": 1},
        "finetune": {
            "lora": {"rank": 2, "alpha": 4.0, "mode": "fedavg"},
            "sync": {"name": "hierfavg", "k1": 8, "k2": 1, "deadline_factor": None},
            "batch_size": 16, "optimizer": "adamw", "lr": 5e-2, "time_budget_s": 1e9,
            "max_cloud_rounds": rounds or (6 if quick else 10),
        },
    }


def pretrain_base(model_cfg: Any, train: dict[str, torch.Tensor], steps: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Central pre-training of the tiny ViT on the digits 0-4 (so fine-tuning starts from useful features)."""
    from cloudedge.models import build_model

    model = build_model(model_cfg, num_labels=5, seed=seed)
    keep = train["labels"] < 5
    x, y = train["pixel_values"][keep], train["labels"][keep]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, len(y), (32,), generator=gen)
        loss = F.cross_entropy(model(pixel_values=x[idx]).logits, y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _case(raw: dict[str, Any], aggregator: str, attack: str | None, fraction: float, gate: bool = False,
          privacy: dict[str, Any] | None = None) -> dict[str, Any]:
    ft = dict(raw["finetune"])
    ft["robust"] = {"aggregator": {"name": aggregator, **AGGREGATORS[aggregator]},
                    "gate": {} if gate else {"norm_rule": "none"}}
    if attack is not None:
        ft["attack"] = {**ATTACKS[attack], "fraction": fraction, "seed": ATTACKER_SEED}
    if privacy is not None:
        ft["privacy"] = privacy
    return {**raw, "finetune": ft}


def _run_case(raw: dict[str, Any], fleet: Fleet, task: Any) -> dict[str, Any]:
    t0 = time.perf_counter()
    cfg = config_from_dict(raw, source="robustness")
    loop = HierFinetune(fleet, task, settings_from_config(cfg), LocalEngine(copy=False, check=False))
    s = loop.run()
    accs = [r["acc"] for r in loop.history]
    out = {
        "final_acc": s["final_acc"], "best_acc": s["best_acc"], "last3_mean_acc": sum(accs[-3:]) / len(accs[-3:]),
        "rejected_updates": s["rejected_updates"], "attackers": (s["attack"] or {}).get("attackers", []),
        "edge_aggregator": s["edge_aggregator"], "cloud_aggregator": s["cloud_aggregator"],
        "accuracy_curve": [round(a, 4) for a in accs], "wall_s": round(time.perf_counter() - t0, 2),
        "cost_model": s["cost_model"],
    }
    if s.get("privacy"):
        out["epsilon"] = s["epsilon"]
        out["privacy"] = {k: s["privacy"][k] for k in ("clip_norm", "noise_multiplier", "mode", "delta", "rounds")}
    return out


def run(quick: bool, out_dir: Path, aggregators: tuple[str, ...] | None = None,
        attacks: tuple[str, ...] | None = None, fractions: tuple[float, ...] | None = None,
        rounds: int | None = None, pretrain_steps: int | None = None, dp: bool = True,
        gate_rows: bool = True) -> dict[str, Any]:
    """Every aggregator against every attack at every fraction (quick: 20% only), plus clean runs,
    ``mean+gate`` rows and one DP row. Options shrink the grid (for tests)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: one thread beats two contending ones
    try:
        return _run(quick, aggregators or tuple(AGGREGATORS), attacks or tuple(ATTACKS),
                    fractions or (QUICK_FRACTIONS if quick else FRACTIONS), rounds,
                    pretrain_steps if pretrain_steps is not None else (150 if quick else 300), dp, gate_rows)
    finally:
        torch.set_num_threads(threads)


def _run(quick: bool, aggregators: tuple[str, ...], attacks: tuple[str, ...], fractions: tuple[float, ...],
         rounds: int | None, pretrain_steps: int, dp: bool, gate_rows: bool) -> dict[str, Any]:
    raw = bench_config(quick, rounds)
    cfg = config_from_dict(raw, source="robustness")
    fleet = Fleet.from_config(cfg.fleet, cfg.seed)
    task = prepare_task(cfg, fleet)
    t0 = time.perf_counter()
    if pretrain_steps > 0:
        train = {k: torch.cat([d[k] for d in task.device_data.values()]) for k in ("pixel_values", "labels")}
        task.spec["base_tensors"] = pretrain_base(cfg.model, train, pretrain_steps, seed=cfg.seed)
    pretrain_s = time.perf_counter() - t0
    methods: dict[str, Any] = {}
    for agg in aggregators:
        methods[f"{agg}/clean/0"] = _run_case(_case(raw, agg, None, 0.0), fleet, task)
        for attack in attacks:
            for frac in fractions:
                methods[f"{agg}/{attack}/{frac:g}"] = _run_case(_case(raw, agg, attack, frac), fleet, task)
    if gate_rows:
        for attack in attacks:
            for frac in fractions:
                methods[f"mean+gate/{attack}/{frac:g}"] = _run_case(_case(raw, "mean", attack, frac, gate=True),
                                                                   fleet, task)
    if dp:
        methods["mean+dp/clean/0"] = _run_case(_case(raw, "mean", None, 0.0, privacy=DP), fleet, task)
    return {
        "benchmark": "robustness",
        "config": {**raw, "quick": quick, "aggregators": AGGREGATORS, "attacks": ATTACKS,
                   "fractions": list(fractions), "attacker_seed": ATTACKER_SEED, "pretrain_steps": pretrain_steps,
                   "pretrain_wall_s": round(pretrain_s, 2), "devices": len(fleet.devices), "dp": DP,
                   "gate": "norm rule off in AGGREGATOR rows (structural checks only); default MAD rule in mean+gate rows",
                   "hardware": "virtual clock; real work on this machine's CPU, 1 torch thread"},
        "methods": methods,
        "goal": _goal(methods, aggregators, attacks),
        "dp": _dp_cost(methods),
    }


def _goal(methods: dict[str, Any], aggregators: tuple[str, ...], attacks: tuple[str, ...]) -> dict[str, Any]:
    """At 20% attackers, per attack: the best aggregator's final accuracy against the clean mean's."""
    clean = methods.get("mean/clean/0", {}).get("final_acc")
    out: dict[str, Any] = {"clean_acc": clean, "within_points": GOAL_POINTS, "per_attack": {}}
    for attack in attacks:
        rows = {a: methods[f"{a}/{attack}/0.2"]["final_acc"] for a in aggregators if f"{a}/{attack}/0.2" in methods}
        if not rows or clean is None:
            continue
        best = max(rows, key=lambda a: rows[a])
        out["per_attack"][attack] = {"best": best, "final_acc": rows[best], "gap": clean - rows[best],
                                     "met": clean - rows[best] <= GOAL_POINTS}
    out["met"] = bool(out["per_attack"]) and all(v["met"] for v in out["per_attack"].values())
    return out


def _dp_cost(methods: dict[str, Any]) -> dict[str, Any] | None:
    row, ref = methods.get("mean+dp/clean/0"), methods.get("mean/clean/0")
    if row is None or ref is None:
        return None
    return {"epsilon": row["epsilon"], "delta": DP["delta"], "final_acc_dp": row["final_acc"],
            "final_acc_no_dp": ref["final_acc"], "utility_cost": ref["final_acc"] - row["final_acc"]}
