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

The parts, each in its own module: :mod:`~cloudedge.finetune.edge_round` (step 2, shared by every
topology), :mod:`~cloudedge.finetune.topologies` (step 3: two-tier, barrier, autonomous merges, chosen
by the policy's ``topology``), :mod:`~cloudedge.finetune.messages` (payloads, bytes, link times),
:mod:`~cloudedge.finetune.safeguards` and :mod:`~cloudedge.finetune.churn` (reliability and privacy)
and :mod:`~cloudedge.finetune.metrics` (metric rows). :class:`HierFinetune` builds them and runs the
cloud updates; the run directory, metric rows, checkpoints (:meth:`HierFinetune.state_dict`) and the
resume rule are the shared stage skeleton (:class:`cloudedge.stage.StageRun`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from cloudedge.aggregate import ServerOptimizer, get_server_optimizer
from cloudedge.device import resolve_device
from cloudedge.engine import Engine, WorkerSpec
from cloudedge.errors import InputError
from cloudedge.finetune.churn import Churn
from cloudedge.finetune.devicedata import samples_of_range
from cloudedge.finetune.edge_round import EdgeRounds
from cloudedge.finetune.lora import BASE_DELTA_SUFFIX, LoraMode, lora_layers, lora_mode, with_base_deltas
from cloudedge.finetune.messages import CLOUD, Messages
from cloudedge.finetune.metrics import MetricLog, Tally
from cloudedge.finetune.safeguards import Safeguards
from cloudedge.finetune.sync import SyncPolicy, make_policy
from cloudedge.finetune.topologies import TOPOLOGIES, Topology
from cloudedge.finetune.workers import FinetuneWorker
from cloudedge.fleet import Fleet, VirtualClock
from cloudedge.stage import StageRun

STAGE = "finetune"
Tensors = dict[str, torch.Tensor]


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
    refactor: str = "svd"  # the product mode's knob
    batch_size: int = 16
    optimizer: str = "adamw"
    lr: float = 3e-3
    server_optimizer: str | dict[str, Any] = "fedavg"  # a name, or {name: ..., its knobs}
    server_lr: float = 1.0
    compression: str = "none"
    device: str = "cpu"  # where workers hold the model: cpu, cuda or auto (each worker's host decides)
    precision: str = "fp32"  # fp32, or bf16 autocast for the forward passes
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

    def lora(self) -> LoraMode:
        """The LoRA aggregation mode these settings name, built with its knob (``refactor``)."""
        return lora_mode(self.lora_mode, self.refactor)


def server_optimizer(choice: str | dict[str, Any], lr: float) -> ServerOptimizer:
    return get_server_optimizer(choice, lr=lr)


class HierFinetune:
    """One fine-tuning run of one sync policy over a fleet: the cloud's state, and the parts that
    move it (see the module docstring). ``run()`` returns the summary.

    ``stage_run``: where rows and checkpoints go (default: in memory, labelled ``method`` or the
    policy's name); ``on_round(round, row)`` is called after each cloud update's row is logged
    (before its checkpoint: an exception it raises interrupts the run like a crash would).
    """

    def __init__(self, fleet: Fleet, task: TaskData, settings: FinetuneSettings, engine: Engine,
                 stage_run: StageRun | None = None, method: str | None = None,
                 on_round: Callable[[int, dict[str, Any]], None] | None = None):
        self.fleet, self.task, self.s, self.engine = fleet, task, settings, engine
        self.stage_run = stage_run or StageRun(STAGE, None, method or settings.policy)
        self.method = self.stage_run.method
        self.clock = VirtualClock(fleet)
        device = resolve_device(settings.device, "finetune.device")  # this host's, for its MFU peak
        kw = dict(settings.policy_kwargs)
        kw.setdefault("time_budget_s", settings.time_budget_s)
        kw.setdefault("lr", settings.lr)
        self.policy: SyncPolicy = make_policy(settings.policy, **kw)
        self.topology: Topology = TOPOLOGIES.get(self.policy.topology)(self)
        self.opt = server_optimizer(settings.server_optimizer, settings.server_lr)
        self.scaling = float(task.spec["alpha"]) / int(task.spec["rank"])
        self.merge_count = 0  # the cloud's aggregations so far: product mode's re-initialisation seeds
        self.spec = {**task.spec, "mode": settings.lora_mode}
        self.mode = settings.lora()
        engine.register(CLOUD, WorkerSpec(FinetuneWorker, dict(
            spec=self.spec, data=task.test_data, batch_size=settings.batch_size, device=settings.device,
            precision=settings.precision)))
        self.info = engine.call(CLOUD, "model_info")
        self.global_state: Tensors = self.initial_state()
        self.charged, self.charged_layout = self._charged_costs()
        self.agg_samples = {agg: samples_of_range(task.device_data, fleet, *self.topology.point_range(agg))
                            for agg in self.topology.points()}
        self.n_all = sum(self.agg_samples.values())
        self.cloud_round, self.t_cloud = 0, 0.0
        self.tally = Tally()
        self.messages = Messages(settings, fleet, self.clock, self.global_state, self.charged_layout)
        self.churn = Churn(settings.churn, settings.seed, settings.lora_mode)
        self.safeguards = Safeguards(settings, fleet, self.tally, self.charged, self.charged_layout,
                                     self.global_state, self.topology.point_devices, self.scaling)
        device_kwargs = dict(spec=self.spec, batch_size=settings.batch_size, optimizer=settings.optimizer,
                             lr=settings.lr, device=settings.device, precision=settings.precision)
        self.rounds = EdgeRounds(settings, fleet, task.device_data, engine, self.clock, self.policy, self.messages,
                                 self.safeguards, self.churn, self.tally, float(self.charged["train_step_flops"]),
                                 device_kwargs, host_step_flops=float(self.info["train_step_flops"]))
        self.log = MetricLog(settings, fleet, self.clock, self.tally, self._evaluate, self.safeguards.epsilon,
                             device, self.stage_run, on_round)
        self.log.in_effect = self.global_state

    def initial_state(self) -> Tensors:
        """The global adapter state a run starts from (with dense base deltas under product/merge)."""
        init = self.engine.call(CLOUD, "initial_state")
        return with_base_deltas(init) if self._merged() else init

    def _merged(self) -> bool:
        return self.mode.merges

    def _charged_costs(self) -> tuple[dict[str, Any], Tensors | None]:
        """The costs the clock charges: the trained model's, or clock.charge_as's (cloudedge.finetune.charge),
        and the charged model's adapter layout (None: the trained model's)."""
        if self.task.charge is None:
            return self.info, None
        from cloudedge.finetune.charge import charged_info, with_charged_base_deltas

        test = self.task.test_data
        text_len = int(test["input_ids"].shape[1]) if "input_ids" in test else None
        charged, layout = charged_info(self.task.charge, self.spec, self.s.batch_size, text_len)
        return charged, with_charged_base_deltas(layout) if self._merged() else layout

    # --- the cloud ------------------------------------------------------------------------------

    def _evaluate(self, state: Tensors) -> dict[str, float]:
        return self.engine.call(CLOUD, "evaluate", state=state, max_samples=self.s.eval_max)

    def apply_server(self, candidate: Tensors) -> None:
        """The server optimizer's step towards ``candidate`` (product modes refactor: they take it as it is)."""
        delta = {k: candidate[k] - self.global_state[k] for k in candidate if not k.endswith(BASE_DELTA_SUFFIX)}
        if self.mode.refactors:
            self.global_state = candidate  # refactored adapters: no server optimizer (config checks)
        else:
            self.global_state = self.opt.step(self.global_state, delta)

    def next_reinit_seed(self) -> int:
        """Product mode's re-initialisation seed of the cloud's next aggregation."""
        self.merge_count += 1
        return self.s.seed * 100_003 + self.merge_count

    def done(self, t: float) -> bool:
        """Is the run over at time ``t`` (the time budget spent, or the cloud-round limit reached)?"""
        return t >= self.s.time_budget_s or self.cloud_round >= self.s.max_cloud_rounds

    def log_update(self, t: float, extra: dict[str, Any]) -> dict[str, Any]:
        """The metric row of the cloud update just made (at ``t``), with the topology's ``extra`` fields."""
        return self.log.log(t, self.cloud_round, self.global_state, extra)

    @property
    def history(self) -> list[dict[str, Any]]:
        """The metric rows so far."""
        return self.log.history

    @property
    def train_count(self) -> dict[str, int]:
        """Rounds each device trained in whose update was planned to arrive."""
        return self.rounds.train_count

    def run(self, resume: bool = False) -> dict[str, Any]:
        """Fine-tune until the virtual time budget or the round limit; returns the summary.

        ``resume``: continue from the last checkpoint of the stage run (the shared rule,
        :meth:`StageRun.resume`: the rows logged before it are this run's rows so far)."""
        run = self.stage_run
        state, rows = run.resume() if resume else (None, [])
        if state is not None:
            self.load_state_dict(state, rows, str(run.ckpt_dir))
        else:
            self.log_update(0.0, {"syncs": 0})
            self.topology.start()
        with run.progress(self.s.max_cloud_rounds, self.cloud_round) as bar:
            while not self.topology.step():
                bar.advance()
                if run.ckpt_dir is not None and self.cloud_round % self.s.checkpoint_every == 0:
                    run.checkpoint(self.cloud_round, self.state_dict())
        if self.s.eval_every_s:
            self.log.score_grid(self.s.time_budget_s, inclusive=True)
        return self.summary()

    # --- checkpoints ----------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Everything a restart needs after cloud update ``cloud_round``, as one nested state
        (:func:`cloudedge.checkpoint.save_state`): the global adapters, the server optimizer, the
        topology's edges waiting to merge, the devices' cached models (churn), and as plain data
        the clock, every random stream, the policy's state and the counts. The rows are the run
        directory's (the resume rule keeps those logged before the checkpoint)."""
        return {
            "global": self.global_state, "server_optimizer": self.opt.state_dict(),
            "topology": self.topology.state_dict(), "t_cloud": self.t_cloud, "merge_count": self.merge_count,
            "edge_rounds": self.rounds.state_dict(), "clock": self.clock.state_dict(),
            "policy": self.policy.state_dict(), "tally": self.tally.state_dict(), "churn": self.churn.state_dict(),
            "privacy": self.safeguards.privacy_state(),
        }

    def load_state_dict(self, state: dict[str, Any], rows: list[dict[str, Any]], source: str) -> None:
        """Restore :meth:`state_dict` output (``state["round"]``: its cloud update) and the rows so far."""
        keys = list(self.global_state)  # the model's order (a checkpoint sorts keys; sums over keys follow it)
        _check_adapters(state["global"], self.global_state, source)
        self.global_state = {k: state["global"][k] for k in keys}
        self.opt.load_state_dict(state["server_optimizer"], source=source)
        self.cloud_round, self.t_cloud = int(state["round"]), float(state["t_cloud"])
        self.merge_count = int(state["merge_count"])
        self.rounds.load_state_dict(state["edge_rounds"])
        self.clock.load_state_dict(state["clock"])
        self.policy.load_state_dict(state["policy"])
        self.log.history = list(rows)
        self.log.in_effect = self.global_state
        self.tally.load_state_dict(state["tally"])
        self.churn.load_state_dict(state["churn"], keys)
        self.safeguards.load_privacy_state(state["privacy"], source)
        self.topology.load_state_dict(state["topology"])

    # --- results --------------------------------------------------------------------------------

    def summary(self) -> dict[str, Any]:
        """The run's results: accuracy, time, bytes, energy, counts, costs, reliability and privacy."""
        history = self.history
        last = next(r for r in reversed(history) if "bytes_device_edge" in r)  # the last update row
        target = self.s.target_accuracy
        scored = [r for r in history if "acc" in r]  # grid mode: the grid rows
        hit = next((r["virtual_time_s"] for r in scored if target is not None and r["acc"] >= target), None)
        update_bytes, model_bytes = self.messages.update_bytes(), int(self.charged["model_bytes"])
        return {
            "method": self.method,
            "policy": self.s.policy,
            "lora_mode": self.mode.describe(),
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
            "dropped_updates": self.tally.dropped_total,
            "device_steps": self.tally.device_steps_total,
            "update_bytes": update_bytes,
            "model_bytes": model_bytes,
            "payload_fraction": update_bytes / model_bytes,
            "trainable_params": int(self.charged["trainable_params"]),
            "params": int(self.charged["params"]),
            "train_step_flops": self.rounds.step_flops,
            "cost_model": self._cost_model(),
            **self.safeguards.summary(),
        }

    def _cost_model(self) -> dict[str, Any]:
        from cloudedge.models.charge import cost_model_summary, describe

        m = self.spec["model"]
        trained = describe(f"{m['kind']} {m['hidden']}x{m['layers']} (trained)", int(self.info["params"]),
                           self.messages.trained_update_bytes())
        charge = self.task.charge
        charged = None if charge is None else describe(charge.name, int(self.charged["params"]),
                                                       self.messages.update_bytes())
        return cost_model_summary(trained, charged, charge)


__all__ = ["FinetuneSettings", "HierFinetune", "TaskData", "lora_layers", "server_optimizer"]


def _check_adapters(saved: dict[str, Any], expected: dict[str, Any], source: str) -> None:
    """A checkpoint's adapters must be this config's, key for key and shape for shape: a resume
    with another ``finetune.lora`` (rank, targets, mode) or model is an InputError naming ``source``."""
    missing = [k for k in expected if k not in saved]
    unexpected = [k for k in saved if k not in expected]
    if missing or unexpected:
        raise InputError(f"{source}: its adapters are not this config's ({len(missing)} missing, e.g. "
                         f"{missing[:2]}; {len(unexpected)} unexpected, e.g. {unexpected[:2]}); was finetune.lora "
                         "or the model changed since it was written?")
    shapes = [(k, tuple(saved[k].shape), tuple(expected[k].shape)) for k in expected
              if tuple(saved[k].shape) != tuple(expected[k].shape)]
    if shapes:
        k, got, want = shapes[0]
        raise InputError(f"{source}: adapter '{k}' has shape {list(got)}, this config's is {list(want)} "
                         f"({len(shapes)} differ); was finetune.lora.rank or the model changed since it was written?")
