"""Selection under availability traces: online at the round's start, dropout at the offline instant,
over-selection with a goal, and a round's cost that does not grow with the fleet."""

from __future__ import annotations

import math

import pytest
import torch

from cloudedge.config import config_from_dict
from cloudedge.engine import LocalEngine
from cloudedge.finetune.loop import HierFinetune
from cloudedge.finetune.messages import Upload
from cloudedge.finetune.stage import prepare_task, settings_from_config
from cloudedge.fleet import Fleet
from cloudedge.fleet.traces import load_interval_trace

FLOPS = 1e8  # slow devices: local training takes a visible share of a virtual second


def _raw(devices, rounds=1, fleet_extra=None, **ft):
    return {
        "seed": 1,
        "fleet": {"edges": [{"count": 1, "overrides": {"latency_s": 0.0005}, "devices": devices if isinstance(devices, list) else [devices]}],
                  **(fleet_extra or {})},
        "data": {"source": "digits", "partition": {"kind": "iid"}},
        "model": {"kind": "vit", "hidden": 16, "layers": 1, "heads": 2, "image_size": 8, "patch_size": 4,
                  "channels": 1},
        "finetune": {"lora": {"rank": 2, "alpha": 4.0}, "sync": {"name": "hierfavg", "k1": 8, "k2": 1,
                                                                  "deadline_factor": None},
                     "batch_size": 16, "lr": 5e-2, "time_budget_s": 1e9, "max_cloud_rounds": rounds,
                     "eval_max": 100, **ft},
    }


def _loop(raw):
    torch.set_num_threads(1)
    cfg = config_from_dict(raw)
    fleet = Fleet.from_config(cfg.fleet, cfg.seed)
    return HierFinetune(fleet, prepare_task(cfg, fleet), settings_from_config(cfg), LocalEngine())


def _trace(loop, tmp_path, rows):
    path = tmp_path / "trace.csv"
    path.write_text("device,start_s,end_s\n" + "".join(f"{d},{a},{b}\n" for d, a, b in rows))
    fleet = loop.fleet
    loop.fleet.availability = load_interval_trace(path, fleet.device_number, set())


def test_only_devices_online_at_the_round_start_are_drawn(tmp_path):
    overrides = {"flops": FLOPS, "latency_s": 0.0005}
    loop = _loop(_raw({"count": 4, "profile": "phone-mid", "overrides": overrides}, rounds=2))
    _trace(loop, tmp_path, [("edge0/dev0", 0, 1e6), ("edge0/dev1", 0, 1e6), ("edge0/dev2", 1e6, 2e6)])
    loop.run()
    assert set(loop.train_count) == {"edge0/dev0", "edge0/dev1"} and loop.train_count["edge0/dev0"] == 2
    assert [r["online_devices"] for r in loop.history] == [2.0, 2.0, 2.0]
    from cloudedge.track.plots import availability_plot

    png = availability_plot([{**r, "stage": "finetune", "method": "hierfavg"} for r in loop.history], tmp_path)
    assert png is not None and png.stat().st_size > 0


def test_a_device_going_offline_mid_task_is_a_dropout_at_that_instant(tmp_path):
    overrides = {"flops": FLOPS, "latency_s": 0.0005}
    loop = _loop(_raw({"count": 2, "profile": "phone-mid", "overrides": overrides}))
    train_s = 8 * loop.rounds.step_flops / FLOPS
    assert train_s > 0.05  # the setting this test needs: training is long against the transfers
    t_off = 0.5 * train_s
    _trace(loop, tmp_path, [("edge0/dev0", 0, t_off), ("edge0/dev1", 0, 1e6)])
    loop.run()
    row = loop.history[1]
    assert row["dropped"] == 1 and loop.summary()["dropped_out_updates"] == 1
    clock = loop.clock
    # Its work is charged up to the instant it went away, and no further.
    assert clock.busy_until["edge0/dev0"] == pytest.approx(t_off)
    assert 0 < clock.flops_done["edge0/dev0"] < 0.5 * clock.flops_done["edge0/dev1"]
    assert set(loop.train_count) == {"edge0/dev1"}  # only updates that arrive are trained for


