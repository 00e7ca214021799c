"""The prompt-tuning stage: every edge adapts a frozen CLIP on its own unlabeled test stream.

Read top to bottom: resolve the CLIP checkpoint and the data; give each edge one shift (a
corruption at a severity of the test split, or the user's image folder as it is) in a seeded
order; for ``coop`` the cloud first learns the context on the labelled clean source split and
sends it down; then one round at a time:

    every edge adapts on its next batch (through the Engine) -> optionally, every ``share_every``
    rounds, edges upload their prompts, the cloud returns the sample-weighted mean (federated
    test-time prompts; bytes and transfer time on the virtual clock) -> log -> checkpoint.

Labels are used only to score predictions, never to adapt. Accounting per edge: top-1 accuracy,
milliseconds of real wall time per image, peak memory of an adaptation step
(:mod:`cloudedge.adapt.memory`), prompt bytes on the wire (:mod:`cloudedge.comm`).

``adapt(cfg, ...)`` is the API, ``adapt_checkpoint(path, ...)`` the demo's shortcut, and
``run_adapt(cfg, out_dir, resume, engine_kind)`` what the CLI calls.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from cloudedge import comm
from cloudedge.adapt.charge import PromptWire
from cloudedge.adapt.clip_model import ClipAdapter, load_clip
from cloudedge.adapt.memory import measure_peak_bytes
from cloudedge.adapt.methods import METHODS, CoOp, build_method
from cloudedge.aggregate import weighted_mean
from cloudedge.checkpoint import load_latest, save_checkpoint
from cloudedge.config import with_overrides
from cloudedge.config.adapt import AdaptConfig
from cloudedge.config.model import ModelConfig
from cloudedge.config.run import RunConfig
from cloudedge.device import resolve_device, synchronize
from cloudedge.engine import Engine, Task, WorkerError, WorkerSpec, make_engine
from cloudedge.errors import InputError
from cloudedge.fleet import CLOUD_ID, Fleet, VirtualClock
from cloudedge.models.charge import resolve_charge
from cloudedge.models.inputs import check_images, config_image_spec
from cloudedge.stage import run_stage_into
from cloudedge.track.run import RunDir

STAGE = "adapt"
Tensors = dict[str, torch.Tensor]


# ------------------------------------------------------------------------------------ the model


def clip_source(acfg: AdaptConfig, cfg: RunConfig, checkpoint: str | Path | None = None) -> dict[str, Any]:
    """Where the edges load the CLIP from, as plain data: ``{"path", "model_cfg"}``.

    Order: the explicit ``checkpoint``, ``adapt.checkpoint``, then the stage model's ``path``.
    A pretrain run directory is accepted (its ``model/`` folder is used).
    """
    model_cfg = acfg.model or cfg.model
    raw = checkpoint or acfg.checkpoint or model_cfg.path
    if raw is None:
        raise InputError("adapt.checkpoint: a CLIP checkpoint is needed (pre-train one with "
                         "`cloudedge pretrain` task clip, or give a local HF CLIP directory)")
    from cloudedge.models import resolve_path

    path = resolve_path(raw, cfg.base_dir)
    if path.is_dir() and not (path / "config.json").is_file() and (path / "model" / "config.json").is_file():
        path = path / "model"
    if not path.exists():
        raise InputError(f"adapt.checkpoint: {path} does not exist")
    cfg_dict = model_cfg.model_dump(mode="json") if model_cfg.kind == "clip" else None
    return {"path": str(path), "model_cfg": cfg_dict}


def load_clip_source(source: dict[str, Any], device: str = "cpu") -> ClipAdapter:
    model_cfg = ModelConfig(**source["model_cfg"]) if source.get("model_cfg") else None
    clip = load_clip(source["path"], model_cfg)
    clip.model.to(device)
    return clip


# ------------------------------------------------------------------------------------ the worker


class AdaptWorker:
    """An edge: holds its stream (images, labels used only for scoring) and adapts on it."""

    def __init__(self, edge_id: str, source: dict[str, Any], method: str, method_args: dict[str, Any],
                 classnames: list[str], images: torch.Tensor, labels: torch.Tensor, batch_size: int,
                 seed: int, device: str = "cpu"):
        self.edge_id = edge_id
        # Resolved on this edge's host (auto: its GPU, if it has one).
        self.clip = load_clip_source(source, resolve_device(device, "adapt.device"))
        self.method = build_method(method, self.clip, classnames, seed=seed, **method_args)
        self.images, self.labels, self.batch_size = images, labels, batch_size
        self.position = 0
        self.correct = 0
        self.timed_images = 0
        self.timed_s = 0.0
        self.timed_cpu_s = 0.0  # process CPU time of the same spans: far less moved by other processes' load
        self.peak_bytes = -1

    def step(self) -> dict[str, Any]:
        """Adapt on (and predict) the next batch; returns this batch's and the running figures."""
        if self.position >= len(self.images):
            return self.stats(batch_correct=0, batch_seen=0)
        x = self.images[self.position:self.position + self.batch_size]
        y = self.labels[self.position:self.position + self.batch_size]
        if self.peak_bytes < 0:
            # The first batch measures memory (the tracker slows it, so it is not timed).
            logits, self.peak_bytes = measure_peak_bytes(lambda: self.method.predict_batch(x), self.clip.device)
        else:
            t0, c0 = time.perf_counter(), time.process_time()
            logits = self.method.predict_batch(x)
            synchronize(self.clip.device)
            self.timed_s += time.perf_counter() - t0
            self.timed_cpu_s += time.process_time() - c0
            self.timed_images += len(x)
        batch_correct = int((logits.argmax(-1).cpu() == y).sum())
        self.correct += batch_correct
        self.position += len(x)
        # The state after this step travels back with the result (prompts are small): if this
        # worker dies later, the coordinator restores its replacement to exactly this point.
        return {**self.stats(batch_correct=batch_correct, batch_seen=len(x)), "snapshot": self._snapshot()}

    def _snapshot(self) -> dict[str, Any]:
        state = self.get_state()
        return {"tensors": state["tensors"], "counters": state["counters"]}

    def stats(self, batch_correct: int = 0, batch_seen: int = 0) -> dict[str, Any]:
        return {"seen": self.position, "correct": self.correct, "batch_correct": batch_correct,
                "batch_seen": batch_seen, "timed_s": self.timed_s, "timed_cpu_s": self.timed_cpu_s,
                "timed_images": self.timed_images,
                "peak_bytes": max(self.peak_bytes, 0), "done": self.position >= len(self.images)}

    def get_prompt(self) -> Tensors:
        return self.method.prompt_state()

    def params(self) -> int:
        """Parameters of the CLIP this edge adapts (for the summary's ``cost_model``)."""
        return sum(p.numel() for p in self.clip.model.parameters())

    def set_prompt(self, prompt: Tensors) -> None:
        self.method.load_prompt_state(prompt)

    def get_state(self) -> dict[str, Any]:
        return {"tensors": self.method.state_dict(), "stats": self.stats(),
                "counters": {"position": self.position, "correct": self.correct, "timed_s": self.timed_s,
                             "timed_cpu_s": self.timed_cpu_s, "timed_images": self.timed_images,
                             "peak_bytes": self.peak_bytes}}

    def set_state(self, tensors: Tensors, counters: dict[str, Any]) -> None:
        self.method.load_state_dict(tensors)
        self.position, self.correct = int(counters["position"]), int(counters["correct"])
        self.timed_s, self.timed_images = float(counters["timed_s"]), int(counters["timed_images"])
        self.timed_cpu_s = float(counters.get("timed_cpu_s", 0.0))  # absent in checkpoints of older runs
        self.peak_bytes = int(counters["peak_bytes"])


