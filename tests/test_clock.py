"""The virtual clock: hand-computed times, barriers, energy and byte accounting, resume."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from cloudedge.config import config_from_dict
from cloudedge.errors import InputError
from cloudedge.fleet import (
    PROFILES,
    Fleet,
    VirtualClock,
    available,
    available_nodes,
    compute_seconds,
    transfer_seconds,
)

# Round figures so every expected number below can be checked by hand.
CLOUD = {"flops": 1e12, "uplink_Bps": 1e9, "downlink_Bps": 1e9, "latency_s": 0.001,
         "joules_per_flop": 1e-12, "radio_joules_per_byte": 1e-9}
EDGE = {"flops": 1e11, "uplink_Bps": 1e8, "downlink_Bps": 1e8, "latency_s": 0.01,
        "joules_per_flop": 1e-11, "radio_joules_per_byte": 1e-8}
DEVICE = {"flops": 1e9, "uplink_Bps": 1e6, "downlink_Bps": 4e6, "latency_s": 0.05,
          "joules_per_flop": 1e-10, "radio_joules_per_byte": 1e-6}


def make_fleet(edge: dict | None = None, n_devices: int = 3, n_edges: int = 1) -> Fleet:
    raw = {"fleet": {
        "cloud": {"overrides": CLOUD},
        "edges": [{"count": n_edges, "overrides": {**EDGE, **(edge or {})},
                   "devices": [{"count": n_devices, "profile": "phone-low", "overrides": DEVICE}]}],
    }}
    return Fleet.from_config(config_from_dict(raw).fleet, seed=0)


def test_pure_helpers():
    a100, phone = PROFILES["a100"], PROFILES["phone-mid"]
    assert compute_seconds(a100, 2 * a100.flops) == pytest.approx(2.0)
    # 5 MB up a 20 Mbit/s phone link into a 100 Gbit/s NIC: 2 s, plus the phone's latency.
    assert transfer_seconds(phone, a100, 5e6) == pytest.approx(5e6 / 2.5e6 + phone.latency_s)
    assert transfer_seconds(a100, phone, 0) == pytest.approx(phone.latency_s)


def test_compute_serializes_on_a_node_and_respects_start():
    clock = VirtualClock(make_fleet())
    assert clock.compute("edge0/dev0", 2e9) == pytest.approx(2.0)
    assert clock.compute("edge0/dev0", 1e9) == pytest.approx(3.0)  # waits for the first
    assert clock.compute("edge0/dev1", 1e9, start=5.0) == pytest.approx(6.0)
    assert clock.compute("edge0/dev1", 1e9, start=0.0) == pytest.approx(7.0)  # busy until 6
    assert clock.now == 0.0  # only barriers / advance_to move `now`
    assert clock.energy_j["edge0/dev0"] == pytest.approx(3e9 * 1e-10)
    assert clock.flops_done["edge0/dev1"] == 2e9


def test_compute_until_charges_only_the_work_done_before_it_stops():
    clock = VirtualClock(make_fleet())
    assert clock.compute_until("edge0/dev0", 4e9, start=1.0, until=2.5) == pytest.approx(2.5)
    assert clock.flops_done["edge0/dev0"] == pytest.approx(1.5e9)
    assert clock.compute_until("edge0/dev1", 1e9, start=0.0, until=9.0) == pytest.approx(1.0)  # finished first
    assert clock.compute_until("edge0/dev1", 1e9, start=3.0, until=2.0) == pytest.approx(3.0)  # gone already
    assert clock.flops_done["edge0/dev1"] == pytest.approx(1e9)


def test_transfer_time_energy_and_bytes():
    clock = VirtualClock(make_fleet())
    clock.compute("edge0/dev0", 2e9)  # ends at 2.0; the upload waits for it
    end = clock.transfer("edge0/dev0", "edge0", 1_000_000)
    assert end == pytest.approx(2.0 + 1e6 / 1e6 + 0.05)
    assert clock.busy_until["edge0"] == pytest.approx(end)
    assert clock.energy_j["edge0/dev0"] == pytest.approx(2e9 * 1e-10 + 1e6 * 1e-6)
    assert clock.energy_j["edge0"] == pytest.approx(1e6 * 1e-8)
    end2 = clock.transfer("edge0", "cloud", 3_000_000)  # the edge has the data at `end`
    assert end2 == pytest.approx(end + 3e6 / 1e8 + 0.01)
    assert clock.bytes_by_link == {("device", "edge"): 1_000_000, ("edge", "cloud"): 3_000_000}
    clock.transfer("cloud", "edge0/dev1", 10)
    assert clock.bytes_by_link[("device", "cloud")] == 10
    assert clock.bytes_by_direction[("cloud", "device")] == 10
    assert clock.messages == 3
    tiers = clock.energy_by_tier()
    assert tiers["device"] == pytest.approx(0.2 + 1.0 + 10e-6)
    assert tiers["edge"] == pytest.approx(1e6 * 1e-8 + 3e6 * 1e-8)
    assert tiers["cloud"] == pytest.approx(3e6 * 1e-9 + 10e-9)
    with pytest.raises(ValueError):
        clock.transfer("edge0", "edge0", 1)


def test_barrier_round_lasts_as_long_as_the_slowest_device():
    clock = VirtualClock(make_fleet())
    devices = [d.id for d in clock.fleet.devices_of("edge0")]
    for k, dev in enumerate(devices, start=1):
        clock.compute(dev, k * 1e9)  # 1, 2, 3 s
        clock.transfer(dev, "edge0", 1_000_000)  # + 1.05 s each
    t = clock.barrier([*devices, "edge0"])
    assert t == pytest.approx(3.0 + 1.05)
    assert clock.now == t
    assert all(clock.busy_until[i] == t for i in [*devices, "edge0"])
    # Next round starts for everyone at t, even the device that finished first.
    assert clock.compute(devices[0], 1e9) == pytest.approx(t + 1.0)
    # Waiting at the barrier is idle time: dev0 was busy 1 + 1.05 s of the first 4.05 s.
    assert clock.busy_s[devices[0]] == pytest.approx(2.05 + 1.0)
    # `now` never moves back.
    assert clock.barrier(["cloud"]) == t
    assert clock.advance_to(1.0) == t and clock.advance_to(10.0) == 10.0


def test_broadcast_shares_the_senders_uplink():
    # Edge uplink 8 MB/s, device downlink 4 MB/s: three 4 MB messages are 1.5 s of edge uplink.
    clock = VirtualClock(make_fleet(edge={"uplink_Bps": 8e6}))
    ends = [clock.transfer("edge0", d.id, 4_000_000) for d in clock.fleet.devices_of("edge0")]
    assert ends == pytest.approx([1.05, 1.05, 1.55])
    # A single message is exactly transfer_seconds.
    solo = VirtualClock(make_fleet(edge={"uplink_Bps": 8e6}))
    fleet = solo.fleet
    assert solo.transfer("edge0", "edge0/dev0", 4_000_000) == pytest.approx(
        transfer_seconds(fleet.nodes["edge0"].profile, fleet.nodes["edge0/dev0"].profile, 4_000_000))


def test_uploads_share_the_receivers_downlink():
    clock = VirtualClock(make_fleet(edge={"downlink_Bps": 2e6}))
    ends = [clock.transfer(d.id, "edge0", 1_000_000) for d in clock.fleet.devices_of("edge0")]
    assert ends == pytest.approx([1.05, 1.05, 1.55])
    # The edge counts as busy once over the overlapping receptions, not three times.
    assert clock.busy_s["edge0"] == pytest.approx(1.55)


def test_utilization_whole_run_and_since_a_mark():
    clock = VirtualClock(make_fleet())
    clock.compute("edge0/dev0", 1e9)
    clock.compute("edge0/dev1", 2e9)
    clock.barrier(["edge0/dev0", "edge0/dev1"])
    assert clock.utilization(["edge0/dev0", "edge0/dev1"]) == pytest.approx((1 + 2) / (2 * 2))
    mark = clock.mark()
    clock.compute("edge0/dev0", 4e9)
    clock.barrier(["edge0/dev0", "edge0/dev1"])
    assert clock.utilization(["edge0/dev0"], since=mark) == pytest.approx(1.0)
    assert clock.utilization(["edge0/dev1"], since=mark) == pytest.approx(0.0)
    assert clock.utilization(["edge0/dev0", "edge0/dev1"], since=mark) == pytest.approx(0.5)
    summary = clock.summary()
    assert summary["virtual_time_s"] == pytest.approx(6.0)
    assert summary["flops_by_tier"]["device"] == 7e9
    assert summary["utilization_by_tier"]["edge"] == 0.0
    json.dumps(summary)


def _some_work(clock: VirtualClock, rounds: range) -> None:
    for r in rounds:
        clock.transfer("cloud", "edge0", 2_000_000)
        for k, dev in enumerate(clock.fleet.devices_of("edge0")):
            clock.transfer("edge0", dev.id, 1_000_000)
            clock.compute(dev.id, (k + r + 1) * 1e9)
            clock.transfer(dev.id, "edge0", 500_000)
        clock.barrier([n for n in clock.fleet.nodes if n != "cloud"])
        clock.compute("edge0", 1e10)
        clock.transfer("edge0", "cloud", 2_000_000)
        clock.barrier(clock.fleet.nodes)


def test_state_round_trip_resumes_exactly():
    straight = VirtualClock(make_fleet())
    _some_work(straight, range(4))

    first = VirtualClock(make_fleet())
    _some_work(first, range(2))
    saved = json.loads(json.dumps(first.state_dict()))
    resumed = VirtualClock(make_fleet())
    resumed.load_state_dict(saved)
    assert resumed.state_dict() == first.state_dict()
    _some_work(resumed, range(2, 4))
    assert resumed.state_dict() == straight.state_dict()
    assert resumed.summary() == straight.summary()


def test_state_from_another_fleet_or_malformed_is_input_error():
    state = VirtualClock(make_fleet()).state_dict()
    with pytest.raises(InputError, match="clock state: saved for another fleet"):
        VirtualClock(make_fleet(n_devices=4)).load_state_dict(state)
    broken = {**state, "per_node": {**state["per_node"], "busy_s": ["x"] * 5}}
    with pytest.raises(InputError, match="clock state: malformed"):
        VirtualClock(make_fleet()).load_state_dict(broken)
    with pytest.raises(InputError, match="version"):
        VirtualClock(make_fleet()).load_state_dict({"version": 99})


def test_availability_draws():
    fleet = Fleet.from_config(config_from_dict({"fleet": {"edges": [{"devices": [
        {"count": 2000, "profile": "phone-low"},
        {"count": 1, "profile": "phone-low", "overrides": {"availability": 0.0}}]}]}}).fleet, seed=0)
    rng = np.random.default_rng(3)
    assert all(available(fleet.cloud, rng) for _ in range(100))  # availability 1.0
    assert not any(available(fleet.devices[-1], rng) for _ in range(100))
    up = available_nodes(fleet.devices, np.random.default_rng(7))
    assert fleet.devices[-1] not in up
    assert len(up) / 2000 == pytest.approx(PROFILES["phone-low"].availability, abs=0.04)
    # Same draws as calling `available` one node at a time.
    rng = np.random.default_rng(7)
    assert up == [n for n in fleet.devices if available(n, rng)]


def test_edge_wan_link_is_separate_from_its_access_link():
    """An edge with ``wan_*`` figures reaches the cloud over its WAN (own rate, latency and queue) and
    its devices over its access link: a WAN upload does not delay a device's message."""
    fleet = make_fleet(edge={"wan_uplink_Bps": 2.5e6, "wan_downlink_Bps": 5e6, "wan_latency_s": 0.04})
    clock = VirtualClock(fleet)
    cloud, edge, dev = fleet.nodes["cloud"], fleet.nodes["edge0"], fleet.nodes["edge0/dev0"]
    assert transfer_seconds(edge.profile, cloud.profile, 2.5e6) == pytest.approx(1.0 + 0.04)
    assert transfer_seconds(cloud.profile, edge.profile, 5e6) == pytest.approx(1.0 + 0.04)
    assert transfer_seconds(dev.profile, edge.profile, 1e6) == pytest.approx(1.0 + 0.05)  # access: unchanged
    assert clock.transfer("edge0", "cloud", 2_500_000, start=0.0) == pytest.approx(1.04)
    # A second WAN message queues behind the first on the WAN pipe ...
    assert clock.transfer("edge0", "cloud", 2_500_000, start=0.0) == pytest.approx(2.04)
    # ... while the access pipe is free: a device's upload to the edge is not queued behind them.
    assert clock.transfer("edge0/dev0", "edge0", 1_000_000, start=0.0) == pytest.approx(1.05)
    state = json.loads(json.dumps(clock.state_dict()))
    again = VirtualClock(fleet)
    again.load_state_dict(state)
    assert again.transfer("edge0", "cloud", 2_500_000, start=0.0) == pytest.approx(3.04)