def test_over_selection_keeps_the_first_updates_and_cancels_the_rest():
    groups = [{"count": 3, "profile": "phone-mid", "overrides": {"availability": 1.0, "flops": FLOPS}},
              {"count": 3, "profile": "phone-mid", "overrides": {"availability": 1.0, "flops": FLOPS / 5}}]
    loop = _loop(_raw(groups, selection={"goal": 3, "over_selection": 2.0}))
    loop.run()
    fast = {d.id for d in loop.fleet.devices if d.profile.flops == FLOPS}
    slow = {d.id for d in loop.fleet.devices if d.profile.flops < FLOPS}
    assert set(loop.train_count) == fast  # the three first to deliver are kept
    row = loop.history[1]
    assert row["surplus"] == 3 and row["dropped"] == 0 and row["timed_out"] == 0
    energy = loop.clock.energy_j
    for d in slow:  # cancelled once the goal's updates were due: charged for part of their work
        assert 0 < loop.clock.flops_done[d] < max(loop.clock.flops_done[f] for f in fast)
    assert all(energy[d] > 0 for d in slow)
    # The round ended when the kept updates were in, not when the slow ones would have been.
    slow_full = 8 * loop.rounds.step_flops / loop.fleet.nodes[next(iter(slow))].profile.flops
    assert row["virtual_time_s"] < slow_full


def test_a_round_costs_the_same_at_1000_and_100000_devices():
    """Nodes, device data and engine registrations scale with the participants, not the fleet."""
    from cloudedge.bench.scale import measure

    torch.set_num_threads(1)
    small = measure(1_000, rounds=1, availability="diurnal", goal=2, over_selection=1.5, test_samples=20)
    large = measure(100_000, rounds=1, availability="diurnal", goal=2, over_selection=1.5, test_samples=20)
    for m in (small, large):
        assert m["participants_per_round"] == 20  # 2 per edge, 10 edges
        assert m["device_data_built"] == 20  # data made only for the devices that trained
        assert m["registered_after_round"] == [1]  # only the cloud's evaluation worker stays registered
        assert m["devices_holding_a_model"] == 0
    assert large["device_nodes_built"] < 2 * small["device_nodes_built"] < 2_000  # 100x the fleet, not 100x the nodes


def test_an_upload_to_the_edge_never_waits_behind_one_sent_later():
    """A slow device planned first and a fast one share their edge's slow downlink: the fast one's
    upload goes out and arrives while the slow one still computes, so it is busy only for its own
    compute and upload (booked in plan order, it waited behind the slow one's later upload)."""
    groups = [{"count": 1, "profile": "phone-mid", "overrides": {"availability": 1.0, "flops": FLOPS / 50}},
              {"count": 1, "profile": "phone-mid", "overrides": {"availability": 1.0, "flops": FLOPS}}]
    raw = _raw(groups)
    raw["fleet"]["edges"][0]["overrides"]["downlink_Bps"] = 1e4
    loop = _loop(raw)
    loop.run()
    slow, fast = "edge0/dev0", "edge0/dev1"
    assert loop.fleet.nodes[slow].profile.flops < loop.fleet.nodes[fast].profile.flops
    slow_train_s = loop.clock.flops_done[slow] / loop.fleet.nodes[slow].profile.flops
    fast_train_s = loop.clock.flops_done[fast] / loop.fleet.nodes[fast].profile.flops
    assert fast_train_s < loop.clock.busy_s[fast] < 0.5 * slow_train_s
    assert loop.train_count == {slow: 1, fast: 1}


