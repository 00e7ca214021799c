"""The `adapt` section. Owned by the `cloudedge.adapt` stage; extended as the stage grows."""

from __future__ import annotations

from cloudedge.config.base import StrictModel
from cloudedge.config.data import DataConfig
from cloudedge.config.model import ModelConfig


class AdaptConfig(StrictModel):
    data: DataConfig | None = None
    model: ModelConfig | None = None
