"""Architectures the virtual clock can charge (``clock.charge_as``), as data from their public configs.

Each preset is the family (which ``transformers`` class describes it), the architecture numbers
copied from the model's published ``config.json``, and where they come from. Only what changes a
cost is listed: sizes of every matrix, vocabulary, sequence length and image geometry. The clock
never loads weights; the architecture is built on the ``meta`` device (shapes only).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

Family = Literal["gpt2", "llama", "vit", "clip"]


@dataclass(frozen=True)
class Preset:
    """A named architecture: ``family``, its ``transformers`` config fields, and their ``source``."""

    family: Family
    config: dict[str, Any] = field(default_factory=dict)
    source: str = ""


PRESETS: dict[str, Preset] = {
    "gpt2-124m": Preset("gpt2", {
        "n_embd": 768, "n_layer": 12, "n_head": 12, "n_positions": 1024, "vocab_size": 50257,
    }, "https://huggingface.co/openai-community/gpt2/blob/main/config.json"),
    "gpt2-355m": Preset("gpt2", {
        "n_embd": 1024, "n_layer": 24, "n_head": 16, "n_positions": 1024, "vocab_size": 50257,
    }, "https://huggingface.co/openai-community/gpt2-medium/blob/main/config.json"),
    "llama-3.2-1b": Preset("llama", {
        "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16, "num_attention_heads": 32,
        "num_key_value_heads": 8, "head_dim": 64, "vocab_size": 128256, "max_position_embeddings": 131072,
        "tie_word_embeddings": True, "rope_theta": 500000.0,
    }, "https://huggingface.co/meta-llama/Llama-3.2-1B/blob/main/config.json"),
    "vit-b16": Preset("vit", {
        "hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072,
        "image_size": 224, "patch_size": 16, "num_channels": 3,
    }, "https://huggingface.co/google/vit-base-patch16-224/blob/main/config.json"),
    "clip-vit-b16": Preset("clip", {
        "projection_dim": 512,
        "text_config": {"hidden_size": 512, "intermediate_size": 2048, "num_hidden_layers": 12,
                        "num_attention_heads": 8, "max_position_embeddings": 77, "vocab_size": 49408},
        "vision_config": {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
                          "num_attention_heads": 12, "image_size": 224, "patch_size": 16, "num_channels": 3},
    }, "https://huggingface.co/openai/clip-vit-base-patch16/blob/main/config.json"),
}
"""The named architectures ``clock.charge_as`` accepts (docs/profiles.md, "Charged costs")."""