def test_an_update_queued_past_the_deadline_is_a_straggler():
    """Two identical devices share their edge's slow downlink: alone, each upload would be in before
    the deadline (1.2 x compute plus transfers), so both are planned; queued behind the first, the
    second arrives after it, and is dropped as a straggler (it was accepted when only the plan judged)."""
    groups = {"count": 2, "profile": "phone-mid",
              "overrides": {"availability": 1.0, "flops": FLOPS, "latency_s": 0.0005}}
    raw = _raw(groups, sync={"name": "hierfavg", "k1": 8, "k2": 1, "deadline_factor": 1.2})
    loop = _loop(raw)
    train_s = 8 * loop.rounds.step_flops / FLOPS
    up_bytes = loop.rounds.messages.update_bytes()
    raw["fleet"]["edges"][0]["overrides"]["downlink_Bps"] = up_bytes / train_s  # an upload takes as long as training
    loop = _loop(raw)
    deadlines = []
    policy_deadline = loop.policy.deadline
    loop.policy.deadline = lambda edge: deadlines.append(out := policy_deadline(edge)) or out
    loop.run()
    row = loop.history[1]
    assert loop.train_count == {"edge0/dev0": 1, "edge0/dev1": 1}  # both were planned and trained
    assert row["timed_out"] == 1 and loop.summary()["timed_out_updates"] == 1
    # The setting this test needs: each upload alone (training, then one upload's time on the
    # edge's downlink) is in before the round's deadline; queued behind the other, it is not.
    (deadline,) = deadlines
    assert 2 * train_s < deadline < 3 * train_s
    # The first upload was booked whole; the second held the downlink from its turn until the
    # deadline cut it off, and what got through by then is charged.
    assert up_bytes < loop.clock.bytes_by_direction[("device", "edge")] < 2 * up_bytes


def test_a_relayed_update_needs_its_device_online_only_until_the_edge_has_it(tmp_path):
    """fedavg2: device -> edge -> cloud over a slow edge WAN uplink. A device whose trace ends after
    its first hop is done but before the cloud has the update still delivers (the edge carries it
    on); one whose trace ends during its first hop drops out."""
    device = {"count": 1, "profile": "phone-mid", "overrides": {"flops": FLOPS, "latency_s": 0.0005}}
    raw = _raw(device, sync={"name": "fedavg2", "k1": 8, "k2": 1, "deadline_factor": None})
    raw["fleet"]["edges"][0]["overrides"]["wan_uplink_Bps"] = 2_000.0  # the second hop takes about a second

    def run(t_off=None):
        loop = _loop(raw)
        arrivals = []
        uploads = loop.messages.uploads
        loop.messages.uploads = lambda sends, on=None: (out := uploads(sends, on=on), on or arrivals.extend(out))[0]
        if t_off is not None:
            _trace(loop, tmp_path, [("edge0/dev0", 0, t_off)])
        loop.run()
        return loop, arrivals

    loop, arrivals = run()
    handed_over = loop.clock.busy_until["edge0/dev0"]  # the device is busy until its first hop is done
    (arrival,) = arrivals
    assert arrival.lost is None and arrival.at > handed_over + 0.5  # the setting this test needs
    loop, arrivals = run(0.5 * (handed_over + arrival.at))
    assert loop.history[1]["dropped"] == 0 and arrivals[0].lost is None
    assert loop.history[1]["virtual_time_s"] == pytest.approx(arrival.at)
    flops = loop.clock.flops_done["edge0/dev0"]
    first_hop = loop.messages.sender_s(loop.fleet.nodes["edge0/dev0"], loop.fleet.nodes["cloud"],
                                       loop.messages.update_bytes())
    loop, arrivals = run(handed_over - 0.5 * first_hop)  # during its first hop, after its compute
    # Dropped in the plan, it never trained: its upload starts and is cut off when it leaves.
    assert loop.history[1]["dropped"] == 1 and [a.lost for a in arrivals] == ["offline"]
    assert loop.clock.flops_done["edge0/dev0"] == pytest.approx(flops)  # its whole compute is charged
    assert 0 < loop.clock.bytes_by_direction[("device", "edge")] < loop.messages.update_bytes()
    assert ("edge", "cloud") not in loop.clock.bytes_by_direction


