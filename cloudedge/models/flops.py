"""Exact forward FLOP counts of the zoo's models, and a measured count for anything else.

Convention (the same as ``torch.utils.flop_counter.FlopCounterMode``):

- Only matrix products are counted: linear layers, convolutions, and attention (``Q K^T`` and
  ``A V``). A multiply-add is 2 FLOPs. Norms, activations, softmax, embeddings lookups and
  residual adds are not counted (they are a few percent at these sizes and memory-bound anyway).
- Attention is counted over the full ``seq x seq`` score matrix, causal or not: causal masking is
  not subtracted (``FlopCounterMode`` does not subtract it either).
- Training FLOPs per sample are **3 x forward**: the backward pass costs about twice the forward
  (one product for the gradient w.r.t. the activations, one w.r.t. the weights). This is the
  usual ``6 N`` per token rule of thumb. With frozen weights (LoRA) the weight-gradient half is
  mostly skipped, so 3x is then an upper bound; the clock stays conservative.

``FlopCounterMode`` has no formula for the CPU fused attention kernel
(``aten._scaled_dot_product_flash_attention_for_cpu``), which ``sdpa`` attention uses on CPU, so
a plain count on CPU misses attention. :func:`measure_flops` registers that kernel with the same
formula ``FlopCounterMode`` uses for the CUDA kernels; with it, measured counts equal the
formulas here exactly for ``sdpa`` and ``eager`` attention alike. Its backward is registered the
same way: like the CUDA kernels' backward it recomputes the score matrix, so it does five products
where ``eager`` attention's backward does four, and a training step measured on a CPU host costs
exactly what it costs measured on a GPU host (before, the CPU count had no attention backward and
a fine-tuning run's virtual times differed between the two hosts by a relative 1.9e-5, seen on an
H200; the CPU now gives the GPU's value exactly).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count
from transformers import (
    CLIPConfig,
    CLIPModel,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    ViTConfig,
    ViTForImageClassification,
)

from cloudedge.config.model import ModelConfig
from cloudedge.models.zoo import BYTE_VOCAB_SIZE, clip_config, gpt_config, vit_config

TRAINING_FLOPS_FACTOR = 3
"""Training FLOPs = this x forward FLOPs (forward + a backward of about twice the forward)."""

Tower = Literal["pair", "text", "image"]


@dataclass(frozen=True)
class _Stack:
    """The sizes of a pre/post-norm transformer encoder or decoder stack (no cross-attention)."""

    hidden: int
    layers: int
    intermediate: int

    def flops(self, seq: int) -> int:
        """Forward FLOPs of the stack on one sequence of ``seq`` tokens."""
        h, s = self.hidden, seq
        qkv = 2 * s * h * 3 * h
        out_proj = 2 * s * h * h
        attention = 2 * (2 * s * s * h)  # scores Q K^T, then A V; summed over heads
        mlp = 2 * (2 * s * h * self.intermediate)
        return self.layers * (qkv + out_proj + attention + mlp)


def gpt_forward_flops(
    cfg: ModelConfig | GPT2Config, seq_len: int | None = None, *, vocab_size: int = BYTE_VOCAB_SIZE
) -> int:
    """Forward FLOPs of a ``GPT2LMHeadModel`` on one sequence of ``seq_len`` tokens.

    ``seq_len`` defaults to the context length. The LM head scores every position against the
    whole vocabulary. ``vocab_size`` is used only with a ``ModelConfig`` (a ``GPT2Config`` has it).
    """
    config = cfg if isinstance(cfg, GPT2Config) else gpt_config(cfg, vocab_size=vocab_size)
    seq = config.n_positions if seq_len is None else seq_len
    _check_positive("seq_len", seq)
    stack = _Stack(config.n_embd, config.n_layer, config.n_inner or 4 * config.n_embd)
    lm_head = 2 * seq * config.n_embd * config.vocab_size
    return stack.flops(seq) + lm_head


def llama_forward_flops(config: LlamaConfig, seq_len: int | None = None) -> int:
    """Forward FLOPs of a ``LlamaForCausalLM`` on one sequence of ``seq_len`` tokens.

    Grouped-query attention: the query and output projections are ``hidden x heads * head_dim``,
    the key and value projections ``hidden x kv_heads * head_dim``; scores and ``A V`` run over all
    query heads. SwiGLU MLP: three ``hidden x intermediate`` products (gate, up, down). The LM
    head scores every position against the whole vocabulary, tied to the embeddings or not (a
    tied head is the same product). ``seq_len`` defaults to ``max_position_embeddings``.
    """
    seq = config.max_position_embeddings if seq_len is None else seq_len
    _check_positive("seq_len", seq)
    h, s = config.hidden_size, seq
    head_dim = getattr(config, "head_dim", None) or h // config.num_attention_heads
    q_width = config.num_attention_heads * head_dim
    kv_width = (config.num_key_value_heads or config.num_attention_heads) * head_dim
    projections = 2 * s * h * (2 * q_width + 2 * kv_width)  # q, o (q_width) and k, v (kv_width)
    attention = 2 * (2 * s * s * q_width)
    mlp = 3 * (2 * s * h * config.intermediate_size)
    lm_head = 2 * s * h * config.vocab_size
    return config.num_hidden_layers * (projections + attention + mlp) + lm_head


def vit_forward_flops(cfg: ModelConfig | ViTConfig, *, num_labels: int | None = None) -> int:
    """Forward FLOPs of a ``ViTForImageClassification`` on one image of the configured size.

    ``num_labels`` overrides ``cfg.num_labels`` for a ``ModelConfig`` (as in ``build_model``).
    """
    config = cfg if isinstance(cfg, ViTConfig) else vit_config(cfg, num_labels=num_labels)
    patches = (config.image_size // config.patch_size) ** 2
    patch_embed = 2 * patches * config.num_channels * config.patch_size**2 * config.hidden_size
    stack = _Stack(config.hidden_size, config.num_hidden_layers, config.intermediate_size)
    head = 2 * config.hidden_size * config.num_labels  # on the CLS token only
    return patch_embed + stack.flops(patches + 1) + head


def clip_forward_flops(
    cfg: ModelConfig | CLIPConfig, text_len: int | None = None, *, tower: Tower = "pair"
) -> int:
    """Forward FLOPs of a ``CLIPModel``.

    Args:
        cfg: the model config.
        text_len: tokens per text (default: the text tower's ``max_position_embeddings``).
        tower: ``"text"`` (one text -> its projected embedding), ``"image"`` (one image -> its
            projected embedding), or ``"pair"``: one text and one image and their similarity
            logit (``2 x projection_dim``). A batch of ``B`` texts against ``B`` images costs
            ``B x (text + image) + 2 B^2 projection_dim``; the quadratic term is small and is
            charged per pair here.
    """
    config = cfg if isinstance(cfg, CLIPConfig) else clip_config(cfg)
    text_cfg, vision_cfg = config.text_config, config.vision_config
    projection = config.projection_dim

    seq = text_cfg.max_position_embeddings if text_len is None else text_len
    _check_positive("text_len", seq)
    text_stack = _Stack(text_cfg.hidden_size, text_cfg.num_hidden_layers, text_cfg.intermediate_size)
    text = text_stack.flops(seq) + 2 * text_cfg.hidden_size * projection  # projection of the EOS state

    patches = (vision_cfg.image_size // vision_cfg.patch_size) ** 2
    patch_embed = 2 * patches * vision_cfg.num_channels * vision_cfg.patch_size**2 * vision_cfg.hidden_size
    vision_stack = _Stack(vision_cfg.hidden_size, vision_cfg.num_hidden_layers, vision_cfg.intermediate_size)
    image = patch_embed + vision_stack.flops(patches + 1) + 2 * vision_cfg.hidden_size * projection

    if tower == "text":
        return text
    if tower == "image":
        return image
    if tower == "pair":
        return text + image + 2 * projection
    raise ValueError(f"tower must be 'pair', 'text' or 'image', got {tower!r}")


def flops_per_sample(
    model_or_cfg: nn.Module | ModelConfig,
    kind: str | None = None,
    *,
    seq_len: int | None = None,
    vocab_size: int = BYTE_VOCAB_SIZE,
    num_labels: int | None = None,
    tower: Tower = "pair",
    inputs: Any = None,
) -> int:
    """Forward FLOPs per sample (a sequence, an image, or a CLIP (text, image) pair).

    Args:
        model_or_cfg: a ``ModelConfig`` (kinds gpt / vit / clip) or a built model. A built
            ``GPT2LMHeadModel``, ``LlamaForCausalLM``, ``ViTForImageClassification`` or ``CLIPModel`` (also one loaded
            from a local checkpoint) uses the formula of its own config; any other model is
            measured on ``inputs``.
        kind: ``gpt`` / ``vit`` / ``clip``; defaults to the config's kind or the model's class.
        seq_len: tokens per sequence (gpt) or per text (clip); default the context length.
        vocab_size, num_labels: as given to ``build_model`` (``ModelConfig`` only).
        tower: for clip, see :func:`clip_forward_flops`.
        inputs: a sample batch for models without a formula; the count is divided by its
            batch size (the first dimension of its first tensor).
    """
    if isinstance(model_or_cfg, ModelConfig):
        kind = kind or model_or_cfg.kind
        cfg: ModelConfig | GPT2Config | ViTConfig | CLIPConfig = model_or_cfg
    else:
        model_kind, config = _formula_config(model_or_cfg)
        if model_kind is None:
            if inputs is None:
                raise ValueError(
                    f"no FLOP formula for {type(model_or_cfg).__name__}: pass sample `inputs` to measure it"
                )
            return measure_flops(model_or_cfg, inputs) // _batch_size(inputs)
        if kind is not None and kind != model_kind:
            raise ValueError(f"kind {kind!r} does not match the model ({type(model_or_cfg).__name__})")
        kind, cfg = model_kind, config

    if kind == "gpt":
        return gpt_forward_flops(cfg, seq_len, vocab_size=vocab_size)  # type: ignore[arg-type]
    if kind == "vit":
        return vit_forward_flops(cfg, num_labels=num_labels)  # type: ignore[arg-type]
    if kind == "clip":
        return clip_forward_flops(cfg, seq_len, tower=tower)  # type: ignore[arg-type]
    if kind == "llama" and isinstance(cfg, LlamaConfig):
        return llama_forward_flops(cfg, seq_len)
    raise ValueError(f"no FLOP formula for kind {kind!r}: build the model and pass it with sample `inputs`")


def training_flops_per_sample(
    model_or_cfg: nn.Module | ModelConfig, kind: str | None = None, **kwargs: Any
) -> int:
    """Training FLOPs per sample: ``TRAINING_FLOPS_FACTOR`` (3) x :func:`flops_per_sample`."""
    return TRAINING_FLOPS_FACTOR * flops_per_sample(model_or_cfg, kind, **kwargs)


def measure_flops(model: nn.Module, inputs: Any) -> int:
    """FLOPs of one forward pass of ``model`` on ``inputs``, counted by ``FlopCounterMode``.

    ``inputs`` is a mapping (``model(**inputs)``), a tuple/list (``model(*inputs)``) or one
    tensor (``model(inputs)``). Runs without gradients; counts the whole batch. The CPU fused
    attention kernel is counted like the CUDA ones (see the module docstring).
    """
    counter = FlopCounterMode(display=False, custom_mapping=_EXTRA_FORMULAS)
    with torch.no_grad(), counter:
        if isinstance(inputs, Mapping):
            model(**inputs)
        elif isinstance(inputs, tuple | list):
            model(*inputs)
        else:
            model(inputs)
    return int(counter.get_total_flops())


# --- internals ---------------------------------------------------------------------------------


def _cpu_flash_attention_flops(
    query_shape: torch.Size, key_shape: torch.Size, value_shape: torch.Size, *args: Any, **kwargs: Any
) -> int:
    """The CPU fused attention kernel does the same two batched products as the CUDA ones."""
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _cpu_flash_attention_backward_flops(
    grad_out_shape: torch.Size, query_shape: torch.Size, key_shape: torch.Size, value_shape: torch.Size,
    *args: Any, **kwargs: Any,
) -> int:
    """Its backward does what the CUDA kernels' backward does (the score matrix recomputed, then the
    four gradient products), counted with the same formula, so a step measured on a CPU host costs
    what the same step measured on a GPU host does."""
    return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


_EXTRA_FORMULAS: dict[Any, Any] = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_flash_attention_flops,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_flash_attention_backward_flops,
}


def _formula_config(model: nn.Module) -> tuple[str | None, Any]:
    """(kind, HF config) when a formula describes ``model`` exactly, else (None, None)."""
    # Exact classes only: e.g. a ViTModel has a pooler the ViT formula does not count.
    if type(model) is GPT2LMHeadModel:
        return "gpt", model.config
    if type(model) is ViTForImageClassification:
        return "vit", model.config
    if type(model) is CLIPModel:
        return "clip", model.config
    if type(model) is LlamaForCausalLM:
        return "llama", model.config
    return None, None


def _batch_size(inputs: Any) -> int:
    values = list(inputs.values()) if isinstance(inputs, Mapping) else inputs
    if isinstance(values, torch.Tensor):
        return int(values.shape[0])
    for value in values:
        if isinstance(value, torch.Tensor):
            return int(value.shape[0])
    raise ValueError("inputs hold no tensor to take the batch size from")


def _check_positive(name: str, value: int) -> None:
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
