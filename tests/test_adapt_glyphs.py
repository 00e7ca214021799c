"""Test-time adaptation on glyphs: label-preserving shifts, streams, balanced swapped targets,
prompt sharing within a shift, the headroom gate and the cached glyph CLIP."""

from __future__ import annotations

import pytest
import torch

from cloudedge.config import config_from_dict
from cloudedge.config.glyphs import GlyphsConfig
from cloudedge.data.glyph_attrs import BACKGROUNDS, FOREGROUNDS
from cloudedge.data.glyph_shifts import UNSEEN_COLOURS, ink_and_colours, shift_glyphs
from cloudedge.data.glyphs import glyph_specs, glyph_split
from cloudedge.errors import InputError

GLYPHS = {"classes": "alnum", "channels": 3, "train_size": 72, "test_size": 144,
          "held_out_fonts": ["computer-modern"], "cache": False}


@pytest.fixture(scope="module")
def glyphs():
    train_spec, _ = glyph_specs(GlyphsConfig(**GLYPHS), 16)
    return glyph_split(train_spec, "test", 72, use_cache=False)


@pytest.mark.parametrize("name", ["inverted", "palette", "texture", "upside_down", "mirrored", "sideways"])
def test_shifts_keep_labels_change_pixels_and_are_deterministic(glyphs, name):
    a, b = shift_glyphs(glyphs, name, seed=3), shift_glyphs(glyphs, name, seed=3)
    assert torch.equal(a.x, b.x) and torch.equal(a.y, glyphs.y)
    assert a.x.shape == glyphs.x.shape and 0.0 <= float(a.x.min()) and float(a.x.max()) <= 1.0
    assert (a.x - glyphs.x).abs().mean() > 0.05  # the images did move


def test_palette_keeps_the_ink_and_uses_only_unseen_colours(glyphs):
    shifted = shift_glyphs(glyphs, "palette", seed=1)
    ink, _, _ = ink_and_colours(glyphs)
    # Where a pixel is fully ink or fully background, the new image shows exactly an unseen colour.
    unseen = torch.tensor([c for _, c in UNSEEN_COLOURS])
    seen = torch.tensor([c for _, c in FOREGROUNDS + BACKGROUNDS])
    pixels = shifted.x.permute(0, 2, 3, 1)[(ink[:, 0] == 0) | (ink[:, 0] == 1)]
    assert torch.cdist(pixels, unseen).min(dim=1).values.max() < 1e-5
    assert torch.cdist(unseen, seen).min() > 0.1
    # The character is the same: each channel of each image is exactly a + b * (the original ink).
    design = torch.stack([torch.ones_like(ink.flatten(1)), ink.flatten(1)], dim=-1)  # [N, P, 2]
    for c in range(3):
        target = shifted.x[:, c].flatten(1)[..., None]
        coef = torch.linalg.lstsq(design, target).solution
        assert (design @ coef - target).abs().max() < 1e-4


def test_gray_glyphs_invert_and_texture_but_cannot_change_palette():
    train_spec, _ = glyph_specs(GlyphsConfig(**{**GLYPHS, "channels": 1}), 16)
    gray = glyph_split(train_spec, "test", 36, use_cache=False)
    assert torch.allclose(shift_glyphs(gray, "inverted", 0).x, 1 - gray.x)
    assert shift_glyphs(gray, "texture", 0).x.shape == gray.x.shape
    with pytest.raises(InputError, match="palette"):
        shift_glyphs(gray, "palette", 0)


def _adapt_cfg(clip_dir, edges: int, streams: list[dict], **adapt):
    return config_from_dict({
        "seed": 0, "fleet": {"edges": [{"count": edges}]},
        "data": {"source": "glyphs", "image_size": 16, "glyphs": GLYPHS},
        "model": MODEL,
        "adapt": {"checkpoint": str(clip_dir), "stream_samples": 24, "batch_size": 8, "streams": streams, **adapt},
    })


MODEL = {"kind": "clip", "hidden": 32, "layers": 1, "heads": 4, "context": 32, "image_size": 16,
         "patch_size": 8, "channels": 3, "projection_dim": 16}


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    from cloudedge.config.model import ModelConfig
    from cloudedge.models import build_model, save_local

    return save_local(build_model(ModelConfig(**MODEL), seed=0), tmp_path_factory.mktemp("clip") / "model")