def _three_on_a_slow_downlink(tmp_path, offline: dict[str, float] | None = None):
    """Goal 2 of 3 devices doing the same work, sent in the order dev0, dev1, dev2, on their edge's
    downlink that takes as long for an upload as training does; ``offline``: when some go offline.
    Returns the loop and its uploads' bookings, what-if and real, each as {device: (Upload, Arrival)}."""
    groups = [{"count": 1, "profile": "phone-mid", "overrides": {"availability": 1.0, "flops": FLOPS * f,
                                                                 "latency_s": 0.0005}}
              for f in (1.0, 0.99, 0.98)]
    raw = _raw(groups, selection={"goal": 2, "over_selection": 1.5})
    loop = _loop(raw)
    train_s = 8 * loop.rounds.step_flops / FLOPS
    raw["fleet"]["edges"][0]["overrides"]["downlink_Bps"] = loop.rounds.messages.update_bytes() / train_s
    loop = _loop(raw)
    if offline:
        _trace(loop, tmp_path, [(d, 0, offline.get(d, 1e6)) for d in ("edge0/dev0", "edge0/dev1", "edge0/dev2")])
    booked: dict[str, list] = {"what-if": [], "real": []}
    uploads = loop.messages.uploads

    def spy(sends, on=None):
        out = uploads(sends, on=on)
        booked["real" if on is None else "what-if"].append({s.src: (s, a) for s, a in zip(sends, out, strict=True)})
        return out

    loop.messages.uploads = spy
    loop.run()
    return loop, booked, train_s


def test_over_selection_keeps_updates_that_will_be_in_behind_the_others(tmp_path):
    """Goal 2 of 3 devices sharing their edge's slow downlink. Each upload alone would be in
    before dev1 goes offline, so ranked on their uploads alone dev0 and dev1 were kept and dev2
    cancelled. Queued behind dev0, dev1's upload outlasts its time online. The round would then
    fall short of its goal with dev2 already cancelled. Ranked by a what-if booking of all three,
    dev0 and dev2 are kept and dev1 is cancelled as the surplus."""
    loop, booked, train_s = _three_on_a_slow_downlink(tmp_path)  # everyone online
    what_if = booked["what-if"][0]  # every planned upload, to rank them (then the kept ones alone)
    assert set(loop.train_count) == {"edge0/dev0", "edge0/dev1"} and loop.history[1]["surplus"] == 1
    send, queued = what_if["edge0/dev1"]
    up_bytes = loop.messages.update_bytes()
    alone = send.sent_at + loop.messages.link_s(loop.fleet.nodes["edge0/dev1"], loop.fleet.nodes["edge0"], up_bytes)
    assert queued.lost is None and alone + 0.5 * train_s < queued.at  # the setting: dev1 queues behind dev0

    # dev1 goes offline while queued
    loop, booked, _ = _three_on_a_slow_downlink(tmp_path, {"edge0/dev1": 0.5 * (alone + queued.at)})
    row = loop.history[1]
    assert booked["what-if"][0]["edge0/dev1"][1].lost == "offline"
    assert set(loop.train_count) == {"edge0/dev0", "edge0/dev2"}  # dev1 never trains: it is the surplus
    assert row["surplus"] == 1 and row["dropped"] == 0 and row["timed_out"] == 0
    kept = booked["real"][0]  # the devices' uploads (the edge's to the cloud follow)
    assert set(kept) == {"edge0/dev0", "edge0/dev2"} and all(a.lost is None for _, a in kept.values())
    # The kept ones' what-if booking alone is the round's real booking, to the instant.
    assert {d: a for d, (_, a) in booked["what-if"][-1].items()} == {d: a for d, (_, a) in kept.items()}
    # dev1 had computed its update before the second kept one was due: its whole compute is charged.
    assert loop.clock.flops_done["edge0/dev1"] == loop.clock.flops_done["edge0/dev0"] > 0


