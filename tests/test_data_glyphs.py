"""The ``glyphs`` source: per-image determinism, balance, font domains, captions, cache, corruptions."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from cloudedge.config import DataConfig, config_from_dict
from cloudedge.config.glyphs import GlyphsConfig
from cloudedge.data import build_dataset, partition
from cloudedge.data import glyphs as glyphs_mod
from cloudedge.data.glyph_attrs import FACES, FAMILY_IDS, PoseRanges, draw_attributes, glyph_captions
from cloudedge.data.glyphs import cache_dir, glyph_specs, glyph_split, load_glyphs, render_glyphs
from cloudedge.data.shifts import CORRUPTIONS, corrupt
from cloudedge.errors import InputError
from cloudedge.pretrain.clip_task import clip_batch

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _own_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    return tmp_path / "xdg"


def _spec(channels: int = 1, size: int = 28, classes: str = "digits"):
    return glyph_specs(GlyphsConfig(classes=classes, channels=channels), size)[0]


def test_same_seed_and_index_give_the_same_pixels_whatever_else_is_generated(monkeypatch):
    spec = _spec(channels=3)
    whole, attrs = render_glyphs(spec, "train", np.arange(120))
    picked = np.array([117, 3, 64, 0, 64])
    again, again_attrs = render_glyphs(spec, "train", picked)
    assert torch.equal(again, whole[picked])
    assert torch.equal(again_attrs["face"], attrs["face"][picked])
    # Chunking (how many images render at once) does not matter either.
    monkeypatch.setattr(glyphs_mod, "PIXELS_PER_CHUNK", 7 * 56 * 56)
    assert torch.equal(render_glyphs(spec, "train", np.arange(120))[0], whole)
    # Nor does how many images the split has, or the order splits are built in.
    test_first = glyph_split(spec, "test", 30, use_cache=False)
    assert torch.equal(glyph_split(spec, "train", 50, use_cache=False).x, whole[:50].float() / 255)
    assert torch.equal(glyph_split(spec, "test", 10, use_cache=False).x, test_first.x[:10])
    # Another split, seed or face set gives other images.
    assert not torch.equal(test_first.x[:10], whole[:10].float() / 255)
    other_seed = glyph_specs(GlyphsConfig(channels=3, seed=1), 28)[0]
    assert not torch.equal(render_glyphs(other_seed, "train", np.arange(10))[0], whole[:10])


def test_images_are_glyph_like():
    x, _ = render_glyphs(_spec(), "train", np.arange(40))
    ink = x.float() / 255
    assert x.shape == (40, 1, 28, 28) and x.dtype == torch.uint8
    # Ink covers a minority of the image, mostly away from the border, and every image has some.
    assert float(ink.mean()) < 0.35 and bool((ink.amax(dim=(1, 2, 3)) > 0.5).all())
    assert float(ink[..., 10:18, 10:18].mean()) > 2 * float(ink[..., :3, :].mean())


def test_classes_and_families_are_balanced():
    spec = _spec(classes="alnum")
    attrs = draw_attributes(spec.seed, "train", np.arange(36 * 5 * 4), 36, spec.faces, spec.ranges, 1)
    assert torch.equal(torch.bincount(attrs["label"], minlength=36), torch.full((36,), 20))
    assert torch.equal(torch.bincount(attrs["family"], minlength=5), torch.full((5,), 144))
    pairs = attrs["label"] * 5 + attrs["family"]
    assert torch.equal(torch.bincount(pairs, minlength=36 * 5), torch.full((36 * 5,), 4))
    assert len(set(attrs["face"].tolist())) == len(FACES)  # every one of the 21 faces is drawn


def test_font_families_are_domains_the_partitioner_deals():
    cfg = DataConfig(source="glyphs", glyphs={"train_size": 300, "test_size": 50})
    assert cfg.image_size == 28  # the glyph default (the digits keep 8)
    train, test = build_dataset(cfg, seed=0)
    assert train.x.shape == (300, 1, 28, 28) and len(test) == 50
    assert train.classes[7] == "seven" and set(train.domains.tolist()) == set(range(len(FAMILY_IDS)))
    parts = partition(train.y.numpy(), 5, "domain", seed=0, domains=train.domains.numpy())
    held = [set(train.domains[p].tolist()) for p in parts]
    assert all(len(h) == 1 for h in held) and set().union(*held) == set(range(5))


def test_held_out_fonts_appear_only_in_test():
    cfg = GlyphsConfig(train_size=100, test_size=40, held_out_fonts=["Computer Modern", "dejavu-serif-bold"])
    train, test = load_glyphs(cfg, 16)
    cm, serif = FAMILY_IDS.index("computer-modern"), FAMILY_IDS.index("dejavu-serif")
    assert cm not in train.domains.tolist() and set(test.domains.tolist()) <= {cm, serif}
    bold = [i for i, f in enumerate(FACES) if f.id == "dejavu-serif-bold"][0]
    assert bold not in train.meta["face"].tolist() and bold in test.meta["face"].tolist()
    only = load_glyphs(GlyphsConfig(train_size=20, test_size=5, fonts=["stix-italic"]), 16)[0]
    assert set(only.meta["face"].tolist()) == {FACES.index(next(f for f in FACES if f.id == "stix-italic"))}
    with pytest.raises(InputError, match="data.glyphs.fonts: unknown font 'comic-sans'"):
        load_glyphs(GlyphsConfig.model_construct(fonts=["comic-sans"]), 28)
    with pytest.raises(InputError, match=r"cfg.yaml: data.glyphs.held_out_fonts: unknown font 'comic' \(families"):
        config_from_dict({"data": {"source": "glyphs", "glyphs": {"held_out_fonts": ["stix", "comic"]}}},
                         source="cfg.yaml")
    with pytest.raises(InputError, match="no font is left"):
        load_glyphs(GlyphsConfig(fonts=["stix"], held_out_fonts=["stix"]), 28)


def test_captions_name_the_attributes_and_exceed_ten_thousand_distinct():
    spec = _spec()
    n = 40_000
    start = time.perf_counter()
    attrs = draw_attributes(spec.seed, "train", np.arange(n), 10, spec.faces, spec.ranges, 1)
    caps = glyph_captions(attrs["label"], train_classes := [*"zero one two three four five six seven eight nine".split()],
                          attrs, seed=0)
    assert time.perf_counter() - start < 30  # attributes only: no pixel is rendered (generous bound)
    assert len(set(caps)) > 10_000
    assert "digit seven" in caps[7] and FACES[int(attrs["face"][7])].phrase in caps[7]
    rgb = glyph_specs(GlyphsConfig(channels=3), 28)[0]
    rgb_attrs = draw_attributes(0, "train", np.arange(50), 10, rgb.faces, rgb.ranges, 3)
    assert " on " in glyph_captions(rgb_attrs["label"], train_classes, rgb_attrs, seed=0)[0]
    # The CLIP task's batches use them when the dataset carries the attributes.
    ds = glyph_split(spec, "train", 12, use_cache=False)
    batch = clip_batch(ds.x, ds.y, ds.classes, seed=0, max_len=128, meta=ds.meta)
    plain = clip_batch(ds.x, ds.y, ds.classes, seed=0, max_len=128)
    assert not torch.equal(batch["input_ids"], plain["input_ids"]) and batch["input_ids"].shape[1] > 40


def test_a_second_load_reads_the_cache(monkeypatch, _own_cache):
    cfg = GlyphsConfig(train_size=64, test_size=16)
    first = load_glyphs(cfg, 28)
    files = sorted(cache_dir().glob("*.safetensors"))
    assert cache_dir() == _own_cache / "cloudedge" / "glyphs" and len(files) == 2
    stamps = [f.stat().st_mtime_ns for f in files]

    def no_render(*args, **kwargs):
        raise AssertionError("rendered again instead of reading the cache")

    monkeypatch.setattr(glyphs_mod, "render_glyphs", no_render)
    second = load_glyphs(cfg, 28)
    assert torch.equal(first[0].x, second[0].x) and torch.equal(first[1].meta["rotation"], second[1].meta["rotation"])
    assert [f.stat().st_mtime_ns for f in files] == stamps
    # Other parameters are another file; a damaged file is rendered again.
    with pytest.raises(AssertionError, match="rendered again"):
        load_glyphs(cfg.model_copy(update={"rotation": 30.0}), 28)
    monkeypatch.undo()
    monkeypatch.setenv("XDG_CACHE_HOME", str(_own_cache))
    files[0].write_bytes(files[0].read_bytes()[:100])
    third = load_glyphs(cfg, 28)
    assert torch.equal(third[0].x, first[0].x) and torch.equal(third[1].x, first[1].x)


WRITER = """
import sys, numpy as np
from cloudedge.config.glyphs import GlyphsConfig
from cloudedge.data.glyphs import cache_dir, glyph_specs, glyph_split, write_atomically
spec = glyph_specs(GlyphsConfig(), 28)[0]
ds = glyph_split(spec, "train", 400)  # both writers render and cache the same split at once
path = cache_dir() / "race.safetensors"
for _ in range(int(sys.argv[1])):
    write_atomically(path, {"pixels": (ds.x * 255).round().to(__import__("torch").uint8)}, {"params": "p"})
