"""The prompt-tuning stage's edges: the CLIP they load, the worker that adapts on a stream, and the
streams themselves (each edge's shift of the test split, in a seeded order).

The stage that drives them is :mod:`cloudedge.adapt.stage`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from cloudedge.adapt.clip_model import ClipAdapter, load_clip
from cloudedge.adapt.memory import measure_peak_bytes
from cloudedge.adapt.methods import build_method
from cloudedge.config.adapt import AdaptConfig
from cloudedge.config.model import ModelConfig
from cloudedge.config.run import RunConfig
from cloudedge.device import resolve_device, synchronize
from cloudedge.errors import InputError
from cloudedge.models.inputs import check_images, config_image_spec

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


def load_clip_source(source: dict[str, Any], device: str = "cpu", precision: str = "fp32") -> ClipAdapter:
    model_cfg = ModelConfig(**source["model_cfg"]) if source.get("model_cfg") else None
    clip = load_clip(source["path"], model_cfg)
    clip.model.to(device)
    clip.precision = precision
    return clip


# ------------------------------------------------------------------------------------ the worker


class AdaptWorker:
    """An edge: holds its stream (images, labels used only for scoring) and adapts on it."""

    def __init__(self, edge_id: str, source: dict[str, Any], method: str, method_args: dict[str, Any],
                 classnames: list[str], images: torch.Tensor, labels: torch.Tensor, batch_size: int,
                 seed: int, device: str = "cpu", precision: str = "fp32"):
        self.edge_id = edge_id
        # Resolved on this edge's host (auto: its GPU, if it has one).
        self.clip = load_clip_source(source, resolve_device(device, "adapt.device"), precision)
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
        if acfg.method.name == "coop" and acfg.coop_fit == "shift":
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