def test_when_fewer_than_the_goal_would_be_in_nobody_is_cancelled(tmp_path):
    """dev1 and dev2 each go offline while queued second behind dev0 (alone, each would be in), so
    at most one update would be in: the round cancels nobody, all three train, and the two lost
    uploads are dropouts."""
    loop, booked, train_s = _three_on_a_slow_downlink(tmp_path)
    what_if = booked["what-if"][0]
    up_bytes = loop.messages.update_bytes()
    send, queued = what_if["edge0/dev1"]
    alone = max(s.sent_at for s, _ in what_if.values()) + loop.messages.link_s(
        loop.fleet.nodes["edge0/dev1"], loop.fleet.nodes["edge0"], up_bytes)  # the last to send, alone
    assert alone + 0.5 * train_s < queued.at  # the setting: queued second is later than anyone alone
    t_off = 0.5 * (alone + queued.at)
    loop, booked, _ = _three_on_a_slow_downlink(tmp_path, {"edge0/dev1": t_off, "edge0/dev2": t_off})
    row = loop.history[1]
    assert set(loop.train_count) == {"edge0/dev0", "edge0/dev1", "edge0/dev2"}
    assert row["surplus"] == 0 and row["dropped"] == 2


def test_a_what_if_clock_sees_the_bookings_and_keeps_its_own():
    from cloudedge.fleet import VirtualClock

    cfg = config_from_dict(_raw({"count": 2, "profile": "phone-mid"}))
    fleet = Fleet.from_config(cfg.fleet, cfg.seed)
    clock = VirtualClock(fleet)
    clock.compute("edge0/dev0", 1e9)
    first = clock.transfer("edge0/dev0", "edge0", 10_000)
    before = clock.state_dict()
    scratch = clock.what_if()
    # It queues behind what is booked: the same message again arrives after the first.
    again = scratch.transfer("edge0/dev0", "edge0", 10_000)
    assert again > first and again == pytest.approx(clock.transfer_end("edge0/dev0", "edge0", 10_000))
    scratch.compute("edge0/dev1", 1e9)
    scratch.what_if().compute("edge0/dev1", 1e9)  # a what-if of a what-if
    assert scratch.busy_until["edge0/dev1"] > 0 and scratch.messages == before["messages"] + 1
    assert clock.state_dict() == before  # nothing booked on it reached the real clock
    assert "edge0/dev1" not in clock.busy_until and "edge0/dev1" not in clock.energy_j  # not even read as 0
    fresh = clock.what_if()  # membership and length are the real clock's until it books
    assert "edge0/dev0" in fresh.busy_until and "edge0/dev1" not in fresh.busy_until
    assert len(fresh.busy_until) == len(clock.busy_until) and fresh.busy_until.get("edge0/dev1") is None
    # Its reports are of the real clock's bookings and its own together.
    assert scratch.makespan() == again > clock.makespan() == first
    assert set(scratch.state_dict()["node_ids"]) == {"edge0/dev1", "edge0/dev0", "edge0"}
    assert scratch.summary()["flops_by_tier"]["device"] == 2e9 and len(scratch.busy_s) == 3
    assert {k: v for k, v in dict(scratch.flops_done).items() if v} == {"edge0/dev1": 1e9, "edge0/dev0": 1e9}


