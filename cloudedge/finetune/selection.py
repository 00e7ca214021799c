"""Who takes part in an edge round, and which updates it keeps (docs/reliability.md, "Selection,
deadlines and over-selection").

- :func:`select_devices`: without a goal, the available devices (Bernoulli: one draw each, the
  draws `cloudedge.fleet.available_nodes` always made; a trace or the diurnal model: those online at
  the round's start), then a ``participation`` share; with a goal, ``goal x over_selection`` drawn
  among the devices online at the round's start, looking only at the candidates drawn (a fleet may
  hold a million devices).
- :func:`keep_first`: over-selection's cut: of the devices that will deliver, the first ``goal`` to
  arrive (what-if bookings of their uploads queued together on the aggregation point's links) are
  kept; the others are cancelled when the last kept update is in.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
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
               arrivals: Callable[[list[Any]], list[float]], last: Callable[[Any], bool] = lambda p: False,
               ) -> tuple[list[Any], int]:
    """Over-selection: keep the first ``goal`` of ``planned`` (items with ``dev``, ``begin``,
    ``flops``) to arrive, and charge each other one's compute up to when the last kept update is
    in (the aggregation point cancels it then). Returns the kept items, in their order, and how
    many were cancelled.

    ``arrivals(items)``: when each of ``items`` would be in if those alone computed and uploaded
    (a what-if booking; inf: lost in the queue). They are ranked by a booking of all of them, the
    items ``last`` says cannot count (an update the aggregation point will reject) after the others.
    The first ``goal`` are then booked alone, as the round will book them. If one of those is
    lost, queued behind the others (a relayed upload can be overtaken on its second hop), it is
    dropped and the next by rank takes its place, until all kept would be in. When that leaves
    fewer than ``goal``, nobody is cancelled: the round takes what comes."""
    if goal is None or len(planned) <= goal:
        return planned, 0
    everyone = arrivals(planned)
    rank = sorted(range(len(planned)), key=lambda i: (last(planned[i]), everyone[i], planned[i].dev.index))
    place = {i: n for n, i in enumerate(rank)}
    kept, waiting = rank[:goal], rank[goal:]
    while True:
        got = arrivals([planned[i] for i in kept])
        lost = [i for i, t in zip(kept, got, strict=True) if not math.isfinite(t)]
        if not lost:
            break
        if len(waiting) < len(lost):
            return planned, 0
        kept = sorted([i for i in kept if i not in lost] + waiting[:len(lost)], key=place.__getitem__)
        waiting = waiting[len(lost):]
    t_cut = max(got)
    keep = set(kept)
    for i in range(len(planned)):
        if i not in keep:
            p = planned[i]
            clock.compute_until(p.dev.id, p.flops, p.begin, t_cut)
    return [p for i, p in enumerate(planned) if i in keep], len(planned) - len(keep)