# ------------------------------------------------------------------------------------ the streams


@dataclass
class Stream:
    """One edge's test stream: its shift's name and the images in streaming order.

    ``labelled``: images of the same shift disjoint from the stream, with labels (what the oracle
    CoOp, ``coop_fit: shift``, is fitted on); None unless asked for."""

    edge_id: str
    shift: str
    images: torch.Tensor
    labels: torch.Tensor
    labelled: tuple[torch.Tensor, torch.Tensor] | None = None


def _test_bases(data_cfg: Any, test: Any) -> tuple[Any, Any]:
    """(held-in test images, held-out-font test images). For ``glyphs`` with ``held_out_fonts``
    the dataset's test split shows only the held-out fonts, so the held-in test images are the
    test split rendered from the training fonts; other sources have one test split (no font shift)."""
    if data_cfg.source != "glyphs" or not data_cfg.glyphs.held_out_fonts:
        return test, None
    from cloudedge.data.glyphs import glyph_specs, glyph_split

    train_spec, _ = glyph_specs(data_cfg.glyphs, data_cfg.image_size)
    return glyph_split(train_spec, "test", data_cfg.glyphs.test_size, data_cfg.glyphs.cache), test


def prompt_class_names(data_cfg: Any, classes: list[str]) -> list[str]:
    """How prompts name the classes: glyph captions say "digit seven" / "letter A", so prompts do too."""
    if data_cfg.source != "glyphs":
        return list(classes)
    from cloudedge.data.glyph_attrs import class_phrase

    return [class_phrase(c) for c in classes]


