"""`data: {source: hf}`: Hugging Face datasets saved to disk or as parquet / arrow / CSV files."""

from __future__ import annotations

from pathlib import Path

import datasets
import numpy as np
import pytest
from PIL import Image

from cloudedge.config import DataConfig, PartitionConfig, config_from_dict
from cloudedge.data import PARTITION_KINDS, build_dataset, partition
from cloudedge.data.hfdata import load_hf
from cloudedge.errors import InputError

datasets.disable_progress_bars()

TEXT_FEATURES = datasets.Features({"text": datasets.Value("string"), "label": datasets.ClassLabel(names=["neg", "pos"]),
                                   "source": datasets.Value("string")})


def _text_table(n: int = 24) -> datasets.Dataset:
    return datasets.Dataset.from_dict(
        {"text": [f"review {i}: {'good' if i % 3 else 'bad'} café" for i in range(n)],
         "label": [int(i % 3 != 0) for i in range(n)], "source": ["web" if i < n // 2 else "shop" for i in range(n)]},
        features=TEXT_FEATURES)


@pytest.fixture(scope="module")
def stored(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hf")
    table = _text_table()
    datasets.DatasetDict({"train": table, "test": table.select(range(6))}).save_to_disk(str(root / "saved"))
    table.to_parquet(str(root / "reviews.parquet"))
    table.to_csv(str(root / "reviews.csv"), index=False)
    (root / "parts").mkdir()
    table.select(range(12)).to_parquet(str(root / "parts" / "a.parquet"))
    table.select(range(12, 24)).to_parquet(str(root / "parts" / "b.parquet"))
    rng = np.random.default_rng(0)
    images = [Image.fromarray((rng.random((10, 14, 3)) * 255).astype("uint8")) for _ in range(12)]
    img_features = datasets.Features({"img": datasets.Image(), "digit": datasets.ClassLabel(names=["zero", "one", "two"])})
    datasets.Dataset.from_dict({"img": images, "digit": [i % 3 for i in range(12)]},
                               features=img_features).save_to_disk(str(root / "images"))
    return {"root": root, "saved": root / "saved", "parquet": root / "reviews.parquet", "csv": root / "reviews.csv",
            "arrow": next((root / "saved" / "train").glob("*.arrow")), "parts": root / "parts",
            "images": root / "images"}


@pytest.mark.parametrize("kind", ["saved", "parquet", "arrow", "parts"])
def test_text_with_class_label_names(stored, kind):
    ds = load_hf(stored[kind], label_field="label", domain_field="source")
    assert len(ds) == 24 and ds.texts[1] == "review 1: good café"
    assert ds.classes == ["neg", "pos"]  # the ClassLabel's names, in its order
    assert ds.labels[:4] == [0, 1, 1, 0]
    assert ds.domains[0] == "web" and ds.domains[-1] == "shop"


def test_csv_labels_are_integers_and_splits_are_chosen(stored):
    ds = load_hf(stored["csv"], label_field="label")
    assert ds.classes == ["0", "1"] and ds.labels[:4] == [0, 1, 1, 0]
    assert ds.domains == ["reviews"] * 24  # without domain_field: the dataset's name
    assert len(load_hf(stored["saved"], split="test")) == 6


def test_images_with_class_label(stored):
    ds = load_hf(stored["images"], image_field="img", label_field="digit", image_size=8)
    assert tuple(ds.x.shape) == (12, 3, 8, 8) and 0 <= float(ds.x.min()) and float(ds.x.max()) <= 1
    assert ds.classes == ["zero", "one", "two"] and ds.y.tolist()[:4] == [0, 1, 2, 0]


def test_bad_input_names_the_path_or_field(stored, tmp_path):
    with pytest.raises(InputError, match="nowhere"):
        load_hf(tmp_path / "nowhere")
    with pytest.raises(InputError, match="no split 'validation'.*train, test"):
        load_hf(stored["saved"], split="validation")
    with pytest.raises(InputError, match="text_field: no column 'body'"):
        load_hf(stored["parquet"], text_field="body")
    with pytest.raises(InputError, match="images need a label column"):
        load_hf(stored["images"], image_field="img")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(InputError, match="unknown data file type"):
        load_hf(tmp_path / "notes.txt")
    (tmp_path / "broken.parquet").write_bytes(b"not parquet")
    with pytest.raises(InputError, match="broken.parquet"):
        load_hf(tmp_path / "broken.parquet")
    rows = _text_table(4).to_dict()
    rows["label"][2] = -1  # ClassLabel's "no label"
    datasets.Dataset.from_dict(rows, features=TEXT_FEATURES).save_to_disk(str(tmp_path / "unlabeled"))
    with pytest.raises(InputError, match="row 2: data.label_field"):
        load_hf(tmp_path / "unlabeled", label_field="label")
    with pytest.raises(InputError, match="needs 'path'"):
        config_from_dict({"data": {"source": "hf"}})


@pytest.mark.parametrize("kind", PARTITION_KINDS)
def test_every_partitioner_deals_an_hf_dataset(stored, kind):
    cfg = DataConfig(source="hf", path="saved", label_field="label", domain_field="source",
                     partition=PartitionConfig(kind=kind, alpha=0.5))
    train, test = build_dataset(cfg, stored["root"], seed=1)
    assert len(train) + len(test) == 24
    domains = np.array(train.domains)
    parts = partition(np.array(train.labels), 3, kind, seed=1, alpha=0.5, domains=domains)
    assert sorted(np.concatenate(parts).tolist()) == list(range(len(train)))
    if kind == "domain":
        assert all(len(set(domains[p])) <= 1 for p in parts if len(p))


@pytest.mark.slow
def test_finetune_stage_on_hf_images(stored, tmp_path):
    from cloudedge.finetune import run_finetune

    cfg = config_from_dict({
        "name": "hf-ft", "seed": 0, "engine": {"threads": 1},
        "fleet": {"edges": [{"count": 1, "devices": [{"count": 2, "profile": "phone-mid",
                                                      "overrides": {"availability": 1.0}}]}]},
        "data": {"source": "hf", "path": str(stored["images"]), "image_field": "img", "label_field": "digit",
                 "image_size": 8, "test_fraction": 0.25, "partition": {"kind": "dirichlet"}},
        "model": {"kind": "vit", "hidden": 16, "layers": 1, "heads": 2, "image_size": 8, "patch_size": 4,
                  "channels": 3, "num_labels": 3},
        "finetune": {"lora": {"rank": 2}, "batch_size": 4, "time_budget_s": 1.0e9, "max_cloud_rounds": 2,
                     "eval_max": 8},
    }, source="test", base_dir=tmp_path)
    summary = run_finetune(cfg, tmp_path / "run")
    assert summary["final_acc"] is not None and 0.0 <= summary["final_acc"] <= 1.0


@pytest.mark.slow
def test_adapt_stage_on_hf_images(stored, tmp_path):
    from cloudedge.adapt import adapt
    from cloudedge.config import ModelConfig
    from cloudedge.models import build_model, save_local

    model = {"kind": "clip", "hidden": 16, "layers": 1, "heads": 2, "context": 32, "image_size": 8, "patch_size": 4,
             "channels": 3, "projection_dim": 8}
    clip = save_local(build_model(ModelConfig(**model), seed=0), tmp_path / "clip")
    cfg = config_from_dict({
        "seed": 0, "engine": {"threads": 1}, "fleet": {"edges": [{"count": 1}]},
        "data": {"source": "hf", "path": str(stored["images"]), "image_field": "img", "label_field": "digit",
                 "image_size": 8, "test_fraction": 0.5},
        "model": model,
        "adapt": {"checkpoint": str(clip), "method": "zeroshot", "stream_samples": 6, "batch_size": 3,
                  "streams": [{"corruption": "contrast", "severity": 3}]},
    }, source="test", base_dir=tmp_path)
    result = adapt(cfg, tmp_path / "run")
    assert 0.0 <= result.summary["acc_mean"] <= 1.0
    assert result.rows and all(r["stage"] == "adapt" for r in result.rows)
