"""Measuring this machine: matmul peak, model-FLOPs utilization, throughput, peak memory.

The stages simulate a fleet on whatever host runs them, so two utilizations matter:

- against the *measured* peak of this host (:func:`measure_matmul_peak`, a large dense matmul):
  how well the host's compute is used (MFU in the usual sense);
- against a profile's *nominal* sustained FLOP/s (``Profile.flops``): how fast the simulation runs
  compared with the device it stands for (> 1: faster than the real device would be).

:func:`utilization_fields` gives both as a dict a stage loop merges into its metric rows.
"""

from __future__ import annotations

import math
import resource
import statistics
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from cloudedge.device import synchronize

# (size, dtype, device, repeats, clock) -> FLOP/s; the peak does not change within a process.
_PEAK_CACHE: dict[tuple[int, torch.dtype, str, int, str], float] = {}


def measure_matmul_peak(size: int = 2048, dtype: torch.dtype = torch.float32, repeats: int = 3,
                        device: str | torch.device = "cpu", clock: str = "wall") -> float:
    """FLOP/s of a ``size x size`` dense matmul on ``device``: the median of ``repeats`` timings.

    Two untimed warm-up products first (thread pool start, MKL/oneDNN kernel selection, caches);
    the second also sizes the timings: each covers enough products to last ~50 ms, so timer
    resolution does not matter. On a shared machine the median is what the host gives now.
    ``clock="cpu"`` divides by this process's CPU time instead of wall time: FLOP per CPU-second,
    which other processes' load disturbs far less (compare it with work timed the same way).
    The result is cached per process for each argument combination.
    """
    if size < 1 or repeats < 1:
        raise ValueError(f"measure_matmul_peak: size and repeats must be >= 1, got {size}, {repeats}")
    if clock not in ("wall", "cpu"):
        raise ValueError(f"measure_matmul_peak: clock must be 'wall' or 'cpu', got {clock!r}")
    timer = time.perf_counter if clock == "wall" else time.process_time
    dev = torch.device(device)
    key = (int(size), dtype, str(dev), int(repeats), clock)
    if key in _PEAK_CACHE:
        return _PEAK_CACHE[key]
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(size, size, generator=gen).to(device=dev, dtype=dtype)
    b = torch.randn(size, size, generator=gen).to(device=dev, dtype=dtype)
    out = torch.empty(size, size, device=dev, dtype=dtype)
    flops_per_product = 2.0 * size**3
    torch.matmul(a, b, out=out)
    synchronize(dev)
    t0 = timer()
    torch.matmul(a, b, out=out)
    synchronize(dev)
    one = max(timer() - t0, 1e-9)
    inner = max(1, min(1000, int(0.05 / one)))
    rates = []
    for _ in range(repeats):
        t0 = timer()
        for _ in range(inner):
            torch.matmul(a, b, out=out)
        synchronize(dev)
        rates.append(inner * flops_per_product / max(timer() - t0, 1e-12))
    peak = float(statistics.median(rates))
    _PEAK_CACHE[key] = peak
    return peak


def mfu(flops: float, seconds: float, peak: float) -> float:
    """Model-FLOPs utilization: ``flops`` done in ``seconds`` as a share of ``peak`` FLOP/s."""
    if seconds <= 0 or peak <= 0:
        raise ValueError(f"mfu: seconds and peak must be > 0, got {seconds}, {peak}")
    return float(flops) / float(seconds) / float(peak)


@dataclass
class Throughput:
    """Counts samples and tokens over measured wall time; ``samples_per_s`` / ``tokens_per_s``.

    Either ``add(samples, tokens, seconds)`` with a time measured elsewhere, or::

        with meter.timed(samples=32, tokens=32 * 128):
            train_step()
    """

    samples: int = 0
    tokens: int = 0
    seconds: float = 0.0

    def add(self, samples: int, tokens: int = 0, seconds: float = 0.0) -> None:
        self.samples += int(samples)
        self.tokens += int(tokens)
        self.seconds += float(seconds)

    @contextmanager
    def timed(self, samples: int, tokens: int = 0) -> Iterator[None]:
        t0 = time.perf_counter()
        yield
        self.add(samples, tokens, time.perf_counter() - t0)

    @property
    def samples_per_s(self) -> float:
        return self.samples / self.seconds if self.seconds > 0 else 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


def peak_rss_mb() -> float:
    """Peak resident memory of this process in MiB (since start, or since :func:`reset_peak_rss`).

    Linux: ``VmHWM`` from ``/proc/self/status`` (resettable); elsewhere ``getrusage`` (KiB on
    Linux, bytes on macOS).
    """
    hwm = _proc_status_kib("VmHWM")
    if hwm is not None:
        return hwm / 1024.0
    ru = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return ru / (1024.0 * 1024.0) if sys.platform == "darwin" else ru / 1024.0


def current_rss_mb() -> float:
    """Resident memory of this process now, in MiB (0.0 where /proc is unavailable)."""
    rss = _proc_status_kib("VmRSS")
    return rss / 1024.0 if rss is not None else 0.0


def reset_peak_rss() -> bool:
    """Reset the peak-RSS mark to the current RSS (Linux ``clear_refs``); False where unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_gpu_mb(device: str | torch.device | None = None) -> float | None:
    """``torch.cuda.max_memory_allocated`` in MiB, or None without CUDA."""
    if not torch.cuda.is_available():
        return None
    return torch.cuda.max_memory_allocated(device) / (1024.0 * 1024.0)


def _proc_status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def stage_peak_size(device: str | torch.device) -> int:
    """The matmul the stages time for their MFU denominator: 1024 on a CPU (a few seconds on a busy
    2-core host, near the CPU's peak), 8192 on a GPU (smaller ones do not fill a modern GPU)."""
    return 1024 if torch.device(device).type == "cpu" else 8192


def utilization_fields(flops_done: float, wall_s: float, profile_flops: float | None = None,
                       device: str | torch.device = "cpu", peak_size: int = 2048,
                       dtype: torch.dtype = torch.float32) -> dict[str, float]:
    """Fields for a stage's metric row: host FLOP/s achieved and MFU against both peaks.

    ``achieved_flops`` = flops_done / wall_s; ``mfu_measured`` against the matmul peak measured on
    ``device`` in ``dtype`` (the precision the work ran in; ``peak_flops_measured``), with a
    ``peak_size`` matmul once per process (a few seconds on a busy 2-core CPU); ``mfu_profile``
    against ``profile_flops`` (a profile's nominal sustained FLOP/s, when given). Empty dict when
    no wall time was measured.
    """
    if wall_s <= 0 or not math.isfinite(wall_s):
        return {}
    peak = measure_matmul_peak(size=peak_size, dtype=dtype, device=device)
    achieved = float(flops_done) / float(wall_s)
    fields = {"achieved_flops": achieved, "peak_flops_measured": peak, "mfu_measured": achieved / peak}
    if profile_flops:
        fields["mfu_profile"] = achieved / float(profile_flops)
    return fields


__all__ = ["Throughput", "current_rss_mb", "measure_matmul_peak", "mfu", "peak_gpu_mb", "peak_rss_mb",
           "reset_peak_rss", "stage_peak_size", "utilization_fields"]