def test_transfer_end_says_when_a_message_would_arrive_behind_the_queue_without_sending_it():
    clock = VirtualClock(make_fleet(edge={"downlink_Bps": 1e6}))  # the edge takes in what one device sends
    assert clock.transfer("edge0/dev0", "edge0", 1_000_000) == pytest.approx(1.0 + 0.05)
    before = json.dumps(clock.state_dict(), sort_keys=True)
    # dev1's own uplink is free, but the edge's downlink carries dev0's megabyte until t = 1 s.
    expected = clock.transfer_end("edge0/dev1", "edge0", 1_000_000, start=0.0)
    assert expected == pytest.approx(2.0 + 0.05)
    assert json.dumps(clock.state_dict(), sort_keys=True) == before  # nothing sent, no node touched
    assert clock.transfer("edge0/dev1", "edge0", 1_000_000, start=0.0) == expected
    with pytest.raises(ValueError, match="itself"):
        clock.transfer_end("edge0", "edge0", 1)
    with pytest.raises(ValueError, match="nbytes"):
        clock.transfer_end("edge0/dev1", "edge0", -5)


def test_relayed_uploads_are_booked_in_event_order():
    """Device -> edge -> cloud: dev0 sends first over a slow uplink, dev1 a second later over a
    fast one. dev1's update reaches the edge first and is forwarded at once, not behind dev0's."""
    from cloudedge.finetune.messages import Messages, Upload

    raw = {"fleet": {
        "cloud": {"overrides": CLOUD},
        "edges": [{"count": 1, "overrides": EDGE,
                   "devices": [{"count": 1, "profile": "phone-low", "overrides": {**DEVICE, "uplink_Bps": 1e5}},
                               {"count": 1, "profile": "phone-low", "overrides": DEVICE}]}],
    }}
    fleet = Fleet.from_config(config_from_dict(raw).fleet, seed=0)
    clock = VirtualClock(fleet)
    messages = Messages(None, fleet, clock, {}, None)
    slow, fast = (a.at for a in messages.uploads([Upload("edge0/dev0", "cloud", 1_000_000, 1.0),
                                                  Upload("edge0/dev1", "cloud", 1_000_000, 2.0)]))
    hop_1 = 1_000_000 / 1e6 + 0.05  # dev1 -> edge at the device's 1 MB/s, the device's latency
    hop_2 = 1_000_000 / 1e8 + 0.01  # edge -> cloud at the edge's 100 MB/s, the edge's latency
    assert fast == pytest.approx(2.0 + hop_1 + hop_2)
    assert slow == pytest.approx(1.0 + 1_000_000 / 1e5 + 0.05 + hop_2)
    # Booked one message at a time in send order, dev1's second hop would have waited for dev0's first.
    naive = VirtualClock(fleet)
    for dev, start in (("edge0/dev0", 1.0), ("edge0/dev1", 2.0)):
        last = naive.transfer("edge0", "cloud", 1_000_000, start=naive.transfer(dev, "edge0", 1_000_000, start=start))
    assert last > slow > fast


