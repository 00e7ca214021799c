"""Bundled sources: digits, colored and rotated variants, the stdlib-docstring corpus."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cloudedge.data import (
    DIGIT_CLASSES,
    PALETTE,
    colored,
    load_digits,
    load_pydocs,
    pydocs_classification,
    rotate_images,
    rotated,
)
from cloudedge.errors import InputError


def test_digits_shape_range_count():
    ds = load_digits()
    assert ds.x.shape == (1797, 1, 8, 8) and ds.x.dtype == torch.float32
    assert ds.y.shape == (1797,) and ds.y.dtype == torch.int64
    assert float(ds.x.min()) == 0.0 and float(ds.x.max()) == 1.0
    assert ds.classes == DIGIT_CLASSES and ds.classes[0] == "zero" and ds.classes[9] == "nine"
    assert sorted(torch.unique(ds.y).tolist()) == list(range(10))


def test_digits_resize_keeps_range_and_content():
    small, big = load_digits(), load_digits(image_size=32)
    assert big.x.shape == (1797, 1, 32, 32)
    assert 0.0 <= float(big.x.min()) and float(big.x.max()) <= 1.0
    # Shrinking the resized digits back gives roughly the originals.
    back = torch.nn.functional.interpolate(big.x, size=(8, 8), mode="area")
    assert float((back - small.x).abs().mean()) < 0.08


def test_subset_keeps_order_and_fields():
    ds = colored(load_digits(), 0.2, seed=0)
    sub = ds.subset(np.array([5, 2, 9]))
    assert torch.equal(sub.x, ds.x[[5, 2, 9]]) and sub.y.tolist() == ds.y[[5, 2, 9]].tolist()
    assert sub.domains.tolist() == ds.domains[[5, 2, 9]].tolist()
    assert sub.meta["flipped"].tolist() == ds.meta["flipped"][[5, 2, 9]].tolist()
    assert len(sub) == 3


@pytest.mark.parametrize("flip_prob", [0.0, 0.1, 0.25, 0.9])
def test_colored_flip_rate(flip_prob):
    ds = load_digits()
    col = colored(ds, flip_prob, seed=3)
    assert col.x.shape == (1797, 3, 8, 8)
    color = col.domains
    observed = float((color != ds.y).float().mean())
    # Binomial std on 1,797 draws is at most 0.012; 4 std of slack.
    assert abs(observed - flip_prob) < 0.05
    assert torch.equal(col.meta["flipped"], color != ds.y)
    # The strokes are multiplied by the recorded color.
    expected = ds.x * PALETTE[color][:, :, None, None]
    assert torch.allclose(col.x, expected)
    # A flipped color is never the label's own color, and other colors are all used.
    flipped_colors = color[col.meta["flipped"]]
    if flip_prob >= 0.25:
        assert len(torch.unique(flipped_colors)) == 10


def test_colored_deterministic_and_seed_dependent():
    ds = load_digits()
    a, b, c = colored(ds, 0.25, 7), colored(ds, 0.25, 7), colored(ds, 0.25, 8)
    assert torch.equal(a.x, b.x)
    assert not torch.equal(a.domains, c.domains)


def test_colored_rejects_bad_prob():
    with pytest.raises(InputError, match="flip_prob"):
        colored(load_digits(), 1.5, 0)


@pytest.mark.parametrize("size", [8, 9, 16])
def test_rotation_by_90_equals_rot90(size):
    x = load_digits(image_size=size).x[:50]
    assert torch.allclose(rotated(load_digits(image_size=size), 90).x[:50], torch.rot90(x, 1, dims=(2, 3)), atol=1e-5)
    assert torch.allclose(rotate_images(x, -90), torch.rot90(x, -1, dims=(2, 3)), atol=1e-5)
    assert torch.allclose(rotate_images(x, 180), torch.rot90(x, 2, dims=(2, 3)), atol=1e-5)


def test_rotation_small_angle_changes_and_zero_is_identity():
    x = load_digits().x[:20]
    assert torch.allclose(rotate_images(x, 0.0), x, atol=1e-6)
    moved = rotate_images(x, 30)
    assert float((moved - x).abs().mean()) > 0.05
    # Rotating there and back loses only the corners and interpolation blur.
    back = rotate_images(rotate_images(x, 30), -30)
    assert float((back - x).abs().mean()) < float((moved - x).abs().mean())


def test_pydocs_is_real_text_with_many_domains():
    docs = load_pydocs()
    assert len(docs) > 1000
    assert len(set(docs.domains)) >= 10
    assert docs.labels is None and len(docs.ids) == len(docs)
    assert all(len(t) >= 40 for t in docs.texts)
    assert len(set(docs.texts)) == len(docs.texts)  # duplicates dropped
    # Real English prose and code: common words and identifiers occur.
    joined = " ".join(docs.texts[:2000])
    for word in (" the ", " return", "None"):
        assert word in joined
    # Domains are top-level module names of the documented objects.
    for domain, qual in zip(docs.domains, docs.ids, strict=True):
        assert qual.split(".")[0] == domain
    assert {"json", "os", "collections"} <= set(docs.domains)
    assert not {"antigravity", "this", "tkinter", "turtle", "idlelib", "test"} & set(docs.domains)


def test_pydocs_deterministic_subsample_and_min_chars():
    a, b = load_pydocs(max_docs=100), load_pydocs(max_docs=100)
    assert a.texts == b.texts and len(a) == 100
    # An even spread keeps many domains represented.
    assert len(set(a.domains)) >= 20
    long_docs = load_pydocs(min_chars=500)
    assert all(len(t) >= 500 for t in long_docs.texts) and len(long_docs) < len(load_pydocs())


def test_pydocs_does_not_depend_on_what_this_process_patched(monkeypatch):
    import textwrap

    from cloudedge.data.sources import _pydocs_corpus

    before = _pydocs_corpus()
    _pydocs_corpus.cache_clear()
    # A host patching the standard library (pytest, IPython, torch do such things) would change a
    # corpus read from this process; the walk runs in a fresh isolated interpreter instead.
    monkeypatch.setattr(textwrap.dedent, "__doc__", "patched by this process, not part of the corpus")
    monkeypatch.setattr(textwrap, "shorten", lambda *a, **k: None)
    after = _pydocs_corpus()
    assert after == before
    assert not any("patched by this process" in text for _, _, text in after)
    assert any(qual == "textwrap.shorten" for _, qual, _ in after)


def test_pydocs_classification_picks_largest_modules():
    view = pydocs_classification(n_classes=10)
    assert len(view.classes) == 10 and view.classes == sorted(view.classes)
    assert set(view.labels) == set(range(10))
    for label, domain in zip(view.labels, view.domains, strict=True):
        assert view.classes[label] == domain
    counts = {c: view.domains.count(c) for c in view.classes}
    everything = load_pydocs()
    others = [everything.domains.count(d) for d in set(everything.domains) - set(view.classes) - {"pydoc_data"}]
    assert min(counts.values()) >= max(others)
    capped = pydocs_classification(n_classes=4, max_per_class=20)
    assert len(capped) == 80
    with pytest.raises(InputError, match="n_classes"):
        pydocs_classification(n_classes=1)

