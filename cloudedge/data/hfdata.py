"""Hugging Face datasets from local disk (``data: {source: hf, path: ...}``), read with ``datasets``.

``path`` is a directory written by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk``, a
``.parquet`` / ``.arrow`` / ``.csv`` / ``.json(l)`` file, or a directory of such files (all of one
kind). Nothing is downloaded: offline mode is forced before the library is used, and a path that is
not on disk is an :class:`InputError` naming it (a hub name such as ``imdb`` is one).

Fields: ``text_field`` gives a :class:`TextDataset`; ``image_field`` (a column of images) gives an
:class:`ImageDataset`, whose ``label_field`` is required. Class names come from the label column's
``ClassLabel`` feature when it has one; otherwise string labels are sorted and integer labels name
themselves, as for JSON Lines. ``domain_field`` names each record's domain (for ``partition.kind:
domain``); without it every record's domain is the dataset's name.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from cloudedge.data.sources import ImageDataset, TextDataset
from cloudedge.errors import InputError

# File suffix -> the datasets library's packaged builder that reads it.
FILE_BUILDERS = {".parquet": "parquet", ".arrow": "arrow", ".csv": "csv", ".json": "json", ".jsonl": "json"}


def _datasets_offline() -> Any:
    """The ``datasets`` module with every network path off (env for a first import, config after)."""
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import datasets
    except ImportError:
        raise InputError("data.source 'hf': the datasets package is not installed (pip install 'cloudedge[hf]')") from None
    datasets.config.HF_DATASETS_OFFLINE = True
    datasets.config.HF_HUB_OFFLINE = True
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    return datasets


def _is_saved_dataset(path: Path) -> bool:
    return path.is_dir() and any((path / n).is_file() for n in ("dataset_dict.json", "state.json"))


def _data_files(path: Path) -> tuple[str, list[str]]:
    """The builder and the files of a data file or a directory of them."""
    files = [path] if path.is_file() else sorted(p for p in path.iterdir() if p.suffix.lower() in FILE_BUILDERS)
    if not files:
        raise InputError(f"{path}: neither a save_to_disk directory nor holding {'/'.join(FILE_BUILDERS)} files")
    kinds = {FILE_BUILDERS.get(p.suffix.lower()) for p in files}
    if None in kinds:
        raise InputError(f"{path}: unknown data file type (known: {', '.join(FILE_BUILDERS)})")
    if len(kinds) > 1:
        raise InputError(f"{path}: mixes file types ({', '.join(sorted(k for k in kinds if k))}); keep one kind")
    return kinds.pop(), [str(p) for p in files]  # type: ignore[return-value]


def read_hf_table(path: str | Path, split: str) -> Any:
    """The ``datasets.Dataset`` at ``path`` (split ``split`` of a saved DatasetDict)."""
    datasets = _datasets_offline()
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such dataset file or folder (source 'hf' reads local data only)")
    try:
        if _is_saved_dataset(path):
            loaded = datasets.load_from_disk(str(path), keep_in_memory=True)
            if isinstance(loaded, datasets.DatasetDict):
                if split not in loaded:
                    raise InputError(f"{path}: data.split: no split '{split}' (splits: {', '.join(loaded)})")
                return loaded[split]
            return loaded
        builder, files = _data_files(path)
        # The builder's Arrow cache goes to a scratch folder; the table is kept in memory.
        with tempfile.TemporaryDirectory(prefix="cloudedge-hf-") as cache:
            return datasets.load_dataset(builder, data_files=files, split="train", cache_dir=cache,
                                         keep_in_memory=True)
    except InputError:
        raise
    except (OSError, ValueError, TypeError, KeyError, datasets.exceptions.DatasetGenerationError) as err:
        first = (str(err).strip() or type(err).__name__).splitlines()[0]
        raise InputError(f"{path}: cannot read as a Hugging Face dataset ({first})") from None


def _column(table: Any, name: str, field: str, path: Path) -> list[Any]:
    if name not in table.column_names:
        raise InputError(f"{path}: data.{field}: no column '{name}' (columns: {', '.join(table.column_names)})")
    return table[name]


def _labels(table: Any, name: str, path: Path) -> tuple[list[int], list[str]]:
    """Integer labels and class names (from a ClassLabel feature when the column has one)."""
    values = _column(table, name, "label_field", path)
    feature = table.features[name]
    if hasattr(feature, "names") and hasattr(feature, "str2int"):  # ClassLabel
        unlabeled = next((i for i, v in enumerate(values) if v is None or v < 0), None)
        if unlabeled is not None:  # ClassLabel writes -1 for "no label"
            raise InputError(f"{path}: row {unlabeled}: data.label_field: column '{name}' has no label there")
        return [int(v) for v in values], list(feature.names)
    if all(isinstance(v, str) for v in values):
        classes = sorted(set(values))
        index = {c: i for i, c in enumerate(classes)}
        return [index[v] for v in values], classes
    if all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values):
        return [int(v) for v in values], [str(i) for i in range(max(values) + 1)]
    raise InputError(f"{path}: data.label_field: column '{name}' must hold class labels, strings or "
                     "non-negative integers (not a mix)")


def _strings(values: list[Any], field: str, name: str, path: Path) -> list[str]:
    for i, v in enumerate(values):
        if not isinstance(v, str):
            raise InputError(f"{path}: row {i}: data.{field}: column '{name}' must hold strings, got {type(v).__name__}")
    return values


def load_hf(path: str | Path, split: str = "train", text_field: str = "text", image_field: str | None = None,
            label_field: str | None = None, domain_field: str | None = None, image_size: int = 32) -> TextDataset | ImageDataset:
    """A local Hugging Face dataset as the project's text or image dataset (see the module docstring)."""
    from cloudedge.data.userdata import pil_to_tensor

    path = Path(path)
    table = read_hf_table(path, split)
    if len(table) == 0:
        raise InputError(f"{path}: the dataset (split '{split}') has no rows")
    name = path.stem if path.is_file() else path.name
    domains = (_strings(_column(table, domain_field, "domain_field", path), "domain_field", domain_field, path)
               if domain_field else [name] * len(table))
    if image_field is not None:
        if label_field is None:
            raise InputError(f"{path}: data.label_field: images need a label column")
        labels, classes = _labels(table, label_field, path)
        images = []
        for i, img in enumerate(_column(table, image_field, "image_field", path)):
            if not hasattr(img, "convert"):
                raise InputError(f"{path}: row {i}: data.image_field: column '{image_field}' must hold images")
            images.append(pil_to_tensor(img.convert("RGB"), image_size))
        domain_names = sorted(set(domains))
        domain_ids = torch.tensor([domain_names.index(d) for d in domains]) if domain_field else None
        return ImageDataset(x=torch.stack(images), y=torch.tensor(labels, dtype=torch.long), classes=classes,
                            domains=domain_ids)
    texts = _strings(_column(table, text_field, "text_field", path), "text_field", text_field, path)
    labels_or_none, classes = _labels(table, label_field, path) if label_field else (None, [])
    return TextDataset(texts=texts, labels=labels_or_none, classes=classes, domains=domains,
                       ids=[f"{name}:{i}" for i in range(len(texts))])
