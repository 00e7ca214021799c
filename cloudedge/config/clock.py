"""The `clock` section: which model's costs the virtual clock charges (docs/profiles.md, "Charged costs")."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator

from cloudedge.config.base import StrictModel
from cloudedge.config.model import ModelConfig


class ArchitectureConfig(StrictModel):
    """A full architecture given as a ``transformers`` config (the fields of its ``config.json``)."""

    family: Literal["gpt2", "llama", "vit", "clip"]
    config: dict[str, Any] = Field(default_factory=dict, description="transformers config fields, e.g. hidden_size")
    name: str | None = Field(default=None, description="shown in summaries; default: the family")


class ClockConfig(StrictModel):
    charge_as: str | ModelConfig | ArchitectureConfig | None = Field(
        default=None,
        description="charge FLOPs, message bytes and memory as this model while the configured one learns: "
                    "a preset name, a `model`-style section, or {family, config}; none: the trained model")
    seq_len: int | None = Field(
        default=None, ge=1, description="tokens per charged text sample; default: the stage's own sequence length")

    @field_validator("charge_as")
    @classmethod
    def _known_preset(cls, value: Any) -> Any:
        if isinstance(value, str):
            from cloudedge.models.presets import PRESETS

            if value not in PRESETS:
                raise ValueError(f"unknown preset '{value}' (presets: {', '.join(PRESETS)}; "
                                 "or give a full model config)")
        return value