def test_streams_of_one_shift_are_disjoint_and_the_oracle_fits_on_other_images(clip_dir):
    from cloudedge.adapt.edges import build_streams

    cfg = _adapt_cfg(clip_dir, 4, [{"shift": "held_out_font"}, {"shift": "palette"}], method="coop",
                     coop_fit="shift")
    streams, _, classes = build_streams(cfg, cfg.adapt, [f"e{i}" for i in range(4)])
    assert [s.shift for s in streams] == ["held_out_font", "palette", "held_out_font", "palette"]
    assert classes[0] == "digit zero" and classes[10] == "letter A"
    for a, b in ((streams[0], streams[2]), (streams[1], streams[3])):
        seen = {tuple(x.flatten().tolist()) for x in torch.cat([a.images, b.images])}
        assert len(seen) == 48  # two disjoint slices of 24
        fit = {tuple(x.flatten().tolist()) for x in a.labelled[0]}
        assert len(fit) == 24 and not fit & seen
    # The same config streams the same images.
    again, _, _ = build_streams(cfg, cfg.adapt, [f"e{i}" for i in range(4)])
    assert torch.equal(again[3].images, streams[3].images)


def test_held_out_font_needs_held_out_fonts(clip_dir):
    from cloudedge.adapt.edges import build_streams

    cfg = _adapt_cfg(clip_dir, 1, [{"shift": "held_out_font"}])
    cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={
        "glyphs": cfg.data.glyphs.model_copy(update={"held_out_fonts": []})})})
    with pytest.raises(InputError, match="held_out_font"):
        build_streams(cfg, cfg.adapt, ["e0"])


def test_prompt_sharing_within_a_shift_averages_only_that_shift(clip_dir):
    from cloudedge.adapt.stage import adapt

    streams = [{"shift": "inverted"}, {"corruption": "contrast", "severity": 3}]
    seen = {}

    def grab(r, rows):
        del rows
        seen[r] = True

    res = adapt(_adapt_cfg(clip_dir, 4, streams), None, method={"name": "swapprompt", "lr": 0.05}, share_every=1,
                share_groups="shift", on_round=grab)
    assert res.summary["prompt_shares"] == 3 and set(res.summary["acc_per_shift"]) == {"inverted", "contrast@3"}
    # Check the grouping itself on the workers' prompts after a share.
    from cloudedge.adapt import edges as adapt_edges
    from cloudedge.adapt.stage import _share_prompts
    from cloudedge.engine import LocalEngine, Task, WorkerSpec
    from cloudedge.fleet import Fleet, VirtualClock

    cfg = _adapt_cfg(clip_dir, 4, streams, share_groups="shift")
    engine = LocalEngine()
    stream_objs, _, classes = adapt_edges.build_streams(cfg, cfg.adapt, [f"edge{i}" for i in range(4)])
    source = {"path": str(clip_dir), "model_cfg": None}
    for i, s in enumerate(stream_objs):
        engine.register(s.edge_id, WorkerSpec(adapt_edges.AdaptWorker, {
            "edge_id": s.edge_id, "source": source, "method": "swapprompt", "method_args": {"lr": 0.05},
            "classnames": classes, "images": s.images, "labels": s.labels, "batch_size": 8, "seed": i}))
    engine.run([Task(s.edge_id, "step") for s in stream_objs])
    before = engine.run([Task(s.edge_id, "get_prompt") for s in stream_objs])
    last = {s.edge_id: {"seen": 8} for s in stream_objs}
    clock = VirtualClock(Fleet.from_config(cfg.fleet, 0))
    _share_prompts(cfg.adapt, stream_objs, last, engine, clock, {"prompt_bytes_up": 0,
                                                                            "prompt_bytes_down": 0, "shares": 0})
    after = engine.run([Task(s.edge_id, "get_prompt") for s in stream_objs])
    for group in ((0, 2), (1, 3)):
        mean = 0.5 * (before[group[0]]["online"] + before[group[1]]["online"])
        for i in group:
            assert torch.allclose(after[i]["online"], mean, atol=1e-6)
    assert not torch.allclose(after[0]["online"], after[1]["online"])


def test_sinkhorn_balances_a_collapsed_batch_and_sharpening_lowers_entropy():
    from cloudedge.adapt.methods import entropy, sinkhorn

    # Every sample leans to class 0: softmax targets say "class 0" for all, the balanced ones cannot.
    logits = torch.tensor([[3.0, 1.0, 0.0, 0.0], [3.0, 0.0, 1.2, 0.0], [3.0, 0.0, 0.0, 1.1], [3.5, 0.0, 0.0, 0.0]])
    q = sinkhorn(logits, iters=20)
    assert torch.allclose(q.sum(1), torch.ones(4), atol=1e-5)
    assert torch.allclose(q.sum(0), torch.ones(4), atol=1e-2)  # each class gets B / K = 1 sample
    assert (logits.softmax(-1).argmax(-1) == 0).all() and set(q.argmax(-1).tolist()) == {0, 1, 2, 3}
    assert (entropy(logits / 0.5) < entropy(logits)).all()


