"""Numbers as people read them: bytes in MB, times in ms / s / min, energy in J, fractions in %.

The unit of a value follows from its metric's name, the project's naming convention
(``docs/architecture.md``, "Metric rows"): ``bytes*`` are bytes, ``*_s`` seconds, ``*_mb``
megabytes, ``ms_*`` milliseconds, ``*energy_j`` / ``*_j`` joules, accuracies, utilizations and
``*fraction`` are fractions of 1. Only what is shown changes: summary.json and metrics.jsonl keep
the raw numbers.

:func:`better` says which direction is better for a metric (lower loss, time, bytes, energy,
memory; higher accuracy, utilization, speedup), so tables can mark the best method per column.
"""

from __future__ import annotations

import math
from typing import Any

BEST_MARK = " ★"
_LOWER = ("loss", "time", "_s", "bytes", "energy", "_j", "mem", "ms_per", "epsilon")
_HIGHER = ("acc", "utilization", "speedup", "gain", "mfu", "fraction_reached")
# Columns a method table is sorted by, first present wins.
_SORT_KEYS = ("final_acc", "acc_mean", "ood_acc", "best_acc", "acc", "final_val_loss", "time_to_target_s")


def _si(value: float, unit: str, prefixes: tuple[tuple[float, str], ...]) -> str:
    for scale, prefix in prefixes:
        if abs(value) >= scale:
            return f"{value / scale:.3g} {prefix}{unit}"
    return f"{value:.3g} {unit}"


def format_bytes(n: float) -> str:
    """Decimal units, as transfer sizes are quoted: 222321512 -> '222 MB'."""
    return _si(n, "B", ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")))


def format_seconds(s: float) -> str:
    """0.0123 -> '12.3 ms', 4.5 -> '4.5 s', 312 -> '5.2 min', 9000 -> '2.5 h'."""
    if s == 0:
        return "0 s"
    if abs(s) < 1e-3:
        return f"{s * 1e6:.3g} µs"
    if abs(s) < 1:
        return f"{s * 1e3:.3g} ms"
    if abs(s) < 120:
        return f"{s:.3g} s"
    if abs(s) < 7200:
        return f"{s / 60:.3g} min"
    return f"{s / 3600:.3g} h"


def format_joules(j: float) -> str:
    return _si(j, "J", ((1e9, "G"), (1e6, "M"), (1e3, "k"), (1.0, ""), (1e-3, "m"), (1e-6, "µ")))


def format_percent(fraction: float) -> str:
    """0.8751 -> '87.5 %', 0.001359 -> '0.136 %'."""
    pct = 100 * fraction
    return f"{pct:.1f} %" if abs(pct) >= 10 else f"{pct:.3g} %"


def unit_of(key: str) -> str | None:
    """``bytes`` | ``s`` | ``ms`` | ``mb`` | ``j`` | ``fraction`` | ``x`` (a ratio) | None, from a metric name."""
    k = key.lower()
    if "bytes" in k:
        return "bytes"
    if k.startswith("ms_") or k.endswith("_ms"):
        return "ms"
    if k.endswith("_mb"):
        return "mb"
    if k.endswith(("_s", "time_s")) or k == "seconds":
        return "s"
    if k.endswith(("energy_j", "_j")):
        return "j"
    if "speedup" in k:
        return "x"
    if (("acc" in k and "accum" not in k) or "utilization" in k or k.endswith("fraction")) and "points" not in k:
        return "fraction"
    return None


def format_value(key: str, value: Any) -> str:
    """``value`` of metric ``key`` in human units (see the module docstring); other values as text."""
    if value is None:
        return "–"
    if isinstance(value, bool) or not isinstance(value, int | float):
        if isinstance(value, dict):
            return ", ".join(f"{k}: {format_value(k if unit_of(str(k)) else key, v)}" for k, v in value.items())
        if isinstance(value, list):
            return ", ".join(format_value(key, v) for v in value)
        return str(value)
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    unit = unit_of(key)
    if unit == "bytes":
        return format_bytes(value)
    if unit == "s":
        return format_seconds(value)
    if unit == "ms":
        return format_seconds(value / 1e3)
    if unit == "mb":
        return format_bytes(value * 1e6)
    if unit == "j":
        return format_joules(value)
    if unit == "fraction":
        return format_percent(value)
    if unit == "x":
        return f"{value:.3g}x"
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:.4g}"


def better(key: str) -> str | None:
    """``"higher"``, ``"lower"`` or None (no order) for metric ``key``."""
    k = key.lower()
    if any(h in k for h in _HIGHER) and "accum" not in k:
        return "higher"
    if any(lo in k for lo in _LOWER):
        return "lower"
    return None


def method_table(methods: dict[str, dict[str, Any]]) -> list[list[str]]:
    """A header row and one row per method in human units, best first, the best value per column marked.

    Methods are sorted by the first of ``final_acc, acc_mean, ood_acc, best_acc, acc, final_val_loss,
    time_to_target_s`` they report (best first; a missing value last); per column the best
    numeric value (by :func:`better`) carries ``★``.
    """
    metrics = sorted({k for m in methods.values() if isinstance(m, dict) for k in m})
    sort_key = next((k for k in _SORT_KEYS if any(_num(m.get(k)) is not None for m in methods.values())), None)
    names = list(methods)
    if sort_key is not None:
        sign = -1.0 if better(sort_key) == "higher" else 1.0
        names.sort(key=lambda n: (_num(methods[n].get(sort_key)) is None, sign * (_num(methods[n].get(sort_key)) or 0.0)))
    best: dict[str, float] = {}
    for k in metrics:
        values = [v for m in methods.values() if (v := _num(m.get(k))) is not None]
        direction = better(k)
        if direction and len(values) > 1 and min(values) != max(values):
            best[k] = max(values) if direction == "higher" else min(values)
    rows = [["method", *metrics]]
    for n in names:
        cells = []
        for k in metrics:
            v = methods[n].get(k)
            mark = BEST_MARK if k in best and _num(v) == best[k] else ""
            cells.append(format_value(k, v) + mark)
        rows.append([n, *cells])
    return rows


def _num(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
        return None
    return float(v)
