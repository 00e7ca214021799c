"""The model zoo: small GPT / ViT / CLIP models from ``transformers`` configs, and local checkpoints.

Every model is built offline. The small kinds (``gpt``, ``vit``, ``clip``) are randomly initialised
from a config; kind ``hf`` loads a local Hugging Face checkpoint directory with
``local_files_only=True``, so a hub name is never resolved over the network.

All built-in kinds use the ``sdpa`` attention implementation: on CPU it is faster than ``eager``
and gives the same outputs. (FLOP counting must know about it; see :mod:`cloudedge.models.flops`.)

Token ids follow the ByteTokenizer contract (``docs/architecture.md``): bytes are 0..255,
``pad = 256``, ``bos = 257``, ``eos = 258``. CLIP's text tower pools the hidden state at the first
EOS of each sequence, which is where the ByteTokenizer puts it.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError
from torch import nn
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForImageClassification,
    CLIPConfig,
    CLIPModel,
    GPT2Config,
    GPT2LMHeadModel,
    PretrainedConfig,
    PreTrainedModel,
    ViTConfig,
    ViTForImageClassification,
)
from transformers.utils import logging as hf_logging

from cloudedge.config.model import ModelConfig
from cloudedge.errors import InputError
from cloudedge.models.inputs import attach_image_spec, hf_dir_spec

# ByteTokenizer ids (docs/architecture.md, "Data"); duplicated here so the zoo does not import
# the data package. EOS is the largest id, so argmax pooling and EOS-id pooling agree.
BYTE_VOCAB_SIZE = 259
PAD_ID = 256
BOS_ID = 257
EOS_ID = 258

ATTN_IMPLEMENTATION = "sdpa"


def build_model(
    cfg: ModelConfig,
    *,
    vocab_size: int = BYTE_VOCAB_SIZE,
    num_labels: int | None = None,
    base_dir: str | os.PathLike[str] = ".",
    seed: int | None = 0,
) -> nn.Module:
    """Build the model ``cfg`` describes.

    Args:
        cfg: the ``model`` config section.
        vocab_size: text vocabulary (``gpt`` and the ``clip`` text tower).
        num_labels: classes of a ``vit`` head (default ``cfg.num_labels``); for kind ``hf`` a
            different value re-initialises an image-classification head.
        base_dir: directory a relative ``cfg.path`` resolves against (the config file's dir).
        seed: random initialisation seed. The global torch RNG is left untouched; ``None``
            draws from (and advances) the global RNG instead.

    Returns:
        A ``transformers`` model in training mode, float32.

    Raises:
        InputError: kind ``hf`` and the path is not a readable local checkpoint directory.
    """
    with _seeded(seed):
        if cfg.kind == "gpt":
            return with_known_loss(GPT2LMHeadModel(gpt_config(cfg, vocab_size=vocab_size)))
        if cfg.kind == "vit":
            return ViTForImageClassification(vit_config(cfg, num_labels=num_labels))
        if cfg.kind == "clip":
            return CLIPModel(clip_config(cfg, vocab_size=vocab_size))
        if cfg.kind == "hf":
            assert cfg.path is not None  # ModelConfig enforces it
            return load_local(resolve_path(cfg.path, base_dir), num_labels=num_labels)
    raise AssertionError(f"unhandled model kind {cfg.kind!r}")


def gpt_config(cfg: ModelConfig, *, vocab_size: int = BYTE_VOCAB_SIZE) -> GPT2Config:
    """The ``GPT2Config`` of kind ``gpt``: a decoder with ``cfg.context`` positions."""
    return GPT2Config(
        n_embd=cfg.hidden,
        n_layer=cfg.layers,
        n_head=cfg.heads,
        n_positions=cfg.context,
        vocab_size=vocab_size,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=PAD_ID,
        # The same tanh approximation as GPT-2's "gelu_new", as one fused kernel instead of several
        # Python-level ops (measured: the largest elementwise cost of a CPU training step).
        activation_function="gelu_pytorch_tanh",
        resid_pdrop=cfg.dropout,
        embd_pdrop=cfg.dropout,
        attn_pdrop=cfg.dropout,
        attn_implementation=ATTN_IMPLEMENTATION,
    )


def vit_config(cfg: ModelConfig, *, num_labels: int | None = None) -> ViTConfig:
    """The ``ViTConfig`` of kind ``vit``: MLP width 4 x hidden, a linear head on the CLS token."""
    return ViTConfig(
        image_size=cfg.image_size,
        patch_size=cfg.patch_size,
        num_channels=cfg.channels,
        hidden_size=cfg.hidden,
        num_hidden_layers=cfg.layers,
        num_attention_heads=cfg.heads,
        intermediate_size=4 * cfg.hidden,
        num_labels=num_labels if num_labels is not None else cfg.num_labels,
        hidden_dropout_prob=cfg.dropout,
        attention_probs_dropout_prob=cfg.dropout,
        attn_implementation=ATTN_IMPLEMENTATION,
    )


def clip_config(cfg: ModelConfig, *, vocab_size: int = BYTE_VOCAB_SIZE) -> CLIPConfig:
    """The ``CLIPConfig`` of kind ``clip``: both towers share hidden / layers / heads.

    ``eos_token_id`` is the ByteTokenizer's EOS (258), so the text tower pools at the first EOS
    of each sequence (transformers pools by argmax of the ids only for the legacy id 2).
    """
    tower = {
        "hidden_size": cfg.hidden,
        "intermediate_size": 4 * cfg.hidden,
        "num_hidden_layers": cfg.layers,
        "num_attention_heads": cfg.heads,
        "projection_dim": cfg.projection_dim,
        "attention_dropout": cfg.dropout,
        "dropout": cfg.dropout,
    }
    text = {
        **tower,
        "vocab_size": vocab_size,
        "max_position_embeddings": cfg.context,
        "bos_token_id": BOS_ID,
        "eos_token_id": EOS_ID,
        "pad_token_id": PAD_ID,
    }
    vision = {
        **tower,
        "image_size": cfg.image_size,
        "patch_size": cfg.patch_size,
        "num_channels": cfg.channels,
    }
    return CLIPConfig(
        text_config=text,
        vision_config=vision,
        projection_dim=cfg.projection_dim,
        attn_implementation=ATTN_IMPLEMENTATION,
    )


def resolve_path(path: str | os.PathLike[str], base_dir: str | os.PathLike[str] = ".") -> Path:
    """``path`` as is when absolute (or ``~``), otherwise relative to ``base_dir``."""
    candidate = Path(path).expanduser()
    return candidate if candidate.is_absolute() else Path(base_dir) / candidate


def load_local(path: str | os.PathLike[str], *, num_labels: int | None = None) -> PreTrainedModel:
    """Load a local HF checkpoint directory; never touches the network.

    The class comes from the config's ``architectures``: ``CLIPModel``; a causal LM
    (``...ForCausalLM`` / ``...LMHeadModel``) via ``AutoModelForCausalLM``; an image classifier
    via ``AutoModelForImageClassification``; anything else via ``AutoModel``.

    Raises:
        InputError: the directory, its ``config.json`` or its weights are missing or unreadable.
    """
    directory = Path(path)
    if not directory.is_dir():
        raise InputError(f"{directory}: not a local checkpoint directory (model kind 'hf' never downloads)")
    if not (directory / "config.json").is_file():
        raise InputError(f"{directory}: no config.json (not a Hugging Face checkpoint directory)")
    try:
        config = AutoConfig.from_pretrained(directory, local_files_only=True, trust_remote_code=False)
    except (OSError, ValueError, KeyError) as err:  # JSONDecodeError is a ValueError
        raise InputError(f"{directory / 'config.json'}: unreadable model config: {_first_line(err)}") from err

    loader, extra = _loader_for(config, num_labels)
    try:
        with _quiet():
            model, info = loader.from_pretrained(
                directory,
                config=config,
                local_files_only=True,
                trust_remote_code=False,
                use_safetensors=True,  # never unpickle a pytorch_model.bin
                attn_implementation=_attn_for(config),
                output_loading_info=True,
                **extra,
            )
    except (OSError, ValueError, RuntimeError, SafetensorError) as err:
        # Missing / truncated / mismatched weight files surface as these; the message names the dir.
        raise InputError(f"{directory}: unreadable checkpoint: {_first_line(err)}") from err
    missing = sorted(info.get("missing_keys") or [])
    if missing:
        # transformers would silently random-initialise these; a half-loaded model is bad input.
        shown = ", ".join(missing[:3]) + (f" (+{len(missing) - 3} more)" if len(missing) > 3 else "")
        raise InputError(f"{directory}: checkpoint lacks weights the {type(model).__name__} needs: {shown}")
    vision = getattr(config, "vision_config", config)
    if hasattr(vision, "num_channels") and hasattr(vision, "image_size"):
        # Its processor's mean / std (and size) travel with the model to where pixels enter it.
        attach_image_spec(model, hf_dir_spec(directory, config))
    model.train()
    return with_known_loss(model)


def with_known_loss(model: nn.Module) -> nn.Module:
    """Name a causal LM's loss, which transformers derives from the class name.

    ``GPT2LMHeadModel`` matches none of transformers' loss names, so every first loss call warns
    ``loss_type=None ... unrecognized`` before using the causal-LM loss anyway; naming that loss
    here gives the same numbers without the warning.
    """
    if isinstance(model, PreTrainedModel) and model.can_generate() and getattr(model, "loss_type", None) is None:
        model.loss_type = "ForCausalLM"
    return model


def save_local(model: nn.Module, path: str | os.PathLike[str], tokenizer: object | None = None) -> Path:
    """Save ``model`` as a HF checkpoint directory (``config.json`` + ``model.safetensors``), with
    the tokenizer / image processor files that feed it (:mod:`cloudedge.models.export`).

    The result loads back with ``build_model(ModelConfig(kind="hf", path=...))``, and with
    ``AutoTokenizer`` + ``AutoModelForCausalLM`` (or ``AutoProcessor`` + ``CLIPModel``).
    ``tokenizer``: the project tokenizer the model was trained with (default: the byte tokenizer
    when the vocabulary is its size).
    """
    if not isinstance(model, PreTrainedModel):
        raise TypeError(f"save_local needs a transformers PreTrainedModel, got {type(model).__name__}")
    directory = Path(path)
    directory.mkdir(parents=True, exist_ok=True)
    # transformers 5 always writes safetensors; no pickle is ever produced.
    with _quiet():
        model.save_pretrained(directory)
    from cloudedge.models.export import write_processing_files

    write_processing_files(model, directory, tokenizer)  # type: ignore[arg-type]
    return directory


def build_uninitialised(build: Callable[[], nn.Module], device: str | torch.device = "cpu") -> nn.Module:
    """``build()``, with the model's parameters allocated on ``device`` but not initialised.

    For a model whose every parameter is overwritten before it is used: a pre-training worker
    loads the coordinator's parameters at the start of every task. Random initialisation is then
    pure waste, and it is not small: on the H200 machine's CPU it took about 1 s per build of the
    ~100M-parameter GPT, 61% of a ``pretrain-hetero`` run's wall time, because a device worker is
    rebuilt every round (docs/performance.md). Allocating on ``device`` also saves the copy from
    host memory. Buffers (position ids and the like) are built as usual, and tied weights are
    tied again (transformers ties them in the initialisation this skips).

    Not thread-safe: transformers switches the ``torch.nn.init`` functions off module-wide while
    ``build`` runs, and the engines build one worker at a time per process.
    """
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # transformers releases that keep it in modeling_utils
        from transformers.modeling_utils import no_init_weights  # type: ignore[attr-defined,no-redef]
    with no_init_weights(), torch.device(device):
        model = build()
    for module in model.modules():
        if isinstance(module, PreTrainedModel):
            module.tie_weights()
    return model


def param_count(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (tied weights counted once); only ``requires_grad`` ones if asked."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def model_bytes(model: nn.Module) -> int:
    """Bytes held by all parameters (tied weights counted once), at their current dtypes."""
    return sum(p.numel() * p.element_size() for p in model.parameters())


# --- internals ---------------------------------------------------------------------------------


@contextlib.contextmanager
def _seeded(seed: int | None) -> Iterator[None]:
    """Run the body under ``torch.manual_seed(seed)`` and restore the global RNG afterwards."""
    if seed is None:
        yield
        return
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Hide transformers' per-load progress bars (noise in logs of many small loads)."""
    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def _loader_for(config: PretrainedConfig, num_labels: int | None) -> tuple[type, dict[str, object]]:
    """The auto class that matches ``config.architectures``, and extra ``from_pretrained`` kwargs."""
    architectures = list(getattr(config, "architectures", None) or [])
    if "CLIPModel" in architectures:
        return CLIPModel, {}
    if any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in architectures):
        return AutoModelForCausalLM, {}
    if any(a.endswith("ForImageClassification") for a in architectures):
        extra: dict[str, object] = {}
        if num_labels is not None and num_labels != config.num_labels:
            # A new head for a new label set; the backbone weights still load.
            config.num_labels = num_labels
            config.id2label = {i: f"LABEL_{i}" for i in range(num_labels)}
            config.label2id = {v: k for k, v in config.id2label.items()}
            extra["ignore_mismatched_sizes"] = True
        return AutoModelForImageClassification, extra
    return AutoModel, {}


def _attn_for(config: PretrainedConfig) -> str | None:
    """``sdpa`` for the zoo's own architectures (as built), else whatever transformers picks."""
    return ATTN_IMPLEMENTATION if config.model_type in ("gpt2", "vit", "clip") else None


def _first_line(err: BaseException) -> str:
    text = str(err).strip() or type(err).__name__
    return text.splitlines()[0]