def test_a_kept_relayed_update_is_not_overtaken_on_its_second_hop():
    """Two-tier (device -> edge -> cloud), goal 2 of 3, the cloud's downlink shared. Booked all
    together, B, A and C arrive in that order, so B and A rank first. Booked without C, B's first
    hop ends sooner and B overtakes A on the cloud's downlink, which pushes A past the deadline.
    So A cannot be kept with B: C takes its place, and what is kept is what arrives."""
    from types import SimpleNamespace

    from cloudedge.finetune.selection import keep_first

    n, fast = 1000, 1e12
    phone = {"count": 1, "profile": "phone-mid"}
    raw = _raw([], sync={"name": "fedavg2", "k1": 8, "k2": 1, "deadline_factor": None})
    raw["fleet"] = {
        "cloud": {"overrides": {"downlink_Bps": n / 4, "uplink_Bps": fast, "latency_s": 0}},
        "edges": [
            {"count": 1, "overrides": {"downlink_Bps": n / 5, "uplink_Bps": fast, "latency_s": 0,
                                       "wan_uplink_Bps": fast, "wan_latency_s": 0},
             "devices": [{**phone, "overrides": {"uplink_Bps": fast, "latency_s": 0}},
                         {**phone, "overrides": {"uplink_Bps": n / 18, "latency_s": 0}}]},
            {"count": 1, "overrides": {"downlink_Bps": fast, "uplink_Bps": fast, "latency_s": 0,
                                       "wan_uplink_Bps": fast, "wan_latency_s": 10},
             "devices": [{**phone, "overrides": {"uplink_Bps": fast, "latency_s": 0}}]}]}
    loop = _loop(raw)
    b, c, a = "edge0/dev0", "edge0/dev1", "edge1/dev0"
    sent, deadline = {c: 0.0, b: 0.1, a: 7.0}, 22.5
    planned = [SimpleNamespace(dev=loop.fleet.nodes[d], begin=sent[d], flops=0.0, online_until=math.inf)
               for d in (c, b, a)]

    def arrivals(items):
        return loop.rounds._expected_arrivals("cloud", items, n, deadline)

    together = dict(zip((c, b, a), arrivals(planned), strict=True))
    assert together[b] < together[a] < together[c] < deadline  # the setting: B and A rank first
    kept, cancelled = keep_first(planned, 2, loop.clock, arrivals)
    assert [p.dev.id for p in kept] == [c, b] and cancelled == 1
    real = loop.messages.uploads([Upload(p.dev.id, "cloud", n, sent[p.dev.id], math.inf, deadline) for p in kept])
    assert all(r.lost is None for r in real)


def test_keep_first_ranks_updates_that_will_be_rejected_last_and_cancels_at_the_last_kept_arrival():
    """Pure ranking: arrivals 2, 3, 4 booked all together, 1, 2, 3 booked fewer at a time (less
    queueing). The first to arrive will be rejected (a stale update past max_staleness), so the
    second and third are kept, and the first is cancelled when they are in booked alone (3, not the
    ranking booking's 4), charged its compute up to then."""
    from types import SimpleNamespace

    from cloudedge.finetune.selection import keep_first
    from cloudedge.fleet import VirtualClock

    cfg = config_from_dict(_raw({"count": 3, "profile": "phone-mid", "overrides": {"flops": 1.0}}))
    fleet = Fleet.from_config(cfg.fleet, cfg.seed)
    clock = VirtualClock(fleet)
    at = {"edge0/dev0": 1.0, "edge0/dev1": 2.0, "edge0/dev2": 3.0}
    planned = [SimpleNamespace(dev=fleet.nodes[d], begin=0.0, flops=10.0, stale=d == "edge0/dev0") for d in at]
    kept, cancelled = keep_first(planned, 2, clock, lambda items: [at[p.dev.id] + (len(items) == 3) for p in items],
                                 last=lambda p: p.stale)
    assert [p.dev.id for p in kept] == ["edge0/dev1", "edge0/dev2"] and cancelled == 1
    assert clock.flops_done["edge0/dev0"] == 3.0  # 1 FLOP/s from 0 until the cut at 3


