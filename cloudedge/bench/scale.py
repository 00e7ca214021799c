"""``scale``: seconds per round and peak memory of the fine-tuning stage on large simulated fleets.

What runs: the fine-tuning stage's hierarchical round (:class:`cloudedge.finetune.HierFinetune`,
policy ``hierfavg`` with one edge round per cloud round, ``k1`` local steps, no deadline) over a
fleet of ``N`` devices under 10 edges, with ``participation`` 0.1 and every device available, so
each round trains 10% of the fleet (100 devices for N = 1,000) on a tiny LoRA ViT. Each device holds
``samples_per_device`` synthetic 8x8 images (the data grows with N; the model must not).

How: each N runs in a fresh interpreter (``isolate``, the default) so its peak resident memory is
its own; the memory before the fleet is built (torch and transformers imported) is reported as
``baseline_mb``. Setup (registering N workers, the cloud's FLOP count) is timed apart from the
rounds; ``seconds_per_round`` is the median wall time of a cloud round (its evaluation of the
global state on ``test_samples`` included). After every round the engine's ``live_workers`` is
read: a device that is not being trained should hold no model.
"""

from __future__ import annotations

import gc
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from cloudedge.engine import LocalEngine
from cloudedge.errors import InputError
from cloudedge.perf import current_rss_mb, peak_rss_mb, reset_peak_rss

GOAL_SECONDS_1000 = 30.0
EDGES = 10
MODEL = {"kind": "vit", "hidden": 16, "layers": 1, "heads": 1, "image_size": 8, "patch_size": 4, "channels": 1}


def _task(n_devices: int, fleet: Any, samples_per_device: int, test_samples: int, seed: int) -> Any:
    from cloudedge.finetune import TaskData

    gen = torch.Generator().manual_seed(seed)
    n_classes = 10

    def images(n: int) -> dict[str, torch.Tensor]:
        return {"pixel_values": torch.rand(n, 1, 8, 8, generator=gen),
                "labels": torch.randint(0, n_classes, (n,), generator=gen)}

    spec = {"model": MODEL, "base_dir": ".", "seed": seed, "n_classes": n_classes, "rank": 2, "alpha": 4.0,
            "targets": None, "mode": "fedavg", "base_tensors": None, "base_source": "bench scale"}
    device_data = {d.id: images(samples_per_device) for d in fleet.devices}
    return TaskData(spec=spec, device_data=device_data, test_data=images(test_samples),
                    classes=[str(c) for c in range(n_classes)])


class ReleasingEngine(LocalEngine):
    """A LocalEngine that drops every device's worker after its task (the cloud's is kept).

    What a stage does when it calls ``engine.release`` on its sampled devices after each round
    (the pre-training loop does; ``release_devices=True`` measures that for the fine-tuning loop).
    """

    def run(self, tasks: Any) -> list[Any]:
        tasks = list(tasks)
        results = super().run(tasks)
        for task in tasks:
            if task.worker_id != "cloud":
                self.release(task.worker_id)
        return results


