"""The `finetune` section: hierarchical federated fine-tuning of LoRA adapters (cloudedge.finetune)."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field, model_validator

from cloudedge.config.base import StrictModel
from cloudedge.config.clock import ClockConfig
from cloudedge.config.data import DataConfig
from cloudedge.config.model import ModelConfig
from cloudedge.registry import plugin_choice


class LoraSection(StrictModel):
    """LoRA adapters and how they are aggregated (docs/finetuning.md, "LoRA aggregation")."""

    rank: int = Field(default=4, ge=1)
    alpha: float = Field(default=8.0, gt=0, description="scaling = alpha / rank")
    targets: list[str] | None = Field(default=None, description="module names; default per architecture")
    moved_keys: ClassVar[dict[str, str]] = {
        "refactor": "give it with the mode, e.g. mode: {name: product, refactor: merge}"}

    mode: plugin_choice("cloudedge.finetune.lora:LORA_MODES") = Field(  # type: ignore[valid-type]
        default="fedavg", description="fedavg | ffa | product (knob refactor: svd | merge): a name or {name: ...}")


class GateSection(StrictModel):
    """The update gate every device and edge update passes (cloudedge.robust.UpdateGate)."""

    norm_rule: Literal["mad", "ratio", "none"] = Field(
        default="mad", description="outlying-norm rule over a round's norms per local step; none: structure only")
    max_norm_ratio: float = Field(default=5.0, gt=0, description="k of the norm rule")
    max_norm: float | None = Field(default=None, gt=0, description="absolute cap on an update's L2 norm")
    min_updates: int = Field(default=3, ge=3, description="fewest updates for the norm rule to apply")
    mad_floor: float = Field(default=0.1, ge=0, description="MAD floor as a share of the median (bound >= 1.5 x median at k = 5)")


class RobustSection(StrictModel):
    """Robust aggregation of device updates at the edge and edge updates at the cloud
    (docs/reliability.md, "Reliability in fine-tuning")."""

    moved_keys: ClassVar[dict[str, str]] = {
        key: "give it with the aggregator, e.g. aggregator: {name: trimmed_mean, beta: 0.3}"
        for key in ("beta", "n_byzantine", "m")}

    aggregator: plugin_choice("cloudedge.aggregate:AGGREGATORS") = Field(  # type: ignore[valid-type]
        default="mean", description="at the edge, over its devices' updates: a name or {name: ..., its knobs}")
    cloud_aggregator: plugin_choice("cloudedge.aggregate:AGGREGATORS", optional=True) = Field(  # type: ignore[valid-type]
        default=None, description="at the cloud, over edge updates (barrier policies); null: same as aggregator")
    gate: GateSection = Field(default_factory=GateSection)


class AttackSection(StrictModel):
    """Simulated hostile devices, for experiments only (cloudedge.attacks)."""

    moved_keys: ClassVar[dict[str, str]] = {
        key: "give it with the attack, e.g. kind: {name: scaled, scale: 10}" for key in ("scale", "std")}

    kind: plugin_choice("cloudedge.attacks:ATTACKS") = Field(  # type: ignore[valid-type]
        description="the attack: a name (signflip scaled random nan), or {name: ..., its knobs}")
    fraction: float = Field(default=0.2, ge=0, le=1, description="share of all devices that attack")
    seed: int = Field(default=0, ge=0, description="which devices attack")


class ChurnSection(StrictModel):
    """Devices that drop out mid-round or come back with a stale model (docs/reliability.md)."""

    dropout: float = Field(default=0.0, ge=0, lt=1, description="chance a device that started a round drops out")
    stale_prob: float = Field(default=0.0, ge=0, le=1,
                              description="chance an available device trains from its cached (old) model")
    max_staleness: int = Field(default=4, ge=0, description="stale updates older than this (edge rounds) are rejected")
    stale_decay: float = Field(default=0.5, ge=0, description="weight of an update s rounds stale: (1 + s)^-decay")


class SelectionSection(StrictModel):
    """Who takes part in a round (docs/reliability.md, "Selection, deadlines and over-selection")."""

    goal: int | None = Field(default=None, ge=1, description=(
        "updates each aggregation point waits for per round; null: 'participation' of the available devices"))
    over_selection: float = Field(default=1.0, ge=1.0, description=(
        "with a goal: draw goal x this many online devices and keep the first goal updates"))


class PrivacySection(StrictModel):
    """Differential privacy of device updates: DP-FedAvg at the edge (cloudedge.privacy)."""

    clip_norm: float = Field(gt=0, description="S: every device update is clipped to this L2 norm")
    noise_multiplier: float = Field(gt=0, description="z: noise std = z S on the sum")
    mode: Literal["central", "local"] = "central"
    delta: float = Field(default=1e-5, gt=0, lt=1, description="the delta of the reported (epsilon, delta)")


class FinetuneConfig(StrictModel):
    """One fine-tuning run: LoRA, sync policy, robustness, privacy, schedule."""

    data: DataConfig | None = None
    model: ModelConfig | None = None
    clock: ClockConfig | None = Field(default=None, description="this stage's own clock section (charge_as, "
                                                                "seq_len); none: the top-level one")
    init: str | None = Field(
        default=None, description="cloudedge checkpoint (folder with 'latest' or .safetensors) of the base model"
    )
    init_prefix: str = Field(default="", description="key prefix of the model's tensors in that checkpoint")
    pooling: Literal["auto", "cls", "mean"] = Field(
        default="auto", description="ViT feature: the final CLS token, or the mean of all tokens; auto: mean for a "
                                    "cloudedge pre-training Classifier (pre-trained that way), else cls")
    lora: LoraSection = Field(default_factory=LoraSection)
    sync: plugin_choice("cloudedge.finetune.sync:POLICIES") = Field(  # type: ignore[valid-type]
        default="autonomous", description="synchronization policy: a name, or {name: ..., its knobs} "
                                          "(docs/finetuning.md, \"Synchronization policies\")")
    participation: float = Field(default=1.0, gt=0, le=1, description="share of available devices per edge round")
    selection: SelectionSection = Field(default_factory=SelectionSection)
    batch_size: int = Field(default=16, ge=1)
    optimizer: Literal["sgd", "adamw"] = "adamw"
    lr: float = Field(default=3e-3, gt=0)
    server_optimizer: plugin_choice("cloudedge.aggregate:SERVER_OPTIMIZERS") = Field(  # type: ignore[valid-type]
        default="fedavg", description="the cloud's step on the aggregated delta: a name, or {name: ..., its knobs} "
                                       "(momentum; beta1, beta2, tau); its lr is server_lr (docs/aggregation.md)")
    server_lr: float = Field(default=1.0, gt=0)
    compression: Literal["none", "fp16", "bf16", "int8"] = "none"
    device: Literal["cpu", "cuda", "auto"] = Field(
        default="cpu", description="where every worker holds the model (auto: cuda when present)")
    precision: Literal["fp32", "bf16"] = Field(
        default="fp32", description="bf16: forward passes under bfloat16 autocast (weights, adapters and "
                                    "optimizer state stay float32); the memory check counts it")
    time_budget_s: float = Field(default=60.0, gt=0, description="virtual seconds the run may take")
    max_cloud_rounds: int = Field(default=100, ge=1, description="cloud updates (async: merges / edges)")
    target_accuracy: float | None = Field(default=None, gt=0, le=1, description="for time_to_target_s")
    eval_max: int | None = Field(default=None, ge=1, description="test samples used per evaluation")
    eval_every_s: float | None = Field(
        default=None, gt=0, description="score the global model every this many virtual seconds (the model in "
                                        "effect then; the same instants for every policy); none: after each cloud update")
    checkpoint_every: int = Field(default=1, ge=1, description="cloud updates between checkpoints")
    robust: RobustSection = Field(default_factory=RobustSection)
    attack: AttackSection | None = Field(default=None, description="simulated attackers (experiments only)")
    churn: ChurnSection = Field(default_factory=ChurnSection)
    privacy: PrivacySection | None = None
    memory_fraction: float = Field(default=0.5, gt=0, le=1,
                                   description="share of a device's memory fine-tuning may use")

    @model_validator(mode="before")
    @classmethod
    def _refuse_sync_policy_key(cls, data: Any) -> Any:
        sync = data.get("sync") if isinstance(data, dict) else None
        if isinstance(sync, dict) and "policy" in sync:
            raise ValueError("sync.policy is no longer a key: name the policy with its knobs, e.g. "
                             "sync: {name: autonomous, k1: 5, max_steps: 20}")
        return data

    @model_validator(mode="after")
    def _consistent(self) -> FinetuneConfig:
        mode = self.lora.mode.name
        # Validating lora.mode imported its registry already (plugin_choice): no new import cost here.
        from cloudedge.finetune.lora import mode_class

        if mode_class(mode).refactors and self.server_optimizer.name != "fedavg":
            raise ValueError(f"lora.mode '{mode}' needs server_optimizer 'fedavg' (adapters are refactored)")
        if mode_class(mode).refactors:
            # Modes that refactor the adapters: per-tensor medians/trims and noise on the factors have
            # no meaning there (docs/reliability.md).
            for name, agg in (("aggregator", self.robust.aggregator), ("cloud_aggregator", self.robust.cloud_aggregator)):
                if agg is not None and agg.name != "mean":
                    raise ValueError(f"robust.{name} '{agg.name}' needs a lora.mode that keeps the factors, "
                                     f"such as 'fedavg' or 'ffa' (got '{mode}')")
            if self.privacy is not None:
                raise ValueError(f"privacy needs a lora.mode that keeps the factors, such as 'fedavg' or 'ffa' "
                                 f"(got '{mode}')")
        if self.privacy is not None and self.privacy.mode == "central" and self.robust.aggregator.name != "mean":
            raise ValueError("robust.aggregator must be 'mean' with central privacy (DP-FedAvg's noise is "
                             "calibrated to a clipped sum); use privacy.mode 'local' for robust aggregation")
        return self
