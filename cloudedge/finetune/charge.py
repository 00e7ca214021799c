"""Fine-tuning's costs for the model the clock charges (``clock.charge_as``; docs/profiles.md).

The charged architecture gets the run's LoRA adapters (its rank, alpha, aggregation mode, and
target modules mapped onto that architecture's names) and the run's head. One training step of it
is counted the way a device's real model is (:func:`cloudedge.finetune.workers.step_info`: FLOPs of
forward + backward, parameter and activation bytes), on a batch of the run's size and the charged
model's input shape; its adapter state is the layout of every message.

A preset or ``{family, config}`` is built on the meta device (shapes only). There attention runs
as plain products, whose backward skips gradients nobody needs and recomputes nothing, while the
fused attention kernels (CPU and CUDA alike, :mod:`cloudedge.models.flops`) compute every gradient
and recompute the score matrix: the two counts differ by a few percent. A ``model``-style section is therefore built for real on the CPU (it is
the kind of model this project trains), so charging the trained model's own config gives exactly
its measured costs.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
import torch.nn.functional as F

from cloudedge import comm
from cloudedge.finetune.lora import A_SUFFIX, B_SUFFIX, BASE_DELTA_SUFFIX, TARGETS, lora_layers
from cloudedge.models.charge import ChargedModel, meta_backbone

# Attention projections by role, per architecture: a run's target names map onto the charged one's.
_ROLE_OF = {"query": "q", "q_proj": "q", "key": "k", "k_proj": "k", "value": "v", "v_proj": "v", "c_attn": "qkv",
            "out_proj": "o", "o_proj": "o"}
_NAMES: dict[str, dict[str, list[str]]] = {
    "gpt": {"q": ["c_attn"], "k": ["c_attn"], "v": ["c_attn"], "qkv": ["c_attn"]},
    "llama": {"q": ["q_proj"], "k": ["k_proj"], "v": ["v_proj"], "qkv": ["q_proj", "k_proj", "v_proj"],
              "o": ["o_proj"]},
    "vit": {"q": ["query", "q_proj"], "k": ["key", "k_proj"], "v": ["value", "v_proj"],
            "qkv": ["query", "key", "value", "q_proj", "k_proj", "v_proj"]},
    "clip": {"q": ["q_proj"], "k": ["k_proj"], "v": ["v_proj"], "qkv": ["q_proj", "k_proj", "v_proj"],
             "o": ["out_proj"]},
}


def mapped_targets(run_targets: list[str] | None, kind: str) -> list[str]:
    """The charged architecture's target modules for the run's ``finetune.lora.targets``.

    None: the architecture's defaults (:data:`TARGETS`), as for the trained model. Names that are
    attention projections (``query``, ``q_proj``, ``c_attn``, ...) map by role; others stay as given.
    """
    if not run_targets:
        return list(TARGETS[kind])
    out: list[str] = []
    for name in run_targets:
        role = _ROLE_OF.get(name)
        for mapped in (_NAMES[kind].get(role, [name]) if role else [name]):
            if mapped not in out:
                out.append(mapped)
    return out


def charged_lora_model(charge: ChargedModel, spec: Mapping[str, Any]) -> torch.nn.Module:
    """The charged architecture with the run's adapters and head, on the meta device."""
    from cloudedge.finetune.model import backbone_of, with_lora

    if charge.model_cfg is not None:
        from cloudedge.models import build_model

        base = build_model(charge.model_cfg, base_dir=spec.get("base_dir", "."), seed=int(spec["seed"]))
    else:
        base = meta_backbone(charge)
    _, kind, _ = backbone_of(base)
    targets = mapped_targets(spec.get("targets"), kind) if charge.model_cfg is None or spec.get("targets") else None
    with torch.device(_device(charge)):
        return with_lora(base, {**spec, "pooling": spec.get("pooling", "cls") if kind == "vit" else "cls"}, targets)


def _device(charge: ChargedModel) -> str:
    return "cpu" if charge.model_cfg is not None else "meta"


def charged_batch(charge: ChargedModel, model: torch.nn.Module, batch: int, text_len: int) -> dict[str, torch.Tensor]:
    """A batch of the charged model's input shape: token ids or images (no data on the meta device)."""
    kind = model.kind  # type: ignore[attr-defined]
    if kind in ("gpt", "llama"):
        seq = charge.text_len(text_len)
        ones = torch.ones(batch, seq, dtype=torch.long, device=_device(charge))
        # Meta tensors hold no values for transformers to inspect in a mask: full-length rows, no mask.
        return {"input_ids": ones} if charge.model_cfg is None else {"input_ids": ones, "attention_mask": ones}
    if charge.model_cfg is not None:
        size, channels = charge.model_cfg.image_size, charge.model_cfg.channels
    else:
        vision: Any = charge.hf_config.vision_config if kind == "clip" else charge.hf_config  # type: ignore[union-attr]
        size, channels = vision.image_size, vision.num_channels
    return {"pixel_values": torch.zeros(batch, channels, size, size, device=_device(charge))}


def charged_info(charge: ChargedModel, spec: Mapping[str, Any], batch_size: int,
                 text_len: int | None) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(``model_info`` of the charged model, its adapter-state layout as meta tensors).

    The run's data are 1-channel digits or the like; the charged batch has the charged model's own
    input shape (its channels, image size; token ids of ``clock.seq_len`` or the run's length).

    ``text_len``: tokens per sample of the run's text data; None for image data."""
    from cloudedge.errors import InputError
    from cloudedge.finetune.model import adapter_state
    from cloudedge.finetune.workers import step_info

    model = charged_lora_model(charge, spec)
    kind = model.kind  # type: ignore[attr-defined]
    if (kind in ("gpt", "llama")) != (text_len is not None):
        data = "text" if text_len is not None else "images"
        raise InputError(f"{charge.field}: {charge.name} is a {kind} model; this fine-tuning run learns from {data}")
    inputs = charged_batch(charge, model, batch_size, text_len or 0)
    labels = torch.zeros(batch_size, dtype=torch.long, device=_device(charge))
    info = step_info(model, lambda: F.cross_entropy(model(inputs), labels), batch_size, batch_size)
    layout = {k: torch.empty(v.shape, dtype=v.dtype, device="meta") for k, v in adapter_state(model).items()}
    return info, layout


def with_charged_base_deltas(layout: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The layout plus a dense float32 ``base_delta`` [out, in] per LoRA layer (``product/merge``)."""
    out = dict(layout)
    for layer in lora_layers(layout):
        rank_in, out_rank = layout[layer + A_SUFFIX].shape, layout[layer + B_SUFFIX].shape
        out[layer + BASE_DELTA_SUFFIX] = torch.empty(out_rank[0], rank_in[1], dtype=torch.float32, device="meta")
    return out


def _part(key: str) -> str:
    for suffix in (A_SUFFIX, B_SUFFIX, BASE_DELTA_SUFFIX):
        if key.endswith(suffix):
            return suffix
    return "head"


def charged_message_bytes(layout: Mapping[str, torch.Tensor], keys: Iterable[str], compression: str) -> int:
    """Bytes of the charged model's version of a message that carries ``keys`` of the trained state:
    the same parts (A factors, B factors, base deltas, head) of the charged layout."""
    parts = {_part(k) for k in keys}
    return comm.wire_nbytes({k: v for k, v in layout.items() if _part(k) in parts}, compression)