def test_a_straggler_that_finished_computing_uploads_until_the_deadline_cuts_it_off():
    """dev2 trains as fast as the others but uploads over a link three times slower than its
    training: the plan knows its update cannot be in by the deadline (a straggler), yet the device
    does not know it. It uploads from the end of its training until the deadline, holding its link,
    and what got through by then is charged to it and to the edge."""
    fast = {"availability": 1.0, "flops": FLOPS, "latency_s": 0.0005}
    raw = _raw([{"count": 3, "profile": "phone-mid", "overrides": fast}],
               sync={"name": "hierfavg", "k1": 8, "k2": 1, "deadline_factor": 1.5})
    loop = _loop(raw)
    train_s = 8 * loop.rounds.step_flops / FLOPS
    up_bytes = loop.rounds.messages.update_bytes()
    raw["fleet"]["edges"][0]["devices"] = [
        {"count": 2, "profile": "phone-mid", "overrides": fast},
        {"count": 1, "profile": "phone-mid", "overrides": {**fast, "uplink_Bps": up_bytes / (3 * train_s)}}]
    loop = _loop(raw)
    deadlines = []
    policy_deadline = loop.policy.deadline
    loop.policy.deadline = lambda edge: deadlines.append(edge.now + (out := policy_deadline(edge))) or out
    loop.run()
    (deadline,) = deadlines  # the round's start plus the policy's deadline
    row, clock = loop.history[1], loop.clock
    assert row["timed_out"] == 1 and set(loop.train_count) == {"edge0/dev0", "edge0/dev1"}  # it never trained
    straggler, peer = "edge0/dev2", "edge0/dev0"
    assert clock.flops_done[straggler] == clock.flops_done[peer] > 0  # its compute ended before the deadline
    assert clock.busy_until[straggler] == pytest.approx(deadline)  # sending until the deadline
    sent = clock.bytes_by_direction[("device", "edge")] - 2 * up_bytes  # the two kept updates, then its part
    assert 0 < sent < up_bytes
    # The same compute and download as its peer; its upload, cut off, is charged for what got through.
    radio = loop.fleet.nodes[straggler].profile.radio_joules_per_byte
    assert clock.energy_j[straggler] - clock.energy_j[peer] == pytest.approx((sent - up_bytes) * radio)


def _slow_third(tmp_path, **extra):
    """dev2 computes 1.7x longer than dev0 and dev1, whose two uploads share the edge's downlink
    (0.3 x training each). Returns the raw config and training time."""
    fast = {"availability": 1.0, "flops": FLOPS, "latency_s": 0.0005}
    raw = _raw([{"count": 2, "profile": "phone-mid", "overrides": fast},
                {"count": 1, "profile": "phone-mid", "overrides": {**fast, "flops": FLOPS / 1.7}}], **extra)
    loop = _loop(raw)
    train_s = 8 * loop.rounds.step_flops / FLOPS
    raw["fleet"]["edges"][0]["overrides"]["downlink_Bps"] = loop.rounds.messages.update_bytes() / (0.3 * train_s)
    return raw, train_s


def _run_spying_cut(loop):
    """Run ``loop``; returns the plans' cut uploads (stragglers and dropouts that finished computing)."""
    planned_cut: list = []
    plan_round = loop.rounds._plan_edge_round
    loop.rounds._plan_edge_round = lambda *a: planned_cut.extend((plan := plan_round(*a)).cut) or plan
    loop.run()
    return planned_cut


