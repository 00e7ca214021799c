"""Build the (train, test) datasets a ``data`` config section describes."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cloudedge.config.data import DataConfig
from cloudedge.data.glyphs import load_glyphs
from cloudedge.data.shifts import check_corruption, corrupt
from cloudedge.data.sources import (
    ImageDataset,
    TextDataset,
    colored,
    even_pick,
    load_digits,
    load_pydocs,
    pydocs_classification,
    rotated,
)
from cloudedge.data.userdata import load_image_folder, load_jsonl, load_text
from cloudedge.errors import InputError

Dataset = ImageDataset | TextDataset


def split_indices(n: int, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Sorted (train, test) indices: a seeded permutation, the first ``round(n * test_fraction)``
    (at least 1, at most ``n - 1``) to test."""
    if n < 2:
        raise InputError(f"data: {n} sample(s) cannot be split into train and test (need at least 2)")
    n_test = min(max(1, round(n * test_fraction)), n - 1)
    order = np.random.default_rng(seed).permutation(n)
    return np.sort(order[n_test:]), np.sort(order[:n_test])


def _resolve(base_dir: str | Path, path: str | None) -> Path:
    assert path is not None  # DataConfig's validator requires it for the sources that read files
    p = Path(path).expanduser()
    return p if p.is_absolute() else Path(base_dir) / p


def _load_whole(cfg: DataConfig, base_dir: str | Path) -> Dataset:
    """The full dataset before the split, for every source except ``colored`` (colored per split)."""
    if cfg.source in ("digits", "colored"):
        return load_digits(cfg.image_size)
    if cfg.source == "rotated":
        return rotated(load_digits(cfg.image_size), cfg.degrees)
    if cfg.source == "corrupted":
        return load_digits(cfg.image_size)  # corrupted after the split, each split with its own seed
    if cfg.source == "pydocs":
        if cfg.n_classes is not None:
            view = pydocs_classification(cfg.n_classes, min_chars=cfg.min_chars)
            return view if cfg.max_docs is None else view.subset(even_pick(len(view), cfg.max_docs))
        return load_pydocs(max_docs=cfg.max_docs, min_chars=cfg.min_chars)
    if cfg.source == "text":
        return load_text(_resolve(base_dir, cfg.path))
    if cfg.source == "jsonl":
        return load_jsonl(_resolve(base_dir, cfg.path), cfg.text_field, cfg.label_field, cfg.domain_field)
    if cfg.source == "imagefolder":
        names = _resolve(base_dir, cfg.class_names) if cfg.class_names else None
        return load_image_folder(_resolve(base_dir, cfg.path), cfg.image_size, names)
    if cfg.source == "hf":
        from cloudedge.data.hfdata import load_hf

        return load_hf(_resolve(base_dir, cfg.path), cfg.split, cfg.text_field, cfg.image_field, cfg.label_field,
                       cfg.domain_field, cfg.image_size)
    raise InputError(f"data.source: unknown source '{cfg.source}'")


def build_dataset(cfg: DataConfig, base_dir: str | Path = ".", seed: int = 0) -> tuple[Dataset, Dataset]:
    """``(train, test)`` for ``cfg``: the source loaded, split by :func:`split_indices`.

    ``colored`` colors train with ``flip_prob`` (seed ``seed``) and test with ``test_flip_prob``
    (default ``flip_prob``; seed ``seed + 1``), so a test split with a lying color (e.g. 0.9)
    measures out-of-distribution accuracy. ``corrupted`` corrupts each split (seeds ``seed`` and
    ``seed + 1``). ``glyphs`` renders its own train and test splits (``data.glyphs``: sizes, fonts,
    held-out fonts) from its own seed. Relative ``path``/``class_names`` resolve against ``base_dir``.
    """
    if cfg.source == "corrupted":
        assert cfg.corruption is not None  # DataConfig's validator
        check_corruption(cfg.corruption, cfg.severity)
    if cfg.source == "glyphs":  # generated as two splits (a held-out font set only in test)
        return load_glyphs(cfg.glyphs, cfg.image_size)
    whole = _load_whole(cfg, base_dir)
    train_idx, test_idx = split_indices(len(whole), cfg.test_fraction, seed)
    train, test = whole.subset(train_idx), whole.subset(test_idx)
    if cfg.source == "colored":
        assert isinstance(train, ImageDataset) and isinstance(test, ImageDataset)
        test_flip = cfg.flip_prob if cfg.test_flip_prob is None else cfg.test_flip_prob
        train, test = colored(train, cfg.flip_prob, seed), colored(test, test_flip, seed + 1)
    elif cfg.source == "corrupted":
        assert isinstance(train, ImageDataset) and isinstance(test, ImageDataset) and cfg.corruption
        train = corrupt(train, cfg.corruption, cfg.severity, seed)
        test = corrupt(test, cfg.corruption, cfg.severity, seed + 1)
    return train, test
