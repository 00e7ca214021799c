"""The `model` section: a small model built from a transformers config, or a local checkpoint."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from cloudedge.config.base import StrictModel


class ModelConfig(StrictModel):
    kind: Literal["gpt", "vit", "clip", "hf"] = "gpt"
    path: str | None = Field(default=None, description="local HF checkpoint dir (kind hf) or cloudedge checkpoint")
    # Transformer size (gpt, vit, and both CLIP towers).
    hidden: int = Field(default=128, ge=8)
    layers: int = Field(default=4, ge=1)
    heads: int = Field(default=4, ge=1)
    context: int = Field(default=128, ge=8, description="gpt: context length; clip: text length")
    # Images
    image_size: int = Field(default=8, ge=4)
    patch_size: int = Field(default=2, ge=1)
    channels: int = Field(default=3, ge=1)
    num_labels: int = Field(default=10, ge=2)
    projection_dim: int = Field(default=64, ge=8, description="clip: joint embedding size")
    dropout: float = Field(
        default=0.0, ge=0.0, lt=1.0, description="dropout of built models (0: training is reproducible)"
    )

    @model_validator(mode="after")
    def _consistent(self) -> ModelConfig:
        if self.kind == "hf" and not self.path:
            raise ValueError("kind 'hf' needs 'path' (a local checkpoint directory)")
        if self.hidden % self.heads:
            raise ValueError(f"hidden ({self.hidden}) must be divisible by heads ({self.heads})")
        if self.kind in ("vit", "clip") and self.image_size % self.patch_size:
            raise ValueError(f"image_size ({self.image_size}) must be divisible by patch_size ({self.patch_size})")
        return self
