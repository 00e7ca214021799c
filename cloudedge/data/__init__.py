"""cloudedge.data: offline datasets, their shifted variants, user data, partitioners, tokenizers.

See ``docs/data.md`` for the sources, the corruption parameters and the exact partition rules.
"""

from cloudedge.data.build import build_dataset, split_indices
from cloudedge.data.partition import PARTITION_KINDS, partition, partition_by_edge, partition_stats
from cloudedge.data.shifts import CORRUPTIONS, SEVERITIES, check_corruption, corrupt
from cloudedge.data.sources import (
    DIGIT_CLASSES,
    PALETTE,
    ImageDataset,
    TextDataset,
    colored,
    load_digits,
    load_pydocs,
    pydocs_classification,
    resize_images,
    rotate_images,
    rotated,
)
from cloudedge.data.tokenizer import BPETokenizer, ByteTokenizer, lm_blocks, train_bpe
from cloudedge.data.userdata import load_image_folder, load_jsonl, load_text

__all__ = [
    "CORRUPTIONS",
    "DIGIT_CLASSES",
    "PALETTE",
    "PARTITION_KINDS",
    "SEVERITIES",
    "BPETokenizer",
    "ByteTokenizer",
    "ImageDataset",
    "TextDataset",
    "build_dataset",
    "check_corruption",
    "colored",
    "corrupt",
    "lm_blocks",
    "load_digits",
    "load_image_folder",
    "load_jsonl",
    "load_pydocs",
    "load_text",
    "partition",
    "partition_by_edge",
    "partition_stats",
    "pydocs_classification",
    "resize_images",
    "rotate_images",
    "rotated",
    "split_indices",
    "train_bpe",
]
