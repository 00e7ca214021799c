"""What a pre-training worker trains: the model for each task and its per-batch loss.

Three tasks share one loop:

- ``lm``: causal language modelling (GPT); the unit of work is a token (weights count tokens).
- ``classify``: image classification with a :class:`Classifier` (ViT backbone or MLP + linear head);
  the loss comes from the objective (``erm`` = cross-entropy, or an invariant objective).
- ``clip``: CLIP-style contrastive pre-training on digit image-caption pairs (the loss is
  ``cloudedge.pretrain.clip_task.clip_contrastive_loss``).
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import nn

from cloudedge.config.model import ModelConfig
from cloudedge.device import module_device, to_device

EncoderKind = Literal["vit", "mlp"]


class Classifier(nn.Module):
    """An encoder producing features ``z`` [B, D] and a linear head on top.

    ``features(x)`` is what invariant objectives regularize; ``forward(x) = head(features(x))``.
    The encoder is a ViT backbone (``transformers.ViTModel``, mean of the token states, so the
    pooled feature sees every patch) or a small MLP on flattened pixels (``kind="mlp"``, fast tests).
    """

    def __init__(self, encoder: nn.Module, feature_dim: int, n_classes: int, kind: EncoderKind):
        super().__init__()
        self.encoder = encoder
        self.feature_dim = int(feature_dim)
        self.n_classes = int(n_classes)
        self.kind: EncoderKind = kind
        self.head = nn.Linear(self.feature_dim, self.n_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Features [B, D] of images ``x`` [B, C, H, W]."""
        if self.kind == "vit":
            hidden = self.encoder(pixel_values=x).last_hidden_state  # [B, 1 + patches, D]
            return hidden.mean(dim=1)
        return self.encoder(x.flatten(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def _vit_backbone(cfg: ModelConfig) -> nn.Module:
    from transformers import ViTConfig, ViTModel

    vit_cfg = ViTConfig(
        hidden_size=cfg.hidden,
        num_hidden_layers=cfg.layers,
        num_attention_heads=cfg.heads,
        intermediate_size=4 * cfg.hidden,
        image_size=cfg.image_size,
        patch_size=cfg.patch_size,
        num_channels=cfg.channels,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return ViTModel(vit_cfg, add_pooling_layer=False)


def _mlp_backbone(cfg: ModelConfig) -> nn.Module:
    in_dim = cfg.channels * cfg.image_size * cfg.image_size
    layers: list[nn.Module] = []
    width = in_dim
    for _ in range(max(1, cfg.layers)):
        layers += [nn.Linear(width, cfg.hidden), nn.ReLU()]
        width = cfg.hidden
    return nn.Sequential(*layers)


def build_classifier(model_cfg: ModelConfig, n_classes: int, seed: int, kind: EncoderKind | None = None) -> Classifier:
    """A freshly initialised :class:`Classifier` (deterministic under ``seed``).

    ``kind`` defaults to ``"vit"`` for ``model_cfg.kind == "vit"`` and ``"mlp"`` otherwise.
    """
    kind = kind or ("vit" if model_cfg.kind == "vit" else "mlp")
    # Initialisation draws from the global generator (transformers and nn.Linear do); fork it so
    # building a model never disturbs the caller's random stream.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        encoder = _vit_backbone(model_cfg) if kind == "vit" else _mlp_backbone(model_cfg)
        return Classifier(encoder, model_cfg.hidden, n_classes, kind)


# ----------------------------------------------------------------------------------- cost model


def mlp_forward_flops(model_cfg: ModelConfig, n_classes: int) -> int:
    """Forward FLOPs of the MLP Classifier on one image (2 per multiply-add)."""
    width = model_cfg.channels * model_cfg.image_size**2
    flops = 0
    for _ in range(max(1, model_cfg.layers)):
        flops += 2 * width * model_cfg.hidden
        width = model_cfg.hidden
    return flops + 2 * model_cfg.hidden * n_classes


def train_flops_per_sample(task: str, model_cfg: ModelConfig, *, seq_len: int, n_classes: int,
                           encoder: EncoderKind) -> int:
    """Training FLOPs (3 x forward) of one sample: a sequence (lm), an image, or a CLIP pair."""
    from cloudedge.models.flops import (
        TRAINING_FLOPS_FACTOR,
        clip_forward_flops,
        gpt_forward_flops,
        vit_forward_flops,
    )

    if task == "lm":
        forward = gpt_forward_flops(model_cfg, seq_len)
    elif task == "clip":
        forward = clip_forward_flops(model_cfg, model_cfg.context)
    elif encoder == "vit":
        forward = vit_forward_flops(model_cfg, num_labels=n_classes)
    else:
        forward = mlp_forward_flops(model_cfg, n_classes)
    return TRAINING_FLOPS_FACTOR * int(forward)


# ------------------------------------------------------------------------------ models and loss


def build_task_model(task: str, model_cfg: ModelConfig, *, n_classes: int, encoder: EncoderKind, seed: int,
                     objective: Any = None, base_dir: str = ".") -> nn.Module:
    """The model a task trains, freshly initialised under ``seed`` (the same on every node)."""
    if task == "classify":
        model = build_classifier(model_cfg, n_classes, seed, kind=encoder)
        return objective.prepare_model(model) if objective is not None else model
    from cloudedge.models.zoo import build_model

    return build_model(model_cfg, seed=seed, base_dir=base_dir)


def batch_units(task: str, batch: dict[str, torch.Tensor]) -> int:
    """What a batch's loss is a mean over: predicted tokens for an LM, else samples."""
    if task == "lm":
        ids = batch["input_ids"]
        return int(ids.shape[0] * (ids.shape[1] - 1))  # HF shifts labels: the first token is not predicted
    return int(next(iter(batch.values())).shape[0])


def batch_loss(task: str, model: nn.Module, batch: dict[str, torch.Tensor], *, objective: Any = None,
               client_state: dict[str, Any] | None = None, server_msg: dict[str, Any] | None = None,
               step: int = 0) -> tuple[torch.Tensor, dict[str, float]]:
    """Mean loss of ``batch`` (over :func:`batch_units`) and its logs."""
    if task == "lm":
        ids = batch["input_ids"]
        return model(input_ids=ids, labels=ids).loss, {}
    if task == "classify":
        if objective is None:
            return nn.functional.cross_entropy(model(batch["x"]), batch["y"]), {}
        return objective.loss(model, batch["x"], batch["y"], client_state or {}, server_msg or {}, step)
    from cloudedge.pretrain.clip_task import clip_contrastive_loss

    loss = clip_contrastive_loss(model, batch["pixel_values"], batch["input_ids"], batch["attention_mask"])
    return loss, {}


@torch.no_grad()
def evaluate_loss(task: str, model: nn.Module, data: dict[str, torch.Tensor], batch_size: int = 64) -> float:
    """Mean loss of ``model`` over ``data`` (unit-weighted: tokens for an LM), in eval mode."""
    was_training = model.training
    model.eval()
    device = module_device(model)
    n = int(next(iter(data.values())).shape[0])
    total, units = 0.0, 0
    for start in range(0, n, batch_size):
        chunk = to_device({k: v[start:start + batch_size] for k, v in data.items()}, device)
        loss, _ = batch_loss(task, model, chunk)
        u = batch_units(task, chunk)
        total += float(loss) * u
        units += u
    model.train(was_training)
    return total / max(units, 1)
