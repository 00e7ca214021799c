"""The `data` section: which data, and how it is split over the fleet's devices."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from cloudedge.config.base import StrictModel
from cloudedge.config.glyphs import GlyphsConfig

SourceName = Literal["digits", "colored", "rotated", "corrupted", "pydocs", "text", "jsonl", "imagefolder", "glyphs",
                     "hf"]
# Sources that read the user's files named by `path`.
PATH_SOURCES = ("text", "jsonl", "imagefolder", "hf")


class PartitionConfig(StrictModel):
    """How samples are dealt to devices. Deterministic under the run's seed."""

    kind: Literal["iid", "dirichlet", "domain", "quantity"] = "iid"
    alpha: float = Field(default=0.5, gt=0, description="Dirichlet concentration (dirichlet, quantity)")
    min_samples: int = Field(default=1, ge=0, description="every client gets at least this many")


class DataConfig(StrictModel):
    source: SourceName = "digits"
    path: str | None = Field(default=None, description="file or folder for text, jsonl, imagefolder, hf")
    text_field: str = "text"
    label_field: str | None = None
    # hf: a Hugging Face dataset on disk (docs/data.md).
    split: str = Field(default="train", description="hf: the split of a saved DatasetDict")
    image_field: str | None = Field(default=None, description="hf: column of images (else text_field is read)")
    domain_field: str | None = Field(default=None, description="jsonl, hf: field naming each record's domain")
    class_names: str | None = Field(default=None, description="file with one class name a line (imagefolder)")
    # Variants of the bundled digits.
    flip_prob: float = Field(default=0.1, ge=0, le=1, description="colored: chance the color lies")
    test_flip_prob: float | None = Field(
        default=None, ge=0, le=1, description="colored: flip_prob of the test split (None: same as flip_prob)"
    )
    degrees: float = Field(default=0.0, description="rotated: rotation angle")
    corruption: str | None = None
    severity: int = Field(default=3, ge=1, le=5)
    image_size: int = Field(default=8, ge=4, le=512, description="images are resized to this")
    # pydocs
    max_docs: int | None = Field(default=None, ge=1)
    min_chars: int = Field(default=40, ge=1, description="pydocs: drop docstrings shorter than this")
    n_classes: int | None = Field(
        default=None, ge=2, description="pydocs: classify docstrings by module over the n largest modules"
    )
    test_fraction: float = Field(default=0.2, gt=0, lt=1)
    partition: PartitionConfig = Field(default_factory=PartitionConfig)
    glyphs: GlyphsConfig = Field(default_factory=GlyphsConfig, description="glyphs: what the images show")

    @model_validator(mode="before")
    @classmethod
    def _glyphs_image_size(cls, data: Any) -> Any:
        # glyphs are MNIST-scale: 28 px unless the config says otherwise (the digits keep 8).
        if isinstance(data, dict) and data.get("source") == "glyphs" and "image_size" not in data:
            return {**data, "image_size": 28}
        return data

    @model_validator(mode="after")
    def _path_when_needed(self) -> DataConfig:
        if self.source in PATH_SOURCES and not self.path:
            raise ValueError(f"source '{self.source}' needs 'path'")
        if self.source == "corrupted" and not self.corruption:
            raise ValueError("source 'corrupted' needs 'corruption'")
        return self
