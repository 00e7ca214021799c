"""Hierarchical federated fine-tuning: devices -> edges -> cloud, on the virtual clock.

One cloud update, read top to bottom:

1. Each edge pulls the global adapter state (cloud -> edge transfer).
2. Edge rounds, until the sync policy says "sync": the available devices (one draw against each
   profile's availability, then a ``participation`` share) receive the edge's state, run their
   planned local steps (real gradient steps; virtual time = measured FLOPs / device FLOP/s) and
   send their update back. A device whose update would arrive after the edge round's deadline is
   a straggler: it is cancelled at the deadline, its energy up to then is charged, its update is
   dropped, and the edge waits until the deadline (it cannot know the update is not coming).
   The edge averages the updates it got (weights: samples) with the LoRA aggregation mode, after
   every update passed the update gate (and, as configured, a robust aggregator, churn's staleness
   rule and DP-FedAvg: docs/reliability.md, "Reliability in fine-tuning").
3. The edge sends its state to the cloud. With a ``barrier`` policy the cloud waits for every edge
   and averages them (weights: the edges' samples); otherwise (autonomous) it merges each edge
   when it arrives: ``global += w_e (edge - pulled)``. The server optimizer turns the result into
   the next global state. The global state is evaluated on the test set (not timed).

``two_tier`` policies (fedavg2) skip the edge tier: devices exchange with the cloud directly, each
message relayed over its edge's links (access link + the edge site's WAN uplink), so the WAN carries
one copy per device.
"""

from __future__ import annotations

import heapq
import json
import math
import time
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cloudedge.aggregate import ServerOptimizer, get_server_optimizer
from cloudedge.attacks import apply_attack, choose_attackers
from cloudedge.comm import compress
from cloudedge.device import resolve_device
from cloudedge.engine import Engine, Task, WorkerError, WorkerSpec
from cloudedge.errors import InputError
from cloudedge.finetune.devicedata import sample_count, samples_of_range
from cloudedge.finetune.lora import (
    A_SUFFIX,
    BASE_DELTA_SUFFIX,
    aggregate_lora,
    lora_layers,
    sent_keys,
    state_distance,
    with_base_deltas,
)
from cloudedge.finetune.reliability import (
    PrivacyLedger,
    UpdateGuard,
    check_memory,
    memory_need,
    robust_delta,
    robust_settings,
    stale_weight,
)
from cloudedge.finetune.selection import keep_first, select_devices
from cloudedge.finetune.sync import (
    DeviceObs,
    DeviceStats,
    EdgeObs,
    EdgeRoundStats,
    SyncPolicy,
    disagreement,
    make_policy,
)
from cloudedge.finetune.workers import FinetuneWorker
from cloudedge.fleet import Fleet, VirtualClock, transfer_seconds
from cloudedge.fleet.topology import Node
from cloudedge.fleet.traces import online_count, online_until
from cloudedge.perf import stage_peak_size, utilization_fields

Tensors = dict[str, torch.Tensor]
CLOUD = "cloud"


@dataclass
class TaskData:
    """Everything a fine-tuning run needs besides the fleet: the model spec, and data per worker."""

    spec: dict[str, Any]  # see cloudedge.finetune.model.build_lora_classifier
    device_data: dict[str, dict[str, torch.Tensor]]  # device id -> tensors (labels + inputs)
    test_data: dict[str, torch.Tensor]
    classes: list[str]
    charge: Any = None  # the ChargedModel of clock.charge_as (None: the clock charges the trained model)


@dataclass
class FinetuneSettings:
    """The knobs of one run (a FinetuneConfig, flattened; the benchmark builds these directly)."""

    policy: str = "autonomous"
    policy_kwargs: dict[str, Any] = field(default_factory=dict)
    lora_mode: str = "fedavg"
    refactor: str = "svd"
    batch_size: int = 16
    optimizer: str = "adamw"
    lr: float = 3e-3
    server_optimizer: str = "fedavg"
    server_lr: float = 1.0
    compression: str = "none"
    device: str = "cpu"  # where workers hold the model: cpu, cuda or auto (each worker's host decides)
    participation: float = 1.0
    time_budget_s: float = 60.0
    max_cloud_rounds: int = 100
    target_accuracy: float | None = None
    eval_max: int | None = None
    # Score the global model at the instants 0, e, 2e, ... <= time_budget_s (the model in effect at
    # each), instead of after every cloud update: every method scored at the same instants.
    eval_every_s: float | None = None
    checkpoint_every: int = 1
    seed: int = 0
    # Reliability (docs/reliability.md, "Reliability in fine-tuning"): the `finetune.robust`,
    # `attack`, `churn` and `privacy` sections as plain dicts ({} / None: defaults / off).
    robust: dict[str, Any] = field(default_factory=dict)
    attack: dict[str, Any] | None = None
    churn: dict[str, Any] = field(default_factory=dict)
    privacy: dict[str, Any] | None = None
    memory_fraction: float = 0.5
    # Selection (docs/reliability.md, "Selection, deadlines and over-selection"): with a goal, each
    # aggregation point draws goal x over_selection devices among those online at the round's start
    # and keeps the first `goal` updates; None: `participation` of the available devices.
    goal: int | None = None
    over_selection: float = 1.0

_CHURN_DEFAULTS: dict[str, Any] = {"dropout": 0.0, "stale_prob": 0.0, "max_staleness": 4, "stale_decay": 0.5}
_COUNTS = ("timed_out", "dropped", "stale", "rejected", "failed", "surplus")
_MAX_REJECTED_LISTED = 20  # per metric row; the count is always exact


def server_optimizer(name: str, lr: float) -> ServerOptimizer:
    return get_server_optimizer(name, lr=lr)


@dataclass
class _Planned:
    """A device that set out on this edge round and will deliver (unless it is rejected)."""

    dev: Node
    steps: int
    flops: float
    begin: float
    start: Tensors  # the model it trains from (the edge's, or its stale cached copy)
    staleness: int  # edge rounds its model is behind (0: this round's)
    arrive: float = 0.0  # when its update is expected at the aggregation point


@dataclass
class _EdgeRoundPlan:
    """An edge round between its planning and its results (see ``HierFinetune.edge_rounds``)."""

    agg_id: str
    devices: Sequence[Node]
    state: Tensors
    t0: float
    version: int
    received: Tensors  # the state as the devices receive it (after compression)
    avail: list[Node]
    obs_all: tuple[DeviceObs, ...]
    t_deadline: float
    extra: float  # FLOPs of the gradient statistics some policies ask for, per device
    energy0: float
    planned: list[_Planned] = field(default_factory=list)
    timed_out: list[str] = field(default_factory=list)
    dropped_out: list[str] = field(default_factory=list)
    tasks: list[Task] = field(default_factory=list)
    surplus: int = 0  # over-selected devices cancelled once the goal's updates were due


@dataclass
class _Period:
    """An edge between two cloud syncs: what it pulled, where it is now, its edge rounds so far."""

    pulled: Tensors
    state: Tensors
    t: float
    rounds: int = 0


@dataclass
class _Pending:
    """An edge whose period of edge rounds is done, waiting to merge (async mode)."""

    t_ready: float
    edge_id: str
    state: Tensors
    pulled: Tensors
    obs: EdgeObs