def test_relaying_edge_is_busy_for_every_hop_it_carries():
    """Two relayed uploads ten seconds apart: the edge receives and forwards each, and its busy time
    is the sum of both (booking all first hops before any second hop lost the first forward)."""
    from cloudedge.finetune.messages import Messages, Upload

    fleet = make_fleet(n_devices=2)
    clock = VirtualClock(fleet)
    Messages(None, fleet, clock, {}, None).uploads([Upload("edge0/dev0", "cloud", 1_000_000, 0.0),
                                                    Upload("edge0/dev1", "cloud", 1_000_000, 10.0)])
    hop_1 = 1_000_000 / 1e6 + 0.05
    hop_2 = 1_000_000 / 1e8 + 0.01
    assert clock.busy_s["edge0"] == pytest.approx(2 * (hop_1 + hop_2))


def test_an_upload_queued_past_the_deadline_or_its_senders_time_online_is_lost_and_cut_off():
    """Three devices send 1 MB to their edge at t = 0 over the edge's 1 MB/s downlink: alone, each
    would be in at 1.05 s; queued, the second is in at 2.05 s and the third at 3.05 s. With the
    edge's deadline at 2.5 s the third is lost ("deadline"); a second device that goes offline at
    1.2 s is lost ("offline"). A lost upload holds the links until it is cut off, and what got
    through by then is charged: the third, its turn on the downlink at 2 s, half its megabyte."""
    from cloudedge.finetune.messages import Messages, Upload

    fleet = make_fleet(edge={"downlink_Bps": 1e6}, n_devices=3)
    mb = 1_000_000
    alone = mb / 1e6 + 0.05  # the device's 1 MB/s and its latency (larger than the edge's)

    def run(online_until):
        clock = VirtualClock(fleet)
        arrivals = Messages(None, fleet, clock, {}, None).uploads(
            [Upload(f"edge0/dev{i}", "edge0", mb, 0.0, online_until[i], 2.5) for i in range(3)])
        return clock, arrivals

    clock, (a0, a1, a2) = run([math.inf] * 3)
    assert (a0.at, a0.lost) == (pytest.approx(alone), None)
    assert (a1.at, a1.lost) == (pytest.approx(2.0 + 0.05), None)
    assert (a2.at, a2.lost) == (math.inf, "deadline")
    assert clock.bytes_by_direction[("device", "edge")] == pytest.approx(2.5 * mb, abs=1)
    radio = fleet.nodes["edge0/dev0"].profile.radio_joules_per_byte
    assert clock.energy_j["edge0/dev2"] == pytest.approx(0.5 * mb * radio)
    assert clock.busy_until["edge0/dev2"] == 2.5  # busy sending until the edge stopped waiting
    clock, (a0, a1, a2) = run([math.inf, 1.2, math.inf])
    assert a1.lost == "offline" and a0.lost is None
    # dev1 held the downlink from its turn (1 s) until it left (0.2 MB through); dev2 queued after that
    assert (a2.at, a2.lost) == (pytest.approx(1.2 + 1.0 + 0.05), None)
    assert clock.bytes_by_direction[("device", "edge")] == pytest.approx(2.2 * mb, abs=1)
    # Going offline after the deadline is a deadline miss, as the round's plan counts it.
    assert run([math.inf, math.inf, 3.0])[1][2].lost == "deadline"
    # An upload whose turn had not come by its cut got nothing through and holds nothing.
    clock = VirtualClock(fleet)
    assert clock.transfer_cut("edge0/dev0", "edge0", mb, until=0.5, start=1.0) == 0 and not clock.messages


