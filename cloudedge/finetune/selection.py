"""Who takes part in an edge round, and which updates it keeps (docs/reliability.md, "Selection,
deadlines and over-selection").

- :func:`select_devices`: without a goal, the available devices (Bernoulli: one draw each, the
  draws `cloudedge.fleet.available_nodes` always made; a trace or the diurnal model: those online at
  the round's start), then a ``participation`` share; with a goal, ``goal x over_selection`` drawn
  among the devices online at the round's start, looking only at the candidates drawn (a fleet may
  hold a million devices).
- :func:`keep_first`: over-selection's cut: of the devices that will deliver, the first ``goal`` by
  expected arrival (every planned upload queued on the edge's links: a what-if booking) are kept;
  the others are cancelled when the last kept update is due.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from cloudedge.fleet import available_nodes
from cloudedge.fleet.topology import DeviceSeq, Fleet, Node
from cloudedge.fleet.traces import online_mask, sample_online


def device_numbers(fleet: Fleet, devices: Sequence[Node]) -> np.ndarray:
    """The device numbers of ``devices`` (a lazy `DeviceSeq` gives its range without building nodes)."""
    if isinstance(devices, DeviceSeq):
        return np.arange(devices.lo, devices.hi, dtype=np.int64)
    return np.array([fleet.device_number(d.id) for d in devices], dtype=np.int64)


def select_devices(fleet: Fleet, devices: Sequence[Node], t0: float, rng: np.random.Generator, goal: int | None,
                   over_selection: float, participation: float) -> list[Node]:
    """The devices of ``devices`` that take part in a round starting at ``t0`` (module docstring)."""
    if goal is None:
        if fleet.availability.kind == "bernoulli":
            avail = available_nodes(devices, rng)
        else:
            numbers = device_numbers(fleet, devices)
            avail = [fleet.device(int(n)) for n in numbers[online_mask(fleet, numbers, t0, rng)]]
        if participation < 1.0 and avail:
            k = max(1, round(participation * len(avail)))
            pick = sorted(rng.choice(len(avail), size=k, replace=False).tolist())
            avail = [avail[i] for i in pick]
        return avail
    want = math.ceil(goal * over_selection)
    if isinstance(devices, DeviceSeq):
        chosen = sample_online(fleet, devices.lo, devices.hi, t0, want, rng)
    else:
        chosen = sample_online(fleet, 0, 0, t0, want, rng, numbers=device_numbers(fleet, devices))
    return [fleet.device(int(n)) for n in chosen]


def keep_first(planned: list[Any], goal: int | None, clock: Any,
               expected: Sequence[float]) -> tuple[list[Any], int]:
    """Over-selection: keep the first ``goal`` of ``planned`` (items with ``dev``, ``begin``,
    ``flops``) by ``expected`` arrival (per item; inf: it would be lost in the queue), and charge
    each other one's compute up to when the last kept update is due (the edge cancels it then).
    ``expected`` comes from booking every planned upload, so a kept one, queued behind fewer, is
    in no later. When fewer than ``goal`` would be in at all, nobody is cancelled: the round takes
    what comes. Returns the kept items, in their order, and how many were cancelled."""
    if goal is None or len(planned) <= goal:
        return planned, 0
    order = sorted(range(len(planned)), key=lambda i: (expected[i], planned[i].dev.index))
    t_cut = expected[order[goal - 1]]
    if not math.isfinite(t_cut):
        return planned, 0
    kept, extra = set(order[:goal]), order[goal:]
    for i in extra:
        p = planned[i]
        clock.compute_until(p.dev.id, p.flops, p.begin, t_cut)
    return [p for i, p in enumerate(planned) if i in kept], len(extra)