def _shifted(spec: Any, k: int, base: Any, font_base: Any, seed: int) -> tuple[Any, str]:
    """The test images under stream spec ``k`` and the shift's name."""
    from cloudedge.data import check_corruption, corrupt
    from cloudedge.data.glyph_shifts import HELD_OUT_FONT, shift_glyphs

    ds, names = base, []
    if spec.shift == HELD_OUT_FONT:
        if font_base is None:
            raise InputError(f"adapt.streams.{k}.shift: held_out_font needs data.source glyphs with "
                             "data.glyphs.held_out_fonts")
        ds = font_base
    elif spec.shift is not None:
        ds = shift_glyphs(base, spec.shift, seed + 1 + k)
    if spec.shift is not None:
        names.append(spec.shift)
    if spec.corruption:
        check_corruption(spec.corruption, spec.severity, field=f"adapt.streams.{k}.corruption")
        ds = corrupt(ds, spec.corruption, spec.severity, seed + 1 + k)
        names.append(f"{spec.corruption}@{spec.severity}")
    return ds, "+".join(names) or "clean"


def build_streams(cfg: RunConfig, acfg: AdaptConfig, edge_ids: list[str]) -> tuple[list[Stream], Any, list[str]]:
    """Each edge's stream (test split under its shift, seeded order) and the clean source split.

    Edge ``i`` streams spec ``k = i % len(streams)``; the edges sharing a spec take consecutive,
    disjoint slices of one seeded order of its images. Class names are returned as prompts say them.
    """
    from cloudedge.data import build_dataset

    data_cfg = acfg.data or cfg.data
    train, test = build_dataset(data_cfg, cfg.base_dir, cfg.seed)
    if not hasattr(test, "x"):
        raise InputError(f"adapt.data.source: prompt tuning needs images, got '{data_cfg.source}'")
    base, font_base = _test_bases(data_cfg, test)
    n_specs = len(acfg.streams)
    copies = [len(range(k, len(edge_ids), n_specs)) for k in range(n_specs)]
    shifted: dict[int, tuple[Any, str, torch.Tensor]] = {}
    streams = []
    for i, edge_id in enumerate(edge_ids):
        k, copy = i % n_specs, i // n_specs
        if k not in shifted:
            ds, name = _shifted(acfg.streams[k], k, base, font_base, cfg.seed)
            order = torch.randperm(len(ds), generator=torch.Generator().manual_seed(cfg.seed * 7919 + k))
            shifted[k] = (ds, name, order)
        ds, name, order = shifted[k]
        n = acfg.stream_samples or len(ds) // copies[k]
        part = order[copy * n:(copy + 1) * n]
        if len(part) == 0:
            raise InputError(f"adapt.stream_samples: stream {k} has {len(ds)} images, too few for "
                             f"{copies[k]} edges of {n}")
        labelled = None
        if acfg.method == "coop" and acfg.coop_fit == "shift":
            used = copies[k] * n
            fit = order[used:used + (acfg.coop_samples or n)]
            if len(fit) < (acfg.coop_samples or n):
                raise InputError(f"adapt.coop_samples: stream {k} ({name}) has {len(ds)} images; the oracle needs "
                                 f"{used} for its streams and {acfg.coop_samples or n} more to fit on")
            labelled = (ds.x[fit].contiguous(), ds.y[fit].contiguous())
        streams.append(Stream(edge_id, name, ds.x[part].contiguous(), ds.y[part].contiguous(), labelled))
    return streams, train, prompt_class_names(data_cfg, list(test.classes))


