"""The `pretrain` section: collaborative pre-training across the fleet (docs/pretraining.md)."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, model_validator

from cloudedge.config.base import StrictModel
from cloudedge.config.clock import ClockConfig
from cloudedge.config.data import DataConfig
from cloudedge.config.model import ModelConfig
from cloudedge.registry import plugin_choice

TierName = Literal["cloud", "edge", "device"]


class PretrainConfig(StrictModel):
    """One pre-training run: task, algorithm, batch controller, objective, schedule, outputs."""

    moved_keys: ClassVar[dict[str, str]] = {
        "controller_args": "give the parameters with the controller, e.g. controller: {name: goodput, lr_power: 0.5}",
        "objective_args": "give the parameters with the objective, e.g. objective: {name: irm, penalty_weight: 100}",
    }

    data: DataConfig | None = None
    model: ModelConfig | None = None
    clock: ClockConfig | None = Field(default=None, description="this stage's own clock section (charge_as, "
                                                                "seq_len); none: the top-level one")

    # What is trained.
    task: Literal["lm", "classify", "clip"] = Field(
        default="lm", description="lm: causal LM on text; classify: images -> labels; clip: image-caption pairs")
    encoder: Literal["vit", "mlp"] | None = Field(
        default=None, description="classify: encoder of the Classifier (default: vit for model.kind vit, else mlp)")
    seq_len: int | None = Field(default=None, ge=4, description="lm: tokens per training sequence (default: model.context)")
    workers: list[TierName] = Field(
        default_factory=lambda: ["cloud", "edge", "device"], description="tiers whose nodes train (each holds data)")

    # How workers combine.
    algorithm: plugin_choice("cloudedge.pretrain.algorithms:ALGORITHMS") = Field(  # type: ignore[valid-type]
        default="sync", description="sync: one aggregated gradient step per round; local: H local steps then an outer step")
    local_steps: int = Field(default=8, ge=1, description="local: inner steps per round (H)")
    outer_optimizer: Literal["nesterov", "fedavg"] = Field(
        default="nesterov", description="local: DiLoCo's SGD + Nesterov momentum on the pseudo-gradient, or plain FedAvg")
    outer_lr: float = Field(default=0.7, gt=0)
    outer_momentum: float = Field(default=0.9, ge=0, lt=1)
    fednova: bool = Field(default=True, description="local: normalize updates by local steps when they differ")

    # Batches.
    controller: plugin_choice("cloudedge.pretrain.batch:CONTROLLERS") = Field(  # type: ignore[valid-type]
        default="uniform", description="batch controller: a name, or {name: ..., its parameters} (docs/pretraining.md)")
    global_batch: int = Field(default=32, ge=1, description="samples per step over all workers (sequences for lm)")
    memory_fraction: float = Field(
        default=0.5, gt=0, le=1, description="share of a node's memory that training may use")

    # Optimisation.
    rounds: int = Field(default=50, ge=1)
    time_budget_s: float | None = Field(
        default=None, gt=0, description="stop before a round that would start at or past this virtual time")
    optimizer: Literal["adamw", "adam", "sgd"] = Field(
        default="adamw", description="sync: the step; local: inner steps. adamw: betas 0.9/0.95 (DiLoCo); "
        "adam: torch's defaults, betas 0.9/0.999 (IRM's Colored-MNIST recipe)")
    lr: float = Field(default=1e-3, gt=0)
    weight_decay: float = Field(default=0.1, ge=0)
    warmup_rounds: int = Field(default=0, ge=0)
    lr_schedule: Literal["constant", "cosine"] = Field(
        default="constant", description="after the warm-up: constant (controllers compare at one lr), or a cosine "
                                        "decay from lr to lr * min_lr_ratio at the last round")
    min_lr_ratio: float = Field(default=0.0, ge=0, le=1, description="cosine: the last round's lr as a share of lr")
    grad_clip: float | None = Field(default=1.0, gt=0)
    objective: plugin_choice("cloudedge.pretrain.objectives:OBJECTIVES") = Field(  # type: ignore[valid-type]
        default="erm", description="classify: a name (erm irm vrex fedsr fediir pin), or {name: ..., its parameters}")

    # Where the math runs.
    device: Literal["cpu", "cuda", "auto"] = Field(
        default="cpu", description="where workers and the coordinator hold the model (auto: cuda when present)")
    precision: Literal["fp32", "bf16"] = Field(
        default="fp32", description="bf16: forward passes under bfloat16 autocast (weights, gradients and "
                                    "optimizer state stay float32)")

    # Wire and outputs.
    compression: Literal["none", "fp16", "int8"] = "none"
    update_check: Literal["structure", "norm"] = Field(
        default="structure",
        description="every update is checked before aggregation: structure (keys, shapes, finite values), "
                    "or also norm (reject norms far outside the round's: median + 5 MAD; docs/reliability.md)")
    eval_every: int = Field(default=5, ge=1)
    eval_samples: int = Field(default=128, ge=1, description="held-out samples the cloud evaluates on")
    checkpoint_every: int = Field(default=10, ge=1)
    target_val_loss: float | None = Field(default=None, description="report the virtual time to reach it")

    @model_validator(mode="after")
    def _consistent(self) -> PretrainConfig:
        if not self.workers:
            raise ValueError("workers: name at least one tier")
        if len(set(self.workers)) != len(self.workers):
            raise ValueError("workers: a tier is named twice")
        return self
