"""Converting FedScale's device traces to cloudedge's trace files (docs/profiles.md, "FedScale traces").

FedScale ships two traces (benchmark/dataset/data/device_info/README.md in its repository), both
Python dicts serialized with ``pickle``:

- ``client_behave_trace``: client id -> ``{'duration', 'inactive': [..], 'finish_time', 'active':
  [..], 'model'}``; client ``c`` is online from ``active[i]`` to ``inactive[i]`` (seconds), and its
  simulator reads the trace modulo ``finish_time`` (it repeats).
- ``client_device_capacity``: client id -> ``{'computation', 'communication'}``; FedScale's
  simulator takes ``computation`` as milliseconds per sample and ``communication`` as kbit/s.

cloudedge never unpickles a file (a pickle can run any code when loaded). A user converts the
pickle to JSON once, in an environment they trust (docs/profiles.md, "FedScale traces", has the
one-line command), and this module reads the JSON.

Clients are mapped to the fleet's devices in order of their ids (numeric ids numerically): the k-th
client becomes device number k; clients beyond the fleet's size are left out.
"""

from __future__ import annotations

import csv
import io
import json
import math
import statistics
from pathlib import Path
from typing import Any

from cloudedge.errors import InputError

_PICKLE_HINT = ("cloudedge does not unpickle files; convert it to JSON once, in an environment you trust "
                "(docs/profiles.md, \"FedScale traces\", has the one-line command)")


def _load_json(path: Path) -> dict[str, Any]:
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise InputError(f"{path}: cannot read ({err.strerror})") from None
    if raw[:1] == b"\x80" or path.suffix.lower() in (".pkl", ".pickle"):
        raise InputError(f"{path}: a pickle file. {_PICKLE_HINT}")
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise InputError(f"{path}: not a JSON object of clients ({err}). {_PICKLE_HINT}") from None
    if not isinstance(data, dict) or not data:
        raise InputError(f"{path}: expected a JSON object mapping client ids to entries")
    return data


def _ordered(data: dict[str, Any]) -> list[str]:
    return sorted(data, key=lambda k: (0, int(k), "") if str(k).isdigit() else (1, 0, str(k)))


def behave_to_rows(path: str | Path, device_ids: list[str], horizon_s: float) -> list[tuple[str, float, float]]:
    """Online intervals ``(device, start_s, end_s)`` up to ``horizon_s``, each client's periodic
    trace unrolled (FedScale repeats it every ``finish_time`` seconds)."""
    path = Path(path)
    data = _load_json(path)
    rows: list[tuple[str, float, float]] = []
    for device, client in zip(device_ids, _ordered(data), strict=False):
        entry = data[client]
        try:
            active = [float(x) for x in entry["active"]]
            inactive = [float(x) for x in entry["inactive"]]
            period = float(entry["finish_time"])
        except (KeyError, TypeError, ValueError) as err:
            raise InputError(f"{path}: client {client}: not a FedScale behaviour entry ({err!r})") from None
        if len(active) != len(inactive) or period <= 0 or not math.isfinite(period):
            raise InputError(f"{path}: client {client}: 'active' and 'inactive' differ in length or "
                             "'finish_time' is not positive")
        spans = sorted((a, min(b, period)) for a, b in zip(active, inactive, strict=True) if b > a and a < period)
        base = 0.0
        while base < horizon_s:
            for a, b in spans:
                start, end = base + a, min(base + b, horizon_s)
                if start >= horizon_s:
                    break
                if rows and rows[-1][0] == device and start <= rows[-1][2]:
                    rows[-1] = (device, rows[-1][1], max(rows[-1][2], end))  # touching or overlapping: one
                else:
                    rows.append((device, start, end))
            base += period
    return rows


def capacity_to_rows(path: str | Path, device_ids: list[str]) -> list[tuple[str, float, float, float]]:
    """Speed multipliers ``(device, compute_scale, uplink_scale, downlink_scale)`` relative to the
    median client (so the median client is its profile): compute from milliseconds per sample
    (more is slower), both links from ``communication``."""
    path = Path(path)
    data = _load_json(path)
    clients = _ordered(data)[:len(device_ids)]
    try:
        comp = [float(data[c]["computation"]) for c in clients]
        comm = [float(data[c]["communication"]) for c in clients]
    except (KeyError, TypeError, ValueError) as err:
        raise InputError(f"{path}: not a FedScale capacity trace ({err!r})") from None
    if not clients or min(comp) <= 0 or min(comm) <= 0:
        raise InputError(f"{path}: 'computation' and 'communication' must be positive")
    mc, ml = statistics.median(comp), statistics.median(comm)
    return [(d, mc / c, m / ml, m / ml) for d, c, m in zip(device_ids, comp, comm, strict=False)]


def write_csv(rows: list[tuple], header: tuple[str, ...]) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(header)
    for row in rows:
        writer.writerow([row[0], *(f"{x:.10g}" for x in row[1:])])
    return out.getvalue()