print(float(ds.x.sum()))
"""


def test_concurrent_writers_never_expose_a_partial_file(_own_cache):
    from safetensors.torch import load_file

    expected = (glyph_split(_spec(), "train", 400, use_cache=False).x * 255).round().to(torch.uint8)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "XDG_CACHE_HOME": str(_own_cache)}
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, "25"], env=env, stdout=subprocess.PIPE, text=True)
             for _ in range(2)]
    race = cache_dir() / "race.safetensors"
    reads = 0
    while any(p.poll() is None for p in procs):
        if race.exists():
            assert torch.equal(load_file(race)["pixels"], expected)  # raises on a partial file
            reads += 1
        time.sleep(0.002)  # leave the two cores to the writers
    outs = [p.communicate(timeout=60)[0].strip() for p in procs]
    assert all(p.returncode == 0 for p in procs) and outs[0] == outs[1]
    assert reads > 0 and torch.equal(load_file(race)["pixels"], expected)
    assert not list(cache_dir().glob("*.tmp"))  # no temporary file is left behind
    cached = glyph_split(_spec(), "train", 400)  # the split both writers cached reads back whole
    assert torch.equal((cached.x * 255).round().to(torch.uint8), expected)


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("size", [28, 32])
def test_corruptions_work_at_glyph_sizes(size, channels):
    spec = glyph_specs(GlyphsConfig(channels=channels, noise=0.0, blur=0.0), size)[0]
    x = render_glyphs(spec, "train", np.arange(48))[0].float() / 255
    for name in CORRUPTIONS:
        distortion = []
        for severity in range(1, 6):
            out = corrupt(x, name, severity, seed=3)
            assert out.shape == x.shape and float(out.min()) >= 0.0 and float(out.max()) <= 1.0
            distortion.append(float((out - x).abs().mean()))
        assert distortion[0] > 1e-3, f"{name} at {size} px leaves the images unchanged"
        slack = 0.02 * distortion[-1]
        assert all(hi >= lo - slack for lo, hi in zip(distortion, distortion[1:], strict=False)), (name, distortion)
        assert distortion[-1] > 1.3 * distortion[0], f"{name} at {size} px: severity barely matters {distortion}"


def test_example_config_pretrains_clip_on_glyphs(tmp_path):
    from cloudedge.config import load_config
    from cloudedge.pretrain.stage import pretrain

    cfg = load_config(ROOT / "configs" / "pretrain-glyphs.yaml")
    data = cfg.data.model_dump()
    data["glyphs"].update(train_size=240, test_size=40)
    small = config_from_dict({**cfg.model_dump(mode="json"), "data": data,
                              "pretrain": {**cfg.pretrain.model_dump(mode="json"), "rounds": 1, "global_batch": 16,
                                                              "eval_every": 1, "eval_samples": 16}})
    result = pretrain(small, tmp_path / "run")
    assert np.isfinite(result.summary["final_val_loss"]) and not result.summary["excluded"]


def test_pose_ranges_zero_give_upright_centred_glyphs():
    still = PoseRanges(rotation=0, scale=0, shear=0, shift=0, stroke=0, blur=0, noise=0)
    spec = glyph_specs(GlyphsConfig(), 28)[0]
    calm = type(spec)(**{**spec.__dict__, "ranges": still, "elastic": 0.0})
    ink = render_glyphs(calm, "train", np.arange(20))[0][:, 0] > 127
    for img in ink:  # without pose, a glyph's box is centred and its longer side is 70% of the image
        rows, cols = torch.nonzero(img.any(dim=1)).flatten(), torch.nonzero(img.any(dim=0)).flatten()
        assert abs((rows[0] + rows[-1]) / 2 - 13.5) <= 1.5 and abs((cols[0] + cols[-1]) / 2 - 13.5) <= 1.5
        assert 17 <= max(rows[-1] - rows[0], cols[-1] - cols[0]) + 1 <= 22


def test_a_share_of_captions_names_only_the_class():
    spec = glyph_specs(GlyphsConfig(classes="alnum", channels=3), 28)[0]
    attrs = draw_attributes(0, "train", np.arange(2000), 36, spec.faces, spec.ranges, 3)
    classes = glyph_split(spec, "test", 1, use_cache=False).classes
    rich = glyph_captions(attrs["label"], classes, attrs, seed=0)
    mixed = glyph_captions(attrs["label"], classes, attrs, seed=0, plain_fraction=0.75)
    short = [c for c in mixed if c.count(" ") <= 5]
    assert 0.70 < len(short) / len(mixed) < 0.80  # class-only: "a photo of a digit seven."
    assert all(c.rstrip(".").endswith(("digit " + classes[int(y)], "letter " + classes[int(y)]))
               for c, y in zip(mixed, attrs["label"], strict=True) if c in short)
    assert all(r == m for r, m in zip(rich, mixed, strict=True) if m not in short)  # the rest unchanged
    assert glyph_captions(attrs["label"], classes, attrs, seed=0, plain_fraction=0.0) == rich
    # The config knob reaches the captions the pre-training stage deals to its workers.
    from cloudedge.fleet import Fleet
    from cloudedge.pretrain.shards import build_shards

    def caption_lengths(plain: float) -> torch.Tensor:
        cfg = config_from_dict({
            "data": {"source": "glyphs", "glyphs": {"classes": "alnum", "channels": 3, "train_size": 72,
                                                     "test_size": 36, "plain_captions": plain, "cache": False}},
            "model": {"kind": "clip", "hidden": 16, "layers": 1, "heads": 2, "context": 48, "image_size": 28,
                      "patch_size": 7, "channels": 3, "projection_dim": 16},
            "pretrain": {"task": "clip", "workers": ["cloud"]}})
        shards = build_shards(cfg, cfg.pretrain, [Fleet.from_config(cfg.fleet, cfg.seed).cloud], seq_len=48)
        return shards.train["cloud"]["attention_mask"].sum(1)

    from cloudedge.data.glyph_attrs import PLAIN_TEMPLATES, class_phrase

    longest_plain = max(len(t.format(what=class_phrase(c))) for t in PLAIN_TEMPLATES for c in classes)
    assert caption_lengths(1.0).max() <= 2 + longest_plain  # BOS + a class-only caption + EOS
    assert caption_lengths(0.0).float().mean() > 40  # attribute captions fill the text context
    with pytest.raises(InputError, match="plain_captions"):
        config_from_dict({"data": {"source": "glyphs", "glyphs": {"plain_captions": 1.5}}})


def test_named_styles_restyle_a_seeded_share_of_train_images_and_their_captions_say_so():
    from cloudedge.data.glyph_styles import STYLE_NAMES, apply_style, stylize
    from cloudedge.data.glyphs import load_glyphs

    cfg = GlyphsConfig(classes="alnum", channels=3, train_size=400, test_size=36, cache=False,
                       styles=["upside_down", "mirrored"], style_fraction=0.3)
    train, test = load_glyphs(cfg, 28)
    plain = glyph_split(glyph_specs(cfg, 28)[0], "train", 400, use_cache=False)
    style = train.meta["style"]
    assert torch.equal(train.y, plain.y) and "style" not in test.meta  # the test split stays upright
    assert 0.22 < float((style >= 0).float().mean()) < 0.38
    assert set(style.unique().tolist()) == {-1, STYLE_NAMES.index("upside_down"), STYLE_NAMES.index("mirrored")}
    for k, name in enumerate(STYLE_NAMES):
        idx = style == k
        if idx.any():
            assert torch.equal(train.x[idx], apply_style(plain.x[idx], name))
    assert torch.equal(train.x[style < 0], plain.x[style < 0])
    again = stylize(plain, ["upside_down", "mirrored"], 0.3, seed=0)
    assert torch.equal(again.x, train.x) and torch.equal(again.meta["style"], style)
    # Upside down twice is upright; a mirror image differs from the picture.
    assert torch.equal(apply_style(apply_style(plain.x, "upside_down"), "upside_down"), plain.x)
    assert (apply_style(plain.x, "mirrored") - plain.x).abs().mean() > 0.02
    # Captions name the style for the styled pictures, and only for them.
    captions = glyph_captions(train.y, train.classes, train.meta, seed=0, plain_fraction=0.75)
    for c, s, y in zip(captions, style.tolist(), train.y.tolist(), strict=True):
        named = c.startswith(("an upside-down photo of a ", "a mirrored photo of a "))
        assert named == (s >= 0)
        if named:
            assert c.endswith(f" {train.classes[y]}.")
    with pytest.raises(InputError, match="styles.*unknown style 'flipped'"):
        config_from_dict({"data": {"source": "glyphs", "glyphs": {"styles": ["flipped"]}}})
    with pytest.raises(InputError, match="style_fraction needs styles"):
        config_from_dict({"data": {"source": "glyphs", "glyphs": {"style_fraction": 0.2}}})