def test_a_cut_upload_holds_each_pipe_for_the_bytes_that_got_through():
    """dev0's megabyte has the edge's 1 MB/s downlink from 0 to 1 s. dev1's, sent at 0 too, gets its
    turn there at 1 s: cut at 0.5 s nothing got through (its own uplink had started, the edge's had
    not), so nothing is booked; cut at 1.5 s, half a megabyte got through. The edge's downlink is
    then free at 1.5 s and dev1's uplink at 0.5 s; the edge holds no new data; dev2's megabyte,
    sent at 0, takes the downlink from 1.5 s."""
    fleet = make_fleet(edge={"downlink_Bps": 1e6}, n_devices=3)
    mb = 1_000_000
    clock = VirtualClock(fleet)
    clock.transfer("edge0/dev0", "edge0", mb, start=0.0)
    before = clock.state_dict()
    assert clock.transfer_cut("edge0/dev1", "edge0", mb, until=0.5, start=0.0) == 0
    assert clock.state_dict() == before  # nothing booked, not even a message
    ready = clock._data_ready["edge0"]
    assert clock.transfer_cut("edge0/dev1", "edge0", mb, until=1.5, start=0.0) == pytest.approx(mb / 2, abs=1)
    assert clock.busy_until["edge0/dev1"] == 1.5 and clock.busy_s["edge0/dev1"] == 1.5
    assert clock._data_ready["edge0"] == ready  # a cut message delivers nothing
    assert clock.transfer_end("edge0/dev1", "edge0", 0, start=0.0) == pytest.approx(1.5 + 0.05)  # downlink free at 1.5
    assert clock.transfer_end("edge0/dev2", "edge0", mb, start=0.0) == pytest.approx(1.5 + 1.0 + 0.05)
    assert clock._up_free["edge0/dev1"] == pytest.approx(0.5)  # its uplink carried half a megabyte