class HierFinetune:
    """One fine-tuning run of one sync policy over a fleet. ``run()`` returns the summary."""

    def __init__(self, fleet: Fleet, task: TaskData, settings: FinetuneSettings, engine: Engine,
                 run_dir: Any = None, method: str | None = None, progress: Any = None):
        self.fleet, self.task, self.s, self.engine = fleet, task, settings, engine
        self.run_dir, self.progress = run_dir, progress
        self.method = method or settings.policy
        self.clock = VirtualClock(fleet)
        self.device = resolve_device(settings.device, "finetune.device")  # this host's, for its MFU peak
        # One random stream per aggregation point (availability, sampling) and one for its churn:
        # a point's draws do not depend on how its rounds interleave with other points' rounds.
        self.rngs: dict[str, np.random.Generator] = {}
        self.churn_rngs: dict[str, np.random.Generator] = {}
        kw = dict(settings.policy_kwargs)
        kw.setdefault("time_budget_s", settings.time_budget_s)
        kw.setdefault("lr", settings.lr)
        self.policy: SyncPolicy = make_policy(settings.policy, **kw)
        self.opt = server_optimizer(settings.server_optimizer, settings.server_lr)
        self.scaling = float(task.spec["alpha"]) / int(task.spec["rank"])
        self.merge_count = 0
        self.train_count: dict[str, int] = {}
        spec = {**task.spec, "mode": settings.lora_mode}
        self.spec = spec
        # Devices are registered when they are sampled and forgotten after their round, so the
        # engine (and a lazy `task.device_data`) holds one round's devices, not the fleet's.
        self._device_kwargs = dict(spec=spec, batch_size=settings.batch_size, optimizer=settings.optimizer,
                                   lr=settings.lr, device=settings.device)
        self._registered: set[str] = set()
        # A device worker registered after this point (a test's faulty worker) replaces the default
        # one; anything registered before (another run's workers on a shared engine) does not.
        self._earlier_ids = engine.worker_ids()
        engine.register(CLOUD, WorkerSpec(FinetuneWorker, dict(
            spec=spec, data=task.test_data, batch_size=settings.batch_size, device=settings.device)))
        self.info = engine.call(CLOUD, "model_info")
        self.global_state: Tensors = engine.call(CLOUD, "initial_state")
        if settings.lora_mode == "product" and settings.refactor == "merge":
            self.global_state = with_base_deltas(self.global_state)
        self._in_effect = self.global_state  # grid mode: the global model since the last cloud update
        self._init_charge()
        self.step_flops = float(self.charged["train_step_flops"])
        self.n_samples: dict[str, int] = {}  # filled as devices are met (sample_count needs no data)
        self.agg_samples = {agg: samples_of_range(task.device_data, fleet, *self._range(agg))
                            for agg in ([CLOUD] if self.policy.two_tier else [e.id for e in fleet.edges])}
        self.n_all = sum(self.agg_samples.values())
        self.fastest_flops = max((p.flops for p, _, _ in fleet.device_profile_set()), default=1.0)
        self.sec_per_step: dict[str, float] = {}  # measured per device; its profile's until it trained
        self.host_flops, self.host_wall_s = 0.0, 0.0  # real work done on this host, for MFU
        self.edge_round_s: dict[str, float] = {}
        self.history: list[dict[str, Any]] = []
        self.cloud_round = 0
        self.t_cloud = 0.0
        self.pending: list[_Pending] = []
        self.dropped_total = 0  # updates that never arrived: timed out at a deadline or dropped out
        self.device_steps_total = 0  # local steps whose updates were aggregated
        self._init_reliability()

    # --- reliability (docs/reliability.md) -----------------------------------------------------

    def _init_charge(self) -> None:
        """The costs the clock charges: the trained model's, or clock.charge_as's (cloudedge.finetune.charge)."""
        self.charged, self.charged_layout = self.info, None
        if self.task.charge is not None:
            from cloudedge.finetune.charge import charged_info, with_charged_base_deltas

            text_len = int(self.task.test_data["input_ids"].shape[1]) if "input_ids" in self.task.test_data else None
            self.charged, layout = charged_info(self.task.charge, self.spec, self.s.batch_size, text_len)
            merged = self.s.lora_mode == "product" and self.s.refactor == "merge"
            self.charged_layout = with_charged_base_deltas(layout) if merged else layout

    def _init_reliability(self) -> None:
        """Gate, aggregators, attackers, churn, DP; and the memory check, before any work starts."""
        s = self.s
        if self.charged_layout is not None:
            extra = sum(v.numel() * v.element_size() for k, v in self.charged_layout.items()
                        if k.endswith(BASE_DELTA_SUFFIX))
        else:
            extra = sum(v.numel() * v.element_size() for k, v in self.global_state.items()
                        if k.endswith(BASE_DELTA_SUFFIX))
        self.memory_need = memory_need(self.charged, s.optimizer, extra)
        check_memory(self.fleet, self.memory_need, s.memory_fraction, s.batch_size)
        self.robust = robust_settings(s.robust)
        self.edge_aggregator = self.robust["aggregator"]["name"]
        self.cloud_aggregator = self.robust["cloud_aggregator"]["name"]
        if s.lora_mode == "product" and {self.edge_aggregator, self.cloud_aggregator} != {"mean"}:
            raise InputError("finetune.robust.aggregator: robust aggregators need lora.mode 'fedavg' or 'ffa' "
                             "(product mode refactors the adapters)")
        sent = sent_keys(list(self.global_state), s.lora_mode)
        merged = s.lora_mode == "product" and s.refactor == "merge"
        self.cloud_keys = list(self.global_state) if merged else sent
        self.device_guard = UpdateGuard({k: self.global_state[k] for k in sent}, self.robust["gate"],
                                        dp=s.privacy is not None)
        self.cloud_guard = UpdateGuard({k: self.global_state[k] for k in self.cloud_keys}, self.robust["gate"])
        self.churn = {**_CHURN_DEFAULTS, **s.churn}
        self.attack_opts: dict[str, Any] | None = None
        self.attackers: list[str] = []
        if s.attack is not None:
            a = s.attack
            # The attack's own knobs: everything but who attacks (fraction, seed); unset ones keep their defaults.
            self.attack_opts = {"kind": a["kind"], **{k: v for k, v in a.items()
                                                      if k not in ("kind", "fraction", "seed") and v is not None}}
            apply_attack(a["kind"], {"x": torch.ones(1)}, seed=0,  # options checked now, not mid-run
                         **{k: v for k, v in self.attack_opts.items() if k != "kind"})
            self.attackers = [str(d) for d in choose_attackers([d.id for d in self.fleet.devices],
                                                               float(a.get("fraction", 0.2)), int(a.get("seed", 0)))]
        self.dp = None if s.privacy is None else {"mode": "central", "delta": 1e-5, **s.privacy}
        self.privacy: PrivacyLedger | None = None
        self.dp_expected: dict[str, float] = {}
        if self.dp is not None:
            from cloudedge.privacy import DPFedAvg

            self.dp_mech = DPFedAvg(self.dp["clip_norm"], self.dp["noise_multiplier"], self.dp["mode"])
            rates = {}
            for agg_id, devs in self._aggregation_points().items():
                avail = [s.participation * d.profile.availability for d in devs]
                # The fixed denominator of DP-FedAvg: the expected number of participants. The sampling
                # rate is the most available device's (its epsilon is the largest), conservatively.
                self.dp_expected[agg_id] = max(1.0, sum(avail)) if s.goal is None else float(s.goal)
                q = 1.0 if self.dp["mode"] == "local" else min(1.0, max(avail, default=0.0))
                if s.goal is not None or self.fleet.availability.kind != "bernoulli":
                    q = 1.0  # who is online follows a trace, not a known rate: no amplification claimed
                if q > 0:
                    rates[agg_id] = q
            self.privacy = PrivacyLedger(self.dp["noise_multiplier"], rates, self.dp["delta"])
        self.agg_rounds: dict[str, int] = {}  # edge rounds run by each aggregation point (model version)
        self.device_cache: dict[str, tuple[int, Tensors]] = {}  # last model each device received (churn)
        self.counts = dict.fromkeys(_COUNTS, 0)  # since the last metric row
        self.failures_log: list[dict[str, str]] = []  # workers that failed since the last row, and why
        self.totals = dict.fromkeys(_COUNTS, 0)
        self.rejected_log: list[dict[str, str]] = []  # since the last metric row

    def _aggregation_points(self) -> dict[str, list[Node]]:
        """Who aggregates device updates: each edge, or the cloud for two-tier policies."""
        if self.policy.two_tier:
            return {CLOUD: list(self.fleet.devices)}
        return {e.id: self.fleet.devices_of(e.id) for e in self.fleet.edges}

    def _count(self, key: str, n: int = 1) -> None:
        self.counts[key] += n
        self.totals[key] += n

    def _reject(self, at: str, rejected: dict[Any, str]) -> None:
        self._count("rejected", len(rejected))
        for cid, reason in rejected.items():
            self.rejected_log.append({"at": at, "from": str(cid), "reason": reason})

    def _start_state(self, agg_id: str, dev_id: str, received: Tensors, version: int) -> tuple[Tensors, int]:
        """The model a device trains from, and how many edge rounds it is behind.

        With ``churn.stale_prob``, a device holding an older model than this round's misses the
        broadcast with that chance (e.g. it just came back) and trains from its cached copy."""
        if self.churn["stale_prob"] <= 0:
            return received, 0
        cached = self.device_cache.get(dev_id)
        if cached is not None and cached[0] < version and self._churn_rng(agg_id).random() < self.churn["stale_prob"]:
            return cached[1], version - cached[0]
        self.device_cache[dev_id] = (version, received)
        return received, 0

    def _stale_reason(self, staleness: int) -> str | None:
        if staleness > self.churn["max_staleness"]:
            return (f"stale: trained from a model {staleness} edge rounds old > churn.max_staleness "
                    f"{self.churn['max_staleness']}")
        if staleness > 0 and self.s.lora_mode == "product":
            return "stale: product mode refactors the adapters every round, so an older update does not apply"
        return None

    def _rng(self, agg_id: str) -> np.random.Generator:
        """The aggregation point's stream for availability and sampling."""
        return _stream(self.rngs, [self.s.seed, 7919, _stable_index(agg_id)], agg_id)

    def _churn_rng(self, agg_id: str) -> np.random.Generator:
        """The aggregation point's stream for churn (dropouts, stale devices)."""
        return _stream(self.churn_rngs, [self.s.seed, 15_485_863, _stable_index(agg_id)], agg_id)

    def _edge_reinit_seed(self, agg_id: str, version: int) -> int:
        """Product mode's re-initialisation seed at an aggregation point's round ``version``."""
        return (self.s.seed * 100_003 + _stable_index(agg_id) * 7_919 + version * 31) % (2**31)

    def _dp_seed(self, agg_id: str, version: int) -> int:
        return (self.s.seed * 1_000_033 + _stable_index(agg_id) * 104_729 + version) % (2**31)

    def _aggregate_devices(self, agg_id: str, version: int, state: Tensors, received: Tensors,
                           accepted: dict[str, Tensors], weights: dict[str, float]) -> Tensors:
        """The aggregation point's next state from the accepted device updates (deltas from ``received``)."""
        if not accepted:
            return dict(state)
        ids = list(accepted)
        if self.dp is not None and (self.dp["mode"] == "central" or self.edge_aggregator == "mean"):
            gen = torch.Generator().manual_seed(self._dp_seed(agg_id, version))
            mean, _ = self.dp_mech.aggregate([accepted[i] for i in ids], gen, self.dp_expected.get(agg_id))
            return _plus(received, mean)
        if self.edge_aggregator == "mean":
            total = sum(weights[i] for i in ids)
            return aggregate_lora([_plus(received, accepted[i]) for i in ids], [weights[i] / total for i in ids],
                                  self.s.lora_mode, scaling=self.scaling, refactor=self.s.refactor,
                                  reinit_seed=self._edge_reinit_seed(agg_id, version))
        out = robust_delta(self.device_guard, accepted, weights, self.robust["aggregator"])
        assert out.delta is not None
        return _plus(received, out.delta)

    # --- sizes ---------------------------------------------------------------------------------

    def _down_keys(self, state: Tensors) -> list[str]:
        """What a receiver needs: every trained tensor (and base deltas); under ffa A never changes."""
        if self.s.lora_mode == "ffa":
            return [k for k in state if not k.endswith(A_SUFFIX)]
        return list(state)

    def _ship(self, tensors: Tensors) -> tuple[Tensors, int]:
        """The tensors as the receiver gets them (after compression) and the bytes on the wire."""
        payload = compress(tensors, self.s.compression)
        got = payload.decompress() if self.s.compression != "none" else tensors
        return {k: got[k].to(tensors[k].dtype) for k in tensors}, self._charged_nbytes(tensors, int(payload.nbytes))

    def _charged_nbytes(self, tensors: Tensors, nbytes: int) -> int:
        """``nbytes`` of a message, or the bytes of the charged model's version of it (clock.charge_as)."""
        if self.charged_layout is None:
            return nbytes
        from cloudedge.finetune.charge import charged_message_bytes

        return charged_message_bytes(self.charged_layout, tensors, self.s.compression)

    def _send_state(self, state: Tensors) -> tuple[Tensors, int]:
        keys = self._down_keys(state)
        got, nbytes = self._ship({k: state[k] for k in keys})
        return {**state, **got}, nbytes

    def update_bytes(self) -> int:
        """Bytes of one device update (uncompressed shape of what a device sends)."""
        keys = sent_keys(list(self.global_state), self.s.lora_mode)
        zeros = {k: torch.zeros_like(self.global_state[k]) for k in keys}
        return self._charged_nbytes(zeros, int(compress(zeros, self.s.compression).nbytes))

    def trained_update_bytes(self) -> int:
        """Bytes of one device update of the model that learns (whatever the clock charges)."""
        keys = sent_keys(list(self.global_state), self.s.lora_mode)
        return int(compress({k: torch.zeros_like(self.global_state[k]) for k in keys}, self.s.compression).nbytes)

    # --- one edge round ------------------------------------------------------------------------

    def _range(self, agg_id: str) -> tuple[int, int]:
        """Device numbers under an aggregation point (the cloud's: all of them)."""
        return (0, len(self.fleet.devices)) if agg_id == CLOUD else self.fleet.device_range(agg_id)

    def _n(self, dev_id: str) -> int:
        if dev_id not in self.n_samples:
            self.n_samples[dev_id] = sample_count(self.task.device_data, dev_id)
        return self.n_samples[dev_id]

    def _step_s(self, dev: Node) -> float:
        return self.sec_per_step.get(dev.id, self.step_flops / dev.profile.flops)

    def _device_obs(self, agg: Node, dev: Node, down_bytes: int, up_bytes: int) -> DeviceObs:
        comm = (self._link_s(agg, dev, down_bytes) + self._link_s(dev, agg, up_bytes))
        return DeviceObs(dev.id, self._step_s(dev), comm, self._n(dev.id))

    def _link_s(self, src: Node, dst: Node, nbytes: int) -> float:
        """Expected seconds of one message (two-tier device <-> cloud: two hops via the edge)."""
        if self.policy.two_tier and {src.tier, dst.tier} == {"device", "cloud"}:
            dev = src if src.tier == "device" else dst
            edge = self.fleet.nodes[dev.parent]
            return (transfer_seconds(src.profile, edge.profile, nbytes)
                    + transfer_seconds(edge.profile, dst.profile, nbytes))
        return transfer_seconds(src.profile, dst.profile, nbytes)

    def _transfer(self, src_id: str, dst_id: str, nbytes: int, start: float) -> float:
        """A message on the clock; two-tier device <-> cloud messages are relayed by the edge."""
        src, dst = self.fleet.nodes[src_id], self.fleet.nodes[dst_id]
        if self.policy.two_tier and {src.tier, dst.tier} == {"device", "cloud"}:
            dev = src if src.tier == "device" else dst
            t = self.clock.transfer(src_id, dev.parent, nbytes, start=start)
            return self.clock.transfer(dev.parent, dst_id, nbytes, start=t)
        return self.clock.transfer(src_id, dst_id, nbytes, start=start)

    def edge_round(self, agg_id: str, devices: Sequence[Node], state: Tensors, t0: float) -> tuple[Tensors, float, dict]:
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

    def edge_rounds(self, rounds: list[tuple[str, list[Node], Tensors, float]]) -> list[tuple[Tensors, float, dict]]:
        """Several aggregation points' rounds (``edge_round``'s arguments each) with one engine call.

        The points share no device, link or random stream, so running their rounds together gives
        what running them one after another would; the one engine call is what lets a Ray cluster
        train every edge's devices at the same time (on their edge hosts).
        """
        plans = [self._plan_edge_round(*r) for r in rounds]
        tasks = [task for plan in plans for task in plan.tasks]
        wall0 = time.perf_counter()
        results = self.engine.run_tolerant(tasks)
        self.host_wall_s += time.perf_counter() - wall0
        out, at = [], 0
        for plan in plans:
            mine = results[at:at + len(plan.tasks)]
            at += len(plan.tasks)
            self.host_flops += sum(p.flops for p, res in zip(plan.planned, mine, strict=True)
                                   if not isinstance(res, WorkerError))
            out.append(self._finish_edge_round(plan, mine))
            for p in plan.planned:
                if p.dev.id in self._registered:
                    self._registered.discard(p.dev.id)
                    self.engine.unregister(p.dev.id)  # its data and spec go with its worker
        return out

    def _plan_edge_round(self, agg_id: str, devices: Sequence[Node], state: Tensors, t0: float) -> _EdgeRoundPlan:
        """Everything an edge round decides before its devices train: who takes part, with how
        many steps and from which model; who drops out or cannot make the deadline (charged now)."""
        agg = self.fleet.nodes[agg_id]
        avail = select_devices(self.fleet, devices, t0, self._rng(agg_id), self.s.goal, self.s.over_selection,
                               self.s.participation)
        version = self.agg_rounds.get(agg_id, 0)
        self.agg_rounds[agg_id] = version + 1
        received, down_bytes = self._send_state(state)
        up_bytes = self.update_bytes()
        # With a goal the round looks at its candidates only (a fleet may hold a million devices).
        seen = (avail or list(devices[:1])) if self.s.goal is not None else devices
        obs_all = tuple(self._device_obs(agg, d, down_bytes, up_bytes) for d in seen)
        obs_of = {o.device_id: o for o in obs_all}
        deadline = self.policy.deadline(EdgeObs(agg_id, 0, 0.0, 0.0, self.edge_round_s.get(agg_id, 0.0),
                                                0.0, 0.0, 0.0, obs_all, t0))
        t_deadline = math.inf if deadline is None else t0 + deadline
        extra = self.step_flops if self.policy.needs_grad_stats else 0.0
        plan = _EdgeRoundPlan(agg_id, devices, state, t0, version, received, avail, obs_all, t_deadline, extra,
                              energy0=sum(self.clock.energy_j[d.id] for d in avail))
        churn_rng = self._churn_rng(agg_id)
        for dev in avail:
            steps = self.policy.device_steps(agg_id, obs_of[dev.id], deadline)
            if steps <= 0:
                continue  # the device knows it cannot make the deadline: it sits out, spends nothing
            start, staleness = self._start_state(agg_id, dev.id, received, version)
            # A stale device missed this round's model: it receives nothing and starts at once.
            t_recv = self._transfer(agg_id, dev.id, down_bytes, start=t0) if staleness == 0 else t0
            flops = steps * self.step_flops + extra
            begin = max(t_recv, self.clock.busy_until[dev.id])
            end = begin + flops / dev.profile.flops
            arrive = end + self._link_s(dev, agg, up_bytes)
            t_off = online_until(self.fleet, self.fleet.device_number(dev.id), t0)
            if self.churn["dropout"] > 0 and churn_rng.random() < self.churn["dropout"]:
                # It starts, then goes away (battery, network, user): the work it did is charged and
                # its update never arrives. The edge cannot tell and waits until the deadline.
                self.clock.compute(dev.id, float(churn_rng.random()) * flops, start=begin)
                plan.dropped_out.append(dev.id)
            elif arrive > t_off and t_off < t_deadline:
                # Its trace takes it offline before its update is in: a dropout at that instant,
                # its work up to then charged.
                self.clock.compute(dev.id, min(flops, max(0.0, t_off - begin) * dev.profile.flops), start=begin)
                plan.dropped_out.append(dev.id)
            elif arrive > t_deadline:
                done = max(0.0, t_deadline - begin) * dev.profile.flops
                self.clock.compute(dev.id, min(flops, done), start=begin)
                plan.timed_out.append(dev.id)
            else:
                plan.planned.append(_Planned(dev, steps, flops, begin, start, staleness, arrive))
        plan.planned, plan.surplus = keep_first(plan.planned, self.s.goal, self.clock)
        for p in plan.planned:
            n = self.train_count.get(p.dev.id, 0)
            self.train_count[p.dev.id] = n + 1
            seed = (self.s.seed * 1_000_003 + _stable_index(p.dev.id) * 7_919 + n) % (2**31)
            kw: dict[str, Any] = dict(state=p.start, steps=p.steps, seed=seed, stats=self.policy.needs_grad_stats)
            if p.dev.id in self.attackers:
                kw["attack"] = dict(self.attack_opts or {})
            elif self.dp is not None:
                kw["dp"] = {k: self.dp[k] for k in ("clip_norm", "noise_multiplier", "mode")}
            # Released after its task: a device holds no model between the rounds it is sampled in
            # (workers are stateless between tasks: rebuilding one gives the same result).
            if p.dev.id in self._earlier_ids or not self.engine.has_worker(p.dev.id):
                self.engine.register(p.dev.id, WorkerSpec(FinetuneWorker, dict(
                    data=self.task.device_data[p.dev.id], **self._device_kwargs)))
                self._registered.add(p.dev.id)
            plan.tasks.append(Task(p.dev.id, "train", kw, release=True))
        return plan

    def _finish_edge_round(self, plan: _EdgeRoundPlan, results: list[Any]) -> tuple[Tensors, float, dict]:
        """What arrives from the devices that trained: the clock, the gate, the aggregate, the policy."""
        agg_id, t0 = plan.agg_id, plan.t0
        obs_of = {o.device_id: o for o in plan.obs_all}
        extra, t_deadline = plan.extra, plan.t_deadline
        incoming: dict[str, Tensors] = {}
        work, weight, stats_of, steps_of = {}, {}, {}, {}
        rejected: dict[str, str] = {}
        failed: dict[str, str] = {}
        arrivals, step_s, comm_s = [], [], []
        for p, res in zip(plan.planned, results, strict=True):
            dev = p.dev
            if isinstance(res, WorkerError):
                failed[dev.id] = str(res.cause)
                continue
            t_done = self.clock.compute(dev.id, p.flops, start=p.begin)
            got, nbytes = self._ship(res["update"])
            arrivals.append(self._transfer(dev.id, agg_id, nbytes, start=t_done))
            measured = (t_done - p.begin) / max(1.0, p.steps + extra / self.step_flops)
            self.sec_per_step[dev.id] = 0.5 * self._step_s(dev) + 0.5 * measured
            step_s.append(measured)
            comm_s.append(obs_of[dev.id].comm_s)
            steps_of[dev.id], work[dev.id] = p.steps, float(p.steps)
            weight[dev.id] = float(res["n"]) * stale_weight(p.staleness, self.churn["stale_decay"])
            if p.staleness > 0:
                self._count("stale")
                reason = self._stale_reason(p.staleness)
                if reason is not None:
                    rejected[dev.id] = reason
                    continue
            incoming[dev.id] = got
            if "stats" in res:
                st = res["stats"]
                stats_of[dev.id] = DeviceStats(float(res["n"]), st["grad_start"], st["grad_end_diff"],
                                               st["loss_diff"], st["step_norm"])
        gate = self.device_guard.check(incoming, work)
        rejected.update({str(k): v for k, v in gate.rejected.items()})
        accepted: dict[str, Tensors] = {str(k): v for k, v in gate.accepted.items()}
        if self.privacy is not None and agg_id in self.privacy.accountants and (
                accepted if self.dp is not None and self.dp["mode"] == "central" else plan.planned):
            self.privacy.step(agg_id)  # central: a noised mean was released; local: devices sent
        t_end = max(arrivals, default=t0)
        goal_met = self.s.goal is not None and len(arrivals) >= self.s.goal  # no need to wait for the rest
        if (plan.timed_out or plan.dropped_out or failed or not plan.planned) and not goal_met:
            t_end = max(t_end, t_deadline if math.isfinite(t_deadline) else t0)
        if not plan.avail and not math.isfinite(t_deadline):
            t_end = t0 + max(o.comm_s + o.sec_per_step for o in plan.obs_all)  # nobody reachable: wait a beat
        new_state = self._aggregate_devices(agg_id, plan.version, plan.state, plan.received, accepted, weight)
        drift = _update_drift(list(accepted.values()), [weight[i] for i in accepted])
        self.edge_round_s[agg_id] = (t_end - t0 if agg_id not in self.edge_round_s
                                     else 0.5 * self.edge_round_s[agg_id] + 0.5 * (t_end - t0))
        if step_s:
            self.policy.on_edge_round(agg_id, EdgeRoundStats(
                local_step_s=float(np.mean(step_s)), agg_s=float(np.mean(comm_s)),
                devices=[stats_of[i] for i in accepted if i in stats_of], now=t_end))
        self.dropped_total += len(plan.timed_out) + len(plan.dropped_out)
        self._count("timed_out", len(plan.timed_out))
        self._count("dropped", len(plan.dropped_out))
        self._count("failed", len(failed))
        self._count("surplus", plan.surplus)
        self.failures_log.extend({"at": agg_id, "from": d, "reason": r} for d, r in failed.items())
        self._reject(agg_id, rejected)
        self.device_steps_total += sum(steps_of[i] for i in accepted)
        info = {"participants": len(plan.avail), "accepted": len(accepted), "timed_out": len(plan.timed_out),
                "dropped": len(plan.dropped_out), "rejected": len(rejected), "failed": len(failed),
                "steps": [steps_of[i] for i in accepted], "drift": drift, "obs": plan.obs_all,
                "energy_j": sum(self.clock.energy_j[d.id] for d in plan.avail) - plan.energy0}
        return new_state, t_end, info

    def _next_reinit_seed(self) -> int:
        self.merge_count += 1
        return self.s.seed * 100_003 + self.merge_count

    # --- an edge's period between cloud syncs ---------------------------------------------------

    def edge_periods(self, starts: dict[str, tuple[Tensors, float]]) -> dict[str, tuple[Tensors, float, EdgeObs]]:
        """Several edges' periods (``edge_id: (pulled, t0)``), their rounds in lockstep.

        Round k of every edge still running goes to the engine in one call (``edge_rounds``);
        an edge leaves when its policy syncs. Edges share no device, link or random stream, so
        each edge's period is what it would be alone, and a Ray cluster runs the edges in parallel.
        """
        cloud = self.fleet.nodes[CLOUD]
        sync_bytes = self.update_bytes()
        running = {e: _Period(pulled, pulled, t0) for e, (pulled, t0) in starts.items()}
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
                if run.rounds >= 100 or self.policy.should_sync(obs):
                    done[edge_id] = (state, t, obs)
                    del running[edge_id]
        return {e: done[e] for e in starts}

    # --- the cloud ------------------------------------------------------------------------------

    def _edge_upload(self, state: Tensors, pulled: Tensors) -> tuple[Tensors, int]:
        """An edge's state as the cloud receives it (the change since ``pulled``, compressed) and
        its bytes. Under ffa A never changes; after a product/merge re-initialisation every tensor,
        the dense base deltas included, has changed and is sent."""
        merged = self.s.lora_mode == "product" and self.s.refactor == "merge"
        keys = list(state) if merged else sent_keys(list(state), self.s.lora_mode)
        got, nbytes = self._ship({k: state[k] - pulled[k] for k in keys})
        return {**pulled, **{k: pulled[k] + v for k, v in got.items()}}, nbytes

    def _apply_server(self, candidate: Tensors) -> None:
        delta = {k: candidate[k] - self.global_state[k] for k in candidate if not k.endswith(BASE_DELTA_SUFFIX)}
        if self.s.lora_mode == "product":
            self.global_state = candidate  # product modes refactor: no server optimizer (config checks)
        else:
            self.global_state = self.opt.step(self.global_state, delta)

    def _evaluate(self) -> dict[str, float]:
        return self.engine.call(CLOUD, "evaluate", state=self.global_state, max_samples=self.s.eval_max)

    def _score_grid(self, until: float, inclusive: bool = False) -> None:
        """Grid mode: a row (``eval: grid``) for each instant of the grid before ``until`` (up to it
        when ``inclusive``) not scored yet, with the global model in effect then."""
        step = float(self.s.eval_every_s or 0.0)
        k = sum(r.get("eval") == "grid" for r in self.history)
        last_round = self.history[-1]["round"] if self.history else 0
        while k * step <= self.s.time_budget_s + 1e-9 and (k * step < until or (inclusive and k * step <= until + 1e-9)):
            ev = self.engine.call(CLOUD, "evaluate", state=self._in_effect, max_samples=self.s.eval_max)
            row = {"round": last_round, "virtual_time_s": k * step, "acc": ev["acc"], "loss": ev["loss"],
                   "eval": "grid"}
            self.history.append(row)
            if self.run_dir is not None:
                self.run_dir.log(stage="finetune", method=self.method, **row)
            k += 1

    def _log(self, t: float, extra: dict[str, Any]) -> dict[str, Any]:
        if self.s.eval_every_s:  # scored on the grid; the update row carries no accuracy
            self._score_grid(t)
            ev = {}
        else:
            ev = self._evaluate()
        links = self.clock.bytes_by_link
        row = {
            "round": self.cloud_round, "virtual_time_s": t, **{k: ev[k] for k in ("acc", "loss") if k in ev},
            "bytes_device_edge": int(links.get(("device", "edge"), 0)),
            "bytes_edge_cloud": int(links.get(("edge", "cloud"), 0)),
            "bytes_device_cloud": int(links.get(("device", "cloud"), 0)),
            "device_energy_j": self.clock.energy_by_tier()["device"],
            "online_devices": online_count(self.fleet, t),
            "dropped_total": self.dropped_total, "device_steps_total": self.device_steps_total,
            **self.counts, "rejected_total": self.totals["rejected"],
            "rejections": self.rejected_log[:_MAX_REJECTED_LISTED],
            **extra,
        }
        if self.host_wall_s > 0:  # this host's model-FLOPs utilization since the last row
            util = utilization_fields(self.host_flops, self.host_wall_s, self.fastest_flops, device=self.device,
                                      peak_size=stage_peak_size(self.device))
            row.update({k: util[k] for k in ("mfu_measured", "mfu_profile", "achieved_flops")})
            self.host_flops, self.host_wall_s = 0.0, 0.0
        if self.privacy is not None:
            row["epsilon"] = self.privacy.epsilon()
        if self.failures_log:
            row["failures"] = self.failures_log
        self.counts = dict.fromkeys(_COUNTS, 0)
        self.rejected_log = []
        self.failures_log = []
        self.history.append(row)
        self._in_effect = self.global_state
        if self.run_dir is not None:
            self.run_dir.log(stage="finetune", method=self.method, **row)
        if self.progress is not None:
            self.progress(row)
        return row

    def _done(self, t: float) -> bool:
        return t >= self.s.time_budget_s or self.cloud_round >= self.s.max_cloud_rounds

    def run(self, ckpt_dir: Path | None = None, resume: bool = False) -> dict[str, Any]:
        """Fine-tune until the virtual time budget or the round limit; returns the summary."""
        if not (resume and ckpt_dir is not None and self._restore(ckpt_dir)):
            if resume and self.run_dir is not None:
                # Killed before its first checkpoint: start over, without the rows logged before the crash.
                self.run_dir.truncate_metrics(lambda r: r.get("stage") != "finetune" or r.get("method") != self.method)
            self._log(0.0, {"syncs": 0})
            if not (self.policy.barrier or self.policy.two_tier):
                self._start_periods([e.id for e in self.fleet.edges], 0.0)
        while True:
            if self.policy.two_tier:
                finished = self._round_two_tier()
            elif self.policy.barrier:
                finished = self._round_barrier()
            else:
                finished = self._merge_next()
            if finished:
                break
            if ckpt_dir is not None and self.cloud_round % self.s.checkpoint_every == 0:
                self._save(ckpt_dir)
        if self.s.eval_every_s:
            self._score_grid(self.s.time_budget_s, inclusive=True)
        return self.summary()

    def _round_two_tier(self) -> bool:
        if self._done(self.t_cloud):
            return True
        state, t, info = self.edge_round(CLOUD, self.fleet.devices, self.global_state, self.t_cloud)
        self._apply_server(state)
        self.t_cloud = self.clock.advance_to(t)
        self.cloud_round += 1
        self._log(t, {"syncs": self.cloud_round, "mean_steps": _mean(info["steps"])})
        return False

    def _round_barrier(self) -> bool:
        if self._done(self.t_cloud):
            return True
        states, weights, reports, ends = [], [], {}, []
        pulled, down_bytes = self._send_state(self.global_state)
        periods = self.edge_periods({e.id: (pulled, self._transfer(CLOUD, e.id, down_bytes, start=self.t_cloud))
                                     for e in self.fleet.edges})
        for e in self.fleet.edges:
            state, t, obs = periods[e.id]
            edge_state, nbytes = self._edge_upload(state, pulled)
            ends.append(self._transfer(e.id, CLOUD, nbytes, start=t))
            n_e = self.agg_samples[e.id]
            states.append(edge_state)
            weights.append(float(n_e))
            reports[e.id] = obs
        total = sum(weights)
        candidate = self._aggregate_edges(pulled, list(reports), states, weights,
                                          [float(o.rounds_done) for o in reports.values()])
        if candidate is not None:
            self._apply_server(candidate)
        for (e_id, obs), st, w in zip(reports.items(), states, weights, strict=True):
            layer_div = _layer_divergence(st, self.global_state) * w / total
            reports[e_id] = _with(obs, layer_divergence=layer_div)
        self.policy.on_cloud_sync(reports)
        self.t_cloud = self.clock.advance_to(max(ends))
        self.cloud_round += 1
        self._log(self.t_cloud, {"syncs": self.cloud_round,
                                 "k2": {e: r.rounds_done for e, r in reports.items()}})
        return False

    def _aggregate_edges(self, pulled: Tensors, edge_ids: list[str], states: list[Tensors], weights: list[float],
                         rounds: list[float]) -> Tensors | None:
        """Barrier: gate the edges' updates (norms per edge round) and aggregate the accepted ones
        with the cloud aggregator. None when no edge update was accepted (the cloud keeps its state)."""
        deltas = {e: {k: st[k] - pulled[k] for k in self.cloud_keys} for e, st in zip(edge_ids, states, strict=True)}
        gate = self.cloud_guard.check(deltas, dict(zip(edge_ids, rounds, strict=True)))
        self._reject(CLOUD, dict(gate.rejected))
        ok = [i for i, e in enumerate(edge_ids) if e in gate.accepted]
        if not ok:
            return None
        if self.cloud_aggregator == "mean":
            total = sum(weights[i] for i in ok)
            return aggregate_lora([states[i] for i in ok], [weights[i] / total for i in ok], self.s.lora_mode,
                                  scaling=self.scaling, refactor=self.s.refactor, reinit_seed=self._next_reinit_seed())
        out = robust_delta(self.cloud_guard, {edge_ids[i]: deltas[edge_ids[i]] for i in ok},
                           {edge_ids[i]: weights[i] for i in ok}, self.robust["cloud_aggregator"])
        assert out.delta is not None
        return _plus(pulled, out.delta)

    def _check_edge_alone(self, edge_id: str, state: Tensors, pulled: Tensors) -> Tensors:
        """Async: an edge's update merges on its own, so only the checks that need no other update
        apply (structure, finiteness, ``gate.max_norm``). A rejected edge contributes nothing."""
        delta = {k: state[k] - pulled[k] for k in self.cloud_keys}
        reason = self.cloud_guard.gate.structural_reason(delta)
        if reason is None:
            return state
        self._reject(CLOUD, {edge_id: reason})
        return dict(pulled)

    def _start_periods(self, edge_ids: list[str], t: float) -> None:
        """Async: the edges pull the global state at ``t`` and run until each decides to sync."""
        pulled, down_bytes = self._send_state(self.global_state)
        periods = self.edge_periods({e: (pulled, self._transfer(CLOUD, e, down_bytes, start=t)) for e in edge_ids})
        for edge_id, (state, t_ready, obs) in periods.items():
            state = self._check_edge_alone(edge_id, state, pulled)
            heapq.heappush(self.pending, _Pending(t_ready, edge_id, state, pulled, obs))  # type: ignore[misc]

    def _merge_next(self) -> bool:
        item = heapq.heappop(self.pending)  # type: ignore[misc]
        if self._done(item.t_ready):
            return True
        edge_state, nbytes = self._edge_upload(item.state, item.pulled)
        t = self._transfer(item.edge_id, CLOUD, nbytes, start=item.t_ready)
        share = self.agg_samples[item.edge_id] / self.n_all
        # Staleness: merges the cloud applied since this edge pulled (it pulls right after its own
        # merge, or at the start), read from the logged rows so that a resumed run sees the same.
        staleness = 0
        for row in reversed(self.history):
            if row.get("edge") == item.edge_id:
                break
            staleness += "edge" in row
        w = self.policy.merge_weight(share, staleness, len(self.fleet.edges))
        candidate = aggregate_lora([self.global_state, edge_state, item.pulled], [1.0, w, -w], self.s.lora_mode,
                                   scaling=self.scaling, refactor=self.s.refactor, reinit_seed=self._next_reinit_seed())
        # The cloud's answer to the edge: how its change agrees with what the others did meanwhile.
        nu = disagreement({k: edge_state[k] - item.pulled[k] for k in self.cloud_keys},
                          {k: self.global_state[k] - item.pulled[k] for k in self.cloud_keys})
        self._apply_server(candidate)
        self.policy.on_cloud_sync({item.edge_id: _with(item.obs, disagreement=nu)})
        self.cloud_round += 1
        self.t_cloud = self.clock.advance_to(t)
        self._log(t, {"syncs": self.cloud_round, "edge": item.edge_id, "k2": item.obs.rounds_done,
                      "staleness": staleness, "merge_weight": w, "disagreement": nu})
        self._start_periods([item.edge_id], t)
        return False

    # --- results --------------------------------------------------------------------------------

    def summary(self) -> dict[str, Any]:
        last = next(r for r in reversed(self.history) if "bytes_device_edge" in r)  # the last update row
        target = self.s.target_accuracy
        scored = [r for r in self.history if "acc" in r]  # grid mode: the grid rows
        hit = next((r["virtual_time_s"] for r in scored if target is not None and r["acc"] >= target), None)
        return {
            "method": self.method,
            "policy": self.s.policy,
            "lora_mode": self.s.lora_mode + (f"/{self.s.refactor}" if self.s.lora_mode == "product" else ""),
            "final_acc": scored[-1]["acc"],
            "best_acc": max(r["acc"] for r in scored),
            "eval_every_s": self.s.eval_every_s,
            "target_accuracy": target,
            "time_to_target_s": hit,
            "virtual_time_s": last["virtual_time_s"],
            "cloud_updates": self.cloud_round,
            "bytes_device_edge": last["bytes_device_edge"],
            "bytes_edge_cloud": last["bytes_edge_cloud"],
            "bytes_device_cloud": last["bytes_device_cloud"],
            "device_energy_j": last["device_energy_j"],
            "dropped_updates": self.dropped_total,
            "device_steps": self.device_steps_total,
            "update_bytes": self.update_bytes(),
            "model_bytes": int(self.charged["model_bytes"]),
            "payload_fraction": self.update_bytes() / int(self.charged["model_bytes"]),
            "trainable_params": int(self.charged["trainable_params"]),
            "params": int(self.charged["params"]),
            "train_step_flops": self.step_flops,
            "cost_model": self._cost_model(),
            **self._reliability_summary(),
        }

    def _cost_model(self) -> dict[str, Any]:
        from cloudedge.models.charge import cost_model_summary, describe

        trained = describe(f"{self.spec['model']['kind']} {self.spec['model']['hidden']}x{self.spec['model']['layers']} "
                           "(trained)", int(self.info["params"]), self.trained_update_bytes())
        charge = self.task.charge
        charged = None if charge is None else describe(charge.name, int(self.charged["params"]), self.update_bytes())
        return cost_model_summary(trained, charged, charge)

    def _reliability_summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "edge_aggregator": self.edge_aggregator, "cloud_aggregator": self.cloud_aggregator,
            "timed_out_updates": self.totals["timed_out"], "dropped_out_updates": self.totals["dropped"],
            "stale_updates": self.totals["stale"], "rejected_updates": self.totals["rejected"],
            "failed_updates": self.totals["failed"],
            "memory_need_bytes": self.memory_need,
            "attack": None if self.attack_opts is None else {**self.attack_opts, "attackers": self.attackers},
            "privacy": None,
        }
        if self.dp is not None and self.privacy is not None:
            out["privacy"] = {**self.dp, "epsilon": self.privacy.epsilon(), "rounds": self.privacy.rounds(),
                              "sample_rates": {a: acc.sample_rate for a, acc in self.privacy.accountants.items()}}
            out["epsilon"] = out["privacy"]["epsilon"]
        return out

    # --- checkpoints ----------------------------------------------------------------------------

    def _save(self, ckpt_dir: Path) -> None:
        from cloudedge.checkpoint import save_checkpoint

        tensors = {f"global/{k}": v for k, v in self.global_state.items()}
        opt_state = self.opt.state_dict()
        tensors.update({f"opt/{k}": v for k, v in opt_state["tensors"].items()})
        pend = []
        for i, p in enumerate(self.pending):
            tensors.update({f"pending/{i}/state/{k}": v for k, v in p.state.items()})
            tensors.update({f"pending/{i}/pulled/{k}": v for k, v in p.pulled.items()})
            pend.append({"t_ready": p.t_ready, "edge_id": p.edge_id, "obs": _obs_plain(p.obs)})
        state = {
            "cloud_round": self.cloud_round, "t_cloud": self.t_cloud, "merge_count": self.merge_count,
            "train_count": self.train_count, "sec_per_step": self.sec_per_step, "edge_round_s": self.edge_round_s,
            "rngs": {k: g.bit_generator.state for k, g in self.rngs.items()}, "clock": self.clock.state_dict(),
            "policy": self.policy.state_dict(), "opt": opt_state["scalars"], "pending": pend,
            "history": self.history, "method": self.method,
            "dropped_total": self.dropped_total, "device_steps_total": self.device_steps_total,
            "reliability": {
                "counts": self.counts, "totals": self.totals, "rejected_log": self.rejected_log,
                "failures_log": self.failures_log,
                "agg_rounds": self.agg_rounds,
                "churn_rngs": {k: g.bit_generator.state for k, g in self.churn_rngs.items()},
                "cache_versions": {d: v for d, (v, _) in self.device_cache.items()},
                "privacy": None if self.privacy is None else self.privacy.state_dict(),
            },
        }
        for dev_id, (_, cached) in self.device_cache.items():
            tensors.update({f"cache/{dev_id}/{k}": v for k, v in cached.items()})
        save_checkpoint(ckpt_dir, self.cloud_round, tensors, json.loads(json.dumps(state, default=_plain)))

    def _restore(self, ckpt_dir: Path) -> bool:
        from cloudedge.checkpoint import load_latest

        found = load_latest(ckpt_dir)
        if found is None:
            return False
        tensors, state = found
        if "rngs" not in state:
            raise InputError(f"{ckpt_dir}: written by an older cloudedge (one random stream for all edges); "
                             "it cannot continue this run: start it again without --resume")
        loaded = {k[len("global/"):]: v for k, v in tensors.items() if k.startswith("global/")}
        self.global_state = {k: loaded[k] for k in self._key_order()}  # safetensors sorts keys
        self.opt.load_state_dict({"tensors": {k[4:]: v for k, v in tensors.items() if k.startswith("opt/")},
                                  "scalars": state["opt"]}, source=str(ckpt_dir))
        self.cloud_round, self.t_cloud = int(state["cloud_round"]), float(state["t_cloud"])
        self.merge_count = int(state["merge_count"])
        self.train_count = {k: int(v) for k, v in state["train_count"].items()}
        self.sec_per_step = {k: float(v) for k, v in state["sec_per_step"].items()}
        self.edge_round_s = {k: float(v) for k, v in state["edge_round_s"].items()}
        for agg_id, rng_state in state["rngs"].items():
            self._rng(agg_id).bit_generator.state = rng_state
        self.clock.load_state_dict(state["clock"])
        self.policy.load_state_dict(state["policy"])
        self.history = list(state["history"])
        self._in_effect = self.global_state
        self.dropped_total, self.device_steps_total = int(state["dropped_total"]), int(state["device_steps_total"])
        self._restore_reliability(state["reliability"], tensors, str(ckpt_dir))
        self.pending = []
        for i, p in enumerate(state["pending"]):
            st = {k[len(f"pending/{i}/state/"):]: v for k, v in tensors.items() if k.startswith(f"pending/{i}/state/")}
            pl = {k[len(f"pending/{i}/pulled/"):]: v for k, v in tensors.items() if k.startswith(f"pending/{i}/pulled/")}
            st = {k: st[k] for k in self.global_state}
            pl = {k: pl[k] for k in self.global_state}
            heapq.heappush(self.pending, _Pending(float(p["t_ready"]), p["edge_id"], st, pl,  # type: ignore[misc]
                                                  _obs_from(p["obs"])))
        if self.run_dir is not None:
            rounds = {r["round"] for r in self.history}
            self.run_dir.truncate_metrics(lambda r: r.get("stage") != "finetune" or r.get("method") != self.method
                                          or r.get("round") in rounds)
        return True

    def _restore_reliability(self, rel: dict[str, Any], tensors: Tensors, source: str) -> None:
        # .get: checkpoints written before `failed` was counted still load.
        self.counts = {k: int(rel["counts"].get(k, 0)) for k in _COUNTS}
        self.totals = {k: int(rel["totals"].get(k, 0)) for k in _COUNTS}
        self.rejected_log = list(rel["rejected_log"])
        self.failures_log = list(rel.get("failures_log", []))
        self.agg_rounds = {k: int(v) for k, v in rel["agg_rounds"].items()}
        for agg_id, rng_state in rel["churn_rngs"].items():
            self._churn_rng(agg_id).bit_generator.state = rng_state
        self.device_cache = {}
        for dev_id, version in rel["cache_versions"].items():
            prefix = f"cache/{dev_id}/"
            got = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
            self.device_cache[dev_id] = (int(version), {k: got[k] for k in self.global_state})
        if self.privacy is not None:
            if rel["privacy"] is None:
                raise InputError(f"{source}: the checkpoint was written without privacy; it cannot resume a DP run")
            self.privacy.load_state_dict(rel["privacy"], source)

    def _key_order(self) -> list[str]:
        init = self.engine.call(CLOUD, "initial_state")
        if self.s.lora_mode == "product" and self.s.refactor == "merge":
            init = with_base_deltas(init)
        return list(init)


