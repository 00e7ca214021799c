"""The virtual clock: work is real, time is accounted.

A node's compute takes `flops / profile.flops` seconds; a message takes `nbytes / min(sender
uplink, receiver downlink)` plus the larger of the two ends' latencies. The clock keeps, per node,
when it is next free (`busy_until`), how long it has been busy, how much energy it used and how
many FLOPs it did; per link (pair of tiers), how many bytes crossed.

Scheduling rules (docs/profiles.md, "The clock"):

- `compute` starts at `max(start or now, busy_until[node])`: a node does one thing at a time.
- `transfer` starts once the sender's data exists (its last compute or receive has ended), not
  after its other sends: a node's link is a pipe that many messages share. Each end's link
  carries bytes at its own rate, first come first served, so an edge sending to 100 phones is
  bounded by its uplink in total and by each phone's downlink per message, rather than sending
  one message after another. A lone message takes exactly `transfer_seconds`. Both ends are
  busy until the message has arrived. "First come" is the order of the calls: a stage books the
  messages of a round in the order they are sent (pre-training and fine-tuning sort their uploads
  by when each sender's compute ends; relayed second hops by when their first hop arrives, with
  ``forwarding=True``), else one could wait behind a message sent later.
- `transfer_end` answers when a `transfer` would arrive, without booking it; `what_if()` gives a
  scratch clock to try several bookings on (a round's uploads queued behind one another).
- `barrier(ids)` moves `now` to when the slowest of them is done, and makes them all wait there.
"""

from __future__ import annotations

import copy
import math
from collections import defaultdict
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from cloudedge.errors import InputError
from cloudedge.fleet.profiles import TIERS, Profile, Tier, link_figures
from cloudedge.fleet.topology import Fleet, Node

STATE_VERSION = 1
_TIER_RANK = {t: i for i, t in enumerate(TIERS)}


def compute_seconds(profile: Profile, flops: float) -> float:
    """Seconds `profile` needs for `flops` floating-point operations."""
    return flops / profile.flops


def transfer_seconds(src_profile: Profile, dst_profile: Profile, nbytes: float) -> float:
    """Seconds one message of `nbytes` takes from src to dst when nothing else is on the links."""
    up, _, src_lat, _ = link_figures(src_profile, dst_profile.tier)
    _, down, dst_lat, _ = link_figures(dst_profile, src_profile.tier)
    return nbytes / min(up, down) + max(src_lat, dst_lat)


def link_key(tier_a: Tier, tier_b: Tier) -> tuple[Tier, Tier]:
    """The undirected link between two tiers, lower tier first: ("device", "edge")."""
    return (tier_a, tier_b) if _TIER_RANK[tier_a] <= _TIER_RANK[tier_b] else (tier_b, tier_a)


def available(node: Node, rng: np.random.Generator) -> bool:
    """Whether `node` is reachable this round: one draw against its profile's availability."""
    return bool(rng.random() < node.profile.availability)


def available_nodes(nodes: Sequence[Node], rng: np.random.Generator) -> list[Node]:
    """The reachable subset of `nodes` (one draw each, in order; same draws as `available`)."""
    draws = rng.random(len(nodes))
    return [n for n, u in zip(nodes, draws, strict=True) if u < n.profile.availability]


@dataclass(frozen=True)
class ClockMark:
    """A point in virtual time and the busy seconds up to it, for `VirtualClock.utilization`."""

    t: float
    busy_s: dict[str, float] = field(repr=False)


class _Overlay(dict):  # type: ignore[type-arg]
    """A per-node table of a what-if clock: its own writes over the real clock's table, which it
    reads through without adding entries to it. Membership, iteration and length are of the union,
    so the clock's reports work on a what-if clock too."""

    def __init__(self, base: dict[str, float]):
        super().__init__()
        self.base = base

    def __missing__(self, key: str) -> float:
        return self.base.get(key, 0.0)

    def get(self, key: str, default: Any = None) -> Any:  # type: ignore[override]
        return dict.__getitem__(self, key) if dict.__contains__(self, key) else self.base.get(key, default)

    def __contains__(self, key: object) -> bool:
        return dict.__contains__(self, key) or key in self.base

    def __iter__(self) -> Iterator[str]:
        yield from dict.__iter__(self)
        yield from (k for k in self.base if not dict.__contains__(self, k))

    def __len__(self) -> int:
        return sum(1 for _ in self)

    def keys(self) -> list[str]:  # type: ignore[override]
        return list(self)

    def values(self) -> list[float]:  # type: ignore[override]
        return [self[k] for k in self]

    def items(self) -> list[tuple[str, float]]:  # type: ignore[override]
        return [(k, self[k]) for k in self]