def check_stream_images(source: dict[str, Any], streams: list[Stream], data_cfg: Any) -> None:
    """Before any edge is built: can the CLIP take these images (channels convert, size is fitted)?"""
    path = Path(source["path"])
    if path.is_dir():  # a HF directory's own config.json says what its vision tower takes
        model_cfg = ModelConfig(kind="hf", path=str(path))
    elif source.get("model_cfg"):
        model_cfg = ModelConfig(**source["model_cfg"])
    else:
        return
    spec = config_image_spec(model_cfg)
    if spec is not None and streams:
        check_images(streams[0].images.shape, spec, f"{STAGE}.data ({data_cfg.source}) for the CLIP at {path}")


# ------------------------------------------------------------------------------------ the stage


@dataclass
class AdaptResult:
    """What :func:`adapt` returns: every logged row and the summary."""

    metrics: list[dict[str, Any]]
    summary: dict[str, Any]
    run_dir: RunDir | None = None


def adapt(cfg: RunConfig, run_dir: RunDir | str | Path | None = None, engine: Engine | None = None, *,
          resume: bool = False, checkpoint: str | Path | None = None,
          on_round: Callable[[int, dict[str, Any]], None] | None = None, **overrides: Any) -> AdaptResult:
    """Adapt the CLIP on every edge's stream.

    Args:
        cfg: the run config; its ``adapt`` section (defaults when absent) with ``overrides``
            applied (any AdaptConfig field, e.g. ``method="tpt"``).
        run_dir: where to log (``RunDir`` or a path); None keeps everything in memory.
        engine: how edges are reached (default: a ``LocalEngine``).
        resume: continue from the last checkpoint in ``run_dir``.
        checkpoint: the CLIP to adapt (overrides ``adapt.checkpoint``).
        on_round: called after each round with (round, {edge: row}).
    """
    acfg = with_overrides(cfg.adapt or AdaptConfig(), overrides, STAGE)
    if acfg.method not in METHODS:
        raise InputError(f"adapt.method: unknown method {acfg.method!r} (known: {', '.join(METHODS)})")
    if isinstance(run_dir, str | Path):
        run_dir = RunDir.create(run_dir, cfg, resume=resume)
    own_engine = engine is None
    engine = engine or make_engine("local")
    device = resolve_device(acfg.device, "adapt.device")
    source = clip_source(acfg, cfg, checkpoint)

    fleet = Fleet.from_config(cfg.fleet, cfg.seed)
    clock = VirtualClock(fleet)
    wire = PromptWire(resolve_charge(cfg.clock), acfg.compression)  # prompt bytes as clock.charge_as's
    edge_ids = [e.id for e in fleet.edges]
    streams, source_split, classnames = build_streams(cfg, acfg, edge_ids)
    check_stream_images(source, streams, acfg.data or cfg.data)
    for s in streams:
        engine.register(s.edge_id, WorkerSpec(AdaptWorker, {
            "edge_id": s.edge_id, "source": source, "method": acfg.method, "method_args": dict(acfg.method_args),
            "classnames": classnames, "images": s.images, "labels": s.labels, "batch_size": acfg.batch_size,
            "seed": cfg.seed, "device": acfg.device}))
    n_rounds = max(math.ceil(len(s.images) / acfg.batch_size) for s in streams)
    totals = {"prompt_bytes_up": 0, "prompt_bytes_down": 0, "shares": 0}

    start_round = 0
    snapshots: dict[str, dict[str, Any]] = {}  # each edge's state after its last good step
    ckpt_dir = run_dir.checkpoint_dir(STAGE) if run_dir is not None else None
    latest = load_latest(ckpt_dir) if (resume and ckpt_dir is not None) else None
    if latest is not None:
        tensors, state = latest
        start_round = int(state["round"])
        clock.load_state_dict(state["clock"])
        totals = state["totals"]
        for s in streams:
            prefix = f"{s.edge_id}."
            own = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
            engine.call(s.edge_id, "set_state", tensors=own, counters=state["edges"][s.edge_id])
            snapshots[s.edge_id] = {"tensors": own, "counters": state["edges"][s.edge_id]}
        run_dir.truncate_metrics(lambda row: row.get("stage") != STAGE or row.get("round", 0) <= start_round)
    else:
        if resume and run_dir is not None:
            # Killed before its first checkpoint: start over, without the rows logged before the crash.
            run_dir.truncate_metrics(lambda row: row.get("stage") != STAGE or row.get("method") != acfg.method)
        if acfg.method == "coop":
            _deploy_coop(cfg, acfg, source, device, source_split, classnames, streams, engine, clock, totals, wire)

    rows: list[dict[str, Any]] = []
    last: dict[str, dict[str, Any]] = {}
    # An edge whose worker fails (a crashed actor, an exception) skips the round and is logged; its
    # replacement is restored to the edge's last good step and streams the skipped batch one round
    # later, so the run gets one more round per failure (at most as many extra rounds as planned).
    planned, r = n_rounds, start_round
    while r < n_rounds:
        results = engine.run_tolerant([Task(s.edge_id, "step") for s in streams])
        round_rows = {}
        failed = {}
        for s, res in zip(streams, results, strict=True):
            if isinstance(res, WorkerError):
                failed[s.edge_id] = str(res)
                if s.edge_id in snapshots:
                    engine.call(s.edge_id, "set_state", **snapshots[s.edge_id])
                continue
            snapshot = res.pop("snapshot", None)
            if snapshot is not None:
                snapshots[s.edge_id] = snapshot
            last[s.edge_id] = res
            if res["batch_seen"] == 0:
                continue
            row = {"stage": STAGE, "method": acfg.method, "round": r + 1, "edge": s.edge_id, "shift": s.shift,
                   "batch_acc": res["batch_correct"] / res["batch_seen"], "acc": res["correct"] / res["seen"],
                   "seen": res["seen"]}
            round_rows[s.edge_id] = row
            rows.append(run_dir.log(**row) if run_dir is not None else row)
        if acfg.share_every and METHODS[acfg.method].shares_prompt and (r + 1) % acfg.share_every == 0:
            _share_prompts(acfg, streams, last, engine, clock, totals, wire)
        if on_round is not None:
            on_round(r + 1, round_rows)
        if failed:
            if n_rounds - planned >= planned:
                raise WorkerError("adapt", f"round {r + 1}", f"edges keep failing: {'; '.join(failed.values())}")
            n_rounds += 1
            fail_row = {"stage": STAGE, "method": acfg.method, "round": r + 1, "failed": len(failed),
                        "failures": failed}
            rows.append(run_dir.log(**fail_row) if run_dir is not None else fail_row)
        if ckpt_dir is not None and ((r + 1) % acfg.checkpoint_every == 0 or r + 1 == n_rounds):
            _checkpoint(ckpt_dir, r + 1, streams, engine, clock, totals)
        r += 1

    final = {s.edge_id: engine.call(s.edge_id, "stats") for s in streams}
    summary = _summary(acfg, streams, final, clock, totals)
    summary["cost_model"] = wire.cost_model(str(source["path"]), engine.call(streams[0].edge_id, "params"),
                                            engine.call(streams[0].edge_id, "get_prompt"))
    if own_engine:
        engine.close()
    return AdaptResult(rows, summary, run_dir)