def test_swapped_loss_with_balancing_matches_its_definition(clip_dir):
    from cloudedge.adapt.clip_model import load_clip
    from cloudedge.adapt.methods import SwapPrompt, sinkhorn

    clip = load_clip(clip_dir)
    names = ["digit zero", "digit one", "letter A"]
    f1 = torch.nn.functional.normalize(torch.randn(6, 16, generator=torch.Generator().manual_seed(0)), dim=-1)
    f2 = torch.nn.functional.normalize(f1 + 0.3 * torch.randn(6, 16, generator=torch.Generator().manual_seed(1)), dim=-1)
    for swap in (True, False):
        sp = SwapPrompt(clip, names, temperature=0.5, balance="sinkhorn", sinkhorn_iters=3, swap=swap)
        with torch.no_grad():
            text = sp._text()
            q1, q2 = (sinkhorn(sp.scale * f @ text.T / 0.5, 3) for f in (f1, f2))
            lp1, lp2 = ((sp.scale * f @ text.T).log_softmax(-1) for f in (f1, f2))
        a, b = (q2, q1) if swap else (q1, q2)
        expected = (-(a * lp1).sum(-1) - (b * lp2).sum(-1)).mean()
        loss = sp.swapped_loss(f1, f2)
        assert torch.allclose(loss, expected, atol=1e-5)
        loss.backward()
        assert sp.learner.ctx.grad is not None and sp.learner.ctx.grad.abs().sum() > 0


@pytest.mark.parametrize("bad", [{"balance": "swav"}, {"temperature": 0.0}, {"steps": 0}, {"lr": -1.0},
                                 {"entropy_weight": -0.1}, {"momentum": 1.5}])
def test_swapprompt_knobs_are_validated(clip_dir, bad):
    from cloudedge.adapt.clip_model import load_clip
    from cloudedge.adapt.methods import build_method

    with pytest.raises(InputError, match="adapt.method"):
        build_method("swapprompt", load_clip(clip_dir), ["a", "b"], **bad)


def test_gate_is_the_oracle_minus_zero_shot_over_the_main_shifts():
    from cloudedge.bench.adapt_tta import headroom

    oracle = {"a": 0.9, "b": 0.7, "c@5": 0.1}
    zeroshot = {"a": 0.8, "b": 0.6, "c@5": 0.5}
    gate = headroom(oracle, zeroshot, ["a", "b"])
    assert gate["oracle_coop"] == pytest.approx(0.8) and gate["headroom_points"] == pytest.approx(10.0)
    assert gate["holds"]
    assert not headroom(oracle, zeroshot, ["a", "b", "c@5"])["holds"]


def test_the_glyph_clip_build_takes_every_core_up_to_a_cap_and_gives_threads_back(monkeypatch):
    from cloudedge.adapt import glyph_clip as gc
    from cloudedge.engine import torch_threads

    for cores, expected in ((1, 1), (2, 2), (64, gc.MAX_BUILD_THREADS), (None, 1)):
        monkeypatch.setattr(gc.os, "cpu_count", lambda cores=cores: cores)
        assert gc.build_threads() == expected
    before = torch.get_num_threads()
    with pytest.raises(RuntimeError), torch_threads(before + 1) as used:
        assert used == torch.get_num_threads() == before + 1
        raise RuntimeError("a failed build")
    assert torch.get_num_threads() == before


def test_glyph_clip_is_built_once_and_reused(tmp_path, monkeypatch):
    from cloudedge.adapt import glyph_clip as gc

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    tiny = {"hidden": 32, "layers": 1, "context": 48, "image_size": 16, "patch_size": 8, "projection_dim": 16}
    monkeypatch.setattr(gc, "MODEL", {**gc.MODEL, **tiny})

    real = gc.pretrain_config

    def recipe(quick: bool) -> dict:
        raw = real(True)
        raw["data"]["image_size"] = 16
        raw["data"]["glyphs"].update(train_size=72, test_size=72)
        raw["model"] = gc.MODEL
        raw["pretrain"].update(rounds=2 if quick else 3, global_batch=16, eval_every=2, warmup_rounds=0)
        return raw

    monkeypatch.setattr(gc, "pretrain_config", recipe)
    threads = torch.get_num_threads()
    first_dir, first = gc.glyph_clip(True, threads=threads + 1)
    again_dir, again = gc.glyph_clip(True)
    assert not first["cached"] and again["cached"] and first_dir == again_dir
    # The build ran with the threads asked for, which the card records; the process keeps its own.
    assert first["training"]["torch_threads"] == threads + 1 and torch.get_num_threads() == threads
    assert (first_dir / "model.safetensors").is_file() or any(first_dir.glob("*.safetensors"))
    assert 0.0 <= again["zero_shot"]["clean_held_in_fonts"] <= 1.0 and again["training"]["rounds"] == 2
    # Its pre-training drew a share of the images in the named styles, and the card scores each style
    # under the plain prompt and under the prompt that names it.
    assert set(again["zero_shot"]["styles"]) == set(gc.STYLES)
    assert all(0.0 <= v <= 1.0 for style in again["zero_shot"]["styles"].values() for v in style.values())
    assert recipe(True)["data"]["glyphs"]["style_fraction"] == gc.STYLE_FRACTION > 0
    other_dir, other = gc.glyph_clip(False)  # another recipe: another folder
    assert other_dir != first_dir and not other["cached"]