class VirtualClock:
    """Accounts virtual time, energy and bytes over a fleet. All times are seconds from 0."""

    def __init__(self, fleet: Fleet):
        self.fleet = fleet
        self.now = 0.0
        # Per node, sparse: a node that never did anything has no entry (reads as 0), so a fleet of
        # a million devices costs what the devices that worked cost (docs/performance.md, "Scale").
        self.busy_until: dict[str, float] = defaultdict(float)
        self.busy_s: dict[str, float] = defaultdict(float)
        self.energy_j: dict[str, float] = defaultdict(float)
        self.flops_done: dict[str, float] = defaultdict(float)
        # When a node's own data is ready to send (end of its last compute or receive).
        self._data_ready: dict[str, float] = defaultdict(float)
        # When each node's uplink / downlink pipe has carried all bytes queued on it.
        self._up_free: dict[str, float] = defaultdict(float)
        self._down_free: dict[str, float] = defaultdict(float)
        # An edge's WAN pipe to the cloud, where its profile gives one (``wan_*``): its own queue.
        self._wan_up_free: dict[str, float] = defaultdict(float)
        self._wan_down_free: dict[str, float] = defaultdict(float)
        self.bytes_by_link: dict[tuple[Tier, Tier], int] = {}
        self.bytes_by_direction: dict[tuple[Tier, Tier], int] = {}
        self.messages = 0
        self._energy_by_kind: dict[Tier, dict[str, float]] = {t: {"compute": 0.0, "radio": 0.0} for t in TIERS}

    # -- work ---------------------------------------------------------------------------------

    def compute(self, node_id: str, flops: float, start: float | None = None) -> float:
        """Run `flops` on a node; returns when it ends. Charges `flops * joules_per_flop`."""
        if flops < 0:
            raise ValueError(f"flops must be >= 0, got {flops}")
        node = self.fleet.nodes[node_id]
        begin = max(self.now if start is None else start, self.busy_until[node_id])
        end = begin + compute_seconds(node.profile, flops)
        self._mark_busy(node_id, begin, end)
        self._data_ready[node_id] = max(self._data_ready[node_id], end)
        self.flops_done[node_id] += float(flops)
        joules = float(flops) * node.profile.joules_per_flop
        self.energy_j[node_id] += joules
        self._energy_by_kind[node.tier]["compute"] += joules
        return end

    def compute_until(self, node_id: str, flops: float, start: float, until: float) -> float:
        """Run ``flops`` from ``start`` but stop at ``until`` (the node left, a deadline passed):
        charges the work done by then; returns when it stopped."""
        done = max(0.0, until - start) * self.fleet.nodes[node_id].profile.flops
        return self.compute(node_id, min(flops, done), start=start)

    def transfer(self, src_id: str, dst_id: str, nbytes: int, start: float | None = None,
                 forwarding: bool = False) -> float:
        """Send `nbytes` from src to dst; returns when the message has fully arrived.

        Charges `nbytes * radio_joules_per_byte` to each end (each with its own profile's figure)
        and counts the bytes on the link between the two tiers. ``forwarding``: src relays a
        message it received at ``start``, so the message is ready then, whatever else src has
        received since (else a send waits for src's last compute or receive).
        """
        src, dst = self.fleet.nodes[src_id], self.fleet.nodes[dst_id]
        begin, end, (up_free, _, up_end), (down_free, _, down_end) = self._route(src_id, dst_id, nbytes, start,
                                                                                 forwarding)
        up_free[src_id], down_free[dst_id] = up_end, down_end
        self._mark_busy(src_id, begin, end)
        self._mark_busy(dst_id, begin, end)
        self._data_ready[dst_id] = max(self._data_ready[dst_id], end)
        self._charge_bytes(src, dst, nbytes)
        return end

    def _charge_bytes(self, src: Node, dst: Node, nbytes: int) -> None:
        """One message's ``nbytes``: radio energy at each end (its own profile's figure), the bytes
        on the link between the two tiers and in that direction."""
        for node in (src, dst):
            joules = nbytes * node.profile.radio_joules_per_byte
            self.energy_j[node.id] += joules
            self._energy_by_kind[node.tier]["radio"] += joules
        key = link_key(src.tier, dst.tier)
        self.bytes_by_link[key] = self.bytes_by_link.get(key, 0) + int(nbytes)
        direction = (src.tier, dst.tier)
        self.bytes_by_direction[direction] = self.bytes_by_direction.get(direction, 0) + int(nbytes)
        self.messages += 1

    def transfer_cut(self, src_id: str, dst_id: str, nbytes: int, until: float, start: float | None = None,
                     forwarding: bool = False) -> int:
        """A message that would arrive after ``until`` and is cut off then (its receiver stopped
        waiting, or its sender went away). The bytes through by then are the fewer that the two
        ends' pipes had carried, each from its turn (latency aside). Each pipe is held for those
        bytes, so the slower one until ``until``; both ends are busy until ``until``; the bytes are
        charged as radio energy at both ends and on the link. Returns them: 0, with nothing booked,
        when its turn had not come on one of the pipes by then."""
        begin, end, (up_free, up_start, up_end), (down_free, down_start, down_end) = self._route(
            src_id, dst_id, nbytes, start, forwarding)
        if end <= until:
            raise ValueError(f"a message arriving at {end} is not cut at {until}: use transfer()")
        # Each pipe carries the message from its turn there at its own rate (nbytes over its time).
        carried = [nbytes * max(0.0, until - t0) / (t1 - t0) if t1 > t0 else 0.0
                   for t0, t1 in ((up_start, up_end), (down_start, down_end))]
        through = int(min(nbytes, *carried))
        if through <= 0:
            return 0
        share = through / nbytes
        up_free[src_id] = max(up_free.get(src_id, 0.0), up_start + share * (up_end - up_start))
        down_free[dst_id] = max(down_free.get(dst_id, 0.0), down_start + share * (down_end - down_start))
        self._mark_busy(src_id, begin, until)
        self._mark_busy(dst_id, begin, until)
        self._charge_bytes(self.fleet.nodes[src_id], self.fleet.nodes[dst_id], through)
        return through

    def transfer_end(self, src_id: str, dst_id: str, nbytes: int, start: float | None = None,
                     forwarding: bool = False) -> float:
        """When :meth:`transfer` with these arguments would deliver, behind what is already queued
        on both ends' pipes, without sending anything (a node deciding whether it can finish)."""
        return self._route(src_id, dst_id, nbytes, start, forwarding)[1]

    def what_if(self) -> VirtualClock:
        """A scratch clock that sees everything booked here so far and keeps what is booked on it
        to itself: to try out several bookings that queue behind one another (an aggregation point
        deciding which over-selected updates will be in first). Costs O(1), whatever the fleet's
        size. Use it at once and drop it: its per-node tables read through to this clock's as they
        are when read, its totals (time, messages, bytes, energy by kind) are copies."""
        scratch = copy.copy(self)
        for name in self._PER_NODE:
            setattr(scratch, name, _Overlay(getattr(self, name)))
        scratch.bytes_by_link, scratch.bytes_by_direction = dict(self.bytes_by_link), dict(self.bytes_by_direction)
        scratch._energy_by_kind = {t: dict(k) for t, k in self._energy_by_kind.items()}
        return scratch

    def _route(self, src_id: str, dst_id: str, nbytes: int, start: float | None, forwarding: bool = False
               ) -> tuple[float, float, tuple[dict[str, float], float, float], tuple[dict[str, float], float, float]]:
        """``(begin, end, (uplink queue, its turn there, its new end), (downlink queue, its turn
        there, its new end))`` of one message: each end's pipe carries it at that end's full rate,
        from its turn (after what is queued on it).
        Reads only (``.get``: no node becomes "touched" by being asked about)."""
        if src_id == dst_id:
            raise ValueError(f"transfer from {src_id!r} to itself")
        if nbytes < 0:
            raise ValueError(f"nbytes must be >= 0, got {nbytes}")
        sp, dp = self.fleet.nodes[src_id].profile, self.fleet.nodes[dst_id].profile
        begin = self.now if start is None else start
        if not forwarding:
            begin = max(begin, self._data_ready.get(src_id, 0.0))
        up, _, src_lat, src_wan = link_figures(sp, dp.tier)
        _, down, dst_lat, dst_wan = link_figures(dp, sp.tier)
        up_free = self._wan_up_free if src_wan else self._up_free
        down_free = self._wan_down_free if dst_wan else self._down_free
        up_start, down_start = max(begin, up_free.get(src_id, 0.0)), max(begin, down_free.get(dst_id, 0.0))
        up_end, down_end = up_start + nbytes / up, down_start + nbytes / down
        wire_end = max(begin + nbytes / min(up, down), up_end, down_end)
        return begin, wire_end + max(src_lat, dst_lat), (up_free, up_start, up_end), (down_free, down_start, down_end)

    def _mark_busy(self, node_id: str, begin: float, end: float) -> None:
        # Only the part past what is already counted: overlapping messages are not double-counted.
        old = self.busy_until[node_id]
        self.busy_s[node_id] += max(0.0, end - max(begin, old))
        if end > old:
            self.busy_until[node_id] = end

    # -- time ---------------------------------------------------------------------------------

    def barrier(self, node_ids: Iterable[str]) -> float:
        """Everyone in `node_ids` waits for the slowest: returns that time and sets `now` to it.

        Waiting is idle time, not busy time. `now` never moves back.
        """
        ids = list(node_ids)
        t = max([self.now, *(self.busy_until[i] for i in ids)])
        for i in ids:
            self.busy_until[i] = t
        self.now = t
        return t

    def advance_to(self, t: float) -> float:
        """Move `now` forward to `t` (never back); returns the new `now`."""
        self.now = max(self.now, float(t))
        return self.now

    def makespan(self) -> float:
        """The latest time anything in the fleet is done (`now` or later)."""
        return max(self.now, max(self.busy_until.values(), default=0.0))

    # -- reports ------------------------------------------------------------------------------

    def mark(self) -> ClockMark:
        """Remember `now` and every node's busy seconds, to measure utilization from here."""
        return ClockMark(self.now, dict(self.busy_s))

    def utilization(self, node_ids: Iterable[str], since: ClockMark | None = None) -> float:
        """Mean share of the time since `since` (default: the start) that these nodes were busy.

        The window ends at `now`, or later if one of them is still busy.
        """
        ids = list(node_ids)
        if not ids:
            return 0.0
        t0 = since.t if since is not None else 0.0
        t1 = max([self.now, *(self.busy_until[i] for i in ids)])
        elapsed = t1 - t0
        if elapsed <= 0:
            return 0.0
        before = since.busy_s if since is not None else {}
        busy = sum(self.busy_s[i] - before.get(i, 0.0) for i in ids)
        return busy / (len(ids) * elapsed)

    def energy_by_tier(self) -> dict[Tier, float]:
        """Joules used per tier, compute and radio together."""
        return {t: kinds["compute"] + kinds["radio"] for t, kinds in self._energy_by_kind.items()}

    def _touched(self) -> list[str]:
        """Ids of the nodes with any entry (the others did nothing and read as 0)."""
        seen: dict[str, None] = {}
        for name in self._PER_NODE:
            seen.update(dict.fromkeys(getattr(self, name)))
        return list(seen)

    def summary(self) -> dict[str, Any]:
        """Plain-data totals for `summary.json` and reports."""
        by_tier: dict[Tier, list[str]] = {t: [] for t in TIERS}
        for node_id in self._touched():
            by_tier[self.fleet.nodes[node_id].tier].append(node_id)
        sizes = {"cloud": 1, "edge": len(self.fleet.edges), "device": len(self.fleet.devices)}
        return {
            "virtual_time_s": self.makespan(),
            "energy_j": {t: e for t, e in self.energy_by_tier().items()},
            "energy_j_by_kind": {t: dict(k) for t, k in self._energy_by_kind.items()},
            "energy_j_total": sum(self.energy_by_tier().values()),
            "bytes_by_link": {_key_str(k, "-"): n for k, n in sorted(self.bytes_by_link.items())},
            "bytes_by_direction": {_key_str(k, "->"): n for k, n in sorted(self.bytes_by_direction.items())},
            "bytes_total": sum(self.bytes_by_link.values()),
            "messages": self.messages,
            "flops_by_tier": {t: sum(self.flops_done[i] for i in ids) for t, ids in by_tier.items()},
            "busy_s_by_tier": {t: sum(self.busy_s[i] for i in ids) for t, ids in by_tier.items()},
            "utilization_by_tier": {t: self.utilization(ids) * len(ids) / sizes[t]
                                    for t, ids in by_tier.items() if sizes[t]},
        }

    # -- resume -------------------------------------------------------------------------------

    _PER_NODE = ("busy_until", "busy_s", "energy_j", "flops_done", "_data_ready", "_up_free", "_down_free",
                 "_wan_up_free", "_wan_down_free")
    _OPTIONAL = ("_wan_up_free", "_wan_down_free")  # absent from states saved before WAN links existed

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue accounting after a restart, as plain JSON-able data.

        Only nodes that did something are listed (``node_ids``); ``n_nodes`` is the fleet's size."""
        ids = self._touched()
        return {
            "version": STATE_VERSION,
            "now": self.now,
            "n_nodes": len(self.fleet.nodes),
            "node_ids": ids,
            "per_node": {name.lstrip("_"): [getattr(self, name)[i] for i in ids] for name in self._PER_NODE},
            "bytes_by_link": {_key_str(k, "-"): n for k, n in self.bytes_by_link.items()},
            "bytes_by_direction": {_key_str(k, "->"): n for k, n in self.bytes_by_direction.items()},
            "messages": self.messages,
            "energy_by_kind": {t: dict(k) for t, k in self._energy_by_kind.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore `state_dict()` output. A state from another fleet is an `InputError`."""
        where = "clock state"
        if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
            raise InputError(f"{where}: not a clock state of version {STATE_VERSION}")
        saved = state.get("node_ids")
        n_nodes = state.get("n_nodes", len(saved) if isinstance(saved, list) else None)
        if (not isinstance(saved, list) or n_nodes != len(self.fleet.nodes)
                or not all(isinstance(i, str) and i in self.fleet.nodes for i in saved)):
            got = n_nodes if isinstance(n_nodes, int) else "no"
            raise InputError(f"{where}: saved for another fleet ({got} nodes, this fleet has {len(self.fleet.nodes)})")
        ids = saved
        try:
            saved_per_node = {**{n.lstrip("_"): [0.0] * len(ids) for n in self._OPTIONAL}, **state["per_node"]}
            per_node = {name: [float(v) for v in saved_per_node[name.lstrip("_")]] for name in self._PER_NODE}
            if any(len(v) != len(ids) for v in per_node.values()):
                raise ValueError("per-node lists of the wrong length")
            now = float(state["now"])
            links = {_parse_key(k, "-"): int(n) for k, n in state["bytes_by_link"].items()}
            directions = {_parse_key(k, "->"): int(n) for k, n in state["bytes_by_direction"].items()}
            messages = int(state["messages"])
            by_kind = {t: {"compute": float(state["energy_by_kind"][t]["compute"]),
                           "radio": float(state["energy_by_kind"][t]["radio"])} for t in TIERS}
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            raise InputError(f"{where}: malformed ({err})") from None
        if not all(math.isfinite(x) for v in per_node.values() for x in v) or not math.isfinite(now):
            raise InputError(f"{where}: malformed (non-finite times or totals)")
        self.now = now
        for name, values in per_node.items():
            setattr(self, name, defaultdict(float, zip(ids, values, strict=True)))
        self.bytes_by_link = links
        self.bytes_by_direction = directions
        self.messages = messages
        self._energy_by_kind = by_kind  # type: ignore[assignment]


def _key_str(key: tuple[str, str], sep: str) -> str:
    return f"{key[0]}{sep}{key[1]}"


def _parse_key(text: str, sep: str) -> tuple[Tier, Tier]:
    a, b = text.split(sep)
    if a not in _TIER_RANK or b not in _TIER_RANK:
        raise ValueError(f"unknown tier in link {text!r}")
    return a, b  # type: ignore[return-value]
