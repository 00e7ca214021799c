"""Benchmarks: `cloudedge bench NAME [--quick] --out DIR` writes DIR/results.json.

Each benchmark is a module here with ``run(quick: bool, out_dir: Path, **options) -> dict`` that
returns ``{"benchmark": NAME, "config": {...}, "methods": {METHOD: {METRIC: value}}}``; it compares
methods side by side in one run. Benchmarks measure; they are not tests.

They register by name in :data:`BENCHMARKS` (the plug-in registry) as a :class:`Benchmark`: the
module is imported only when the benchmark runs, so listing them stays cheap. A benchmark's options
are the keyword parameters of its ``run`` (``cloudedge bench NAME --set KEY=VALUE``); an option
``run`` does not take is an InputError naming the benchmark.
"""

from __future__ import annotations

import importlib
import inspect
import json
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cloudedge.errors import InputError
from cloudedge.registry import Registry


@dataclass(frozen=True)
class Benchmark:
    """A benchmark: the module that holds its ``run`` (dotted, or relative to this package) and a
    one-line description."""

    module: str
    description: str

    def load(self) -> Callable[..., dict[str, Any]]:
        """The benchmark's ``run`` function (imports its module)."""
        name = self.module if "." in self.module else f"cloudedge.bench.{self.module}"
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as err:
            if err.name == name:
                raise InputError(f"benchmark: {self.module!r} is not available in this version") from None
            raise
        return module.run


BENCHMARKS: Registry[Benchmark] = Registry("benchmark")
for _name, _module, _description in (
    ("pretrain-hetero", "pretrain_hetero", "LM pre-training on pydocs over a heterogeneous fleet: batch controllers"),
    ("pretrain-ood", "pretrain_ood", "colored/rotated digits: invariant objectives, in- and out-of-distribution accuracy"),
    ("finetune-hier", "finetune_hier", "hierarchical LoRA fine-tuning: synchronization policies"),
    ("adapt-tta", "adapt_tta", "test-time prompt adaptation of a cached glyph CLIP on label-preserving shifts"),
    ("robustness", "robustness", "robust aggregators against sign-flip, scaled and random updates"),
    ("overhead", "overhead", "one worker's throughput through cloudedge vs a plain PyTorch loop"),
    ("scale", "scale", "seconds per round and peak memory for large simulated fleets"),
):
    BENCHMARKS.add(_name, Benchmark(_module, _description))


def machine_info() -> dict[str, Any]:
    """What ran the benchmark: software, processor, GPU, and how loaded the host was (a shared
    machine's load moves wall-clock numbers several-fold; docs/performance.md)."""
    import os

    import torch

    return {"python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform(),
            "cpu": _cpu_model(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "load_average": _load_average()}


def _cpu_model() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def _load_average() -> list[float] | None:
    """1, 5 and 15 minute load averages (None where the OS has none)."""
    import os

    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def run_benchmark(name: str, out_dir: Path, quick: bool = False, **options: Any) -> Path:
    """Run benchmark ``name`` and write ``out_dir/results.json``; returns its path."""
    if name not in BENCHMARKS:
        raise InputError(f"benchmark: unknown benchmark {name!r} (known: {', '.join(BENCHMARKS)})")
    run = BENCHMARKS.get(name).load()
    accepted = inspect.signature(run).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in accepted.values())
    for option in options:
        if option not in accepted and not takes_any:
            raise InputError(f"benchmark: {name!r} takes no --{option} option")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    load_at_start = _load_average()
    t0 = time.perf_counter()
    result = run(quick=quick, out_dir=out_dir, **options)
    result.setdefault("benchmark", name)
    result["quick"] = quick
    result["wall_s"] = round(time.perf_counter() - t0, 2)
    result["machine"] = {**machine_info(), "load_average_at_start": load_at_start}
    path = out_dir / "results.json"
    path.write_text(json.dumps(result, indent=2, default=float))
    return path
