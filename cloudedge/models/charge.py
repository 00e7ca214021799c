"""The model whose costs the virtual clock charges (``clock.charge_as``), built on the meta device.

A run can learn with a small model while the clock charges a deployment-scale one (a preset of
:mod:`cloudedge.models.presets`, a ``model``-style section, or a ``{family, config}`` architecture).
Every cost then comes from that one model: FLOPs per sample (:mod:`cloudedge.models.flops`), the
bytes of every message (its tensors' names, shapes and dtypes, :func:`cloudedge.comm.wire_nbytes`)
and each worker's memory. The model is built with ``torch.device("meta")``: shapes only, no weights,
so a 1B-parameter architecture costs nothing to describe. docs/profiles.md, "Charged costs".
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import CLIPConfig, GPT2Config, LlamaConfig, PretrainedConfig, ViTConfig

from cloudedge.config.clock import ArchitectureConfig, ClockConfig
from cloudedge.config.model import ModelConfig
from cloudedge.errors import InputError
from cloudedge.models.presets import PRESETS

FIELD = "clock.charge_as"
_CONFIG_CLASSES: dict[str, type[PretrainedConfig]] = {
    "gpt2": GPT2Config, "llama": LlamaConfig, "vit": ViTConfig, "clip": CLIPConfig,
}


@dataclass(frozen=True)
class ChargedModel:
    """What ``clock.charge_as`` names, resolved.

    Exactly one of ``model_cfg`` (a ``model``-style section: built like the trained model) and
    ``hf_config`` (a preset or ``{family, config}``: built from its ``transformers`` config) is set.
    """

    name: str
    family: str  # gpt2 | llama | vit | clip, or the ModelConfig kind (gpt | vit | clip)
    model_cfg: ModelConfig | None = None
    hf_config: PretrainedConfig | None = None
    source: str = ""
    seq_len: int | None = None  # clock.seq_len
    field: str = FIELD  # where the config names it (a stage's own section: "pretrain.clock.charge_as")

    @property
    def is_text(self) -> bool:
        return self.family in ("gpt2", "llama", "gpt")

    def text_len(self, stage_seq_len: int) -> int:
        """Tokens of one charged text sample: ``clock.seq_len``, else the stage's own length."""
        seq = self.seq_len or stage_seq_len
        limit = self.max_positions()
        if limit is not None and seq > limit:
            raise InputError(f"{self.field.removesuffix('charge_as')}seq_len: {seq} tokens exceed {self.name}'s "
                             f"{limit} positions")
        return seq

    def max_positions(self) -> int | None:
        if self.model_cfg is not None:
            return self.model_cfg.context if self.model_cfg.kind == "gpt" else None
        cfg = self.hf_config
        return getattr(cfg, "n_positions", None) or getattr(cfg, "max_position_embeddings", None)


def stage_charge(cfg: Any, stage: str) -> ChargedModel | None:
    """The model a stage's clock charges: its own section's ``clock`` (``pretrain.clock``), else the
    top-level one (:meth:`RunConfig.stage_clock`); errors name the section the choice came from."""
    section = getattr(cfg, stage, None)
    own = getattr(section, "clock", None)
    from_stage = own is not None and "charge_as" in own.model_fields_set
    return resolve_charge(cfg.stage_clock(stage), f"{stage}.clock.charge_as" if from_stage else FIELD)


def resolve_charge(clock: ClockConfig | None, field: str = FIELD) -> ChargedModel | None:
    """The model ``clock.charge_as`` names, or None when absent (the clock charges the trained model)."""
    charge_as = clock.charge_as if clock is not None else None
    seq_len = clock.seq_len if clock is not None else None
    if charge_as is None:
        return None
    if isinstance(charge_as, str):
        preset = PRESETS.get(charge_as)
        if preset is None:
            raise InputError(f"{field}: unknown preset '{charge_as}' (presets: {', '.join(PRESETS)}; "
                             "or give a full model config)")
        return ChargedModel(charge_as, preset.family, hf_config=hf_config(preset.family, preset.config),
                            source=preset.source, seq_len=seq_len, field=field)
    if isinstance(charge_as, ModelConfig):
        if charge_as.kind == "hf":
            raise InputError(f"{field}.kind: 'hf' checkpoints cannot be charged; give the architecture as "
                             "{family, config} or a preset")
        name = f"{charge_as.kind} {charge_as.hidden}x{charge_as.layers} (model config)"
        return ChargedModel(name, charge_as.kind, model_cfg=charge_as, source=field, seq_len=seq_len, field=field)
    assert isinstance(charge_as, ArchitectureConfig)
    return ChargedModel(charge_as.name or charge_as.family, charge_as.family,
                        hf_config=hf_config(charge_as.family, charge_as.config, field), source=field,
                        seq_len=seq_len, field=field)


def hf_config(family: str, fields: dict[str, Any], field: str = FIELD) -> PretrainedConfig:
    """The ``transformers`` config of ``family`` with ``fields`` (InputError on a bad one)."""
    try:
        config = _CONFIG_CLASSES[family](**fields)
    except (TypeError, ValueError) as err:
        raise InputError(f"{field}.config: not a valid {family} config ({err})") from None
    # sdpa on the meta device: the same attention kernels the zoo's models use.
    config._attn_implementation = "sdpa"
    return config


def meta_backbone(charged: ChargedModel) -> nn.Module:
    """The charged architecture's base model (no task head) on the meta device."""
    from transformers import CLIPModel, GPT2Model, LlamaModel, ViTModel

    cfg = charged.hf_config
    assert cfg is not None
    with torch.device("meta"):
        if charged.family == "gpt2":
            return GPT2Model(cfg)
        if charged.family == "llama":
            return LlamaModel(cfg)
        if charged.family == "vit":
            return ViTModel(cfg, add_pooling_layer=False)
        return CLIPModel(cfg)


def meta_layout(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter of ``model`` by name (tied ones once), as shape-only meta tensors."""
    return {name: torch.empty(p.shape, dtype=p.dtype, device="meta") for name, p in model.named_parameters()}


def describe(name: str, params: int, update_bytes: int) -> dict[str, Any]:
    """How summaries state a model: its name, parameters and the bytes of one update."""
    return {"name": name, "params": int(params), "update_bytes": int(update_bytes)}


def cost_model_summary(trained: dict[str, Any], charged: dict[str, Any] | None,
                       charge: ChargedModel | None) -> dict[str, Any]:
    """The ``cost_model`` entry of a summary: both models, and which one the clock charged."""
    return {
        "trained": trained,
        "charged": charged if charged is not None else trained,
        "charged_as": charge.name if charge is not None else None,
        "charged_source": charge.source if charge is not None else None,
        "note": (f"virtual-clock costs (FLOPs, bytes, memory) were charged as {charge.name}"
                 if charge is not None else "virtual-clock costs are the trained model's"),
    }


def cost_model_sentence(cost_model: dict[str, Any]) -> str:
    """One line for reports: which model learned, and which one the clock charged."""
    from cloudedge.fleet.topology import format_bytes

    def one(m: dict[str, Any]) -> str:
        return f"{m['name']}: {m['params']:,} parameters, {format_bytes(m['update_bytes'])} per update"

    trained, charged = cost_model["trained"], cost_model["charged"]
    if cost_model.get("charged_as") is None:
        return f"Virtual-clock costs are those of the model that learned ({one(trained)})."
    return (f"Virtual-clock costs were charged as **{cost_model['charged_as']}** ({one(charged)}) while "
            f"{one(trained)} learned (clock.charge_as).")
