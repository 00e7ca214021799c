"""What one pre-training sample costs on the virtual clock, for the trained or the charged model.

:func:`pretrain_costs` gives, for one model: training FLOPs per sample, parameters (for the static
memory of weights, gradients and AdamW moments, :mod:`cloudedge.pretrain.memory`), activation bytes
per sample, and the layout (names, shapes, dtypes) of what crosses a link (the trainable tensors:
the broadcast model and every update have it). The loop charges these for ``clock.charge_as`` when
it is set (:mod:`cloudedge.models.charge`), else for the model it trains, exactly as before.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from cloudedge import comm
from cloudedge.config.model import ModelConfig
from cloudedge.errors import InputError
from cloudedge.models.charge import ChargedModel, describe, meta_backbone, meta_layout
from cloudedge.pretrain.memory import (
    ACTIVATION_BYTES,
    BYTES_PER_FLOAT,
    activation_bytes_per_sample,
    max_micro_batch,
    transformer_activation_bytes,
)
from cloudedge.pretrain.tasks import Classifier, build_task_model, train_flops_per_sample

# Which charged families can stand in for the model of each task.
_TASK_FAMILIES = {"lm": ("gpt2", "llama"), "clip": ("clip",), "classify": ("vit",)}
# A model-style section: any kind for `classify` (a non-ViT kind trains the MLP encoder, as the stage does).
_TASK_KINDS = {"lm": ("gpt",), "clip": ("clip",), "classify": ("gpt", "vit", "clip")}


@dataclass(frozen=True)
class PretrainCosts:
    """One model's per-sample costs in a pre-training stage (see the module docstring)."""

    name: str
    params: int
    train_flops_per_sample: int
    activation_bytes_per_sample: float
    layout: dict[str, torch.Tensor]  # what a message carries: the trainable tensors (meta or real)
    precision: str = "fp32"  # pretrain.precision: bf16 autocast keeps 16-bit activations and weight copies

    def message_bytes(self, compression: str) -> int:
        """Exact bytes of the model or one update on the wire under ``compression``."""
        return comm.wire_nbytes(self.layout, compression)

    def micro_batch_cap(self, memory_bytes: float, memory_fraction: float) -> int:
        """The largest batch a node holds at once (0: not even weights and optimizer fit)."""
        return max_micro_batch(memory_bytes, memory_fraction, self.params, self.activation_bytes_per_sample,
                               self.precision)

    def describe(self, compression: str) -> dict[str, Any]:
        return describe(self.name, self.params, self.message_bytes(compression))


def trained_costs(task: str, model: nn.Module, model_cfg: ModelConfig, *, seq_len: int, n_classes: int,
                  encoder: str, flops_factor: float = 1.0, precision: str = "fp32") -> PretrainCosts:
    """The costs of the model the stage trains (the clock's default)."""
    from cloudedge.models.zoo import param_count
    from cloudedge.pretrain.workers import trainable

    vocab = getattr(getattr(model, "config", None), "vocab_size", 0) or 0
    flops = train_flops_per_sample(task, model_cfg, seq_len=seq_len, n_classes=n_classes, encoder=encoder)  # type: ignore[arg-type]
    return PretrainCosts(
        name=f"{model_cfg.kind} {model_cfg.hidden}x{model_cfg.layers} (trained)", params=param_count(model),
        train_flops_per_sample=int(round(flops * flops_factor)) if flops_factor != 1.0 else flops,
        activation_bytes_per_sample=activation_bytes_per_sample(task, model_cfg, seq_len=seq_len, vocab_size=vocab,
                                                                encoder=encoder, precision=precision),
        layout={k: v.detach() for k, v in trainable(model).items()}, precision=precision)


def charged_costs(task: str, charge: ChargedModel, *, seq_len: int, n_classes: int, encoder: str | None,
                  seed: int, objective: Any = None, base_dir: str = ".", flops_factor: float = 1.0,
                  precision: str = "fp32") -> PretrainCosts:
    """The costs of ``charge`` doing this task's work on the same samples (built on the meta device).

    ``encoder`` is ``pretrain.encoder`` (None: ViT for a ViT, else the MLP), as for the trained model.
    """
    from cloudedge.models.zoo import param_count

    allowed = _TASK_FAMILIES[task] if charge.model_cfg is None else _TASK_KINDS[task]
    if charge.family not in allowed:
        raise InputError(f"{charge.field}: {charge.name} is a {charge.family} model; pretrain.task '{task}' needs one of "
                         f"{', '.join(allowed)}")
    if charge.model_cfg is not None:
        cfg = charge.model_cfg
        # A model-style section is built exactly like the trained model, only on the meta device.
        enc = encoder or ("vit" if cfg.kind == "vit" else "mlp")
        with torch.device("meta"):
            model = build_task_model(task, cfg, n_classes=n_classes, encoder=enc, seed=seed,  # type: ignore[arg-type]
                                     objective=objective, base_dir=base_dir)
        seq = charge.text_len(seq_len) if task == "lm" else seq_len
        vocab = getattr(getattr(model, "config", None), "vocab_size", 0) or 0
        flops = train_flops_per_sample(task, cfg, seq_len=seq, n_classes=n_classes, encoder=enc)  # type: ignore[arg-type]
        act = activation_bytes_per_sample(task, cfg, seq_len=seq, vocab_size=vocab, encoder=enc, precision=precision)
    else:
        model, flops, act = _hf_task_model(task, charge, seq_len, n_classes, objective, precision)
    layout = meta_layout(model)
    return PretrainCosts(charge.name, param_count(model),
                         int(round(flops * flops_factor)) if flops_factor != 1.0 else flops, act, layout, precision)


