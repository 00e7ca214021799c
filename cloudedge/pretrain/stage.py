"""The pre-training stage: every node of the fleet can be a worker; data stays on its node.

Read top to bottom: :func:`pretrain` sets up (data shards, fleet, memory caps, workers, model, the
algorithm, controller, resume), then runs one round at a time (:meth:`PretrainRun.round`):

    available workers -> controller plans batches -> workers compute (through the Engine)
    -> virtual clock charges transfers and FLOPs -> updates checked -> the algorithm aggregates and
    steps (``sync``: the union-batch gradient; ``local``: an outer step on the mean delta)
    -> controller observes -> log -> checkpoint.

The algorithms are classes in :mod:`cloudedge.pretrain.algorithms`; the run directory, metric rows,
checkpoints and resume rule are the shared stage skeleton (:mod:`cloudedge.stage`).
``pretrain(cfg, ...)`` is the API; ``run_pretrain(cfg, out_dir, resume, engine_kind)`` is what the
CLI calls. The algorithms and controller rules are in docs/pretraining.md.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from cloudedge import comm
from cloudedge.checkpoint import check_state_dict
from cloudedge.config import with_overrides
from cloudedge.config.pretrain import PretrainConfig
from cloudedge.config.run import RunConfig
from cloudedge.device import PRECISIONS, resolve_device, to_device
from cloudedge.engine import Engine, Task, WorkerError, WorkerSpec, make_engine
from cloudedge.errors import InputError
from cloudedge.fleet import CLOUD_ID, Fleet, VirtualClock, available_nodes
from cloudedge.fleet.clock import compute_seconds, transfer_seconds
from cloudedge.fleet.traces import online_mask, online_until
from cloudedge.models.charge import cost_model_summary, stage_charge
from cloudedge.perf import stage_peak_size, utilization_fields
from cloudedge.pretrain.algorithms import ALGORITHMS, PretrainAlgorithm, objective_steps
from cloudedge.pretrain.batch import BatchController, Observation, Plan, WorkerInfo, get_controller
from cloudedge.pretrain.costs import charged_costs, trained_costs
from cloudedge.pretrain.shards import Shards, build_shards, client_shards
from cloudedge.pretrain.tasks import build_task_model, evaluate_loss
from cloudedge.pretrain.workers import PretrainWorker, trainable
from cloudedge.robust import UpdateGate
from cloudedge.stage import MetricRow, StageResult, StageRun, drop_failed, run_stage_into
from cloudedge.track.run import RunDir

STAGE = "pretrain"
Tensors = dict[str, torch.Tensor]


def pretrain(cfg: RunConfig, run_dir: RunDir | str | Path | None = None, engine: Engine | None = None, *,
             resume: bool = False, on_round: Callable[[int, dict[str, Any]], None] | None = None,
             method: str | None = None, shards: dict[str, Tensors] | None = None,
             client_eval: dict[str, dict[str, Tensors]] | None = None, val: Tensors | None = None,
             **overrides: Any) -> StageResult:
    """Pre-train one model across the fleet ``cfg`` describes.

    Args:
        cfg: the run config; its ``pretrain`` section (defaults when absent) with ``overrides``
            applied (any PretrainConfig field, e.g. ``controller="goodput"``).
        run_dir: where to log (``RunDir`` or a path); None keeps everything in memory.
        engine: how workers are reached (default: a ``LocalEngine``).
        resume: continue from the last checkpoint in ``run_dir``.
        on_round: called after each round with (round, logged row); an exception it raises
            interrupts the run like a crash would (the checkpoints stay).
        method: the label logged in each row (default ``ALGORITHM-CONTROLLER``).
        shards: per-node training data ``{node_id: {"x": ..., "y": ...}}`` (``{"input_ids": ...}``
            for ``lm``) instead of dealing ``cfg``'s data section (:func:`build_shards`, the default);
            nodes of the training tiers without a shard sit out.
        client_eval: per-node test sets ``{node_id: {set_name: {"x": ..., "y": ...}}}``; they stay
            on their node and are scored there every ``eval_every`` rounds and at the end with the
            objective's ``predict`` and that client's private state. Rows log ``<set>_acc`` (mean
            over clients), ``<set>_acc_worst`` and ``clients`` (every client's metrics).
        val: the cloud's held-out data when ``shards`` is given (default: none, no ``val_loss``).

    Returns:
        A :class:`StageResult`: every row, the summary (with ``excluded``: the nodes that could not
        train, and why) and the artefacts ``model`` (the trained global model) and
        ``client_states`` (each client's private objective state as flat tensors, what
        ``Objective.client_state_dict`` gives; ``pin``: its local and personalized models).
    """
    pcfg = with_overrides(cfg.pretrain or PretrainConfig(), overrides, STAGE)
    method = method or f"{pcfg.algorithm.name}-{pcfg.controller.name}"
    run = StageRun.open(STAGE, run_dir, cfg, method, resume=resume)
    own_engine = engine is None
    engine = engine or make_engine("local")
    try:
        engine.use_plugins(cfg.plugins)  # workers in other processes (Ray) register the config's plug-ins too
        stage = PretrainRun(cfg, pcfg, method, engine, shards, client_eval, val)
        rows: list[dict[str, Any]] = []
        if resume:
            state, rows = run.resume()
            if state is not None:
                stage.load_state_dict(state, str(run.ckpt_dir))
        with run.progress(pcfg.rounds, stage.start_round) as bar:
            for r in range(stage.start_round, pcfg.rounds):
                if pcfg.time_budget_s is not None and stage.clock.now >= pcfg.time_budget_s:
                    break  # the virtual-time budget is spent
                row = run.log(stage.round(r))
                rows.append(row)
                if run.ckpt_dir is not None and ((r + 1) % pcfg.checkpoint_every == 0 or stage.is_last(r)):
                    run.checkpoint(r, stage.state_dict())
                if on_round is not None:
                    on_round(r, row)
                bar.advance()
    finally:
        if own_engine:  # an engine this call made is closed whatever happens (Ray actors hold processes)
            engine.close()
    summary = stage.summary(rows)
    run.update_summary(summary)
    return StageResult(rows, summary, {"model": stage.model, "client_states": stage.client_states}, run.run_dir)


class PretrainRun:
    """One pre-training run: built from the config (:meth:`__init__`), then one :meth:`round` at a time."""

    def __init__(self, cfg: RunConfig, pcfg: PretrainConfig, method: str, engine: Engine,
                 shards: dict[str, Tensors] | None, client_eval: dict[str, dict[str, Tensors]] | None,
                 val: Tensors | None):
        self.cfg, self.pcfg, self.method, self.engine = cfg, pcfg, method, engine
        model_cfg = cfg.stage_model(STAGE)
        seq_len = pcfg.seq_len or model_cfg.context
        if pcfg.task == "lm" and seq_len > model_cfg.context:
            raise InputError(f"pretrain.seq_len: {seq_len} exceeds model.context ({model_cfg.context})")
        self.device = resolve_device(pcfg.device, "pretrain.device")

        # --- fleet, data, model ---------------------------------------------------------------
        self.fleet = fleet = Fleet.from_config(cfg.fleet, cfg.seed)
        nodes = [n for n in fleet.nodes.values() if n.tier in pcfg.workers]
        client_eval = dict(client_eval or {})
        self.data: Shards = (build_shards(cfg, pcfg, nodes, seq_len) if shards is None
                             else client_shards(cfg, pcfg, nodes, shards, client_eval, val))
        encoder = pcfg.encoder or ("vit" if model_cfg.kind == "vit" else "mlp")
        self.objective = None
        if pcfg.task == "classify":
            from cloudedge.pretrain.objectives import get_objective

            self.objective = get_objective(pcfg.objective.name, total_steps=objective_steps(pcfg), **pcfg.objective.kwargs())
        self.model = build_task_model(pcfg.task, model_cfg, n_classes=self.data.n_classes,  # type: ignore[arg-type]
                                      encoder=encoder, seed=cfg.seed, objective=self.objective,
                                      base_dir=cfg.base_dir)
        self.model.to(self.device).train()  # the coordinator's copy: aggregation, step and evaluation run there
        self.params = trainable(self.model)

        # --- costs: the trained model's, or those of the model the clock charges (clock.charge_as)
        flops_factor = self.objective.train_flops_factor if self.objective is not None else 1.0  # pin: two more
        self.trained_cost = trained_costs(pcfg.task, self.model, model_cfg, seq_len=seq_len,
                                          n_classes=self.data.n_classes, encoder=encoder, flops_factor=flops_factor,
                                          precision=pcfg.precision)
        self.charge = stage_charge(cfg, STAGE)
        self.cost = self.trained_cost if self.charge is None else charged_costs(
            pcfg.task, self.charge, seq_len=seq_len, n_classes=self.data.n_classes, encoder=pcfg.encoder,
            seed=cfg.seed, objective=self.objective, base_dir=cfg.base_dir, flops_factor=flops_factor,
            precision=pcfg.precision)

        # --- memory: the largest micro-batch each worker can hold ------------------------------
        self.caps: dict[str, int] = {}
        self.excluded = dict(self.data.excluded)
        for node in nodes:
            cap = self.cost.micro_batch_cap(node.profile.memory_bytes, pcfg.memory_fraction)
            if cap < 1:
                self.excluded.setdefault(node.id, f"{self.cost.name}'s weights and optimizer do not fit its memory")
            elif node.id not in self.excluded:
                self.caps[node.id] = cap
        self.workers = [n for n in nodes if n.id in self.caps]
        if not self.workers:
            raise InputError("pretrain.workers: no node can train "
                             f"({'; '.join(f'{k}: {v}' for k, v in self.excluded.items())})")
        self.flops_per_sample = self.cost.train_flops_per_sample

        # --- workers behind the engine ---------------------------------------------------------
        for node in self.workers:
            engine.register(node.id, WorkerSpec(PretrainWorker, {
                "worker_id": node.id, "task": pcfg.task, "model_cfg": model_cfg.model_dump(mode="json"),
                "data": self.data.train[node.id], "seed": cfg.seed, "n_classes": self.data.n_classes,
                "encoder": encoder, "objective": pcfg.objective.name, "objective_args": pcfg.objective.kwargs(),
                "objective_steps": objective_steps(pcfg), "optimizer": pcfg.optimizer,
                "weight_decay": pcfg.weight_decay, "grad_clip": pcfg.grad_clip, "base_dir": cfg.base_dir,
                "eval_data": client_eval.get(node.id), "device": pcfg.device, "precision": pcfg.precision}))
        self.eval_ids = [n.id for n in self.workers if client_eval.get(n.id)]
        # Shard sizes (samples, or LM blocks) let the proportional controller keep every shard in the objective.
        self.shard_sizes = {n.id: int(next(iter(self.data.train[n.id].values())).shape[0]) for n in self.workers}

        # --- the algorithm (with the coordinator's optimizer), controller, clock -----------------
        self.algorithm: PretrainAlgorithm = ALGORITHMS.build(pcfg.algorithm, pcfg=pcfg, params=self.params,
                                                             objective=self.objective)
        self.local_h = self.algorithm.steps_per_round(pcfg)
        ctl_args: dict[str, Any] = pcfg.controller.kwargs()
        if "seed" in ctl_args and ctl_args["seed"] is None:  # a controller's seed defaults to the run's
            ctl_args["seed"] = cfg.seed
        self.controller: BatchController = get_controller(pcfg.controller.name, pcfg.global_batch, **ctl_args)
        self.clock = VirtualClock(fleet)
        self.client_states: dict[str, Tensors] = {}
        self.server_msg: dict[str, Any] = {}
        self.totals: dict[str, Any] = {"compute_s": 0.0, "slot_s": 0.0, "time_to_target_s": None}
        self.start_round = 0
        self.val_loss: float | None = None

        self.param_nbytes = self.cost.message_bytes(pcfg.compression)
        self.charged_update_bytes = None if self.charge is None else self.cost.message_bytes(pcfg.compression)
        # The clock's priors for the controllers: seconds per sample, and a round's broadcast +
        # upload (on idle links) per local step.
        cloud_profile = fleet.nodes[CLOUD_ID].profile
        self.priors = {n.id: (self.flops_per_sample / n.profile.flops,
                              0.0 if n.id == CLOUD_ID else (
                                  transfer_seconds(cloud_profile, n.profile, self.param_nbytes)
                                  + transfer_seconds(n.profile, cloud_profile, self.param_nbytes)) / self.local_h)
                       for n in self.workers}

    # ------------------------------------------------------------------------------------ a round
    def round(self, r: int) -> MetricRow:
        """Plan, compute, charge, check, step, observe and evaluate round ``r``; returns its row."""
        pcfg, fleet, clock, caps = self.pcfg, self.fleet, self.clock, self.caps
        # 1. who is reachable, and the plan
        avail = self._reachable(r)
        infos = [WorkerInfo(n.id, n.profile.flops, caps[n.id], n.id in avail, samples=self.shard_sizes[n.id],
                            sample_s=self.priors[n.id][0], overhead_s=self.priors[n.id][1],
                            availability=1.0 if n.id == CLOUD_ID else n.profile.availability)
                 for n in self.workers]
        plan: Plan = self.controller.plan(r, infos)
        if not plan.batches and avail:  # a controller that planned nobody: the fastest reachable worker trains
            plan = Plan({max((n for n in self.workers if n.id in avail), key=lambda n: n.profile.flops).id:
                         pcfg.global_batch})
        # Nobody reachable: a round of lost work. Nothing trains; the coordinator waits a beat.
        ids = sorted(plan.batches, key=lambda k: list(caps).index(k))
        steps = {k: self.local_h for k in ids}
        lr = _lr_at(pcfg, r) * plan.lr_scale
        step_count = r * self.local_h

        # 2. work, through the engine
        sent = {k: v.detach() for k, v in self.params.items()}  # the engine copies what crosses it
        msg_out = {**self.server_msg, "combine_at_server": True} if self.algorithm.combines else self.server_msg
        tasks = []
        for wid in ids:
            common = {"params": sent, "batch": plan.batches[wid], "micro_batch": min(plan.batches[wid], caps[wid]),
                      "round_idx": r, "step": step_count, "server_msg": msg_out,
                      "client_state": self.client_states.get(wid)}
            # Devices hold no model between the rounds they are sampled in.
            tasks.append(self.algorithm.worker_task(wid, common, lr, release=fleet.nodes[wid].tier == "device"))
        results: list[dict[str, Any]] = []
        failed: dict[str, str] = {}
        host_util: dict[str, Any] = {}
        work_wall_s = compute_wall_s = 0.0
        if ids:
            wall0 = time.perf_counter()
            results = self.engine.run_tolerant(tasks)
            work_wall_s = time.perf_counter() - wall0
            # A worker that failed (a crashed actor, an exception) is left out of this round and
            # logged; the round completes with the others. Ray rebuilds a dead host for the next round.
            ids, results, failed = drop_failed(ids, results)
            if not ids:
                raise WorkerError("round", str(r), f"every worker failed: {'; '.join(failed.values())}")
            host_util, compute_wall_s = self._host_utilization(ids, plan, steps, results, work_wall_s)

        # 3. virtual clock: broadcast, compute, upload; everyone waits for the slowest
        t0 = clock.now
        ready = {wid: (t0 if wid == CLOUD_ID else clock.transfer(CLOUD_ID, wid, self.param_nbytes, start=t0))
                 for wid in ids}
        flops = {wid: plan.batches[wid] * steps[wid] * self.flops_per_sample for wid in ids}
        compute_s = {wid: flops[wid] / fleet.nodes[wid].profile.flops for wid in ids}
        arrivals = [_roundtrip(res["update"], pcfg.compression) for res in results]
        # An update has the charged model's layout (clock.charge_as): its bytes, not the trained one's.
        up_bytes = {wid: self.charged_update_bytes or nbytes for wid, (_, nbytes) in zip(ids, arrivals, strict=True)}
        done, departed = self._book_round(ids, ready, flops, up_bytes)
        updates: list[Tensors] = [to_device(arrived, self.device)
                                  for wid, (arrived, _) in zip(ids, arrivals, strict=True) if wid not in departed]
        if departed:
            failed.update(departed)
            kept = [i for i, wid in enumerate(ids) if wid not in departed]
            ids, results = [ids[i] for i in kept], [results[i] for i in kept]
        if not plan.batches:
            clock.advance_to(t0 + self._idle_wait())
        t1 = clock.barrier([*ids, *departed, CLOUD_ID])
        round_s = t1 - t0
        # Every update is checked before it is aggregated (a hostile or broken worker can send
        # anything): a rejected one is dropped from this round and its reason logged.
        verdict = UpdateGate(self.params, norm_rule="mad" if pcfg.update_check == "norm" else "none").check(
            dict(zip(ids, updates, strict=True)))
        if verdict.rejected:
            if not verdict.accepted:
                raise WorkerError("round", str(r), f"every update was rejected: {verdict.rejected}")
            kept = [i for i, wid in enumerate(ids) if wid not in verdict.rejected]
            ids, results, updates = [ids[i] for i in kept], [results[i] for i in kept], [updates[i] for i in kept]

        train_loss = None
        if ids:  # else every participant went offline: a round of lost work, the model as it was
            # 4. the algorithm aggregates and steps. The controller may weight each update by its own
            # rule (reweighted: the worker's data share), else by units: the mean loss over the union.
            units = [int(res["units"]) for res in results]
            agg_w = ([float(plan.weights[w]) for w in ids] if plan.weights is not None else [float(u) for u in units])
            self.algorithm.step(updates, agg_w, results, lr, step_count)
            for wid, res in zip(ids, results, strict=True):
                if res["client_state"]:
                    self.client_states[wid] = res["client_state"]
            if self.objective is not None:
                self.server_msg = self.objective.server_update(self.server_msg, [res["report"] for res in results],
                                                               [u / sum(units) for u in units])

            # 5. the controller learns from what the clock measured
            train_loss = sum(res["loss"] * u for res, u in zip(results, units, strict=True)) / sum(units)
            self.controller.observe(r, [Observation(wid, plan.batches[wid], compute_s[wid],
                                                    (done[wid] - t0) - compute_s[wid], steps[wid], res["grad_sq_norm"],
                                                    res["loss"])
                                        for wid, res in zip(ids, results, strict=True)], round_s, train_loss)
        busy = sum(compute_s[w] for w in ids)
        self.totals["compute_s"] += busy
        self.totals["slot_s"] += len(ids) * round_s

        # 6. evaluate
        row_val = None
        client_metrics: dict[str, Any] = {}
        if (r + 1) % pcfg.eval_every == 0 or self.is_last(r):
            if self.data.val is not None:
                row_val = self.val_loss = evaluate_loss(pcfg.task, self.model, self.data.val)
                if (pcfg.target_val_loss is not None and self.totals["time_to_target_s"] is None
                        and self.val_loss <= pcfg.target_val_loss):
                    self.totals["time_to_target_s"] = clock.now
            client_metrics = _evaluate_clients(self.engine, fleet, self.eval_ids, self.params, self.client_states)
        summary_clock = clock.summary()
        return MetricRow(STAGE, self.method, r, clock.now, failures=failed, rejections=verdict.rejected, values={
            "round_s": round_s, "train_loss": train_loss, "val_loss": row_val, "lr": lr,
            "batch_per_step": plan.global_batch, "effective_batch": sum(plan.batches[w] * steps[w] for w in ids),
            "participants": len(ids), "accumulating": sum(plan.batches[w] > caps[w] for w in ids),
            "utilization": busy / (len(ids) * round_s) if ids and round_s > 0 else 0.0,
            "bytes_total": summary_clock["bytes_total"], "energy_j": summary_clock["energy_j_total"],
            "work_wall_s": work_wall_s, "compute_wall_s": compute_wall_s, **host_util,
            **{f"ctl_{k}": v for k, v in plan.info.items()}, **client_metrics})

    def is_last(self, r: int) -> bool:
        """Whether round ``r``, just run, is the run's last: the last of ``rounds``, or the one that
        spent the virtual-time budget (no round starts after it). The last is always evaluated and
        checkpointed, whichever stops the run."""
        budget = self.pcfg.time_budget_s
        return r == self.pcfg.rounds - 1 or (budget is not None and self.clock.now >= budget)

    def _idle_wait(self) -> float:
        """How long a round with nobody reachable waits before the next one: what the fastest worker's
        round would take by the clock's priors (its compute of the global batch for ``local_h``
        steps, a broadcast and an upload). A lost round counts against ``rounds``: a trace that
        brings the devices online late can spend them all waiting."""
        # Not the cloud's (it has no links to cross): with devices, a beat would be nanoseconds.
        priors = [p for wid, p in self.priors.items() if wid != CLOUD_ID] or list(self.priors.values())
        return min(self.local_h * (self.pcfg.global_batch * sample_s + overhead_s) for sample_s, overhead_s in priors)

    def _reachable(self, r: int) -> set[str]:
        """The workers reachable in round ``r``: devices as ``fleet.availability`` says at the round's
        start (virtual time), the cloud and edge servers by one seeded draw against their profile's
        availability. Bernoulli devices draw too, in the same order as before traces existed."""
        rng = np.random.default_rng([self.cfg.seed, 7, r])
        if self.fleet.availability.kind == "bernoulli":
            return {n.id for n in available_nodes(self.workers, rng)}
        devices = [n for n in self.workers if n.tier == "device"]
        avail = {n.id for n in available_nodes([n for n in self.workers if n.tier != "device"], rng)}
        numbers = np.array([self.fleet.device_number(n.id) for n in devices], dtype=np.int64)
        online = online_mask(self.fleet, numbers, self.clock.now, rng)
        return avail | {n.id for n, on in zip(devices, online, strict=True) if on}

    def _book_round(self, ids: list[str], ready: dict[str, float], flops: dict[str, float],
                    up_bytes: dict[str, int]) -> tuple[dict[str, float], dict[str, str]]:
        """Book each worker's compute and upload on the clock: ``(when each update is in, {device:
        why it left})``.

        Uploads queue at the cloud in the order they are sent, when each worker's compute ends (ties
        in worker order): none waits behind one sent later. The cloud's own compute is booked first,
        as it runs while the uploads come in (booked after them, it would wait for them). A device
        whose availability model takes it offline before its update would arrive drops out at that
        instant (:meth:`_departure`): its update never arrives (an upload it had started is cut off
        then), and the round waits for it only until it leaves (the coordinator sees the connection
        go)."""
        clock, nodes = self.clock, self.fleet.nodes
        begin = {wid: max(ready[wid], clock.busy_until[wid]) for wid in ids}
        sent_at = {wid: begin[wid] + compute_seconds(nodes[wid].profile, flops[wid]) for wid in ids}
        done: dict[str, float] = {}
        departed: dict[str, str] = {}
        for i in sorted(range(len(ids)), key=lambda i: (ids[i] != CLOUD_ID, sent_at[ids[i]], i)):
            wid = ids[i]
            reason = self._departure(wid, begin[wid], sent_at[wid], flops[wid], up_bytes[wid])
            if reason is not None:
                departed[wid] = reason
                continue
            done[wid] = clock.compute(wid, flops[wid], start=ready[wid])
            if wid != CLOUD_ID:
                done[wid] = clock.transfer(wid, CLOUD_ID, up_bytes[wid], start=done[wid])
        return done, departed

    def _departure(self, wid: str, begin: float, sent_at: float, flops: float, up_bytes: int) -> str | None:
        """Why device ``wid`` (computing from ``begin``, sending at ``sent_at``) goes offline before
        its update would arrive (traces and the diurnal model; Bernoulli availability has no time),
        or None. When it does, the compute it did until it left is charged to the clock, and so is
        the upload it had started, cut off then, as fine-tuning does (edge_round.py). Its arrival is the clock's, behind the uploads sent before
        it and queued at the cloud, not its upload's time alone."""
        if self.fleet.availability.kind == "bernoulli" or self.fleet.nodes[wid].tier != "device":
            return None
        arrive = self.clock.transfer_end(wid, CLOUD_ID, up_bytes, start=sent_at)
        t_off = online_until(self.fleet, self.fleet.device_number(wid), self.clock.now)
        if arrive <= t_off:
            return None
        self.clock.compute_until(wid, flops, begin, t_off)
        if sent_at < t_off:  # it had started sending: its upload is cut off when it leaves
            self.clock.transfer_cut(wid, CLOUD_ID, up_bytes, until=t_off, start=sent_at)
        return f"went offline at {t_off:.6g} s (virtual), before its update would have arrived at {arrive:.6g} s"

    def _host_utilization(self, ids: list[str], plan: Plan, steps: dict[str, int], results: list[dict[str, Any]],
                          work_wall_s: float) -> tuple[dict[str, Any], float]:
        """This host's model-FLOPs utilization while the workers computed (real FLOPs over real
        seconds), against its measured matmul peak and against the fastest participant's profile.

        ``mfu_compute`` counts only the workers' own forward/backward/optimizer seconds: the gap to
        ``mfu_measured`` is what the engine, the copies and the bookkeeping around them cost."""
        # The FLOPs this host really did: the trained model's, not clock.charge_as's (those are virtual).
        flops_done = sum(plan.batches[w] * steps[w] * self.trained_cost.train_flops_per_sample for w in ids)
        host_util = utilization_fields(flops_done, work_wall_s, max(self.fleet.nodes[w].profile.flops for w in ids),
                                       device=self.device, peak_size=stage_peak_size(self.device),
                                       dtype=PRECISIONS[self.pcfg.precision])
        compute_wall_s = sum(float(res.get("compute_wall_s", 0.0)) for res in results)
        if host_util and compute_wall_s > 0:
            host_util["mfu_compute"] = flops_done / compute_wall_s / host_util["peak_flops_measured"]
        return host_util, compute_wall_s

    # ------------------------------------------------------------------------ checkpoint, summary
    def state_dict(self) -> dict[str, Any]:
        """Everything a restart needs, as one nested state (cloudedge.checkpoint.save_state)."""
        ctl_tensors, ctl_meta = self.controller.get_state()
        return {"model": {k: v.detach() for k, v in self.params.items()}, "optimizer": self.algorithm.state_dict(),
                "controller": {"tensors": ctl_tensors, "meta": ctl_meta}, "clock": self.clock.state_dict(),
                "clients": self.client_states, "server_msg": self.server_msg, "totals": self.totals,
                "val_loss": self.val_loss}

    def load_state_dict(self, state: dict[str, Any], source: str) -> None:
        model_t = check_state_dict(state["model"], _ParamView(self.params), source)
        with torch.no_grad():
            for k, p in self.params.items():
                p.copy_(model_t[k])
        self.algorithm.load_state_dict(state["optimizer"])
        self.controller.set_state(state["controller"]["tensors"], state["controller"]["meta"])
        self.clock.load_state_dict(state["clock"])
        self.client_states = dict(state["clients"])
        self.server_msg = dict(state["server_msg"])
        self.totals = state["totals"]
        self.val_loss = state["val_loss"]
        self.start_round = int(state["round"]) + 1

    def summary(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        pcfg, totals, c = self.pcfg, self.totals, self.clock.summary()
        summary = {
            "method": self.method, "task": pcfg.task, "rounds": len(rows), "workers": len(self.workers),
            "final_val_loss": self.val_loss, "final_train_loss": rows[-1]["train_loss"] if rows else None,
            "target_val_loss": pcfg.target_val_loss, "time_to_target_s": totals["time_to_target_s"],
            "virtual_time_s": self.clock.now, "bytes_total": c["bytes_total"], "energy_j": c["energy_j_total"],
            "compute_s": totals["compute_s"],  # virtual compute seconds of all participants, summed
            # Compute utilization: share of the participants' round time spent computing.
            "utilization": totals["compute_s"] / totals["slot_s"] if totals["slot_s"] > 0 else 0.0,
            "mean_batch_per_step": float(np.mean([r["batch_per_step"] for r in rows])) if rows else 0.0,
            "excluded": self.excluded,
            **_last_client_eval(rows),
        }
        summary["controller"] = self.controller.describe()
        summary["cost_model"] = cost_model_summary(
            self.trained_cost.describe(pcfg.compression),
            self.cost.describe(pcfg.compression) if self.charge else None, self.charge)
        return summary


# ------------------------------------------------------------------------------------ helpers


def _lr_at(pcfg: PretrainConfig, round_idx: int) -> float:
    """Linear warm-up over ``warmup_rounds``; then constant (``lr_schedule: constant``, so that
    controllers compare at one lr) or a cosine decay (``cosine``) that reaches
    ``lr * min_lr_ratio`` at the last of ``rounds``."""
    if pcfg.warmup_rounds and round_idx < pcfg.warmup_rounds:
        return pcfg.lr * (round_idx + 1) / pcfg.warmup_rounds
    if pcfg.lr_schedule == "constant":
        return pcfg.lr
    span = pcfg.rounds - 1 - pcfg.warmup_rounds  # rounds after the first decayed one
    progress = 1.0 if span <= 0 else min(max(round_idx - pcfg.warmup_rounds, 0) / span, 1.0)
    low = pcfg.lr * pcfg.min_lr_ratio
    return low + (pcfg.lr - low) * 0.5 * (1.0 + math.cos(math.pi * progress))


_UNCOMPRESSED_NBYTES: dict[tuple, int] = {}


def _roundtrip(tensors: Tensors, mode: str) -> tuple[Tensors, int]:
    """What arrives after sending ``tensors`` compressed, and the exact bytes on the wire."""
    if mode == "none":
        # Uncompressed bytes depend only on names, shapes and dtypes: count them once per layout
        # instead of building (copying) a payload for every update of every round.
        layout = tuple((k, tuple(v.shape), str(v.dtype)) for k, v in tensors.items())
        if layout not in _UNCOMPRESSED_NBYTES:
            _UNCOMPRESSED_NBYTES[layout] = int(comm.compress(tensors, "none").nbytes)
        return tensors, _UNCOMPRESSED_NBYTES[layout]
    payload = comm.compress(tensors, mode)
    return payload.decompress(), int(payload.nbytes)


def _evaluate_clients(engine: Engine, fleet: Fleet, eval_ids: list[str], params: dict[str, nn.Parameter],
                      client_states: dict[str, Tensors]) -> dict[str, Any]:
    """Every client scores the current model (and its private state) on its own test sets.

    Returns row fields: ``clients`` ({client: {"<set>_<metric>": value}}), and per set the mean
    over clients (each client counts once, as personalized FL reports it) ``<set>_<metric>`` and
    the worst client's accuracy ``<set>_acc_worst``. A set called ``id`` also gives ``acc``.
    Evaluation is not charged to the virtual clock.
    """
    if not eval_ids:
        return {}
    current = {k: v.detach() for k, v in params.items()}  # the engine copies what crosses it
    results = engine.run([Task(wid, "evaluate", {"params": current, "client_state": client_states.get(wid)},
                               release=fleet.nodes[wid].tier == "device") for wid in eval_ids])
    clients = {wid: {f"{name}_{k}": v for name, metrics in res.items() for k, v in metrics.items()}
               for wid, res in zip(eval_ids, results, strict=True)}
    out: dict[str, Any] = {}
    for key in sorted({k for metrics in clients.values() for k in metrics}):
        values = [metrics[key] for metrics in clients.values() if key in metrics]
        out[key] = float(np.mean(values))
        if key.endswith("_acc"):
            out[f"{key}_worst"] = float(min(values))
    if "id_acc" in out:
        out["acc"] = out["id_acc"]
    out["clients"] = clients
    return out


class _ParamView(nn.Module):
    """Lets ``check_state_dict`` compare a checkpoint with the trainable parameters only."""

    def __init__(self, params: dict[str, nn.Parameter]):
        super().__init__()
        self._params = params

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:  # type: ignore[override]
        return {k: v.detach() for k, v in self._params.items()}


def _last_client_eval(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The fields :func:`_evaluate_clients` wrote into the last row that has them (or nothing)."""
    for row in reversed(rows):
        if "clients" in row:
            keys = {"clients", "acc", *(k for metrics in row["clients"].values() for k in metrics)}
            keys |= {f"{k}_worst" for k in keys}
            return {k: v for k, v in row.items() if k in keys}
    return {}


def run_pretrain(cfg: RunConfig, out_dir: str | Path, resume: bool = False, engine_kind: str = "local") -> dict[str, Any]:
    """The CLI's entry: run the stage into ``out_dir`` (the trained model in ``out_dir/model``)."""

    def save_model(result: StageResult, path: Path) -> None:
        if hasattr(result.model, "save_pretrained"):
            from cloudedge.models.zoo import save_local

            save_local(result.model, path / "model")

    return run_stage_into(STAGE, cfg, out_dir, resume, engine_kind, pretrain, save_model)


__all__ = ["PretrainRun", "pretrain", "run_pretrain"]
