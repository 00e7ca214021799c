"""How much of a node's memory training takes, and the largest micro-batch that fits.

The estimate (training with AdamW, docs/pretraining.md "Memory"), by ``pretrain.precision``:

- static bytes = 16 P: weights, gradients and AdamW's two moments, 4 bytes each per parameter P
  (float32 in both precisions); under bf16 autocast 2 P more, the bf16 copy of every weight that
  autocast keeps for the forward pass;
- activation bytes per sample of a transformer with L layers, sequence s, hidden h, a heads:
  ``L * s * h * (34 + 5 a s / h)`` for 16-bit activations (Korthikanti et al. 2022, who count what
  is kept for the backward pass in 16 bits: bf16), twice that in float32; plus the output scores
  kept with their gradient (``2 * 4 * s * V`` for an LM over vocabulary V: the loss runs in float32
  under autocast too);
- the MLP encoder keeps its input and every hidden layer (and their gradients): ``2 * b * sum(widths)``
  with b = 4 bytes in float32, 2 in bf16.

A worker may use ``memory_fraction`` of its profile's ``memory_bytes`` (the OS and other apps
hold the rest). ``max_micro_batch`` is what fits after the static part; a requested batch larger
than that runs as several micro-batches whose gradients are accumulated (same gradient, same FLOPs).
"""

from __future__ import annotations

from cloudedge.config.model import ModelConfig

BYTES_PER_FLOAT = 4
STATIC_BYTES_PER_PARAM = 16  # weight + gradient + AdamW exp_avg + exp_avg_sq, float32
# Bytes of one activation value kept for backward, per pretrain.precision (bf16: under autocast).
ACTIVATION_BYTES = {"fp32": 4, "bf16": 2}
# Autocast's bf16 copy of each weight, held through the forward and backward pass.
AUTOCAST_WEIGHT_BYTES = {"fp32": 0, "bf16": 2}


def transformer_activation_bytes(layers: int, seq: int, hidden: int, heads: int, precision: str = "fp32") -> float:
    """Activation bytes per sample kept for backward by a transformer stack (16-bit count x bytes / 2)."""
    return ACTIVATION_BYTES[precision] / 2 * layers * seq * hidden * (34.0 + 5.0 * heads * seq / hidden)


def activation_bytes_per_sample(task: str, model_cfg: ModelConfig, *, seq_len: int, vocab_size: int,
                                encoder: str, precision: str = "fp32") -> float:
    """Estimated activation bytes of one training sample (see the module docstring)."""
    m = model_cfg
    if task == "lm":
        return (transformer_activation_bytes(m.layers, seq_len, m.hidden, m.heads, precision)
                + 2 * BYTES_PER_FLOAT * seq_len * vocab_size)
    patches = (m.image_size // m.patch_size) ** 2 + 1
    vision = transformer_activation_bytes(m.layers, patches, m.hidden, m.heads, precision)
    if task == "clip":
        return vision + transformer_activation_bytes(m.layers, m.context, m.hidden, m.heads, precision)
    if encoder == "vit":
        return vision
    widths = m.channels * m.image_size**2 + m.hidden * max(1, m.layers)
    return 2.0 * ACTIVATION_BYTES[precision] * widths


def static_bytes(n_params: int, precision: str = "fp32") -> float:
    """Bytes that do not depend on the batch: weights, gradients, optimizer moments (and under bf16
    autocast its weight copies)."""
    return float((STATIC_BYTES_PER_PARAM + AUTOCAST_WEIGHT_BYTES[precision]) * n_params)


def max_micro_batch(memory_bytes: float, memory_fraction: float, n_params: int, per_sample_bytes: float,
                    precision: str = "fp32") -> int:
    """Largest batch that fits at once; 0 when not even the model and optimizer fit."""
    free = memory_bytes * memory_fraction - static_bytes(n_params, precision)
    if free < per_sample_bytes:
        return 0
    return int(free // per_sample_bytes)
