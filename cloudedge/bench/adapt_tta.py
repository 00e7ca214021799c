"""Benchmark ``adapt-tta``: test-time prompt adaptation of a glyph CLIP on label-preserving shifts.

1. The CLIP: the bundled small CLIP pre-trained through the pre-training stage on captioned colour
   ``alnum`` glyphs (:mod:`cloudedge.adapt.glyph_clip`; built once per configuration and cached
   under the user cache dir; its model card is copied into the run directory). Or ``checkpoint=``.
2. Shifts (:data:`SHIFTS`): held-out font families, inverted polarity, an unseen colour palette,
   background texture, corruptions at severity 3, and the named styles the CLIP's captions taught
   it (upside down, mirrored, sideways; the zero-shot prompt does not name them); the full run
   adds more corruptions at severity 3 and reports severity 5 separately (:data:`SEVERE`, not in
   ``acc_mean``). Each edge streams one shift (``images_per_shift`` images of the test split, in a
   seeded order, batches of 32), and each shift also has as many labelled images that no edge
   streams (the oracle's).
3. The headroom gate, run and printed first: ``oracle_coop`` (CoOp's context fitted per shift on
   those labelled images) must beat zero-shot by :data:`GATE_POINTS` on the mean over shifts.
4. Methods side by side on the same streams: zeroshot, coop (fitted on the clean labelled source
   split), tpt (episodic), swapprompt (online), tda (training-free), template-select (stream-level
   choice among the plain prompt and the CLIP's style phrases), swapprompt's ablations (no
   EMA, no swap, no sharpening/balancing, milder views, no views), and federated prompt sharing between edges with
   different shifts (one per shift, every batch, all edges) and with the same shift (two edges per
   shift on disjoint halves of its stream, averaged within the shift, beside the same halves unshared).

Reported per method: mean top-1 over shifts, top-1 per shift, milliseconds per image of wall time
and of this process's CPU time (the steadier of the two on a shared CPU), peak tensor memory of an
adaptation step (MB; the frozen model's weights excluded).

The method runs are independent, so ``workers`` processes (default: one per core, at most 2) run
them side by side: the gate's two first, then TPT (about two thirds of the work, 64 views per
image) split over slices of its edges, then the rest. Each process has one torch thread, and every
figure is measured inside the process that ran it, so the results do not depend on ``workers``
(tested: the same numbers serially and in parallel).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Any, get_args

from cloudedge.adapt.glyph_clip import GLYPH_VIEWS, MODEL, STYLES, glyph_clip, glyph_data
from cloudedge.adapt.methods import ZEROSHOT_TEMPLATE
from cloudedge.config import config_from_dict
from cloudedge.config.adapt import AdaptConfig
from cloudedge.data.glyph_styles import style_template
from cloudedge.device import resolve_device
from cloudedge.errors import InputError

GATE_POINTS = 8.0
SOURCE_IMAGES = 2048
BATCH = 32
SHIFTS: list[dict[str, Any]] = [
    {"shift": "held_out_font"}, {"shift": "inverted"}, {"shift": "palette"}, {"shift": "texture"},
    {"corruption": "gaussian_noise", "severity": 3}, {"corruption": "defocus_blur", "severity": 3},
    {"shift": "upside_down"}, {"shift": "mirrored"}, {"shift": "sideways"},
]
FULL_EXTRA: list[dict[str, Any]] = [
    {"corruption": "contrast", "severity": 3}, {"corruption": "pixelate", "severity": 3},
    {"corruption": "impulse_noise", "severity": 3}, {"corruption": "brightness", "severity": 3},
]
SEVERE: list[dict[str, Any]] = [
    {"corruption": c, "severity": 5} for c in ("gaussian_noise", "defocus_blur", "contrast", "pixelate")]
VIEWS = GLYPH_VIEWS
# SwapPrompt at its defaults (lr 5e-3, momentum 0.99, temperature 0.5, Sinkhorn-balanced targets, one
# step per batch), spelled out so the ablations below differ from it in one knob each.
SWAPPROMPT = {"name": "swapprompt", "augment": VIEWS, "lr": 5e-3, "momentum": 0.99, "temperature": 0.5,
              "balance": "sinkhorn", "steps": 1}
# The views ablations: the augment module's defaults (area 0.8-1, 5 degrees, chosen for 8 px digits),
# and none at all (both "views" are the test image itself: balanced self-training on the stream).
MILD_VIEWS: dict[str, Any] = {}
NO_VIEWS: dict[str, Any] = {"crop_scale": [1.0, 1.0], "ratio": [1.0, 1.0], "degrees": 0.0, "brightness": 0.0,
                            "contrast": 0.0}
METHODS: dict[str, dict[str, Any]] = {
    "zeroshot": {"method": "zeroshot"},
    "coop": {"method": "coop", "coop_fit": "source"},
    "tpt": {"method": {"name": "tpt", "augment": VIEWS}},
    "swapprompt": {"method": SWAPPROMPT},
    "tda": {"method": "tda"},
    # Stream-level selection among the plain prompt and the style phrases the CLIP's captions taught
    # it (its model card lists them): the rule fixes the candidates, not the streams.
    "template-select": {"method": {"name": "template-select",
                                   "templates": [ZEROSHOT_TEMPLATE, *(style_template(s) for s in STYLES)]}},
    "swapprompt-no-ema": {"method": {**SWAPPROMPT, "momentum": 0.0}},
    "swapprompt-no-swap": {"method": {**SWAPPROMPT, "swap": False}},
    "swapprompt-no-sharpen": {"method": {**SWAPPROMPT, "temperature": 1.0, "balance": "none"}},
    "swapprompt-mild-views": {"method": {**SWAPPROMPT, "augment": MILD_VIEWS}},
    "swapprompt-no-views": {"method": {**SWAPPROMPT, "augment": NO_VIEWS}},
    "swapprompt-shared-diff": {"method": SWAPPROMPT, "share_every": 1},
    "swapprompt-halves": {"method": SWAPPROMPT, "edges_per_shift": 2},
    "swapprompt-shared-same": {"method": SWAPPROMPT, "edges_per_shift": 2, "share_every": 1, "share_groups": "shift"},
}


def shift_name(spec: dict[str, Any]) -> str:
    """The name the adaptation stage gives a stream spec (``held_out_font``, ``contrast@3``)."""
    parts = [spec["shift"]] if spec.get("shift") else []
    if spec.get("corruption"):
        parts.append(f"{spec['corruption']}@{spec['severity']}")
    return "+".join(parts)


def _config(clip_dir: Path, shifts: list[dict[str, Any]], per_shift: int, edges_per_shift: int,
            device: str = "cpu", precision: str = "fp32") -> Any:
    """The adaptation run: one edge per shift (or ``edges_per_shift``); the train split is CoOp's
    labelled clean source (the first :data:`SOURCE_IMAGES` training-font images, all upright);
    ``device`` / ``precision``: the ``adapt`` section's (where every edge and the cloud phase run
    the CLIP)."""
    test_size = 36 * -(-2 * per_shift // 36)  # the stream and as many labelled images, whole blocks of classes
    return config_from_dict({
        "name": "adapt-tta", "seed": 0,
        "fleet": {"cloud": {"profile": "a100"},
                  "edges": [{"count": len(shifts) * edges_per_shift, "profile": "edge-server"}]},
        "data": glyph_data(SOURCE_IMAGES, test_size, styled=False), "model": MODEL,
        "adapt": {"checkpoint": str(clip_dir), "streams": shifts, "stream_samples": per_shift // edges_per_shift,
                  "batch_size": BATCH, "device": device, "precision": precision},
    })


def _run_method(clip_dir: Path, shifts: list[dict[str, Any]], per_shift: int, spec: dict[str, Any],
                engine: str, where: tuple[str, str] = ("cpu", "fp32")) -> dict[str, Any]:
    from cloudedge.adapt.stage import adapt
    from cloudedge.engine import make_engine

    overrides = {k: v for k, v in spec.items() if k != "edges_per_shift"}
    cfg = _config(clip_dir, shifts, per_shift, spec.get("edges_per_shift", 1), *where)
    with make_engine(engine) as eng:
        s = adapt(cfg, None, eng, **overrides).summary
    return {"acc_mean": s["acc_mean"], "acc_per_shift": s["acc_per_shift"], "ms_per_image": s["ms_per_image"],
            "cpu_ms_per_image": s["cpu_ms_per_image"], "peak_mem_mb": s["peak_mem_mb"], "episodic": s["episodic"],
            "prompt_bytes": s["prompt_bytes_up"] + s["prompt_bytes_down"], "edges": len(s["acc_per_edge"]),
            "timed_images": s["timed_images"]}


def merge_parts(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """One method's figures from runs of disjoint slices of its edges (``adapt.edges``): accuracies
    per shift joined, times per image weighted by the images each part timed, peak memory the
    largest, bytes and edges summed."""
    n = sum(p["timed_images"] for p in parts)

    def per_image(key: str) -> float | None:
        if any(p[key] is None for p in parts) or not n:
            return None
        return sum(p[key] * p["timed_images"] for p in parts) / n

    acc = {k: v for p in parts for k, v in p["acc_per_shift"].items()}
    return {"acc_mean": sum(acc.values()) / len(acc), "acc_per_shift": acc, "ms_per_image": per_image("ms_per_image"),
            "cpu_ms_per_image": per_image("cpu_ms_per_image"), "peak_mem_mb": max(p["peak_mem_mb"] for p in parts),
            "episodic": parts[0]["episodic"], "prompt_bytes": sum(p["prompt_bytes"] for p in parts),
            "edges": sum(p["edges"] for p in parts), "timed_images": n, "parts": len(parts)}


def _in_worker(args: tuple[Path, list[dict[str, Any]], int, dict[str, Any], str, tuple[str, str]]) -> dict[str, Any]:
    """:func:`_run_method` in a pool process (one torch thread, as in the parent)."""
    from cloudedge.engine import configure_threads

    configure_threads(1)
    return _run_method(*args)


def default_workers() -> int:
    """One process per core, at most 2: the benchmark's budget is set for a 2-core machine."""
    return max(1, min(2, os.cpu_count() or 1))


