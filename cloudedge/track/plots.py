"""Matplotlib figures of a run's metrics (PNG, headless backend)."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # no display on servers; must precede pyplot
import matplotlib.pyplot as plt  # noqa: E402

# "accuracy" and "t": fine-tuning's names in run directories written before 2026-11-27.
QUALITY_KEYS = ("val_loss", "acc", "accuracy", "test_acc", "ood_acc")
X_AXES = (("time_s", "virtual time (s)"), ("bytes_total", "bytes moved"))
# Stages name the same quantity differently in their rows; each canonical x-axis reads the first present.
X_ALIASES = {"time_s": ("time_s", "virtual_time_s", "t"),
             "bytes_total": ("bytes_total", ("bytes_device_edge", "bytes_edge_cloud", "bytes_device_cloud"))}


def _x_value(row: dict[str, Any], x: str) -> float | None:
    for alias in X_ALIASES.get(x, (x,)):
        if isinstance(alias, tuple):
            parts = [row.get(a) for a in alias]
            if any(p is not None for p in parts):
                return float(sum(p for p in parts if p is not None))
        elif row.get(alias) is not None:
            return float(row[alias])
    return None


def _series(rows: list[dict[str, Any]], x: str, y: str) -> dict[str, tuple[list[float], list[float]]]:
    by_method: dict[str, tuple[list[float], list[float]]] = defaultdict(lambda: ([], []))
    for r in rows:
        xv = _x_value(r, x)
        if xv is None or r.get(y) is None or "shift" in r:
            continue
        xs, ys = by_method[str(r.get("method", "run"))]
        xs.append(xv)
        ys.append(float(r[y]))
    return dict(by_method)


def curve_plots(rows: list[dict[str, Any]], out_dir: Path) -> list[Path]:
    """For each stage and quality metric: one PNG per x-axis (virtual time, bytes), a line per method."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    stages = sorted({str(r.get("stage")) for r in rows if r.get("stage")})
    for stage in stages:
        srows = [r for r in rows if r.get("stage") == stage]
        for key in QUALITY_KEYS:
            for x, xlabel in X_AXES:
                series = _series(srows, x, key)
                if not series or all(len(v[0]) < 2 for v in series.values()):
                    continue
                fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=110)
                for method, (xs, ys) in sorted(series.items()):
                    ax.plot(xs, ys, marker=".", label=method)
                if x == "bytes_total":
                    ax.set_xscale("symlog")
                ax.set_xlabel(xlabel)
                ax.set_ylabel(key)
                ax.set_title(f"{stage}: {key} vs {xlabel.split(' (')[0]}")
                ax.grid(alpha=0.3)
                ax.legend(fontsize=8)
                fig.tight_layout()
                path = out_dir / f"{stage}_{key}_vs_{x}.png"
                fig.savefig(path)
                plt.close(fig)
                paths.append(path)
    return paths


def shift_bars(rows: list[dict[str, Any]], out_dir: Path, metric: str = "acc") -> Path | None:
    """Test-time adaptation accuracy per shift, one bar group per shift, a bar per method."""
    acc: dict[str, dict[str, float]] = defaultdict(dict)
    for r in rows:
        if r.get("shift") is not None and r.get(metric) is not None and r.get("final", True):
            acc[str(r["shift"])][str(r.get("method"))] = float(r[metric])
    if not acc:
        return None
    shifts = sorted(acc)
    methods = sorted({m for d in acc.values() for m in d})
    width = 0.8 / max(1, len(methods))
    fig, ax = plt.subplots(figsize=(max(6.4, 0.6 * len(shifts) * len(methods) / 2), 4.2), dpi=110)
    for i, m in enumerate(methods):
        xs = [j + i * width for j in range(len(shifts))]
        ax.bar(xs, [acc[s].get(m, 0.0) for s in shifts], width=width, label=m)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(shifts))])
    ax.set_xticklabels(shifts, rotation=45, ha="right", fontsize=8)
    ax.set_ylabel(f"top-1 {metric}")
    ax.set_title("test-time adaptation: accuracy per shift")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    path = out_dir / "adapt_acc_per_shift.png"
    fig.savefig(path)
    plt.close(fig)
    return path


def k2_series(rows: list[dict[str, Any]]) -> dict[str, dict[str, tuple[list[float], list[int]]]]:
    """Per fine-tuning method, per edge: (virtual times, edge rounds it ran before that sync).

    Asynchronous merges log one edge's ``k2`` (an int) and its ``edge``; barrier syncs log a dict
    ``{edge: k2}``; fedavg2 logs none."""
    out: dict[str, dict[str, tuple[list[float], list[int]]]] = defaultdict(lambda: defaultdict(lambda: ([], [])))
    for r in rows:
        k2, t = r.get("k2"), r.get("virtual_time_s")
        if r.get("stage", "finetune") != "finetune" or k2 is None or t is None:
            continue
        per_edge = k2 if isinstance(k2, dict) else {str(r.get("edge")): k2}
        for edge, k in per_edge.items():
            xs, ys = out[str(r.get("method", "run"))][str(edge)]
            xs.append(float(t))
            ys.append(int(k))
    return {m: dict(e) for m, e in out.items()}


def k2_plot(rows: list[dict[str, Any]], out_dir: Path) -> Path | None:
    """The sync interval each edge ran over virtual time, a panel per fine-tuning method, a line per edge."""
    series = k2_series(rows)
    if not series:
        return None
    out_dir.mkdir(parents=True, exist_ok=True)
    methods = sorted(series)
    fig, axes = plt.subplots(1, len(methods), figsize=(3.4 * len(methods) + 1, 3.4), dpi=110, squeeze=False,
                             sharey=True)
    for ax, method in zip(axes[0], methods, strict=True):
        for edge, (xs, ys) in sorted(series[method].items()):
            ax.step(xs, ys, where="post", marker=".", label=edge)
        ax.set_title(method, fontsize=9)
        ax.set_xlabel("virtual time (s)")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("edge rounds per cloud sync (k2)")
    axes[0][-1].legend(fontsize=8)
    fig.tight_layout()
    path = out_dir / "finetune_k2_per_edge.png"
    fig.savefig(path)
    plt.close(fig)
    return path


def availability_plot(rows: list[dict[str, Any]], out_dir: Path) -> Path | None:
    """Fine-tuning's devices online (left axis) and dropouts per cloud round (right axis) over virtual
    time, a line per method; None when the rows carry no ``online_devices``."""
    rows = [r for r in rows if r.get("stage") == "finetune" and r.get("online_devices") is not None]
    if len(rows) < 2:
        return None
    online = _series(rows, "time_s", "online_devices")
    dropped = _series(rows, "time_s", "dropped")
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=110)
    right = ax.twinx()
    for method, (xs, ys) in sorted(online.items()):
        ax.plot(xs, ys, marker=".", label=f"{method}: online")
    for method, (xs, ys) in sorted(dropped.items()):
        right.step(xs, ys, where="post", linestyle="--", alpha=0.7, label=f"{method}: dropouts")
    ax.set_xlabel("virtual time (s)")
    ax.set_ylabel("devices online")
    right.set_ylabel("dropouts since the previous row")
    ax.set_title("finetune: devices online and dropouts")
    ax.grid(alpha=0.3)
    handles = ax.get_legend_handles_labels()[0] + right.get_legend_handles_labels()[0]
    ax.legend(handles, [h.get_label() for h in handles], fontsize=7)
    fig.tight_layout()
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "finetune_online_and_dropouts.png"
    fig.savefig(path)
    plt.close(fig)
    return path
