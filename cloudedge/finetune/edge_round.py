"""One edge round, shared by every topology: an aggregation point and its devices, on the virtual clock.

An aggregation point (an edge, or the cloud for two-tier policies) sends its state to the devices
it selects (:mod:`cloudedge.finetune.selection`); each runs the local steps its sync policy plans
(real gradient steps; virtual time = measured FLOPs / device FLOP/s) and sends its update back. A
device whose update would arrive after the round's deadline is a straggler: it is cancelled at the
deadline, its energy up to then is charged, its update is dropped, and the point waits until the
deadline (it cannot know the update is not coming). The plan judges each upload on its time alone;
one that queues past the deadline (or its sender's time online) behind the others' is lost when
the uploads are booked. With a goal, the over-selected devices are ranked by a what-if booking of
all their uploads queued together, and the kept ones are booked alone the same way, so that they are
in (unless a worker fails). The updates that arrive pass the update gate and are aggregated
(:class:`cloudedge.finetune.safeguards.Safeguards`).

A round is *planned* (who takes part, with how many steps, from which model; dropouts and
stragglers charged) and *finished* (what arrives: the clock, the gate, the aggregate, the policy's
feedback). Between the two, the devices of several points' rounds train in one engine call, which is
what lets a Ray cluster train every edge's devices at once.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from cloudedge.engine import Engine, Task, WorkerError, WorkerSpec
from cloudedge.finetune.churn import Churn
from cloudedge.finetune.devicedata import sample_count
from cloudedge.finetune.lora import state_distance
from cloudedge.finetune.messages import CLOUD, Messages, Upload
from cloudedge.finetune.metrics import Tally
from cloudedge.finetune.reliability import stale_weight
from cloudedge.finetune.safeguards import Safeguards
from cloudedge.finetune.selection import keep_first, select_devices
from cloudedge.finetune.streams import stable_index, stream
from cloudedge.finetune.sync import DeviceObs, DeviceStats, EdgeObs, EdgeRoundStats, SyncPolicy
from cloudedge.finetune.workers import FinetuneWorker
from cloudedge.fleet import Fleet, VirtualClock, transfer_seconds
from cloudedge.fleet.topology import Node
from cloudedge.fleet.traces import online_until

Tensors = dict[str, torch.Tensor]
MAX_PERIOD_ROUNDS = 100  # an edge syncs after this many edge rounds whatever its policy says


@dataclass
class Planned:
    """A device that set out on this edge round and will deliver (unless it is rejected)."""

    dev: Node
    steps: int
    flops: float
    begin: float
    start: Tensors  # the model it trains from (the edge's, or its stale cached copy)
    staleness: int  # edge rounds its model is behind (0: this round's)
    online_until: float = math.inf  # when its availability model takes it offline


@dataclass
class EdgeRoundPlan:
    """An edge round between its planning and its results (see :meth:`EdgeRounds.edge_rounds`)."""

    agg_id: str
    devices: Sequence[Node]
    state: Tensors
    t0: float
    version: int
    received: Tensors  # the state as the devices receive it (after compression)
    avail: list[Node]
    obs_all: tuple[DeviceObs, ...]
    t_deadline: float
    extra: float  # steps' worth of FLOPs the gradient statistics some policies ask for cost a device (0 or 1)
    energy0: float
    planned: list[Planned] = field(default_factory=list)
    timed_out: list[str] = field(default_factory=list)
    dropped_out: list[str] = field(default_factory=list)
    # Uploads of stragglers and dropouts that finished computing before their cut: they start, and
    # are cut off at the deadline or when their sender leaves (booked with the round's uploads).
    cut: list[Upload] = field(default_factory=list)
    tasks: list[Task] = field(default_factory=list)
    surplus: int = 0  # over-selected devices cancelled once the goal's updates were due


@dataclass
class Period:
    """An edge between two cloud syncs: what it pulled, where it is now, its edge rounds so far."""

    pulled: Tensors
    state: Tensors
    t: float
    rounds: int = 0


RoundResult = tuple[Tensors, float, dict[str, Any]]  # the aggregated state, when the round ends, what was observed


class EdgeRounds:
    """The edge rounds of one run, and what they learn about devices (speeds, round times) on the way.

    ``device_kwargs``: the device workers' options besides their data; ``step_flops``: FLOPs of one
    training step as the clock charges it; ``host_step_flops``: as this host really computes it (the
    trained model's; differs under clock.charge_as), for the rows' MFU.
    """

    def __init__(self, settings: Any, fleet: Fleet, device_data: Any, engine: Engine, clock: VirtualClock,
                 policy: SyncPolicy, messages: Messages, safeguards: Safeguards, churn: Churn, tally: Tally,
                 step_flops: float, device_kwargs: dict[str, Any], host_step_flops: float | None = None):
        self.s, self.fleet, self.device_data, self.engine, self.clock = settings, fleet, device_data, engine, clock
        self.policy, self.messages, self.safeguards, self.churn, self.tally = policy, messages, safeguards, churn, tally
        self.step_flops, self.device_kwargs = step_flops, device_kwargs
        self.host_flops_ratio = 1.0 if host_step_flops is None else host_step_flops / step_flops
        self.rngs: dict[str, np.random.Generator] = {}  # availability and sampling, per aggregation point
        self.train_count: dict[str, int] = {}  # trained rounds per device (its training seed)
        self.sec_per_step: dict[str, float] = {}  # measured per device; its profile's until it trained
        self.edge_round_s: dict[str, float] = {}  # EMA of each aggregation point's round time
        self.agg_rounds: dict[str, int] = {}  # edge rounds run by each aggregation point (model version)
        self.n_samples: dict[str, int] = {}  # filled as devices are met (sample_count needs no data)
        # Devices are registered when they are sampled and forgotten after their round, so the
        # engine (and a lazy `device_data`) holds one round's devices, not the fleet's.
        self._registered: set[str] = set()
        # A device worker registered after this point (a test's faulty worker) replaces the default
        # one; anything registered before (another run's workers on a shared engine) does not.
        self._earlier_ids = engine.worker_ids()

    def rng(self, agg_id: str) -> np.random.Generator:
        """The aggregation point's stream for availability and sampling."""
        return stream(self.rngs, [self.s.seed, 7919, stable_index(agg_id)], agg_id)

    def _n(self, dev_id: str) -> int:
        if dev_id not in self.n_samples:
            self.n_samples[dev_id] = sample_count(self.device_data, dev_id)
        return self.n_samples[dev_id]

    def _step_flops_of(self, dev_id: str) -> float:
        """FLOPs of one of this device's training steps as the clock charges them: a batch of
        ``batch_size`` samples, or of all it holds when that is fewer (its worker trains on
        ``min(batch_size, samples)``)."""
        batch = self.s.batch_size
        return self.step_flops * min(batch, self._n(dev_id)) / batch

    def _step_s(self, dev: Node) -> float:
        return self.sec_per_step.get(dev.id, self._step_flops_of(dev.id) / dev.profile.flops)

    def _device_obs(self, agg: Node, dev: Node, down_bytes: int, up_bytes: int) -> DeviceObs:
        comm = (self.messages.link_s(agg, dev, down_bytes) + self.messages.link_s(dev, agg, up_bytes))
        return DeviceObs(dev.id, self._step_s(dev), comm, self._n(dev.id))

    def edge_round(self, agg_id: str, devices: Sequence[Node], state: Tensors, t0: float) -> RoundResult:
        """One round of ``agg_id`` with its ``devices`` from ``state`` at time ``t0``.

        Returns the aggregated state, when the round ends, and what was observed. Updates that
        arrive pass the update gate (and the staleness rule) before they are aggregated.

        A device whose worker fails (a crash, a dead Ray actor: a ``WorkerError`` from
        ``engine.run_tolerant``) sends no update: it is left out of this round like a device that
        dropped out (nothing of its work is charged, as nothing of it is known; the edge waits until
        the deadline, if there is one), counted in the metric row's ``failed`` with the reason in
        ``failures``, and the round completes with the others. After its task every device's worker
        is released, so a device holds no model between the rounds it is sampled in.
        """
        return self.edge_rounds([(agg_id, devices, state, t0)])[0]

    def edge_rounds(self, rounds: list[tuple[str, Sequence[Node], Tensors, float]]) -> list[RoundResult]:
        """Several aggregation points' rounds (``edge_round``'s arguments each) with one engine call.

        The points share no device, link or random stream, so running their rounds together gives
        what running them one after another would; the one engine call is what lets a Ray cluster
        train every edge's devices at the same time (on their edge hosts).
        """
        plans = [self._plan_edge_round(*r) for r in rounds]
        tasks = [task for plan in plans for task in plan.tasks]
        wall0 = time.perf_counter()
        results = self.engine.run_tolerant(tasks)
        self.tally.host_wall_s += time.perf_counter() - wall0
        out, at = [], 0
        for plan in plans:
            mine = results[at:at + len(plan.tasks)]
            at += len(plan.tasks)
            # This host's real FLOPs for its MFU: the trained model's, not clock.charge_as's.
            self.tally.host_flops += self.host_flops_ratio * sum(
                p.flops for p, res in zip(plan.planned, mine, strict=True) if not isinstance(res, WorkerError))
            out.append(self._finish_edge_round(plan, mine))
            for p in plan.planned:
                if p.dev.id in self._registered:
                    self._registered.discard(p.dev.id)
                    self.engine.unregister(p.dev.id)  # its data and spec go with its worker
        return out

    def _plan_edge_round(self, agg_id: str, devices: Sequence[Node], state: Tensors, t0: float) -> EdgeRoundPlan:
        """Everything an edge round decides before its devices train: who takes part, with how
        many steps and from which model; who drops out or cannot make the deadline (charged now)."""
        agg = self.fleet.nodes[agg_id]
        avail = select_devices(self.fleet, devices, t0, self.rng(agg_id), self.s.goal, self.s.over_selection,
                               self.s.participation)
        version = self.agg_rounds.get(agg_id, 0)
        self.agg_rounds[agg_id] = version + 1
        received, down_bytes = self.messages.send_state(state)
        up_bytes = self.messages.update_bytes()
        # With a goal the round looks at its candidates only (a fleet may hold a million devices).
        seen = (avail or list(devices[:1])) if self.s.goal is not None else devices
        obs_all = tuple(self._device_obs(agg, d, down_bytes, up_bytes) for d in seen)
        obs_of = {o.device_id: o for o in obs_all}
        deadline = self.policy.deadline(EdgeObs(agg_id, 0, 0.0, 0.0, self.edge_round_s.get(agg_id, 0.0),
                                                0.0, 0.0, 0.0, obs_all, t0))
        t_deadline = math.inf if deadline is None else t0 + deadline
        extra = 1.0 if self.policy.needs_grad_stats else 0.0  # one more step's FLOPs per device
        plan = EdgeRoundPlan(agg_id, devices, state, t0, version, received, avail, obs_all, t_deadline, extra,
                             energy0=sum(self.clock.energy_j[d.id] for d in avail))
        churn_rng = self.churn.rng(agg_id)
        for dev in avail:
            steps = self.policy.device_steps(agg_id, obs_of[dev.id], deadline)
            if steps <= 0:
                continue  # the device knows it cannot make the deadline: it sits out, spends nothing
            start, staleness = self.churn.start_state(agg_id, dev.id, received, version)
            # A stale device missed this round's model: it receives nothing and starts at once.
            t_recv = self.messages.transfer(agg_id, dev.id, down_bytes, start=t0) if staleness == 0 else t0
            flops = (steps + extra) * self._step_flops_of(dev.id)
            begin = max(t_recv, self.clock.busy_until[dev.id])
            end = begin + flops / dev.profile.flops
            arrive = end + self.messages.link_s(dev, agg, up_bytes)
            t_off = online_until(self.fleet, self.fleet.device_number(dev.id), t0)
            share = self.churn.dropout_share(churn_rng)
            if share is not None:
                # It starts, then goes away (battery, network, user): the work it did is charged and
                # its update never arrives. The edge cannot tell and waits until the deadline.
                self.clock.compute(dev.id, share * flops, start=begin)
                plan.dropped_out.append(dev.id)
            elif end + self.messages.sender_s(dev, agg, up_bytes) > t_off and t_off < t_deadline:
                # Its trace takes it offline before its update is out of its hands (in, or at the
                # relaying edge): a dropout at that instant, its work up to then charged (and its
                # upload so far, if it got that far).
                self.clock.compute_until(dev.id, flops, begin, t_off)
                plan.dropped_out.append(dev.id)
                if end < t_off:
                    plan.cut.append(Upload(dev.id, agg_id, up_bytes, end, t_off, t_deadline))
            elif arrive > t_deadline:
                self.clock.compute_until(dev.id, flops, begin, t_deadline)
                plan.timed_out.append(dev.id)
                if end < t_deadline:
                    plan.cut.append(Upload(dev.id, agg_id, up_bytes, end, t_off, t_deadline))
            else:
                plan.planned.append(Planned(dev, steps, flops, begin, start, staleness, t_off))
        if self.s.goal is not None and len(plan.planned) > self.s.goal:
            plan.planned, plan.surplus = keep_first(
                plan.planned, self.s.goal, self.clock,
                lambda items: self._expected_arrivals(agg_id, items, up_bytes, t_deadline, plan.cut),
                last=lambda p: p.staleness > 0 and self.churn.stale_reason(p.staleness) is not None)
        plan.tasks = [self._train_task(p) for p in plan.planned]
        return plan

    def _expected_arrivals(self, agg_id: str, planned: list[Planned], up_bytes: int, t_deadline: float,
                           cut: Sequence[Upload] = ()) -> list[float]:
        """When each of ``planned``'s updates would be in if those devices alone computed and
        uploaded, in the order they are sent, behind one another and the ``cut`` uploads on the
        links to ``agg_id`` (inf: lost in the queue, past the deadline or its sender's time online).
        Booked on a what-if clock: nothing is charged."""
        scratch = self.clock.what_if()
        sends = [Upload(p.dev.id, agg_id, up_bytes, scratch.compute(p.dev.id, p.flops, start=p.begin),
                        p.online_until, t_deadline) for p in planned]
        return [a.at for a in self.messages.uploads([*sends, *cut], on=scratch)[:len(sends)]]

    def _cut_by_round_end(self, plan: EdgeRoundPlan, sends: list[Upload]) -> list[Upload]:
        """The plan's cut uploads, each cut off at the latest when the aggregation point stops
        listening: when the goal's updates are in (found by a what-if booking of the round's uploads
        with them), else at the deadline. Without either it listens until a device that had
        started sending leaves (the round waits for that: :meth:`_finish_edge_round`). Cut sooner,
        they hold the links less, so the round's own uploads are in no later than in the what-if."""
        if not plan.cut:
            return []
        t_stop = plan.t_deadline
        if self.s.goal is not None:
            trial = self.messages.uploads([*sends, *plan.cut], on=self.clock.what_if())[:len(sends)]
            arrived = [a.at for a in trial if a.lost is None]
            if len(arrived) >= self.s.goal:
                t_stop = max(arrived)
        return [u._replace(deadline=min(u.deadline, t_stop)) for u in plan.cut]

    def _train_task(self, p: Planned) -> Task:
        """The engine task of a planned device (its worker registered for this round when needed)."""
        n = self.train_count.get(p.dev.id, 0)
        self.train_count[p.dev.id] = n + 1
        seed = (self.s.seed * 1_000_003 + stable_index(p.dev.id) * 7_919 + n) % (2**31)
        kw: dict[str, Any] = dict(state=p.start, steps=p.steps, seed=seed, stats=self.policy.needs_grad_stats)
        kw.update(self.safeguards.train_options(p.dev.id))
        # Released after its task: a device holds no model between the rounds it is sampled in
        # (workers are stateless between tasks: rebuilding one gives the same result).
        if p.dev.id in self._earlier_ids or not self.engine.has_worker(p.dev.id):
            self.engine.register(p.dev.id, WorkerSpec(FinetuneWorker, dict(
                data=self.device_data[p.dev.id], **self.device_kwargs)))
            self._registered.add(p.dev.id)
        return Task(p.dev.id, "train", kw, release=True)

    def _finish_edge_round(self, plan: EdgeRoundPlan, results: list[Any]) -> RoundResult:
        """What arrives from the devices that trained: the clock, the gate, the aggregate, the policy."""
        agg_id, t0 = plan.agg_id, plan.t0
        obs_of = {o.device_id: o for o in plan.obs_all}
        extra, t_deadline = plan.extra, plan.t_deadline
        incoming: dict[str, Tensors] = {}
        work, weight, stats_of, steps_of = {}, {}, {}, {}
        rejected: dict[str, str] = {}
        failed: dict[str, str] = {}
        arrivals, step_s, comm_s = [], [], []
        # The clock first: each device computes, then the uploads are booked in event order
        # (Messages.uploads), so none waits behind one that starts later. The plan judged the
        # deadline and departures on each upload's time alone; queued behind the others, an upload
        # can still miss the deadline or outlast its sender's time online, and is then lost as the
        # plan's stragglers and dropouts are. Everything else follows the plan's order, as the
        # aggregate's sums do.
        done: dict[int, tuple[float, Tensors]] = {}
        sends: list[Upload] = []
        for i, (p, res) in enumerate(zip(plan.planned, results, strict=True)):
            if not isinstance(res, WorkerError):
                got, nbytes = self.messages.ship(res["update"])
                done[i] = (self.clock.compute(p.dev.id, p.flops, start=p.begin), got)
                sends.append(Upload(p.dev.id, agg_id, nbytes, done[i][0], p.online_until, t_deadline))
        # The plan's stragglers and dropouts that finished computing upload until they are cut off.
        cut = self._cut_by_round_end(plan, sends)
        arrival_of = dict(zip(done, self.messages.uploads([*sends, *cut])[:len(sends)], strict=True))
        for i, (p, res) in enumerate(zip(plan.planned, results, strict=True)):
            dev = p.dev
            if isinstance(res, WorkerError):
                failed[dev.id] = str(res.cause)
                continue
            t_done, got = done[i]
            arrival = arrival_of[i]
            if arrival.lost is not None:
                (plan.dropped_out if arrival.lost == "offline" else plan.timed_out).append(dev.id)
                continue
            arrivals.append(arrival.at)
            measured = (t_done - p.begin) / max(1.0, p.steps + extra)
            self.sec_per_step[dev.id] = 0.5 * self._step_s(dev) + 0.5 * measured
            step_s.append(measured)
            comm_s.append(obs_of[dev.id].comm_s)
            steps_of[dev.id], work[dev.id] = p.steps, float(p.steps)
            weight[dev.id] = float(res["n"]) * stale_weight(p.staleness, self.churn.opts["stale_decay"])
            if p.staleness > 0:
                self.tally.count("stale")
                reason = self.churn.stale_reason(p.staleness)
                if reason is not None:
                    rejected[dev.id] = reason
                    continue
            incoming[dev.id] = got
            if "stats" in res:
                st = res["stats"]
                stats_of[dev.id] = DeviceStats(float(res["n"]), st["grad_start"], st["grad_end_diff"],
                                               st["loss_diff"], st["step_norm"])
        gate = self.safeguards.device_guard.check(incoming, work)
        rejected.update({str(k): v for k, v in gate.rejected.items()})
        accepted: dict[str, Tensors] = {str(k): v for k, v in gate.accepted.items()}
        self.safeguards.account(agg_id, accepted, plan.planned)
        t_end = max(arrivals, default=t0)
        goal_met = self.s.goal is not None and len(arrivals) >= self.s.goal  # no need to wait for the rest
        if (plan.timed_out or plan.dropped_out or failed or not plan.planned) and not goal_met:
            t_end = max(t_end, t_deadline if math.isfinite(t_deadline) else t0)
            if not math.isfinite(t_deadline):  # no deadline: it sees a device that had started sending leave
                t_end = max([t_end, *(u.online_until for u in cut)])
        if not plan.avail and not math.isfinite(t_deadline):
            t_end = t0 + max(o.comm_s + o.sec_per_step for o in plan.obs_all)  # nobody reachable: wait a beat
        new_state = self.safeguards.aggregate_devices(agg_id, plan.version, plan.state, plan.received, accepted,
                                                      weight)
        drift = update_drift(list(accepted.values()), [weight[i] for i in accepted])
        self.edge_round_s[agg_id] = (t_end - t0 if agg_id not in self.edge_round_s
                                     else 0.5 * self.edge_round_s[agg_id] + 0.5 * (t_end - t0))
        if step_s:
            self.policy.on_edge_round(agg_id, EdgeRoundStats(
                local_step_s=float(np.mean(step_s)), agg_s=float(np.mean(comm_s)),
                devices=[stats_of[i] for i in accepted if i in stats_of], now=t_end))
        self._tally(plan, failed, rejected, sum(steps_of[i] for i in accepted))
        info = {"participants": len(plan.avail), "accepted": len(accepted), "timed_out": len(plan.timed_out),
                "dropped": len(plan.dropped_out), "rejected": len(rejected), "failed": len(failed),
                "steps": [steps_of[i] for i in accepted], "drift": drift, "obs": plan.obs_all,
                "energy_j": sum(self.clock.energy_j[d.id] for d in plan.avail) - plan.energy0}
        return new_state, t_end, info

    def _tally(self, plan: EdgeRoundPlan, failed: dict[str, str], rejected: dict[str, str], steps: int) -> None:
        """A finished round's counts: updates that never arrived, failed, cancelled, rejected; steps used."""
        tally = self.tally
        tally.dropped_total += len(plan.timed_out) + len(plan.dropped_out)
        tally.count("timed_out", len(plan.timed_out))
        tally.count("dropped", len(plan.dropped_out))
        tally.fail(plan.agg_id, failed)
        tally.count("surplus", plan.surplus)
        tally.reject(plan.agg_id, rejected)
        tally.device_steps_total += steps

    def edge_periods(self, starts: dict[str, tuple[Tensors, float]]) -> dict[str, tuple[Tensors, float, EdgeObs]]:
        """Several edges' periods between cloud syncs (``edge_id: (pulled, t0)``), their rounds in lockstep.

        Round k of every edge still running goes to the engine in one call (``edge_rounds``);
        an edge leaves when its policy syncs. Edges share no device, link or random stream, so
        each edge's period is what it would be alone, and a Ray cluster runs the edges in parallel.
        Returns each edge's state, when its period ends, and what it reports to the cloud.
        """
        cloud = self.fleet.nodes[CLOUD]
        sync_bytes = self.messages.update_bytes()
        running = {e: Period(pulled, pulled, t0) for e, (pulled, t0) in starts.items()}
        sync_cost = {}  # what one sync costs each edge: seconds and joules of the two transfers
        for e in starts:
            edge = self.fleet.nodes[e]
            sync_cost[e] = (2 * transfer_seconds(edge.profile, cloud.profile, sync_bytes),
                            2 * sync_bytes * (edge.profile.radio_joules_per_byte + cloud.profile.radio_joules_per_byte))
        done: dict[str, tuple[Tensors, float, EdgeObs]] = {}
        while running:
            ids = list(running)
            outcomes = self.edge_rounds([(e, self.fleet.devices_of(e), running[e].state, running[e].t) for e in ids])
            for edge_id, (state, t, info) in zip(ids, outcomes, strict=True):
                run = running[edge_id]
                run.state, run.t, run.rounds = state, t, run.rounds + 1
                sync_s, sync_j = sync_cost[edge_id]
                obs = EdgeObs(edge_id, run.rounds, state_distance(state, run.pulled), info["drift"],
                              self.edge_round_s[edge_id], sync_s, sync_j, info["energy_j"], info["obs"], t,
                              sync_bytes=2.0 * sync_bytes)
                if run.rounds >= MAX_PERIOD_ROUNDS or self.policy.should_sync(obs):
                    done[edge_id] = (state, t, obs)
                    del running[edge_id]
        return {e: done[e] for e in starts}

    def state_dict(self) -> dict[str, Any]:
        return {"train_count": self.train_count, "sec_per_step": self.sec_per_step, "edge_round_s": self.edge_round_s,
                "rngs": {k: g.bit_generator.state for k, g in self.rngs.items()}, "agg_rounds": self.agg_rounds}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.train_count = {k: int(v) for k, v in state["train_count"].items()}
        self.sec_per_step = {k: float(v) for k, v in state["sec_per_step"].items()}
        self.edge_round_s = {k: float(v) for k, v in state["edge_round_s"].items()}
        for agg_id, rng_state in state["rngs"].items():
            self.rng(agg_id).bit_generator.state = rng_state
        self.agg_rounds = {k: int(v) for k, v in state["agg_rounds"].items()}


def update_drift(updates: list[Tensors], weights: list[float]) -> float:
    """``sum p_d |u_d - mean u| / |mean u|``: how much devices' updates disagree (0: identical)."""
    if len(updates) < 2:
        return 0.0
    total = sum(weights)
    p = [w / total for w in weights]
    keys = list(updates[0])
    mean = {k: sum(pi * u[k].double() for pi, u in zip(p, updates, strict=True)) for k in keys}
    norm = math.sqrt(sum(float(v.pow(2).sum()) for v in mean.values()))
    if norm == 0:
        return 0.0
    spread = sum(pi * state_distance({k: u[k].double() for k in keys}, mean) for pi, u in zip(p, updates, strict=True))
    return spread / norm
