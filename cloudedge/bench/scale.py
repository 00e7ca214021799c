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

``engine="ray"`` compares engines instead of fleet sizes: the same round on one fleet, in rounds
per minute, with ``LocalEngine`` (``local``), ``RayEngine`` on a one-node Ray cluster
(``ray-1node``) and on a two-node cluster (``ray-2nodes``: the head carries the cloud, the second
node the edges, as in docs/cluster.md), each as a ratio to ``local``. The clusters are started
on this machine for the measurement and always stopped (:mod:`cloudedge.bench.ray_cluster`); each
method runs its driver in a fresh interpreter, and the first ``warmup_rounds`` rounds (Ray starts
the edge actors there) are left out of the median.
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


def measure(n_devices: int, rounds: int = 3, participation: float = 0.1, samples_per_device: int = 16,
            local_steps: int = 2, batch_size: int = 8, test_samples: int = 200, seed: int = 0,
            engine: str = "local", address: str | None = None,
            edges: int = EDGES, warmup_rounds: int = 0) -> dict[str, Any]:
    """One fleet size, in this process: seconds per round, peak memory, live workers.

    ``engine="ray"`` runs the workers on the Ray cluster at ``address`` (``RayEngine``); the
    first ``warmup_rounds`` rounds are left out of ``seconds_per_round``."""
    from cloudedge.config.fleet import DeviceGroup, EdgeSpec, FleetConfig, ProfileOverride
    from cloudedge.finetune import FinetuneSettings, HierFinetune
    from cloudedge.fleet import Fleet

    if n_devices % edges:
        raise ValueError(f"scale: the number of devices ({n_devices}) must be a multiple of {edges}")
    gc.collect()
    reset_peak_rss()
    baseline = current_rss_mb()
    t0 = time.perf_counter()
    always_on = ProfileOverride(availability=1.0)  # so exactly `participation` of the fleet trains
    fleet = Fleet.from_config(FleetConfig(edges=[EdgeSpec(count=edges, devices=[
        DeviceGroup(count=n_devices // edges, profile="phone-mid", overrides=always_on)])]), seed)
    task = _task(n_devices, fleet, samples_per_device, test_samples, seed)
    data_mb = sum(t.numel() * t.element_size() for d in task.device_data.values() for t in d.values()) / 2**20
    settings = FinetuneSettings(policy="hierfavg", policy_kwargs={"k1": local_steps, "k2": 1, "deadline_factor": None},
                                batch_size=batch_size, participation=participation, time_budget_s=float("inf"),
                                max_cloud_rounds=rounds + warmup_rounds, checkpoint_every=rounds + warmup_rounds + 1,
                                seed=seed)
    workers: Any
    if engine == "ray":
        from cloudedge.engine.ray import RayEngine

        workers = RayEngine(address=address)
    else:
        workers = LocalEngine()
    stamps: list[float] = []
    live: list[int] = []

    def on_row(row: dict[str, Any]) -> None:
        stamps.append(time.perf_counter())
        live.append(getattr(workers, "live_workers", 0))  # RayEngine's workers live in its actors

    loop = HierFinetune(fleet, task, settings, workers, progress=on_row)
    loop.run()
    per_round = [b - a for a, b in zip(stamps, stamps[1:], strict=False)]  # stamps[0]: the initial evaluation
    timed = per_round[warmup_rounds:]
    trained = sum(loop.train_count.values())
    result = {
        "engine": engine, "devices": n_devices, "edges": edges, "rounds": len(timed),
        "warmup_rounds": warmup_rounds, "warmup_seconds": per_round[:warmup_rounds],
        "participants_per_round": trained / max(1, len(per_round)),
        "seconds_per_round": statistics.median(timed) if timed else None,
        "rounds_per_min": 60.0 / statistics.median(timed) if timed else None,
        "round_seconds": timed,
        "setup_s": stamps[0] - t0 if stamps else None,
        "peak_mem_mb": peak_rss_mb(),
        "baseline_mb": baseline,
        "mem_increase_mb": peak_rss_mb() - baseline,
        "data_mb": data_mb,
        # The cloud's evaluation worker is always live; every other live worker is a device's.
        "live_workers_per_round": live[1:],
        "devices_holding_a_model": None if engine == "ray" else max(live[1:], default=0) - 1,
        "distinct_devices_trained": len(loop.train_count),
        "final_acc": loop.history[-1]["acc"],
    }
    if engine == "ray":
        import ray

        result["ray_nodes"] = sum(1 for n in ray.nodes() if n["Alive"])
        result["restarts"] = dict(workers.restarts)
    workers.close()
    return result


def _isolated(kwargs: dict[str, Any], threads: int, env: dict[str, str] | None = None) -> dict[str, Any]:
    """:func:`measure` in a fresh interpreter (a plain subprocess: no ``__main__`` re-import)."""
    code = ("import json, sys, torch; from cloudedge.bench.scale import measure; "
            "a = json.loads(sys.argv[1]); torch.set_num_threads(a.pop('threads')); "
            "print(json.dumps(measure(**a)))")
    out = subprocess.run([sys.executable, "-c", code, json.dumps({**kwargs, "threads": threads})],
                         capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise RuntimeError(f"scale: the run for {kwargs['n_devices']} devices failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def run(quick: bool, out_dir: Path, devices: list[int] | None = None, *, rounds: int | None = None,
        isolate: bool = True, participation: float = 0.1, samples_per_device: int = 16, local_steps: int = 2,
        seed: int = 0, threads: int | None = None, **options: Any) -> dict[str, Any]:
    """Run the benchmark for each fleet size in ``devices`` (quick: 100, 1000; full: 100, 1000, 10000).

    ``rounds`` timed cloud rounds per size (quick 2, full 3); ``isolate`` runs each size in a
    fresh process (clean peak memory; False runs in this one, for tests). ``threads``: torch's
    intra-op threads for the run (default: as set now; on a shared 2-core host 1 is much faster
    for this tiny model, see docs/performance.md).
    """
    engine = options.pop("engine", None)
    if engine == "ray":
        return compare_engines(quick, devices[0] if devices else None, rounds=rounds, seed=seed, threads=threads,
                               **options)
    if engine not in (None, "local"):
        raise InputError(f"--engine: unknown engine {engine!r} (known: local, ray)")
    if options:
        raise TypeError(f"scale: unknown options {sorted(options)}")
    sizes = list(devices) if devices else ([100, 1000] if quick else [100, 1000, 10000])
    rounds = rounds or (2 if quick else 3)
    threads = threads or torch.get_num_threads()
    methods: dict[str, dict[str, Any]] = {}
    for n in sizes:
        kwargs = {"n_devices": n, "rounds": rounds, "participation": participation,
                  "samples_per_device": samples_per_device, "local_steps": local_steps, "seed": seed}
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
                   "policy": "hierfavg (k2 = 1)", "isolate": isolate, "torch_threads": threads},
        "methods": methods,
        "goals": goals,
    }


def compare_engines(quick: bool, n_devices: int | None = None, *, rounds: int | None = None, edges: int | None = None,
                    participation: float | None = None, seed: int = 0, threads: int | None = None,
                    warmup_rounds: int = 1) -> dict[str, Any]:
    """Rounds per minute of the same fleet with LocalEngine, RayEngine on one and on two Ray nodes.

    Quick: 40 devices under 4 edges, half of them trained per round, 3 timed rounds; full: 100
    devices under 10 edges, 20% per round, 5 timed rounds. Every method runs the same seeded
    rounds, so their final accuracies must agree (checked: ``goals``)."""
    try:
        import ray  # noqa: F401
    except ModuleNotFoundError:
        raise InputError("--engine ray: needs the extra: pip install 'cloudedge[ray]'") from None
    from cloudedge.bench.ray_cluster import local_cluster

    edges = edges or (4 if quick else EDGES)
    n_devices = n_devices or (40 if quick else 100)
    participation = participation or (0.5 if quick else 0.2)
    rounds = rounds or (3 if quick else 5)
    threads = threads or 1  # the actors run one torch thread each: the driver does too
    kwargs: dict[str, Any] = {"n_devices": n_devices, "rounds": rounds, "participation": participation, "seed": seed,
                              "edges": edges, "warmup_rounds": warmup_rounds}
    methods: dict[str, dict[str, Any]] = {"local": _isolated(kwargs, threads)}
    for name, nodes in (("ray-1node", 1), ("ray-2nodes", 2)):
        with local_cluster(nodes=nodes) as (address, env):
            methods[name] = _isolated({**kwargs, "engine": "ray", "address": address}, threads, env=env)
    base = methods["local"]["rounds_per_min"]
    for m in methods.values():
        m["ratio_to_local"] = m["rounds_per_min"] / base if base and m["rounds_per_min"] else None
    accs = {m["final_acc"] for m in methods.values()}
    return {
        "benchmark": "scale",
        "config": {"engine": "ray", "devices": n_devices, "edges": edges, "rounds": rounds,
                   "warmup_rounds": warmup_rounds, "participation": participation, "model": MODEL,
                   "policy": "hierfavg (k2 = 1)", "torch_threads": threads, "cluster": "127.0.0.1, 1 CPU per node",
                   "participants_per_round": methods["local"]["participants_per_round"]},
        "methods": methods,
        "goals": {"same final accuracy on every engine": len(accs) == 1},
    }
