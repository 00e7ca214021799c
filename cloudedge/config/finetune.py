"""The `finetune` section: hierarchical federated fine-tuning of LoRA adapters (cloudedge.finetune)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from cloudedge.config.base import StrictModel
from cloudedge.config.data import DataConfig
from cloudedge.config.model import ModelConfig

SyncName = Literal["fedavg2", "hierfavg", "tempo", "adaptive-interval", "autonomous"]


class LoraSection(StrictModel):
    """LoRA adapters and how they are aggregated (docs/finetuning.md, "LoRA aggregation")."""

    rank: int = Field(default=4, ge=1)
    alpha: float = Field(default=8.0, gt=0, description="scaling = alpha / rank")
    targets: list[str] | None = Field(default=None, description="module names; default per architecture")
    mode: Literal["fedavg", "ffa", "product"] = "fedavg"
    refactor: Literal["svd", "merge"] = Field(default="svd", description="product mode: SVD refactor or merge")


class SyncSection(StrictModel):
    """Synchronization policy and its knobs (docs/finetuning.md, "Synchronization policies")."""

    policy: SyncName = "autonomous"
    k1: int = Field(default=5, ge=1, description="local steps per edge round (fixed policies; autonomous: the median device's)")
    k2: int = Field(default=2, ge=1, description="edge rounds per cloud sync (hierfavg, tempo base, adaptive-interval)")
    deadline_factor: float | None = Field(
        default=2.0, gt=0, description="edge-round deadline = factor x median device's k1-step time; null: none"
    )
    min_steps: int = Field(default=1, ge=1)
    max_steps: int = Field(default=40, ge=1)
    alpha: float = Field(default=1.0, gt=0, description="autonomous: weight of divergence against sync cost")
    k2_max: int = Field(default=8, ge=1, description="autonomous: most edge rounds between cloud syncs")
    margin: float = Field(default=0.9, gt=0, le=1, description="autonomous: share of the deadline a device plans to use")
    sync_budget_bytes: float | None = Field(default=None, gt=0, description="autonomous: edge->cloud bytes per edge")
    phi: float = Field(default=0.025, gt=0, description="adaptive-interval: Wang's control parameter")


class FinetuneConfig(StrictModel):
    data: DataConfig | None = None
    model: ModelConfig | None = None
    init: str | None = Field(
        default=None, description="cloudedge checkpoint (folder with 'latest' or .safetensors) of the base model"
    )
    init_prefix: str = Field(default="", description="key prefix of the model's tensors in that checkpoint")
    lora: LoraSection = Field(default_factory=LoraSection)
    sync: SyncSection = Field(default_factory=SyncSection)
    participation: float = Field(default=1.0, gt=0, le=1, description="share of available devices per edge round")
    batch_size: int = Field(default=16, ge=1)
    optimizer: Literal["sgd", "adamw"] = "adamw"
    lr: float = Field(default=3e-3, gt=0)
    server_optimizer: Literal["fedavg", "fedavgm", "fedadam", "fedyogi"] = "fedavg"
    server_lr: float = Field(default=1.0, gt=0)
    compression: Literal["none", "fp16", "bf16", "int8"] = "none"
    time_budget_s: float = Field(default=60.0, gt=0, description="virtual seconds the run may take")
    max_cloud_rounds: int = Field(default=100, ge=1, description="cloud updates (async: merges / edges)")
    target_accuracy: float | None = Field(default=None, gt=0, le=1, description="for time_to_target_s")
    eval_max: int | None = Field(default=None, ge=1, description="test samples used per evaluation")
    checkpoint_every: int = Field(default=1, ge=1, description="cloud updates between checkpoints")

    @model_validator(mode="after")
    def _consistent(self) -> FinetuneConfig:
        if self.lora.mode == "product" and self.server_optimizer != "fedavg":
            raise ValueError("lora.mode 'product' needs server_optimizer 'fedavg' (adapters are refactored)")
        if self.sync.min_steps > self.sync.max_steps:
            raise ValueError("sync.min_steps must be <= sync.max_steps")
        return self
