"""What travels between devices, edges and the cloud during fine-tuning: payloads, bytes, link times.

A payload is compressed as ``finetune.compression`` says; the receiver gets the decompressed
tensors (the quantization error is real) and the clock is charged the wire bytes, or the bytes of
the charged model's version of the message (``clock.charge_as``, :mod:`cloudedge.finetune.charge`).
The fleet has no direct device <-> cloud link: such a message (two-tier policies) is relayed by the
device's edge (access link, then the edge site's WAN uplink), so the WAN carries one copy per device.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch

from cloudedge.comm import compress
from cloudedge.finetune.lora import A_SUFFIX, mode_class, sent_keys
from cloudedge.fleet import Fleet, VirtualClock, transfer_seconds
from cloudedge.fleet.topology import Node

Tensors = dict[str, torch.Tensor]
CLOUD = "cloud"


class Upload(NamedTuple):
    """An update on its way: a device's to its aggregation point, or an edge's to the cloud (:meth:`Messages.uploads`)."""

    src: str
    dst: str
    nbytes: int
    sent_at: float
    online_until: float = math.inf  # when the sender goes offline (its availability model)
    deadline: float = math.inf  # when the receiver stops waiting


class Arrival(NamedTuple):
    """When an upload is in (``at``), or why it never is (``lost``: "offline" or "deadline"; at = inf)."""

    at: float
    lost: str | None


class Messages:
    """Payloads and their cost on the clock for one run (``settings``: its ``FinetuneSettings``).

    ``template``: the global adapter state (keys, shapes and dtypes of every message);
    ``charged_layout``: the charged model's adapter layout (None: the clock charges the trained model).
    """

    def __init__(self, settings: Any, fleet: Fleet, clock: VirtualClock, template: Tensors,
                 charged_layout: Tensors | None):
        self.s, self.fleet, self.clock = settings, fleet, clock
        self.template, self.charged_layout = template, charged_layout

    def down_keys(self, state: Tensors) -> list[str]:
        """What a receiver needs: every trained tensor (and base deltas); under ffa A never changes."""
        if mode_class(self.s.lora_mode).frozen_a:
            return [k for k in state if not k.endswith(A_SUFFIX)]
        return list(state)

    def ship(self, tensors: Tensors) -> tuple[Tensors, int]:
        """The tensors as the receiver gets them (after compression) and the bytes on the wire."""
        payload = compress(tensors, self.s.compression)
        got = payload.decompress() if self.s.compression != "none" else tensors
        return {k: got[k].to(tensors[k].dtype) for k in tensors}, self.charged_nbytes(tensors, int(payload.nbytes))

    def charged_nbytes(self, tensors: Tensors, nbytes: int) -> int:
        """``nbytes`` of a message, or the bytes of the charged model's version of it (clock.charge_as)."""
        if self.charged_layout is None:
            return nbytes
        from cloudedge.finetune.charge import charged_message_bytes

        return charged_message_bytes(self.charged_layout, tensors, self.s.compression)

    def send_state(self, state: Tensors) -> tuple[Tensors, int]:
        """A model sent down (cloud -> edge, edge -> device): what arrives, and its bytes."""
        keys = self.down_keys(state)
        got, nbytes = self.ship({k: state[k] for k in keys})
        return {**state, **got}, nbytes

    def edge_upload(self, state: Tensors, pulled: Tensors) -> tuple[Tensors, int]:
        """An edge's state as the cloud receives it (the change since ``pulled``, compressed) and
        its bytes. Under ffa A never changes; after a product/merge re-initialisation every tensor,
        the dense base deltas included, has changed and is sent."""
        merged = self.s.lora().merges
        keys = list(state) if merged else sent_keys(list(state), self.s.lora_mode)
        got, nbytes = self.ship({k: state[k] - pulled[k] for k in keys})
        return {**pulled, **{k: pulled[k] + v for k, v in got.items()}}, nbytes

    def update_bytes(self) -> int:
        """Bytes of one device update (uncompressed shape of what a device sends)."""
        keys = sent_keys(list(self.template), self.s.lora_mode)
        zeros = {k: torch.zeros_like(self.template[k]) for k in keys}
        return self.charged_nbytes(zeros, int(compress(zeros, self.s.compression).nbytes))

    def trained_update_bytes(self) -> int:
        """Bytes of one device update of the model that learns (whatever the clock charges)."""
        keys = sent_keys(list(self.template), self.s.lora_mode)
        return int(compress({k: torch.zeros_like(self.template[k]) for k in keys}, self.s.compression).nbytes)

    def relay(self, src: Node, dst: Node) -> str | None:
        """The edge that relays a message between ``src`` and ``dst`` (device <-> cloud), else None."""
        if {src.tier, dst.tier} == {"device", "cloud"}:
            return (src if src.tier == "device" else dst).parent
        return None

    def link_s(self, src: Node, dst: Node, nbytes: int) -> float:
        """Expected seconds of one message (device <-> cloud: two hops via the edge)."""
        via = self.relay(src, dst)
        if via is not None:
            edge = self.fleet.nodes[via]
            return (transfer_seconds(src.profile, edge.profile, nbytes)
                    + transfer_seconds(edge.profile, dst.profile, nbytes))
        return transfer_seconds(src.profile, dst.profile, nbytes)

    def sender_s(self, src: Node, dst: Node, nbytes: int) -> float:
        """Expected seconds until ``src`` has handed a message to ``dst`` over: the whole message, or
        its first hop when the edge relays it (after that the edge carries it on without ``src``)."""
        via = self.relay(src, dst)
        return self.link_s(src, self.fleet.nodes[via] if via is not None else dst, nbytes)

    def uploads(self, sends: Sequence[Upload], on: VirtualClock | None = None) -> list[Arrival]:
        """Book a round's uploads (:class:`Upload`: devices' to their aggregation point, or edges'
        to the cloud) on the run's clock, or ``on`` another one (a ``what_if`` scratch clock);
        when each arrives, or why it never does.

        Each link's queue is first come, first served in booking order, so every hop is booked when
        it starts (a small discrete-event loop): an upload at its send time, and a relayed one
        (device -> edge -> cloud) forwarded by the edge as soon as it is there, not after whatever
        else the edge received later. Booking in time order also keeps each node's busy time right
        (the clock counts only busy time past what it has already booked).

        A hop is judged, behind what is queued when it starts (``VirtualClock.transfer_end``), before
        it is booked: an upload that would arrive after its ``deadline`` is lost as ``"deadline"``, and
        one whose sender goes offline (``online_until``, before the deadline) before its own hop is
        done is lost as ``"offline"`` (a relaying edge needs no device any more). A lost hop is booked
        as cut off at that instant (``VirtualClock.transfer_cut``): its links are held for the bytes
        that got through by then, and those are charged."""
        clock = self.clock if on is None else on
        arrival: dict[int, Arrival] = {}
        events = [(u.sent_at, 0, i) for i, u in enumerate(sends)]
        heapq.heapify(events)
        while events:
            t, hop, i = heapq.heappop(events)
            u = sends[i]
            via = self.relay(self.fleet.nodes[u.src], self.fleet.nodes[u.dst])
            src, dst = (via, u.dst) if hop == 1 else (u.src, via or u.dst)
            end = clock.transfer_end(src, dst, u.nbytes, start=t, forwarding=hop == 1)
            lost = None
            if hop == 0 and end > u.online_until and u.online_until < u.deadline:
                lost = "offline"
            elif end > u.deadline:
                lost = "deadline"
            if lost is not None:
                clock.transfer_cut(src, dst, u.nbytes, until=u.online_until if lost == "offline" else u.deadline,
                                   start=t, forwarding=hop == 1)
                arrival[i] = Arrival(math.inf, lost)
                continue
            end = clock.transfer(src, dst, u.nbytes, start=t, forwarding=hop == 1)
            if hop == 0 and via is not None:
                heapq.heappush(events, (end, 1, i))
            else:
                arrival[i] = Arrival(end, None)
        return [arrival[i] for i in range(len(sends))]

    def transfer(self, src_id: str, dst_id: str, nbytes: int, start: float) -> float:
        """A message on the clock; device <-> cloud messages are relayed by the edge. Returns its arrival."""
        via = self.relay(self.fleet.nodes[src_id], self.fleet.nodes[dst_id])
        if via is not None:
            t = self.clock.transfer(src_id, via, nbytes, start=start)
            return self.clock.transfer(via, dst_id, nbytes, start=t)
        return self.clock.transfer(src_id, dst_id, nbytes, start=start)