def test_a_relayed_upload_needs_its_device_online_only_until_the_edge_has_it():
    """Device -> edge -> cloud: the device may leave once its first hop is done; the deadline is
    judged on the arrival at the cloud."""
    from cloudedge.finetune.messages import Messages, Upload

    fleet = make_fleet(n_devices=1)
    mb = 1_000_000
    hop_1, hop_2 = mb / 1e6 + 0.05, mb / 1e8 + 0.01
    clock = VirtualClock(fleet)
    (kept,) = Messages(None, fleet, clock, {}, None).uploads(
        [Upload("edge0/dev0", "cloud", mb, 0.0, hop_1 + 0.5 * hop_2, 10.0)])  # it leaves during the second hop
    assert (kept.at, kept.lost) == (pytest.approx(hop_1 + hop_2), None)
    (gone,) = Messages(None, fleet, VirtualClock(fleet), {}, None).uploads(
        [Upload("edge0/dev0", "cloud", mb, 0.0, 0.5 * hop_1, 10.0)])
    assert gone.lost == "offline"
    clock = VirtualClock(fleet)
    (late,) = Messages(None, fleet, clock, {}, None).uploads(
        [Upload("edge0/dev0", "cloud", mb, 0.0, math.inf, hop_1 + 0.25 * hop_2)])
    assert late.lost == "deadline"
    # The first hop was booked whole (the edge has it); the second was cut off at the deadline,
    # 5 ms into its 10 ms on the 100 MB/s link: half the megabyte got through.
    assert clock.bytes_by_direction[("device", "edge")] == mb
    assert clock.bytes_by_direction[("edge", "cloud")] == pytest.approx(mb / 2, abs=1)
    # The edge carries it on after the device has left: the second hop is cut at the deadline.
    clock = VirtualClock(fleet)
    (late,) = Messages(None, fleet, clock, {}, None).uploads(
        [Upload("edge0/dev0", "cloud", mb, 0.0, hop_1 + 0.1 * hop_2, hop_1 + 0.25 * hop_2)])
    assert late.lost == "deadline"
    assert clock.bytes_by_direction[("edge", "cloud")] == pytest.approx(mb / 2, abs=1)


def test_transfer_end_of_a_forwarded_message_does_not_wait_for_what_the_relay_received_later():
    """The edge received dev0's megabyte at 1.05 s and dev1's at 2.05 s; forwarding dev0's at 1.05 s
    starts then (forwarding=True), where a send of the edge's own would wait for its last receive."""
    fleet = make_fleet(n_devices=2)
    clock = VirtualClock(fleet)
    mb = 1_000_000
    first = clock.transfer("edge0/dev0", "edge0", mb, start=0.0)
    clock.transfer("edge0/dev1", "edge0", mb, start=1.0)
    hop_2 = mb / 1e8 + 0.01
    forwarded = clock.transfer_end("edge0", "cloud", mb, start=first, forwarding=True)
    assert forwarded == pytest.approx(first + hop_2)
    assert clock.transfer_end("edge0", "cloud", mb, start=first) == pytest.approx(2.05 + hop_2)
    assert clock.transfer("edge0", "cloud", mb, start=first, forwarding=True) == forwarded
