"""How much of a node's memory training takes, and the largest micro-batch that fits.

The estimate (float32 training with AdamW, docs/pretraining.md "Memory"):

- static bytes = 16 P: weights, gradients and AdamW's two moments, 4 bytes each per parameter P;
- activation bytes per sample of a transformer with L layers, sequence s, hidden h, a heads:
  ``2 * L * s * h * (34 + 5 a s / h)`` (Korthikanti et al. 2022 count 16-bit activations kept for
  the backward pass; float32 doubles it), plus the output scores kept with their gradient
  (``2 * 4 * s * V`` for an LM over vocabulary V);
- the MLP encoder keeps its input and every hidden layer (and their gradients): ``2 * 4 * sum(widths)``.

A worker may use ``memory_fraction`` of its profile's ``memory_bytes`` (the OS and other apps
hold the rest). ``max_micro_batch`` is what fits after the static part; a requested batch larger
than that runs as several micro-batches whose gradients are accumulated (same gradient, same FLOPs).
"""

from __future__ import annotations

from cloudedge.config.model import ModelConfig

BYTES_PER_FLOAT = 4
STATIC_BYTES_PER_PARAM = 16  # weight + gradient + AdamW exp_avg + exp_avg_sq, float32


def transformer_activation_bytes(layers: int, seq: int, hidden: int, heads: int) -> float:
    """Activation bytes per sample kept for backward by a transformer stack (float32)."""
    return 2.0 * layers * seq * hidden * (34.0 + 5.0 * heads * seq / hidden)


def activation_bytes_per_sample(task: str, model_cfg: ModelConfig, *, seq_len: int, vocab_size: int,
                                encoder: str) -> float:
    """Estimated activation bytes of one training sample (see the module docstring)."""
    m = model_cfg
    if task == "lm":
        return (transformer_activation_bytes(m.layers, seq_len, m.hidden, m.heads)
                + 2 * BYTES_PER_FLOAT * seq_len * vocab_size)
    patches = (m.image_size // m.patch_size) ** 2 + 1
    vision = transformer_activation_bytes(m.layers, patches, m.hidden, m.heads)
    if task == "clip":
        return vision + transformer_activation_bytes(m.layers, m.context, m.hidden, m.heads)
    if encoder == "vit":
        return vision
    widths = m.channels * m.image_size**2 + m.hidden * max(1, m.layers)
    return 2.0 * BYTES_PER_FLOAT * widths


def static_bytes(n_params: int) -> float:
    """Bytes that do not depend on the batch: weights, gradients, optimizer moments."""
    return float(STATIC_BYTES_PER_PARAM * n_params)


def max_micro_batch(memory_bytes: float, memory_fraction: float, n_params: int, per_sample_bytes: float) -> int:
    """Largest batch that fits at once; 0 when not even the model and optimizer fit."""
    free = memory_bytes * memory_fraction - static_bytes(n_params)
    if free < per_sample_bytes:
        return 0
    return int(free // per_sample_bytes)