def run_methods(clip_dir: Path, shifts: list[dict[str, Any]], per_shift: int, specs: dict[str, dict[str, Any]],
                engine: str, workers: int, first: tuple[str, ...] = (),
                when_first: Callable[[dict[str, dict[str, Any]]], None] | None = None,
                where: tuple[str, str] = ("cpu", "fp32")) -> dict[str, dict[str, Any]]:
    """Every method in ``specs`` on the same streams, in ``workers`` processes (1: in this one);
    results in the order of ``specs``. ``when_first`` is called with the results of the methods named
    in ``first`` as soon as those are in (the gate), while the others run on. ``where``: the
    ``adapt`` section's device and precision.

    TPT, by far the longest run (64 views per image) and episodic (its edges never share), is split
    into ``workers`` runs of interleaved slices of the edges (``adapt.edges``: each edge streams the
    same images as in the whole run) and merged (:func:`merge_parts`), so that no single run is
    the critical path."""
    if workers <= 1 or engine != "local" or len(specs) == 1:
        results: dict[str, dict[str, Any]] = {}
        for name in [*first, *(n for n in specs if n not in first)]:
            results[name] = _run_method(clip_dir, shifts, per_shift, specs[name], engine, where)
            if when_first is not None and name in first and all(f in results for f in first):
                when_first({f: results[f] for f in first})
        return {name: results[name] for name in specs}
    jobs: list[tuple[str, dict[str, Any]]] = []
    for name in sorted(specs, key=lambda n: (n not in first, _method_name(specs[n]) != "tpt")):
        spec = specs[name]
        if _method_name(spec) == "tpt" and not spec.get("share_every"):
            edges = list(range(len(shifts) * spec.get("edges_per_shift", 1)))
            jobs += [(name, {**spec, "edges": edges[i::workers]}) for i in range(min(workers, len(edges)))]
        else:
            jobs.append((name, spec))
    # spawn, not fork: a forked child would inherit this process's torch thread pools and locks.
    with ProcessPoolExecutor(max_workers=min(workers, len(jobs)), mp_context=get_context("spawn")) as pool:
        futures = [(name, pool.submit(_in_worker, (clip_dir, shifts, per_shift, spec, engine, where)))
                   for name, spec in jobs]

        def collect(name: str) -> dict[str, Any]:
            parts = [f.result() for n, f in futures if n == name]
            return parts[0] if len(parts) == 1 else merge_parts(parts)

        if when_first is not None and first:
            when_first({f: collect(f) for f in first})
        return {name: collect(name) for name in specs}