# Pending items compare by (time, edge id): deterministic order on ties.
_Pending.__lt__ = lambda a, b: (a.t_ready, a.edge_id) < (b.t_ready, b.edge_id)  # type: ignore[method-assign]


def _stream(streams: dict[str, np.random.Generator], seed: list[int], key: str) -> np.random.Generator:
    """``streams[key]``, created from ``seed`` on first use (a checkpoint restores it by key)."""
    if key not in streams:
        streams[key] = np.random.default_rng(seed)
    return streams[key]


def _stable_index(node_id: str) -> int:
    """A number of the whole node id, the same in every process (unlike ``hash``)."""
    return zlib.crc32(node_id.encode()) % 1_000_003


def _plus(state: Tensors, delta: Tensors) -> Tensors:
    """``state`` with ``delta`` added to the keys it has (the others unchanged)."""
    return {**state, **{k: state[k] + v.to(state[k].dtype) for k, v in delta.items()}}


def _mean(xs: list[float]) -> float | None:
    return float(np.mean(xs)) if xs else None


def _update_drift(updates: list[Tensors], weights: list[float]) -> float:
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


def _layer_divergence(a: Tensors, b: Tensors) -> float:
    """Tempo's per-layer L1 divergence summed: ``sum_layers |a - b|_1`` (a layer = one tensor)."""
    return sum(float((a[k].double() - b[k].double()).abs().sum()) for k in a if not k.endswith(BASE_DELTA_SUFFIX))


def _with(obs: EdgeObs, **changes: Any) -> EdgeObs:
    import dataclasses

    return dataclasses.replace(obs, **changes)


def _obs_plain(obs: EdgeObs) -> dict[str, Any]:
    import dataclasses

    d = dataclasses.asdict(obs)
    d["devices"] = [dataclasses.asdict(o) for o in obs.devices]
    return d


def _obs_from(d: dict[str, Any]) -> EdgeObs:
    return EdgeObs(**{**d, "devices": tuple(DeviceObs(**o) for o in d["devices"])})


def _plain(value: Any) -> Any:
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.floating):
        return float(value)
    raise TypeError(f"not JSON-able: {type(value).__name__}")


__all__ = ["FinetuneSettings", "HierFinetune", "TaskData", "lora_layers", "server_optimizer"]
