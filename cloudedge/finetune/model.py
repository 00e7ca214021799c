"""The model a device fine-tunes: a frozen pre-trained backbone with LoRA adapters and a linear head.

Backbones (the base model's kind is read from the built model, so local HF checkpoints work too):

- ``vit``: a ViT's encoder; the feature is the final (layer-normed) CLS token, or the mean of all
  final tokens (``pooling="mean"``: how the pre-training stage's image Classifier reads it).
- ``clip``: the vision tower of a CLIP model; the feature is its pooled CLS output. This is how
  the demo chains CLIP pre-training -> fine-tuning on digits -> prompt adaptation.
- ``gpt``: a GPT-2 decoder; the feature is the hidden state of the last non-pad token (the
  ByteTokenizer puts EOS there, so the feature has attended to the whole text).

LoRA layers come from ``peft.inject_adapter_in_model`` on the attention projections
(:data:`cloudedge.finetune.lora.TARGETS`); every base parameter is frozen; the head is trained.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, inject_adapter_in_model
from torch import nn

from cloudedge.config.model import ModelConfig
from cloudedge.errors import InputError
from cloudedge.finetune.lora import BASE_DELTA_SUFFIX, TARGETS, lora_layers, mode_class
from cloudedge.models.inputs import IMAGE_SPEC_ATTR, ImageSpec, fit_pixels


class LoraClassifier(nn.Module):
    """``head(features(backbone(inputs)))``; ``inputs`` is ``{"pixel_values"}`` or ``{"input_ids", "attention_mask"}``."""

    def __init__(self, backbone: nn.Module, kind: str, feature_dim: int, n_classes: int, pooling: str = "cls",
                 image_spec: ImageSpec | None = None):
        super().__init__()
        self.backbone = backbone
        self.kind = kind
        self.pooling = pooling
        self.head = nn.Linear(feature_dim, n_classes)
        # A checkpoint from a HF directory: its processor's size and mean / std, applied to each batch
        # (the data stays in [0, 1] at the coordinator). None: pixels go in as they are.
        self.image_spec = image_spec

    def features(self, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        if self.kind in ("gpt", "llama"):
            mask = inputs.get("attention_mask")
            hidden = self.backbone(input_ids=inputs["input_ids"], attention_mask=mask).last_hidden_state
            if mask is None:  # unpadded (a charged model's batch on the meta device): the last token
                return hidden[:, -1]
            last = (mask.sum(dim=1) - 1).clamp(min=0)
            return hidden[torch.arange(hidden.shape[0]), last]
        pixels = inputs["pixel_values"]
        if self.image_spec is not None:
            pixels = fit_pixels(pixels, self.image_spec)
        out = self.backbone(pixel_values=pixels)
        if self.kind == "clip":
            return out.pooler_output
        if self.pooling == "mean":
            return out.last_hidden_state.mean(dim=1)
        return out.last_hidden_state[:, 0]

    def forward(self, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return self.head(self.features(inputs))


def backbone_of(model: nn.Module) -> tuple[nn.Module, str, int]:
    """(backbone, kind, feature dim) of a built zoo / HF model; InputError for an unsupported one."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type == "gpt2":
        body = model.transformer if hasattr(model, "transformer") else model
        return body, "gpt", int(model.config.n_embd)
    if model_type == "vit":
        body = model.vit if hasattr(model, "vit") else model
        return body, "vit", int(model.config.hidden_size)
    if model_type == "llama":  # only as a charged architecture (clock.charge_as), never trained here
        body = model.model if hasattr(model, "model") else model
        return body, "llama", int(model.config.hidden_size)
    if model_type == "clip":
        return model.vision_model, "clip", int(model.config.vision_config.hidden_size)
    if model_type == "clip_vision_model":
        body = model.vision_model if hasattr(model, "vision_model") else model
        return body, "clip", int(model.config.hidden_size)
    raise InputError(f"model: fine-tuning supports GPT-2, ViT and CLIP models, got model_type {model_type!r}")


def load_base_tensors(path: str | Path, prefix: str = "") -> dict[str, torch.Tensor]:
    """A pre-trained state dict from a cloudedge checkpoint (a folder with ``latest``, or one
    ``.safetensors`` file); keys under ``prefix`` with the prefix removed."""
    from cloudedge.checkpoint import load_latest, load_tensors

    p = Path(path)
    if p.is_dir():
        found = load_latest(p)
        if found is None:
            raise InputError(f"{p}: no checkpoint found (no 'latest' marker)")
        tensors = found[0]
    else:
        tensors = load_tensors(p)
    picked = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    if not picked:
        raise InputError(f"{p}: no tensors under prefix '{prefix}'")
    return picked


