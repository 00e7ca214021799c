"""build_dataset: every source of DataConfig, deterministic splits, relative paths."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from cloudedge.config.data import DataConfig
from cloudedge.data import ImageDataset, TextDataset, build_dataset, load_digits, split_indices
from cloudedge.errors import InputError


def test_split_is_deterministic_disjoint_and_sized():
    train, test = split_indices(100, 0.2, seed=3)
    assert len(test) == 20 and len(train) == 80
    assert np.array_equal(np.sort(np.concatenate([train, test])), np.arange(100))
    again = split_indices(100, 0.2, seed=3)
    assert np.array_equal(train, again[0])
    assert not np.array_equal(test, split_indices(100, 0.2, seed=4)[1])
    assert [len(s) for s in split_indices(2, 0.01, 0)] == [1, 1]
    with pytest.raises(InputError, match="cannot be split"):
        split_indices(1, 0.5, 0)


@pytest.mark.parametrize("source", ["digits", "colored", "rotated", "corrupted"])
def test_digit_sources(source):
    cfg = DataConfig(source=source, degrees=90, corruption="gaussian_noise", severity=2, image_size=8)
    train, test = build_dataset(cfg, ".", seed=1)
    assert isinstance(train, ImageDataset) and len(train) + len(test) == 1797
    assert len(test) == round(1797 * 0.2)
    channels = 3 if source == "colored" else 1
    assert train.x.shape[1:] == (channels, 8, 8)
    again, _ = build_dataset(cfg, ".", seed=1)
    assert torch.equal(train.x, again.x) and torch.equal(train.y, again.y)


def test_rotated_source_is_rotated_digits():
    train, _ = build_dataset(DataConfig(source="rotated", degrees=90), ".", seed=0)
    idx, _ = split_indices(1797, 0.2, 0)
    digits = load_digits().subset(idx)
    assert torch.allclose(train.x, torch.rot90(digits.x, 1, dims=(2, 3)), atol=1e-5)


def test_colored_test_flip_prob():
    cfg = DataConfig(source="colored", flip_prob=0.1, test_flip_prob=0.9)
    train, test = build_dataset(cfg, ".", seed=0)
    train_flip = float((train.domains != train.y).float().mean())
    test_flip = float((test.domains != test.y).float().mean())
    assert abs(train_flip - 0.1) < 0.04 and abs(test_flip - 0.9) < 0.06


def test_unknown_corruption_names_field():
    with pytest.raises(InputError, match="data.corruption: unknown corruption 'fog'"):
        build_dataset(DataConfig(source="corrupted", corruption="fog"), ".", 0)


def test_pydocs_corpus_and_classification():
    train, test = build_dataset(DataConfig(source="pydocs", max_docs=200), ".", 0)
    assert isinstance(train, TextDataset) and len(train) == 160 and train.labels is None
    cls_train, cls_test = build_dataset(DataConfig(source="pydocs", n_classes=5, max_docs=100), ".", 0)
    assert len(cls_train.classes) == 5 and len(cls_train) + len(cls_test) == 100
    assert set(cls_train.labels) <= set(range(5))


def test_user_sources_resolve_relative_paths(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "corpus.txt").write_text("one\n\ntwo\n\nthree\n\nfour\n\nfive")
    rows = [{"text": f"doc {i}", "label": "ab"[i % 2]} for i in range(10)]
    (tmp_path / "data" / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    for cls in ("x", "y"):
        (tmp_path / "data" / "img" / cls).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(np.full((5, 5, 3), 40 * i, dtype=np.uint8)).save(tmp_path / "data" / "img" / cls / f"{i}.png")
    (tmp_path / "names.txt").write_text("y: the y\nx: the x\n")

    train, test = build_dataset(DataConfig(source="text", path="data/corpus.txt"), str(tmp_path), 0)
    assert sorted(train.texts + test.texts) == ["five", "four", "one", "three", "two"] and len(test) == 1
    train, test = build_dataset(DataConfig(source="jsonl", path="data/d.jsonl", label_field="label"), str(tmp_path), 0)
    assert train.classes == ["a", "b"] and len(train) == 8 and len(test) == 2
    cfg = DataConfig(source="imagefolder", path="data/img", class_names="names.txt", image_size=4, test_fraction=0.5)
    train, test = build_dataset(cfg, str(tmp_path), 0)
    assert train.classes == ["the y", "the x"] and train.x.shape[1:] == (3, 4, 4) and len(train) == 3
    with pytest.raises(InputError, match="nothere.jsonl"):
        build_dataset(DataConfig(source="jsonl", path="nothere.jsonl"), str(tmp_path), 0)