def test_a_straggler_cut_off_stops_when_the_goals_updates_are_in(tmp_path):
    """Goal 2 of 3: the round ends when dev0's and dev1's updates are in, before the straggler dev2
    has finished computing (before its deadline). So dev2 sends nothing, and the edge's links are
    not held past its round (cut at the deadline, its upload would have held them)."""
    raw, train_s = _slow_third(tmp_path, selection={"goal": 2, "over_selection": 1.5},
                               sync={"name": "hierfavg", "k1": 8, "k2": 1, "deadline_factor": 1.5})
    loop = _loop(raw)
    (cut,) = _run_spying_cut(loop)
    assert loop.history[1]["timed_out"] == 1 and cut.src == "edge0/dev2"
    assert cut.sent_at < cut.deadline  # the setting: dev2 had finished computing before the deadline
    up_bytes = loop.messages.update_bytes()
    assert loop.clock.bytes_by_direction[("device", "edge")] == 2 * up_bytes  # dev0's and dev1's only
    assert loop.clock.busy_until["edge0/dev2"] == pytest.approx(cut.sent_at)  # it never started sending


def test_without_a_deadline_the_round_waits_for_a_device_that_started_sending_until_it_leaves(tmp_path):
    """No deadline, no goal: dev2 starts its upload after dev0's and dev1's are in and goes offline
    during it. The edge sees it leave: the round ends then, and what got through is charged."""
    raw, train_s = _slow_third(tmp_path)
    loop = _loop(raw)
    up_bytes = loop.messages.update_bytes()
    _trace(loop, tmp_path, [("edge0/dev0", 0, 1e6), ("edge0/dev1", 0, 1e6), ("edge0/dev2", 0, 2.2 * train_s)])
    ends = []
    finish = loop.rounds._finish_edge_round
    loop.rounds._finish_edge_round = lambda plan, res: ends.append((out := finish(plan, res))[1]) or out
    (cut,) = _run_spying_cut(loop)
    assert loop.history[1]["dropped"] == 1 and cut.src == "edge0/dev2" and cut.online_until == 2.2 * train_s
    assert 2 * up_bytes < loop.clock.bytes_by_direction[("device", "edge")] < 3 * up_bytes
    assert loop.clock.busy_until["edge0/dev2"] == pytest.approx(2.2 * train_s)
    assert ends == [pytest.approx(2.2 * train_s)]  # the edge round ends when dev2 leaves


def test_the_over_selection_what_if_queues_behind_the_plans_cut_uploads():
    """A straggler's upload, cut off at the deadline, holds the edge's downlink: the what-if that
    ranks the over-selected devices books it too, so an upload sent after it is expected later."""
    from types import SimpleNamespace

    loop = _loop(_raw({"count": 2, "profile": "phone-mid", "overrides": {"availability": 1.0, "latency_s": 0.0005}}))
    up_bytes = loop.messages.update_bytes()
    dev1 = loop.fleet.nodes["edge0/dev1"]
    item = SimpleNamespace(dev=dev1, begin=0.001, flops=0.0, online_until=math.inf)  # sent after the straggler
    alone = loop.rounds._expected_arrivals("edge0", [item], up_bytes, math.inf)
    straggler = Upload("edge0/dev0", "edge0", 100 * up_bytes, 0.0, math.inf, 1e6)  # cut long after
    behind = loop.rounds._expected_arrivals("edge0", [item], up_bytes, math.inf, [straggler])
    assert behind[0] > alone[0] + 1e-6
    assert loop.clock.messages == 0  # what-if bookings only


def test_a_device_holding_fewer_samples_than_a_batch_is_charged_for_what_it_trains_on():
    """batch_size 1,000 on devices holding a few hundred samples each: a worker trains each step on
    all it holds, so the clock charges a step of that many samples, not of 1,000 (the FLOPs, and
    the time and energy they take)."""
    raw = _raw({"count": 2, "profile": "phone-mid", "overrides": {"availability": 1.0}}, batch_size=1000)
    loop = _loop(raw)
    loop.run()
    batch_step = loop.rounds.step_flops  # one step of 1,000 samples
    for dev in ("edge0/dev0", "edge0/dev1"):
        n = loop.rounds._n(dev)
        assert n < 1000
        assert loop.clock.flops_done[dev] == pytest.approx(8 * batch_step * n / 1000)  # k1 = 8 steps
