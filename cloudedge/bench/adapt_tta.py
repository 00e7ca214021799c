"""Benchmark ``adapt-tta``: test-time prompt adaptation of the bundled CLIP on corrupted digits.

1. Pre-train a small CLIP on clean digit image-caption pairs through the pre-training stage
   (``cloudedge.pretrain``, task ``clip``, cloud + one edge, synchronous), on the train split
   (half of the 1,797 digits). Cached in ``out_dir/clip-pretrained`` keyed by its config, or
   given with ``checkpoint=``.
2. One edge per shift: every corruption in ``cloudedge.data.CORRUPTIONS`` at severity 3 and 5,
   applied to the held-out test split, streamed in a seeded order in batches of 32.
3. Methods side by side on the same streams: zeroshot, coop (context fitted on the labelled clean
   train split by the cloud), tpt (episodic), swapprompt (online), tda (training-free caches), and
   swapprompt-shared (edges average their prompts through the cloud after every batch).

Reported per method: mean top-1 over shifts, top-1 per shift, milliseconds per image of wall time
and of this process's CPU time (the steadier of the two on a shared CPU), peak tensor memory of an adaptation step (MB; the frozen model's weights excluded).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from cloudedge.config import config_from_dict

MODEL = {"kind": "clip", "hidden": 64, "layers": 2, "heads": 4, "context": 32, "image_size": 8, "patch_size": 2,
         "channels": 1, "projection_dim": 64}
DATA = {"source": "digits", "test_fraction": 0.5}
SEVERITIES = (3, 5)
METHODS: dict[str, dict[str, Any]] = {
    "zeroshot": {"method": "zeroshot"},
    "coop": {"method": "coop"},
    "tpt": {"method": "tpt"},
    "swapprompt": {"method": "swapprompt"},
    "tda": {"method": "tda"},
    "swapprompt-shared": {"method": "swapprompt", "share_every": 1},
}


def pretrain_config(quick: bool) -> dict[str, Any]:
    """The CLIP pre-training run (the same for quick and full: 300 rounds overfit the 899 captions,
    validation loss 2.85 against 2.46 after 100)."""
    del quick
    return {
        "name": "adapt-tta-clip", "seed": 0,
        "fleet": {"cloud": {"profile": "a100"}, "edges": [{"count": 1, "profile": "edge-server"}]},
        "data": DATA, "model": MODEL,
        "pretrain": {"task": "clip", "workers": ["cloud", "edge"], "global_batch": 128,
                     "rounds": 100, "lr": 2e-3, "weight_decay": 0.1, "warmup_rounds": 10,
                     "eval_every": 50, "checkpoint_every": 1000},
    }


def pretrained_clip(quick: bool, out_dir: Path) -> tuple[Path, dict[str, Any]]:
    """The pre-trained CLIP's directory (trained now through ``cloudedge.pretrain`` unless cached)."""
    from cloudedge.models import save_local
    from cloudedge.pretrain import pretrain

    raw = pretrain_config(quick)
    key = hashlib.sha256(json.dumps(raw, sort_keys=True).encode()).hexdigest()[:16]
    directory = out_dir / f"clip-pretrained-{key}"
    info_path = directory / "pretrain.json"
    if info_path.is_file() and (directory / "config.json").is_file():
        return directory, json.loads(info_path.read_text())
    result = pretrain(config_from_dict(raw))
    save_local(result.model, directory)
    info = {"config": raw["pretrain"], "final_val_loss": result.summary["final_val_loss"], "cached": False}
    info_path.write_text(json.dumps(info, indent=2))
    return directory, info


def run(quick: bool, out_dir: Path, checkpoint: str | None = None, engine: str = "local") -> dict[str, Any]:
    """Run every method on every shift; returns the benchmark's results dict.

    ``checkpoint``: a CLIP directory to adapt instead of pre-training one; ``engine``: local or ray.
    """
    from cloudedge.adapt.loop import adapt
    from cloudedge.data import CORRUPTIONS
    from cloudedge.engine import make_engine

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if checkpoint is not None:
        clip_dir, pre_info = Path(checkpoint), {"given": str(checkpoint)}
    else:
        clip_dir, pre_info = pretrained_clip(quick, out_dir)
    streams = [{"corruption": c, "severity": s} for s in SEVERITIES for c in CORRUPTIONS]
    stream_samples = 64 if quick else 300  # >= 2 batches: the first measures memory, the rest are timed
    cfg = config_from_dict({
        "name": "adapt-tta", "seed": 0,
        "fleet": {"cloud": {"profile": "a100"}, "edges": [{"count": len(streams), "profile": "edge-server"}]},
        "data": DATA, "model": MODEL,
        "adapt": {"checkpoint": str(clip_dir), "streams": streams, "stream_samples": stream_samples,
                  "batch_size": 32},
    })
    methods: dict[str, Any] = {}
    for name, overrides in METHODS.items():
        with make_engine(engine) as eng:
            s = adapt(cfg, None, eng, **overrides).summary
        methods[name] = {
            "acc_mean": s["acc_mean"], "acc_per_shift": s["acc_per_shift"], "ms_per_image": s["ms_per_image"],
            "cpu_ms_per_image": s["cpu_ms_per_image"],
            "peak_mem_mb": s["peak_mem_mb"], "episodic": s["episodic"],
            "prompt_bytes": s["prompt_bytes_up"] + s["prompt_bytes_down"], "cost_model": s["cost_model"],
        }
    zs, tpt, sp, coop = (methods[m]["acc_mean"] for m in ("zeroshot", "tpt", "swapprompt", "coop"))
    return {
        "benchmark": "adapt-tta",
        "config": {"model": MODEL, "pretrain": pre_info, "shifts": [f"{s['corruption']}@{s['severity']}" for s in streams],
                   "images_per_shift": stream_samples, "batch_size": 32, "seed": 0,
                   "methods": {k: v for k, v in METHODS.items()}},
        "methods": methods,
        "goals": {"swapprompt_minus_tpt": sp - tpt, "swapprompt_minus_zeroshot": sp - zs,
                  "coop_minus_swapprompt": coop - sp,
                  "swapprompt_ms_over_tpt_ms": (methods["swapprompt"]["ms_per_image"] or 0)
                  / max(methods["tpt"]["ms_per_image"] or 1e-9, 1e-9),
                  "swapprompt_cpu_ms_over_tpt_cpu_ms": (methods["swapprompt"]["cpu_ms_per_image"] or 0)
                  / max(methods["tpt"]["cpu_ms_per_image"] or 1e-9, 1e-9)},
    }