def _load_into(model: nn.Module, tensors: Mapping[str, torch.Tensor], source: str) -> None:
    """Load a pre-trained state into ``model``: every backbone key must be there with its shape."""
    body, kind, _ = backbone_of(model)
    own = model.state_dict()
    # The pre-training stage's image Classifier names its ViT `encoder.*`; a ViT here is `vit.*`.
    if kind == "vit" and not any(k.startswith("vit.") for k in tensors):
        tensors = {("vit." + k[len("encoder."):] if k.startswith("encoder.") else k): v for k, v in tensors.items()}
    body_prefix = next((n + "." for n, m in model.named_children() if m is body), "")
    needed = [k for k in own if k.startswith(body_prefix)]
    missing = [k for k in needed if k not in tensors]
    if missing:
        raise InputError(f"{source}: checkpoint does not fit the model: missing '{missing[0]}' ({len(missing)} missing)")
    for k in needed:
        if tuple(tensors[k].shape) != tuple(own[k].shape):
            raise InputError(f"{source}: checkpoint does not fit the model: '{k}' has shape "
                             f"{tuple(tensors[k].shape)}, the model needs {tuple(own[k].shape)}")
    model.load_state_dict({k: tensors[k] for k in needed}, strict=False)


def build_lora_classifier(spec: Mapping[str, Any]) -> LoraClassifier:
    """The fine-tuning model from a plain-data ``spec`` (what a worker receives).

    Keys: ``model`` (ModelConfig as a dict), ``base_dir``, ``seed``, ``n_classes``, ``rank``,
    ``alpha``, ``targets`` (None: per architecture), ``mode`` (LoRA aggregation mode: ``ffa``
    freezes A), ``base_tensors`` (pre-trained state or None: fresh weights from ``seed``),
    ``pooling`` (ViT: ``cls`` or ``mean``; default ``cls``).
    Deterministic: the same spec gives the same initial adapters and head on every node.
    """
    from cloudedge.models import build_model

    cfg = ModelConfig(**spec["model"])
    model = build_model(cfg, base_dir=spec.get("base_dir", "."), seed=int(spec["seed"]))
    if spec.get("base_tensors"):
        _load_into(model, spec["base_tensors"], str(spec.get("base_source", "base checkpoint")))
    return with_lora(model, spec)


def with_lora(model: nn.Module, spec: Mapping[str, Any], targets: list[str] | None = None) -> LoraClassifier:
    """``model``'s backbone with LoRA adapters (``spec``'s rank, alpha, mode) and a linear head.

    ``targets`` default to ``spec["targets"]``, else the architecture's :data:`TARGETS`. Works on the
    meta device too (how the clock prices a charged architecture, cloudedge.finetune.charge).
    """
    seed = int(spec["seed"])
    body, kind, dim = backbone_of(model)
    pooling = str(spec.get("pooling", "cls"))
    if pooling != "cls" and kind != "vit":
        raise InputError(f"finetune.pooling: '{pooling}' applies to ViT backbones, the model is a {kind}")
    targets = targets or spec.get("targets") or TARGETS[kind]
    lcfg = LoraConfig(r=int(spec["rank"]), lora_alpha=float(spec["alpha"]), lora_dropout=0.0,
                      target_modules=list(targets), bias="none", fan_in_fan_out=(kind == "gpt"))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 1)  # peft initialises A from the global generator
        try:
            body = inject_adapter_in_model(lcfg, body)
        except ValueError as err:  # peft's word for target names that match no module of the model
            raise InputError(f"finetune.lora.targets: {list(targets)} do not fit the {kind} model "
                             f"({' '.join(str(err).split())})") from None
        clf = LoraClassifier(body, kind, dim, int(spec["n_classes"]), pooling=pooling,
                             image_spec=getattr(model, IMAGE_SPEC_ATTR, None))
    frozen_a = mode_class(spec["mode"]).frozen_a  # ffa, or a plug-in mode that keeps A frozen
    for name, p in clf.named_parameters():
        trainable = name.startswith("head.") or "lora_B" in name or ("lora_A" in name and not frozen_a)
        p.requires_grad_(trainable)
    if not lora_layers(adapter_state(clf)):
        raise InputError(f"finetune.lora.targets: no module of the model matches {list(targets)}")
    return clf


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter state that is aggregated: every LoRA factor (frozen A included) and the head."""
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n or n.startswith("head.")}


class AdapterSlot:
    """Loads adapter states into a model, including ``base_delta`` entries (merge mode), which
    are added to the frozen base weights (kept as loaded, so repeated loads do not accumulate)."""

    def __init__(self, model: LoraClassifier):
        self.model = model
        self.params = dict(model.named_parameters())
        self._orig: dict[str, torch.Tensor] = {}

    def load(self, state: Mapping[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for k, v in state.items():
                if k.endswith(BASE_DELTA_SUFFIX):
                    self._apply_base_delta(k[: -len(BASE_DELTA_SUFFIX)], v)
                else:
                    self.params[k].copy_(v)

    def _apply_base_delta(self, layer: str, delta: torch.Tensor) -> None:
        module = self.model.get_submodule(layer)
        base = module.base_layer.weight
        if layer not in self._orig:
            self._orig[layer] = base.detach().clone()
        # peft stores GPT-2's Conv1D weight as [in, out] (fan_in_fan_out); deltas are [out, in].
        d = delta.T if getattr(module, "fan_in_fan_out", False) else delta
        base.copy_(self._orig[layer] + d.to(device=base.device, dtype=base.dtype))