def _deploy_coop(cfg: RunConfig, acfg: AdaptConfig, source: dict[str, Any], device: str, source_split: Any,
                 classnames: list[str], streams: list[Stream], engine: Engine, clock: VirtualClock,
                 totals: dict[str, Any], wire: PromptWire) -> None:
    """CoOp: the cloud learns the context with labels, then sends it down.

    ``coop_fit: source``: one context fitted on the labelled clean source split (``coop_samples`` of
    it, a seeded subset), sent to every edge; ``shift`` (the oracle): one context per shift, fitted
    on labelled images of that shift that its edges never stream."""
    args = {k: v for k, v in acfg.method_args.items() if k != "epochs"}
    clip = load_clip_source(source, device)
    if acfg.coop_fit == "source":
        x, y = source_split.x, source_split.y
        if acfg.coop_samples is not None and acfg.coop_samples < len(x):
            pick = torch.randperm(len(x), generator=torch.Generator().manual_seed(cfg.seed))[: acfg.coop_samples]
            x, y = x[pick], y[pick]
        fits = {s.shift: (x, y) for s in streams}
    else:
        fits = {s.shift: s.labelled for s in streams if s.labelled is not None}
    fitted: dict[int, Tensors] = {}  # by the fitted tensor's identity: the source split is fitted once
    prompts: dict[str, Tensors] = {}
    for shift, (x, y) in fits.items():
        if id(x) not in fitted:
            coop = CoOp(clip, classnames, seed=cfg.seed, epochs=acfg.coop_epochs, **args)
            coop.fit(x, y)
            fitted[id(x)] = coop.prompt_state()
        prompts[shift] = fitted[id(x)]
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
        weights.setdefault(group_of[s.edge_id], []).append(float(max(last[s.edge_id]["seen"], 1)))
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


def _checkpoint(ckpt_dir: Path, r: int, streams: list[Stream], engine: Engine, clock: VirtualClock,
                totals: dict[str, Any]) -> None:
    states = engine.run([Task(s.edge_id, "get_state") for s in streams])
    tensors = {f"{s.edge_id}.{k}": v for s, st in zip(streams, states, strict=True) for k, v in st["tensors"].items()}
    save_checkpoint(ckpt_dir, r, tensors, {
        "round": r, "clock": clock.state_dict(), "totals": totals,
        "edges": {s.edge_id: st["counters"] for s, st in zip(streams, states, strict=True)}})


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
        "method": acfg.method, "episodic": METHODS[acfg.method].episodic,
        "acc_mean": sum(acc_per_shift.values()) / len(acc_per_shift), "acc_per_shift": acc_per_shift,
        "acc_per_edge": per_edge,
        "ms_per_image": 1000.0 * timed_s / timed_images if timed_images else None,
        # CPU-seconds of this process per image: on a CPU, what the method costs whatever else
        # the machine is doing (on a GPU the wall time above is the measure).
        "cpu_ms_per_image": 1000.0 * timed_cpu_s / timed_images if timed_images else None,
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