def _method_name(spec: dict[str, Any]) -> str:
    method = spec.get("method")
    return method["name"] if isinstance(method, dict) else str(method)


def _mean(accs: dict[str, float], names: list[str]) -> float:
    return sum(accs[n] for n in names) / len(names)


def headroom(oracle: dict[str, float], zeroshot: dict[str, float], names: list[str]) -> dict[str, Any]:
    """The gate: the oracle CoOp's and zero-shot's mean accuracy over ``names`` (per-shift
    accuracies in [0, 1]), their gap in points, and whether it reaches :data:`GATE_POINTS`."""
    gate = {"oracle_coop": _mean(oracle, names), "zeroshot": _mean(zeroshot, names)}
    gate["headroom_points"] = 100.0 * (gate["oracle_coop"] - gate["zeroshot"])
    gate["holds"] = gate["headroom_points"] >= GATE_POINTS
    return gate


def run(quick: bool, out_dir: Path, checkpoint: str | None = None, engine: str = "local",
        workers: int | None = None, device: str = "cpu", precision: str = "fp32") -> dict[str, Any]:
    """Gate first, then every method on every shift; returns the benchmark's results dict.

    ``checkpoint``: a CLIP to adapt instead of the cached glyph CLIP: a directory of the glyph
    CLIP's architecture, or a local Hugging Face CLIP (a downloaded ViT-B/16: what TPT's published
    effect was measured on); ``engine``: local or ray; ``workers``: processes running methods side
    by side (default :func:`default_workers`; the ray engine runs them one after another);
    ``device`` / ``precision``: where the methods run the CLIP (``cuda`` and ``bf16`` on a GPU; the
    glyph CLIP is still built on the CPU, the same weights on every machine).
    """
    from cloudedge.engine import configure_threads

    raw_workers = workers
    try:
        workers = default_workers() if workers is None else int(workers)
    except (TypeError, ValueError):
        workers = 0
    if workers < 1:
        raise InputError(f"benchmark adapt-tta: --workers must be a whole number of at least 1 "
                         f"(processes), got {raw_workers!r}")
    # A bad device or precision fails here, before the build. The coordinator holds the CLIP too
    # (the cloud phase, CoOp's fit), so it needs the device whatever the engine.
    for option, value in (("device", device), ("precision", precision)):
        allowed = get_args(AdaptConfig.model_fields[option].annotation)
        if value not in allowed:
            raise InputError(f"benchmark adapt-tta --set {option}: one of {', '.join(allowed)} (got {value!r})")
    here = resolve_device(device, "benchmark adapt-tta --set device")
    where = (device, precision)  # auto: each worker's host decides (a Ray worker's may have a GPU)
    # One torch thread on a 2-core host: a second one mostly spins (docs/performance.md).
    configure_threads(None)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if checkpoint is not None:
        clip_dir, card = Path(checkpoint), {"given": str(checkpoint)}
    else:
        clip_dir, card = glyph_clip(quick)
    (out_dir / "model_card.json").write_text(json.dumps(card, indent=2))
    per_shift = 512 if quick else 2000
    main = SHIFTS if quick else SHIFTS + FULL_EXTRA
    shifts = main if quick else main + SEVERE
    names = [shift_name(s) for s in main]

    specs = {"zeroshot": METHODS["zeroshot"], "coop-oracle": {"method": "coop", "coop_fit": "shift"},
             **{name: spec for name, spec in METHODS.items() if name != "zeroshot"}}
    gate: dict[str, Any] = {}

    def print_gate(first: dict[str, dict[str, Any]]) -> None:
        gate.update(headroom(first["coop-oracle"]["acc_per_shift"], first["zeroshot"]["acc_per_shift"], names))
        print(f"adapt-tta gate: oracle CoOp {100 * gate['oracle_coop']:.1f} - zero-shot {100 * gate['zeroshot']:.1f} "
              f"= {gate['headroom_points']:+.1f} points (needs >= {GATE_POINTS:.0f}): "
              f"{'holds' if gate['holds'] else 'FAILS'}", flush=True)

    methods = run_methods(clip_dir, shifts, per_shift, specs, engine, workers, first=("zeroshot", "coop-oracle"),
                          when_first=print_gate, where=where)
    for m in methods.values():  # the mean over the main shifts; severity 5 apart
        m["acc_mean"] = _mean(m["acc_per_shift"], names)
        if not quick:
            m["acc_mean_severity5"] = _mean(m["acc_per_shift"], [shift_name(s) for s in SEVERE])
    acc = {k: 100.0 * v["acc_mean"] for k, v in methods.items()}
    cpu = {k: v["cpu_ms_per_image"] or 0.0 for k, v in methods.items()}
    return {
        "benchmark": "adapt-tta",
        "oracle_coop": gate["oracle_coop"], "headroom_points": gate["headroom_points"], "gate_holds": gate["holds"],
        "config": {"model": MODEL, "clip": card, "shifts": names,
                   "severity5_shifts": [] if quick else [shift_name(s) for s in SEVERE],
                   "images_per_shift": per_shift, "batch_size": BATCH, "seed": 0, "coop_source_images": SOURCE_IMAGES,
                   "gate_points": GATE_POINTS, "methods": METHODS, "workers": workers,
                   "device": here if engine == "local" else device,
                   "precision": precision},
        "methods": methods,
        "goals": {"swapprompt_minus_tpt": acc["swapprompt"] - acc["tpt"],
                  "swapprompt_minus_zeroshot": acc["swapprompt"] - acc["zeroshot"],
                  "coop_minus_swapprompt": acc["coop"] - acc["swapprompt"],
                  "swapprompt_cpu_ms_over_tpt_cpu_ms": cpu["swapprompt"] / max(cpu["tpt"], 1e-9)},
    }