def test_benchmark_methods_give_the_same_results_in_parallel_processes(tmp_path, monkeypatch):
    """``adapt-tta`` runs its methods in spawned processes; every figure but time must not change."""
    from cloudedge.bench.adapt_tta import SWAPPROMPT, run_methods
    from cloudedge.config.model import ModelConfig
    from cloudedge.models import build_model, save_local

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # children inherit it: one render
    tiny = ModelConfig(kind="clip", hidden=32, layers=1, heads=2, context=48, image_size=28, patch_size=14,
                       channels=3, projection_dim=16)
    clip = save_local(build_model(tiny, seed=0), tmp_path / "clip")
    shifts = [{"shift": "inverted"}, {"corruption": "gaussian_noise", "severity": 3}]
    # TPT is split over slices of its edges in parallel (adapt.edges) and merged.
    specs = {"zeroshot": {"method": "zeroshot"}, "swapprompt": {"method": SWAPPROMPT},
             "tpt": {"method": {"name": "tpt", "n_views": 7}}}
    seen: list[list[str]] = []
    serial = run_methods(clip, shifts, 36, specs, "local", 1, first=("zeroshot",),
                         when_first=lambda r: seen.append(list(r)))
    parallel = run_methods(clip, shifts, 36, specs, "local", 2, first=("zeroshot",),
                           when_first=lambda r: seen.append(list(r)))
    assert seen == [["zeroshot"], ["zeroshot"]]
    assert list(parallel) == list(specs)
    for name in specs:
        for key in ("acc_per_shift", "peak_mem_mb", "prompt_bytes", "edges"):
            assert serial[name][key] == parallel[name][key], (name, key)
    assert set(serial["swapprompt"]["acc_per_shift"]) == {"inverted", "gaussian_noise@3"}
    assert parallel["tpt"]["parts"] == 2 and "parts" not in serial["tpt"]
    assert serial["tpt"]["timed_images"] == parallel["tpt"]["timed_images"]


def test_an_adaptation_run_of_some_edges_streams_what_those_edges_stream_in_the_whole_run(clip_dir):
    from cloudedge.adapt.stage import adapt
    from cloudedge.engine import make_engine

    cfg = _adapt_cfg(clip_dir, 3, [{"shift": "inverted"}, {"shift": "palette"}, {"shift": "texture"}],
                     method="zeroshot")
    with make_engine("local") as eng:
        whole = adapt(cfg, None, eng).summary
        part = adapt(cfg, None, eng, edges=[0, 2]).summary
    assert set(part["acc_per_shift"]) == {"inverted", "texture"}
    for shift, acc in part["acc_per_shift"].items():
        assert acc == whole["acc_per_shift"][shift]
    for bad in ([3], []):
        with make_engine("local") as eng, pytest.raises(InputError, match="adapt.edges"):
            adapt(cfg, None, eng, edges=bad)
    # zeroshot shares nothing: a slice of a run with share_every set is still the whole run's.
    with make_engine("local") as eng:
        assert adapt(cfg, None, eng, edges=[0, 2], share_every=1).summary["acc_per_shift"] == part["acc_per_shift"]


