"""A CLIP worth adapting: the bundled small CLIP pre-trained on captioned ``glyphs``, built once and cached.

Test-time prompt adaptation only has something to show when the frozen CLIP reads its source
domain well and loses accuracy under a shift. This module pre-trains such a CLIP through the
pre-training stage (``cloudedge.pretrain``, task ``clip``): 36 characters (``alnum``) rendered in
colour at 28 px from the training fonts (``computer-modern`` held out: a font shift for later),
each paired with a caption naming its class (and, for some, attributes: face, weight, slant,
colours, size, pose). A share of the images is drawn upside down, mirrored or sideways and captioned
so (:data:`STYLES`): the styles a prompt can learn to name at test time. Then it measures the
zero-shot accuracy ("a photo of a {digit seven}.") on clean test images of the training fonts and of
the held-out fonts, and per style under the plain prompt and the one naming it, and writes a model
card.

The result is cached under ``$XDG_CACHE_HOME/cloudedge/clip/<hash>`` (default ``~/.cache``), the
hash over everything that determines the weights (the whole pre-training config and a format
version); it is built in a temporary folder and renamed into place, so a concurrent reader sees a
whole model or none. ``quick`` is a smaller build of the same recipe (fewer images and rounds).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from cloudedge.config import config_from_dict

# Bump whenever the build recipe changes in a way the config below does not show.
GLYPH_CLIP_VERSION = 3
# Patches of 4 px (49 per image): strokes of a 28 px character are 2-4 px wide, and with 7 px patches
# the same recipe learned the class about half as fast per step (measured, docs/prompt-tuning.md).
MODEL: dict[str, Any] = {"kind": "clip", "hidden": 64, "layers": 2, "heads": 4, "context": 48, "image_size": 28,
                         "patch_size": 4, "channels": 3, "projection_dim": 64}
# Share of class-only captions: see cloudedge.data.glyph_attrs.glyph_captions.
PLAIN_CAPTIONS = 0.75
HELD_OUT_FONTS = ["computer-modern"]
# Named styles (cloudedge.data.glyph_styles) a share of the training images is drawn in, each captioned
# with its style ("an upside-down photo of a digit seven."): what the CLIP can read but a plain
# prompt does not say, the room test-time prompt adaptation has (docs/prompt-tuning.md). 30%: one
# image in ten per style, and the class is still learned (57% clean zero-shot quick, 77% full;
# photometric styles named this way left no room, measured there).
STYLES = ["upside_down", "mirrored", "sideways"]
STYLE_FRACTION = 0.3
# Views for the augmenting methods (TPT and SwapPrompt alike) on these 28 px glyphs, chosen on clean
# source images: crops of half the area and 15 degrees keep a character readable, and two such views
# of one image disagree often enough to teach something (docs/prompt-tuning.md).
GLYPH_VIEWS: dict[str, Any] = {"crop_scale": [0.5, 1.0], "degrees": 15.0, "brightness": 0.25, "contrast": 0.5}
CARD = "model_card.json"
# A width-64 model's matmuls on batches of 64 gain from a second core; more is not measured.
MAX_BUILD_THREADS = 4


def glyph_data(train_size: int, test_size: int, styled: bool = True) -> dict[str, Any]:
    """The ``data`` section: colour ``alnum`` glyphs at 28 px, Computer Modern held out; ``styled``:
    :data:`STYLE_FRACTION` of the train images in the named :data:`STYLES` (False: all upright)."""
    glyphs: dict[str, Any] = {"classes": "alnum", "channels": 3, "train_size": train_size, "test_size": test_size,
                              "held_out_fonts": list(HELD_OUT_FONTS), "plain_captions": PLAIN_CAPTIONS}
    if styled:
        glyphs.update(styles=list(STYLES), style_fraction=STYLE_FRACTION)
    return {"source": "glyphs", "image_size": 28, "glyphs": glyphs}


def pretrain_config(quick: bool) -> dict[str, Any]:
    """The CLIP's pre-training run: cloud only, synchronous AdamW 1e-3 on batches of 64 pairs.

    lr 1e-3: at 2e-3 the loss sat longer on its ln(batch) plateau and zero-shot rose slower
    (measured, docs/prompt-tuning.md). Quick: 1,800 rounds, what fits in about 110 s with two
    threads on an idle 2-core machine (the build target is 2 minutes); the oracle gate then held
    for each of three build seeds, where at 1,500 rounds it did not (docs/prompt-tuning.md).
    """
    train_size, rounds = (14_400, 1800) if quick else (43_200, 4000)
    return {
        "name": "glyph-clip", "seed": 0,
        "fleet": {"cloud": {"profile": "a100"}, "edges": [{"count": 1, "profile": "edge-server"}]},
        "data": glyph_data(train_size, 1_440), "model": MODEL,
        "pretrain": {"task": "clip", "workers": ["cloud"], "global_batch": 64, "rounds": rounds, "lr": 1e-3,
                     "weight_decay": 0.1, "warmup_rounds": 10, "eval_every": rounds, "checkpoint_every": 100_000},
    }


def cache_root() -> Path:
    """``$XDG_CACHE_HOME/cloudedge/clip`` (``~/.cache/cloudedge/clip`` when unset)."""
    root = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(root) / "cloudedge" / "clip"


def cache_key(raw: dict[str, Any]) -> str:
    """The cache folder's name: a hash of the build config and :data:`GLYPH_CLIP_VERSION`."""
    blob = json.dumps({"version": GLYPH_CLIP_VERSION, "config": raw}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def zero_shot_accuracy(model_dir: Path | Any, images: torch.Tensor, labels: torch.Tensor, classes: list[str],
                       style: str | None = None) -> float:
    """Top-1 of the single-template zero-shot prompt on ``images`` (as the adaptation stage names
    classes); with ``style``, of the prompt that names it ("an upside-down photo of a digit seven.").
    ``model_dir``: the CLIP's directory, or a loaded ``ClipAdapter`` (the card scores several sets)."""
    from cloudedge.adapt.clip_model import ClipAdapter, load_clip
    from cloudedge.adapt.methods import ZeroShot
    from cloudedge.config.model import ModelConfig
    from cloudedge.data.glyph_attrs import class_phrase
    from cloudedge.data.glyph_styles import style_template

    clip = model_dir if isinstance(model_dir, ClipAdapter) else load_clip(model_dir, ModelConfig(**MODEL))
    templates = {} if style is None else {"templates": [style_template(style)]}
    zs = ZeroShot(clip, [class_phrase(c) for c in classes], **templates)
    correct = 0
    with torch.no_grad():
        for start in range(0, len(images), 512):
            logits = zs.predict_batch(images[start:start + 512])
            correct += int((logits.argmax(-1).cpu() == labels[start:start + 512]).sum())
    return correct / len(images)


def _style_scores(clip: Any, held_in: Any) -> dict[str, dict[str, float]]:
    """Per style: zero-shot on the held-in test images turned that way, plain prompt and the one naming it."""
    from cloudedge.data.glyph_styles import apply_style

    scores = {}
    for name in STYLES:
        turned = apply_style(held_in.x, name)
        scores[name] = {"plain_prompt": zero_shot_accuracy(clip, turned, held_in.y, held_in.classes),
                        "style_prompt": zero_shot_accuracy(clip, turned, held_in.y, held_in.classes, name)}
    return scores


def _card(raw: dict[str, Any], summary: dict[str, Any], model_dir: Path, build_s: float,
          build_cpu_s: float, threads: int) -> dict[str, Any]:
    from cloudedge.adapt.clip_model import load_clip
    from cloudedge.config.glyphs import GlyphsConfig
    from cloudedge.config.model import ModelConfig
    from cloudedge.data.glyphs import glyph_specs, glyph_split

    gcfg = GlyphsConfig(**raw["data"]["glyphs"])
    train_spec, font_spec = glyph_specs(gcfg, raw["data"]["image_size"])
    held_in = glyph_split(train_spec, "test", gcfg.test_size, gcfg.cache)
    held_out = glyph_split(font_spec, "test", gcfg.test_size, gcfg.cache)
    p = raw["pretrain"]
    clip = load_clip(model_dir, ModelConfig(**MODEL))  # once for every score on the card
    return {
        "model": MODEL,
        "data": {"source": "glyphs", **raw["data"]["glyphs"], "image_size": raw["data"]["image_size"],
                 "captions": f"{STYLE_FRACTION:.0%} of the images drawn in a named style ({', '.join(STYLES)}) with "
                             "a caption naming it ('an upside-down photo of a digit seven.'); of the others "
                             f"{PLAIN_CAPTIONS:.0%} class only ('a photo of a digit seven.'), the rest class, size, "
                             "stroke, face, tilt, position and colours (cloudedge.data.glyph_attrs)"},
        "training": {"stage": "cloudedge.pretrain", "task": "clip", "rounds": p["rounds"],
                     "global_batch": p["global_batch"], "pairs_seen": p["rounds"] * p["global_batch"],
                     "lr": p["lr"], "weight_decay": p["weight_decay"], "seed": raw["seed"],
                     "final_val_loss": summary.get("final_val_loss"), "build_wall_s": round(build_s, 1),
                     "build_cpu_s": round(build_cpu_s, 1), "torch_threads": threads},
        "zero_shot": {"prompt": "a photo of a {digit seven | letter A}.",
                      "clean_held_in_fonts": zero_shot_accuracy(clip, held_in.x, held_in.y, held_in.classes),
                      "clean_held_out_fonts": zero_shot_accuracy(clip, held_out.x, held_out.y, held_out.classes),
                      "test_images": gcfg.test_size, "styles": _style_scores(clip, held_in)},
    }


def build_threads() -> int:
    """torch threads for a build: every core, up to :data:`MAX_BUILD_THREADS`.

    The build is one model trained alone in its process (the benchmark's method processes start
    after it), so a free second core helps: the quick build took 89 s with two threads against
    114 s with one on an idle 2-core machine. On a host busy with other work a second thread can be
    slower (docs/performance.md, Finding 1): pass ``threads`` to :func:`glyph_clip` there."""
    return max(1, min(MAX_BUILD_THREADS, os.cpu_count() or 1))


def glyph_clip(quick: bool, use_cache: bool = True, threads: int | None = None) -> tuple[Path, dict[str, Any]]:
    """The pre-trained glyph CLIP's directory and its model card (built now unless cached).

    ``threads``: torch threads for the build (default :func:`build_threads`), restored after; the
    card records them. The weights differ between thread counts by float rounding only, and the
    cache key does not include them. The card's ``cached`` says whether this call found it built.
    """
    from cloudedge.engine import torch_threads
    from cloudedge.models import save_local
    from cloudedge.pretrain import pretrain

    raw = pretrain_config(quick)
    directory = cache_root() / cache_key(raw)
    card_path = directory / CARD
    if use_cache and card_path.is_file() and (directory / "config.json").is_file():
        return directory, {**json.loads(card_path.read_text()), "cached": True, "path": str(directory)}
    with torch_threads(build_threads() if threads is None else threads) as used:
        t0 = time.perf_counter()
        cpu0 = time.process_time()
        result = pretrain(config_from_dict(raw))
        build_cpu_s = time.process_time() - cpu0
        build_s = time.perf_counter() - t0
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        save_local(result.model, tmp)
        card = _card(raw, result.summary, tmp, build_s, build_cpu_s, used)
        (tmp / CARD).write_text(json.dumps(card, indent=2))
        if directory.exists():  # built by someone else meanwhile, or an unusable leftover: replace it
            shutil.rmtree(directory, ignore_errors=True)
        os.replace(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory, {**card, "cached": False, "path": str(directory)}
