"""The prompt-tuning stage: every edge adapts a frozen CLIP on its own unlabeled test stream.

Read top to bottom: resolve the CLIP checkpoint and the data; give each edge one shift (a
corruption at a severity of the test split, or the user's image folder as it is) in a seeded
order (:mod:`cloudedge.adapt.edges`); the method's cloud phase runs once (CoOp learns its context
on labelled data and the cloud sends it down: :meth:`TTAMethod.cloud_phase`); then one round at
a time:

    every edge adapts on its next batch (through the Engine) -> optionally, every ``share_every``
    rounds, edges upload their prompts, the cloud returns the sample-weighted mean (federated
    test-time prompts; bytes and transfer time on the virtual clock) -> log -> checkpoint.

Labels are used only to score predictions, never to adapt. Accounting per edge: top-1 accuracy,
milliseconds of real wall time per image, peak memory of an adaptation step
(:mod:`cloudedge.adapt.memory`), prompt bytes on the wire (:mod:`cloudedge.comm`). The run
directory, rows, checkpoints and resume rule are the shared stage skeleton (:mod:`cloudedge.stage`).

``adapt(cfg, ...)`` is the API, ``adapt_checkpoint(path, ...)`` the demo's shortcut, and
``run_adapt(cfg, out_dir, resume, engine_kind)`` what the CLI calls.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from cloudedge import comm
from cloudedge.adapt.charge import PromptWire
from cloudedge.adapt.edges import (
    AdaptWorker,
    Stream,
    build_streams,
    check_stream_images,
    clip_source,
    load_clip_source,
)
from cloudedge.adapt.methods import METHODS, CloudContext
from cloudedge.aggregate import weighted_mean
from cloudedge.config import with_overrides
from cloudedge.config.adapt import AdaptConfig
from cloudedge.config.run import RunConfig
from cloudedge.device import resolve_device
from cloudedge.engine import Engine, Task, WorkerError, WorkerSpec, make_engine
from cloudedge.errors import InputError
from cloudedge.fleet import CLOUD_ID, Fleet, VirtualClock
from cloudedge.models.charge import stage_charge
from cloudedge.stage import MetricRow, StageResult, StageRun, run_stage_into
from cloudedge.track.run import RunDir

STAGE = "adapt"
Tensors = dict[str, torch.Tensor]


def adapt(cfg: RunConfig, run_dir: RunDir | str | Path | None = None, engine: Engine | None = None, *,
          resume: bool = False, checkpoint: str | Path | None = None,
          on_round: Callable[[int, dict[str, Any]], None] | None = None, **overrides: Any) -> StageResult:
    """Adapt the CLIP on every edge's stream.

    Args:
        cfg: the run config; its ``adapt`` section (defaults when absent) with ``overrides``
            applied (any AdaptConfig field, e.g. ``method="tpt"``).
        run_dir: where to log (``RunDir`` or a path); None keeps everything in memory.
        engine: how edges are reached (default: a ``LocalEngine``).
        resume: continue from the last checkpoint in ``run_dir``.
        checkpoint: the CLIP to adapt (overrides ``adapt.checkpoint``).
        on_round: called after each round with (round, {edge: row}).

    Returns:
        A :class:`StageResult`: the rows logged by this call (after a resume: those after the
        checkpoint; the run directory holds them all), the summary, and the artefact ``prompts``
        (each edge's prompt tensors at the end).
    """
    acfg = with_overrides(cfg.adapt or AdaptConfig(), overrides, STAGE)
    run = StageRun.open(STAGE, run_dir, cfg, acfg.method.name, resume=resume)
    own_engine = engine is None
    engine = engine or make_engine("local")
    try:
        engine.use_plugins(cfg.plugins)  # workers in other processes (Ray) register the config's plug-ins too
        stage = AdaptRun(cfg, acfg, engine, checkpoint)
        state, _ = run.resume() if resume else (None, [])
        if state is not None:
            stage.load_state_dict(state)
        else:
            stage.cloud_phase()

        rows: list[dict[str, Any]] = []
        # An edge whose worker fails (a crashed actor, an exception) skips the round and is logged; its
        # replacement is restored to the edge's last good step and streams the skipped batch one round
        # later, so the run gets one more round per failure (at most as many extra rounds as planned).
        planned = stage.n_rounds
        n_rounds = planned + stage.extra_rounds  # a resumed run keeps the rounds its failures added
        r = stage.start_round
        with run.progress(n_rounds, r) as bar:
            while r < n_rounds:
                round_rows, failed = stage.round(r)
                rows.extend(run.log(row) for row in round_rows.values())
                if on_round is not None:
                    on_round(r + 1, round_rows)
                if failed:
                    if n_rounds - planned >= planned:
                        raise WorkerError("adapt", f"round {r + 1}", f"edges keep failing: {'; '.join(failed.values())}")
                    n_rounds += 1
                    stage.extra_rounds += 1
                    rows.append(run.log(MetricRow(STAGE, acfg.method.name, r + 1, failures=failed)))
                if run.ckpt_dir is not None and ((r + 1) % acfg.checkpoint_every == 0 or r + 1 == n_rounds):
                    run.checkpoint(r + 1, stage.state_dict())
                r += 1
                bar.advance()

        summary = stage.summary()
        prompts = stage.prompts()
    finally:
        if own_engine:  # an engine this call made is closed whatever happens (Ray actors hold processes)
            engine.close()
    return StageResult(rows, summary, {"prompts": prompts}, run.run_dir)


class AdaptRun:
    """One prompt-tuning run: edges and streams built from the config (:meth:`__init__`), the
    method's :meth:`cloud_phase`, then one :meth:`round` at a time."""

    def __init__(self, cfg: RunConfig, acfg: AdaptConfig, engine: Engine, checkpoint: str | Path | None):
        self.cfg, self.acfg, self.engine = cfg, acfg, engine
        self.device = resolve_device(acfg.device, "adapt.device")
        self.source = clip_source(acfg, cfg, checkpoint)
        fleet = Fleet.from_config(cfg.fleet, cfg.seed)
        self.clock = VirtualClock(fleet)
        self.wire = PromptWire(stage_charge(cfg, STAGE), acfg.compression)  # prompt bytes as charge_as's
        self.streams, self.source_split, self.classnames = build_streams(cfg, acfg, [e.id for e in fleet.edges])
        if acfg.edges is not None:  # a slice of the fleet: the streams were dealt to all of it first
            bad = [i for i in acfg.edges if not 0 <= i < len(self.streams)]
            if bad or not acfg.edges:
                raise InputError(f"adapt.edges: {bad or 'an empty list'} (the fleet has {len(self.streams)} edges, "
                                 f"0..{len(self.streams) - 1})")
            chosen = set(acfg.edges)
            _check_slice_shares_whole_groups(acfg, self.streams, chosen)
            self.streams = [s for i, s in enumerate(self.streams) if i in chosen]
        check_stream_images(self.source, self.streams, acfg.data or cfg.data)
        for s in self.streams:
            engine.register(s.edge_id, WorkerSpec(AdaptWorker, {
                "edge_id": s.edge_id, "source": self.source, "method": acfg.method.name,
                "method_args": acfg.method.params.model_dump(mode="json"), "classnames": self.classnames, "images": s.images,
                "labels": s.labels, "batch_size": acfg.batch_size, "seed": cfg.seed, "device": acfg.device,
                "precision": acfg.precision}))
        self.n_rounds = max(math.ceil(len(s.images) / acfg.batch_size) for s in self.streams)
        self.totals: dict[str, Any] = {"prompt_bytes_up": 0, "prompt_bytes_down": 0, "shares": 0}
        self.start_round = 0
        self.extra_rounds = 0  # one per failed edge-round: its batch is streamed one round later
        self.snapshots: dict[str, dict[str, Any]] = {}  # each edge's state after its last good step
        self.last: dict[str, dict[str, Any]] = {}  # each edge's last figures (images seen weigh the share)

    def cloud_phase(self) -> None:
        """The method's work at the cloud before streaming (CoOp: fit the context), sent down."""
        context = CloudContext(load_clip=lambda: load_clip_source(self.source, self.device, self.acfg.precision),
                               classnames=self.classnames, seed=self.cfg.seed, adapt=self.acfg,
                               source=(self.source_split.x, self.source_split.y),
                               labelled={s.shift: s.labelled for s in self.streams})
        prompts = METHODS.get(self.acfg.method.name).cloud_phase(context)
        if prompts:
            _send_down(prompts, self.acfg, self.streams, self.engine, self.clock, self.totals, self.wire)

    def round(self, r: int) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
        """Every edge adapts on its next batch, then (when due) the prompts are shared.

        Returns this round's row of each edge that streamed, and ``{edge: reason}`` of those whose
        worker failed (restored to their last good step)."""
        acfg, engine = self.acfg, self.engine
        results = engine.run_tolerant([Task(s.edge_id, "step") for s in self.streams])
        round_rows: dict[str, dict[str, Any]] = {}
        failed: dict[str, str] = {}
        for s, res in zip(self.streams, results, strict=True):
            if isinstance(res, WorkerError):
                failed[s.edge_id] = str(res)
                if s.edge_id in self.snapshots:
                    engine.call(s.edge_id, "set_state", **self.snapshots[s.edge_id])
                continue
            snapshot = res.pop("snapshot", None)
            if snapshot is not None:
                self.snapshots[s.edge_id] = snapshot
            self.last[s.edge_id] = res
            if res["batch_seen"] == 0:
                continue
            round_rows[s.edge_id] = MetricRow(STAGE, acfg.method.name, r + 1, values={
                "edge": s.edge_id, "shift": s.shift, "batch_acc": res["batch_correct"] / res["batch_seen"],
                "acc": res["correct"] / res["seen"], "seen": res["seen"]}).as_dict()
        if acfg.share_every and METHODS.get(acfg.method.name).shares_prompt and (r + 1) % acfg.share_every == 0:
            _share_prompts(acfg, self.streams, self.last, engine, self.clock, self.totals, self.wire)
        return round_rows, failed

    def state_dict(self) -> dict[str, Any]:
        """The clock, totals and every edge's state (method tensors + counters), as one nested state."""
        states = self.engine.run([Task(s.edge_id, "get_state") for s in self.streams])
        return {"clock": self.clock.state_dict(), "totals": self.totals, "extra_rounds": self.extra_rounds, "edges": {
            s.edge_id: {"tensors": st["tensors"], "counters": st["counters"]}
            for s, st in zip(self.streams, states, strict=True)}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.start_round = int(state["round"])
        self.clock.load_state_dict(state["clock"])
        self.totals = state["totals"]
        self.extra_rounds = int(state.get("extra_rounds", 0))
        for s in self.streams:
            self.snapshots[s.edge_id] = dict(state["edges"][s.edge_id])
            # Images seen weigh the prompt share; an edge that fails the first round after a resume keeps its count.
            self.last[s.edge_id] = {"seen": int(self.snapshots[s.edge_id]["counters"]["position"])}
            self.engine.call(s.edge_id, "set_state", **self.snapshots[s.edge_id])

    def summary(self) -> dict[str, Any]:
        first = self.streams[0].edge_id
        final = {s.edge_id: self.engine.call(s.edge_id, "stats") for s in self.streams}
        summary = _summary(self.acfg, self.streams, final, self.clock, self.totals)
        summary["cost_model"] = self.wire.cost_model(str(self.source["path"]), self.engine.call(first, "params"),
                                                     self.engine.call(first, "get_prompt"))
        return summary

    def prompts(self) -> dict[str, Tensors]:
        """Every edge's prompt tensors now."""
        return {s.edge_id: self.engine.call(s.edge_id, "get_prompt") for s in self.streams}


def _check_slice_shares_whole_groups(acfg: AdaptConfig, streams: list[Stream], chosen: set[int]) -> None:
    """A slice of the fleet (``adapt.edges``) whose method shares prompts must hold every edge its edges
    average with (all of them, or with ``share_groups: shift`` every edge of their shifts): a slice
    shares only within itself, so its edges would otherwise adapt differently from the whole run."""
    if not acfg.share_every or not METHODS.get(acfg.method.name).shares_prompt:
        return  # nothing is averaged: any slice streams and adapts as in the whole run
    group = [s.shift if acfg.share_groups == "shift" else "all" for s in streams]
    shared = {group[j] for j in chosen}
    needed = {i for i, g in enumerate(group) if g in shared}
    missing = sorted(needed - chosen)
    if missing:
        raise InputError(f"adapt.edges: a slice that shares prompts (share_every {acfg.share_every}, share_groups "
                         f"{acfg.share_groups}) must include every edge its edges average with; missing {missing}")


def _send_down(prompts: dict[str, Tensors], acfg: AdaptConfig, streams: list[Stream], engine: Engine,
               clock: VirtualClock, totals: dict[str, Any], wire: PromptWire) -> None:
    """The cloud sends each edge the prompt of its shift (a method's cloud phase); bytes on the clock."""
    tasks = []
    for s in streams:
        payload = comm.compress(prompts[s.shift], acfg.compression)
        nbytes = wire.nbytes(prompts[s.shift], payload.nbytes)
        clock.transfer(CLOUD_ID, s.edge_id, nbytes)
        totals["prompt_bytes_down"] += nbytes
        tasks.append(Task(s.edge_id, "set_prompt", {"prompt": payload.decompress()}))
    engine.run(tasks)


def _share_prompts(acfg: AdaptConfig, streams: list[Stream], last: dict[str, dict[str, Any]], engine: Engine,
                   clock: VirtualClock, totals: dict[str, Any], wire: PromptWire | None = None) -> None:
    """Edges upload prompts; the cloud returns their mean weighted by images seen (FedAvg of prompts),
    over all edges (``share_groups: all``) or separately over the edges of each shift (``shift``).

    ``wire`` prices each message (clock.charge_as); None: as sent."""
    wire = wire or PromptWire(None, acfg.compression)
    prompts = engine.run([Task(s.edge_id, "get_prompt") for s in streams])
    received: dict[str, list[Tensors]] = {}
    weights: dict[str, list[float]] = {}
    group_of = {s.edge_id: (s.shift if acfg.share_groups == "shift" else "all") for s in streams}
    for s, prompt in zip(streams, prompts, strict=True):
        payload = comm.compress(prompt, acfg.compression)
        nbytes = wire.nbytes(prompt, payload.nbytes)
        clock.transfer(s.edge_id, CLOUD_ID, nbytes)
        totals["prompt_bytes_up"] += nbytes
        received.setdefault(group_of[s.edge_id], []).append(payload.decompress())
        # An edge that has not streamed a batch yet (it failed so far) weighs as one image.
        weights.setdefault(group_of[s.edge_id], []).append(float(max(last.get(s.edge_id, {}).get("seen", 0), 1)))
    downs = {g: comm.compress(weighted_mean(received[g], weights[g]), acfg.compression) for g in received}
    tasks = []
    for s in streams:
        down = downs[group_of[s.edge_id]]
        down_nbytes = wire.nbytes(prompts[0], down.nbytes)
        clock.transfer(CLOUD_ID, s.edge_id, down_nbytes)
        totals["prompt_bytes_down"] += down_nbytes
        tasks.append(Task(s.edge_id, "set_prompt", {"prompt": down.decompress()}))
    totals["shares"] += 1
    engine.run(tasks)


def _summary(acfg: AdaptConfig, streams: list[Stream], final: dict[str, dict[str, Any]], clock: VirtualClock,
             totals: dict[str, Any]) -> dict[str, Any]:
    per_edge = {s.edge_id: {"shift": s.shift, "acc": final[s.edge_id]["correct"] / max(final[s.edge_id]["seen"], 1),
                            "images": final[s.edge_id]["seen"]} for s in streams}
    per_shift: dict[str, list[int]] = {}
    for s in streams:
        c = per_shift.setdefault(s.shift, [0, 0])
        c[0] += final[s.edge_id]["correct"]
        c[1] += final[s.edge_id]["seen"]
    acc_per_shift = {k: v[0] / max(v[1], 1) for k, v in per_shift.items()}
    timed_s = sum(f["timed_s"] for f in final.values())
    timed_cpu_s = sum(f["timed_cpu_s"] for f in final.values())
    timed_images = sum(f["timed_images"] for f in final.values())
    c = clock.summary()
    return {
        "method": acfg.method.name, "episodic": METHODS.get(acfg.method.name).episodic,
        "acc_mean": sum(acc_per_shift.values()) / len(acc_per_shift), "acc_per_shift": acc_per_shift,
        "acc_per_edge": per_edge,
        "ms_per_image": 1000.0 * timed_s / timed_images if timed_images else None,
        # CPU-seconds of this process per image: on a CPU, what the method costs whatever else
        # the machine is doing (on a GPU the wall time above is the measure).
        "cpu_ms_per_image": 1000.0 * timed_cpu_s / timed_images if timed_images else None,
        "timed_images": timed_images,  # the images both figures above are over (the first batch is not timed)
        "peak_mem_mb": max(f["peak_bytes"] for f in final.values()) / 2**20,
        "prompt_bytes_up": totals["prompt_bytes_up"], "prompt_bytes_down": totals["prompt_bytes_down"],
        "prompt_shares": totals["shares"], "share_every": acfg.share_every,
        "bytes_total": c["bytes_total"], "virtual_time_s": c["virtual_time_s"],
    }


def run_adapt(cfg: RunConfig, out_dir: str | Path, resume: bool = False, engine_kind: str = "local") -> dict[str, Any]:
    """The CLI's entry: run the stage into ``out_dir`` and return the summary dict."""
    return run_stage_into(STAGE, cfg, out_dir, resume, engine_kind, adapt)


def adapt_checkpoint(checkpoint: str | Path, cfg: RunConfig | None = None, out_dir: str | Path | None = None,
                     **overrides: Any) -> dict[str, Any]:
    """The demo's entry: adapt the CLIP at ``checkpoint`` (a dir or weights file) and return the summary.

    ``cfg`` defaults to a fleet of one cloud and the default edges on the bundled digits; any
    AdaptConfig field may be overridden (``method="tpt"``, ``streams=[...]``, ...).
    """
    from cloudedge.config import RunConfig as _RunConfig

    cfg = cfg or _RunConfig()
    return adapt(cfg, out_dir, checkpoint=checkpoint, **overrides).summary