def test_a_slice_of_a_run_that_shares_prompts_must_hold_whole_sharing_groups(clip_dir):
    """SwapPrompt averages prompts: a slice must hold every edge its edges average with (all of
    them; with share_groups: shift, every edge of their shifts). Edge 3 streams edge 0's shift."""
    from cloudedge.adapt.stage import adapt
    from cloudedge.engine import make_engine

    cfg = _adapt_cfg(clip_dir, 4, [{"shift": "inverted"}, {"shift": "palette"}, {"shift": "texture"}],
                     method="swapprompt", stream_samples=8, share_every=1)
    for edges, groups, missing in (([0, 2], "all", "[1, 3]"), ([0, 2], "shift", "[3]")):
        with make_engine("local") as eng, pytest.raises(InputError, match=rf"adapt.edges: .*missing \{missing}"):
            adapt(cfg, None, eng, edges=edges, share_groups=groups)
    with make_engine("local") as eng:
        whole = adapt(cfg, None, eng, share_groups="shift").summary
        part = adapt(cfg, None, eng, edges=[0, 2, 3], share_groups="shift").summary
    assert part["acc_per_shift"] == {k: whole["acc_per_shift"][k] for k in ("inverted", "texture")}


def test_benchmark_workers_must_be_a_positive_number(tmp_path):
    from cloudedge.bench import run_benchmark

    for bad in ("0", "two"):
        with pytest.raises(InputError, match="--workers"):
            run_benchmark("adapt-tta", tmp_path, quick=True, checkpoint=str(tmp_path), workers=bad)


def test_benchmark_adapts_a_local_hugging_face_clip_on_the_device_and_precision_asked(tmp_path, monkeypatch):
    """``--set checkpoint=DIR`` takes a downloaded HF CLIP (TPT's published setting is a ViT-B/16),
    ``--set device / precision`` reach every method's run, and a bad one fails before any build."""
    from cloudedge.bench import run_benchmark
    from cloudedge.bench.adapt_tta import METHODS, run_methods
    from tests.test_adapt_prompts import save_tiny_hf_clip

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    hf = save_tiny_hf_clip(tmp_path / "hf", context=64)  # room for "an upside-down photo of a letter A."
    shifts = [{"shift": "upside_down"}]
    specs = {name: METHODS[name] for name in ("zeroshot", "template-select")}
    specs["tpt"] = {"method": {"name": "tpt", "n_views": 3}}
    fp32 = run_methods(hf, shifts, 36, specs, "local", 1)
    bf16 = run_methods(hf, shifts, 36, specs, "local", 1, where=("cpu", "bf16"))
    for got in (fp32, bf16):
        assert list(got) == list(specs) and all(set(r["acc_per_shift"]) == {"upside_down"} for r in got.values())
        assert got["tpt"]["timed_images"] > 0
    # bf16 autocast is really on: TPT's adaptation step holds half-size activations
    assert bf16["tpt"]["peak_mem_mb"] < fp32["tpt"]["peak_mem_mb"]
    # A bad option fails before the glyph CLIP's build (minutes), and before anything is written.
    def no_build(quick):
        raise AssertionError("the glyph CLIP was built before the options were checked")

    monkeypatch.setattr("cloudedge.bench.adapt_tta.glyph_clip", no_build)
    bad_options = [({"device": "tpu"}, r"--set device: one of cpu, cuda, auto \(got 'tpu'\)"),
                   ({"precision": "fp8"}, r"--set precision: one of fp32, bf16 \(got 'fp8'\)")]
    if not torch.cuda.is_available():
        bad_options.append(({"device": "cuda"}, "--set device: 'cuda' asked for, but no CUDA device"))
    for bad, message in bad_options:
        with pytest.raises(InputError, match=message):
            run_benchmark("adapt-tta", tmp_path / "out", quick=True, **bad)
    assert not (tmp_path / "out" / "model_card.json").exists()


def test_benchmark_coop_source_is_upright_while_the_clip_saw_styles(tmp_path):
    from cloudedge.adapt.glyph_clip import glyph_data, pretrain_config
    from cloudedge.bench.adapt_tta import SHIFTS, _config

    assert pretrain_config(True)["data"]["glyphs"]["styles"] == ["upside_down", "mirrored", "sideways"]
    cfg = _config(tmp_path, SHIFTS, 512, 1)
    assert cfg.data.glyphs.style_fraction == 0 and not cfg.data.glyphs.styles  # CoOp's clean source
    assert {s.shift for s in cfg.adapt.streams} >= {"upside_down", "mirrored", "sideways"}
    assert "styles" not in glyph_data(10, 10, styled=False)["glyphs"]


def test_the_no_views_ablation_trains_swapprompt_on_the_test_images_themselves():
    from cloudedge.adapt.augment import AugmentSpec, augment
    from cloudedge.bench.adapt_tta import METHODS, NO_VIEWS

    x = torch.rand(4, 3, 28, 28, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(augment(x, AugmentSpec(**NO_VIEWS), torch.Generator().manual_seed(1)), x, atol=1e-5)
    assert METHODS["swapprompt-no-views"]["method"]["augment"] == NO_VIEWS
