"""The top level of a config file."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from cloudedge.config.adapt import AdaptConfig
from cloudedge.config.base import StrictModel
from cloudedge.config.clock import ClockConfig
from cloudedge.config.data import DataConfig
from cloudedge.config.finetune import FinetuneConfig
from cloudedge.config.fleet import FleetConfig
from cloudedge.config.model import ModelConfig
from cloudedge.config.pretrain import PretrainConfig
from cloudedge.config.track import TrackConfig


class EngineConfig(StrictModel):
    kind: Literal["local", "ray"] = "local"
    address: str | None = Field(default=None, description="ray: 'auto' or HOST:PORT; none starts a local Ray")
    threads: int | None = Field(
        default=None, ge=1, le=1024,
        description="torch threads per process; default: 1 on machines with 2 or fewer cores, else torch's own")


class RunConfig(StrictModel):
    name: str = "run"
    seed: int = Field(default=0, ge=0, lt=2**32, description="seeds numpy, torch and every worker")
    engine: EngineConfig = Field(default_factory=EngineConfig)
    fleet: FleetConfig = Field(default_factory=FleetConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    clock: ClockConfig = Field(default_factory=ClockConfig)
    pretrain: PretrainConfig | None = None
    finetune: FinetuneConfig | None = None
    adapt: AdaptConfig | None = None
    track: TrackConfig = Field(default_factory=TrackConfig, description="TensorBoard / MLflow (docs/tracking.md)")
    plugins: list[str] = Field(
        default_factory=list,
        description="modules registering your own plug-ins, imported before the rest is validated: dotted "
                    "names or .py files relative to this config (docs/extending.md)")
    # Directory that relative paths in this config are resolved against (set by load_config).
    base_dir: str = "."

    def stage_data(self, stage: str) -> DataConfig:
        """The data a stage uses: its own section's, else the top-level one."""
        section = getattr(self, stage)
        return section.data if section is not None and section.data is not None else self.data

    def stage_model(self, stage: str) -> ModelConfig:
        section = getattr(self, stage)
        return section.model if section is not None and section.model is not None else self.model

    def stage_clock(self, stage: str) -> ClockConfig:
        """The clock a stage charges by: the top-level one, with the fields its own section
        (``pretrain.clock``) sets replacing those (``finetune.clock: {seq_len: 64}`` keeps the
        top-level ``charge_as``)."""
        section = getattr(self, stage)
        own = section.clock if section is not None else None
        if own is None:
            return self.clock
        return self.clock.model_copy(update={k: getattr(own, k) for k in own.model_fields_set})