def _hf_task_model(task: str, charge: ChargedModel, seq_len: int, n_classes: int,
                   objective: Any, precision: str = "fp32") -> tuple[nn.Module, int, float]:
    """(meta model, training FLOPs per sample, activation bytes per sample) of a preset/architecture."""
    from transformers import GPT2LMHeadModel, LlamaForCausalLM

    from cloudedge.models.flops import (
        TRAINING_FLOPS_FACTOR,
        clip_forward_flops,
        gpt_forward_flops,
        llama_forward_flops,
        vit_forward_flops,
    )

    cfg: Any = charge.hf_config
    if task == "lm":
        seq = charge.text_len(seq_len)
        with torch.device("meta"):
            model: nn.Module = GPT2LMHeadModel(cfg) if charge.family == "gpt2" else LlamaForCausalLM(cfg)
        forward = gpt_forward_flops(cfg, seq) if charge.family == "gpt2" else llama_forward_flops(cfg, seq)
        return model, TRAINING_FLOPS_FACTOR * forward, hf_activation_bytes(charge, seq, precision)
    if task == "clip":
        model = meta_backbone(charge)
        return model, TRAINING_FLOPS_FACTOR * clip_forward_flops(cfg), hf_activation_bytes(charge, 0, precision)
    # classify: the stage's Classifier (mean of the ViT's tokens, linear head) on the charged ViT.
    backbone = meta_backbone(charge)
    with torch.device("meta"):
        model = Classifier(backbone, cfg.hidden_size, n_classes, "vit")
        if objective is not None:
            model = objective.prepare_model(model)
    cfg.num_labels = n_classes
    return model, TRAINING_FLOPS_FACTOR * vit_forward_flops(cfg), hf_activation_bytes(charge, 0, precision)


def hf_activation_bytes(charge: ChargedModel, seq_len: int, precision: str = "fp32") -> float:
    """Activation bytes per training sample of a preset/architecture (docs/profiles.md; ``precision``
    as in :mod:`cloudedge.pretrain.memory`).

    GPT-2, ViT and CLIP towers: :func:`transformer_activation_bytes` (MLP 4 x hidden); LMs add the
    output scores and their gradient. Llama: the same count with its own widths, no dropout masks:
    per token and layer ``2 (8 h + 4 q + 4 kv + 8 I + 2 a s)`` bytes (h hidden, q / kv the query and
    key/value widths, I the SwiGLU width, a heads), then the scores over the vocabulary.
    """
    cfg: Any = charge.hf_config
    if charge.family == "gpt2":
        return (transformer_activation_bytes(cfg.n_layer, seq_len, cfg.n_embd, cfg.n_head, precision)
                + 2 * BYTES_PER_FLOAT * seq_len * cfg.vocab_size)
    if charge.family == "llama":
        h, a, s = cfg.hidden_size, cfg.num_attention_heads, seq_len
        head_dim = getattr(cfg, "head_dim", None) or h // a
        q, kv = a * head_dim, (cfg.num_key_value_heads or a) * head_dim
        per_token = 8 * h + 4 * q + 4 * kv + 8 * cfg.intermediate_size + 2 * a * s
        return (ACTIVATION_BYTES[precision] / 2 * cfg.num_hidden_layers * s * per_token
                + 2 * BYTES_PER_FLOAT * s * cfg.vocab_size)
    vision = cfg.vision_config if charge.family == "clip" else cfg
    patches = (vision.image_size // vision.patch_size) ** 2 + 1
    out = transformer_activation_bytes(vision.num_hidden_layers, patches, vision.hidden_size,
                                       vision.num_attention_heads, precision)
    if charge.family == "clip":
        text = cfg.text_config
        out += transformer_activation_bytes(text.num_hidden_layers, text.max_position_embeddings, text.hidden_size,
                                            text.num_attention_heads, precision)
    return out