def measure(n_devices: int, rounds: int = 3, participation: float = 0.1, samples_per_device: int = 16,
            local_steps: int = 2, batch_size: int = 8, test_samples: int = 200, seed: int = 0,
            release_devices: bool = False) -> dict[str, Any]:
    """One fleet size, in this process: seconds per round, peak memory, live workers."""
    from cloudedge.config.fleet import DeviceGroup, EdgeSpec, FleetConfig, ProfileOverride
    from cloudedge.finetune import FinetuneSettings, HierFinetune
    from cloudedge.fleet import Fleet

    if n_devices % EDGES:
        raise ValueError(f"scale: the number of devices ({n_devices}) must be a multiple of {EDGES}")
    gc.collect()
    reset_peak_rss()
    baseline = current_rss_mb()
    t0 = time.perf_counter()
    always_on = ProfileOverride(availability=1.0)  # so exactly `participation` of the fleet trains
    fleet = Fleet.from_config(FleetConfig(edges=[EdgeSpec(count=EDGES, devices=[
        DeviceGroup(count=n_devices // EDGES, profile="phone-mid", overrides=always_on)])]), seed)
    task = _task(n_devices, fleet, samples_per_device, test_samples, seed)
    data_mb = sum(t.numel() * t.element_size() for d in task.device_data.values() for t in d.values()) / 2**20
    settings = FinetuneSettings(policy="hierfavg", policy_kwargs={"k1": local_steps, "k2": 1, "deadline_factor": None},
                                batch_size=batch_size, participation=participation, time_budget_s=float("inf"),
                                max_cloud_rounds=rounds, checkpoint_every=rounds + 1, seed=seed)
    engine = ReleasingEngine() if release_devices else LocalEngine()
    stamps: list[float] = []
    live: list[int] = []

    def on_row(row: dict[str, Any]) -> None:
        stamps.append(time.perf_counter())
        live.append(engine.live_workers)

    loop = HierFinetune(fleet, task, settings, engine, progress=on_row)
    loop.run()
    per_round = [b - a for a, b in zip(stamps, stamps[1:], strict=False)]  # stamps[0]: the initial evaluation
    trained = sum(loop.train_count.values())
    result = {
        "devices": n_devices, "edges": EDGES, "rounds": len(per_round),
        "participants_per_round": trained / max(1, len(per_round)),
        "seconds_per_round": statistics.median(per_round) if per_round else None,
        "round_seconds": per_round,
        "setup_s": stamps[0] - t0 if stamps else None,
        "peak_mem_mb": peak_rss_mb(),
        "baseline_mb": baseline,
        "mem_increase_mb": peak_rss_mb() - baseline,
        "data_mb": data_mb,
        # The cloud's evaluation worker is always live; every other live worker is a device's.
        "live_workers_per_round": live[1:],
        "devices_holding_a_model": max(live[1:], default=0) - 1,
        "distinct_devices_trained": len(loop.train_count),
    }
    engine.close()
    return result


def _isolated(kwargs: dict[str, Any], threads: int) -> dict[str, Any]:
    """:func:`measure` in a fresh interpreter (a plain subprocess: no ``__main__`` re-import)."""
    code = ("import json, sys, torch; from cloudedge.bench.scale import measure; "
            "a = json.loads(sys.argv[1]); torch.set_num_threads(a.pop('threads')); "
            "print(json.dumps(measure(**a)))")
    out = subprocess.run([sys.executable, "-c", code, json.dumps({**kwargs, "threads": threads})],
                         capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"scale: the run for {kwargs['n_devices']} devices failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def run(quick: bool, out_dir: Path, devices: list[int] | None = None, *, rounds: int | None = None,
        isolate: bool = True, participation: float = 0.1, samples_per_device: int = 16, local_steps: int = 2,
        seed: int = 0, threads: int | None = None, release_devices: bool = False,
        **options: Any) -> dict[str, Any]:
    """Run the benchmark for each fleet size in ``devices`` (quick: 100, 1000; full: 100, 1000, 10000).

    ``rounds`` timed cloud rounds per size (quick 2, full 3); ``isolate`` runs each size in a
    fresh process (clean peak memory; False runs in this one, for tests). ``threads``: torch's
    intra-op threads for the run (default: as set now; on a shared 2-core host 1 is much faster
    for this tiny model, see docs/performance.md). ``release_devices``: drop each device's worker
    after its task (see :class:`ReleasingEngine`) instead of the stage's own engine use.
    """
    engine = options.pop("engine", None)
    if engine not in (None, "local"):
        raise InputError(f"--engine: the scale benchmark measures the local engine, not {engine!r}")
    if options:
        raise TypeError(f"scale: unknown options {sorted(options)}")
    sizes = list(devices) if devices else ([100, 1000] if quick else [100, 1000, 10000])
    rounds = rounds or (2 if quick else 3)
    threads = threads or torch.get_num_threads()
    methods: dict[str, dict[str, Any]] = {}
    for n in sizes:
        kwargs = {"n_devices": n, "rounds": rounds, "participation": participation,
                  "samples_per_device": samples_per_device, "local_steps": local_steps, "seed": seed,
                  "release_devices": release_devices}
        if isolate:
            methods[f"N={n}"] = _isolated(kwargs, threads)
        else:
            before = torch.get_num_threads()
            torch.set_num_threads(threads)
            try:
                methods[f"N={n}"] = measure(**kwargs)
            finally:
                torch.set_num_threads(before)
    goals: dict[str, bool] = {}
    if "N=1000" in methods and methods["N=1000"]["seconds_per_round"] is not None:
        goals["N=1000 round < 30 s"] = methods["N=1000"]["seconds_per_round"] < GOAL_SECONDS_1000
    goals["no model on unsampled devices"] = all(
        m["devices_holding_a_model"] <= m["participants_per_round"] for m in methods.values())
    return {
        "benchmark": "scale",
        "config": {"devices": sizes, "edges": EDGES, "rounds": rounds, "participation": participation,
                   "samples_per_device": samples_per_device, "local_steps": local_steps, "model": MODEL,
                   "policy": "hierfavg (k2 = 1)", "isolate": isolate, "torch_threads": threads,
                   "release_devices": release_devices},
        "methods": methods,
        "goals": goals,
    }
