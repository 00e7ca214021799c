"""A frozen CLIP-style model with its tokenizer and image preprocessing, ready for adaptation.

Two sources give the same :class:`ClipAdapter`:

- the bundled small CLIP (``build_model(ModelConfig(kind="clip"))``, byte-level text): saved as a
  HF checkpoint directory with ``save_local`` or as a cloudedge checkpoint (a ``.safetensors``
  file whose keys may carry a ``model.`` prefix, plus its ``ModelConfig``); its text goes through
  the :class:`~cloudedge.data.ByteTokenizer` and its images are used as they are (pixels in [0, 1]);
- a local Hugging Face CLIP directory (e.g. a downloaded ``openai/clip-vit-base-patch16``): the
  weights, the ``CLIPTokenizer`` files and ``preprocessor_config.json`` (mean / std / size) all come
  from the same directory, with ``local_files_only=True``; nothing is downloaded.

Test-time adaptation never changes the CLIP weights: the model is put in eval mode with every
parameter frozen; only prompt vectors (``cloudedge.adapt.prompts``) or caches change.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Protocol

import torch
import torch.nn.functional as F
from transformers import CLIPModel

from cloudedge.config.model import ModelConfig
from cloudedge.device import autocast
from cloudedge.errors import InputError
from cloudedge.models.inputs import ImageSpec, fit_pixels, model_image_spec


class TextTokenizer(Protocol):
    """What the adaptation code needs from a tokenizer: plain ids and the special ids."""

    bos_id: int
    eos_id: int
    pad_id: int
    max_len: int

    def ids(self, text: str) -> list[int]:
        """Token ids of ``text`` without special tokens."""
        ...


class ByteTextTokenizer:
    """The bundled byte-level tokenizer (UTF-8 bytes; BOS/EOS/PAD above 255)."""

    def __init__(self, max_len: int):
        from cloudedge.data.tokenizer import ByteTokenizer

        self._tok = ByteTokenizer()
        self.bos_id, self.eos_id, self.pad_id = self._tok.bos_id, self._tok.eos_id, self._tok.pad_id
        self.max_len = int(max_len)

    def ids(self, text: str) -> list[int]:
        return list(self._tok.encode(text))


class HFTextTokenizer:
    """A Hugging Face tokenizer (CLIP's BPE) loaded from a local directory."""

    def __init__(self, tokenizer, max_len: int):  # noqa: ANN001 - any PreTrainedTokenizer
        self._tok = tokenizer
        self.bos_id = int(tokenizer.bos_token_id)
        self.eos_id = int(tokenizer.eos_token_id)
        pad = tokenizer.pad_token_id
        self.pad_id = int(pad if pad is not None else tokenizer.eos_token_id)
        self.max_len = int(max_len)

    def ids(self, text: str) -> list[int]:
        return list(self._tok(text, add_special_tokens=False)["input_ids"])


def encode_texts(tok: TextTokenizer, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """``[BOS] ids [EOS]`` right-padded to the longest text: ``(input_ids, attention_mask)``.

    Raises:
        InputError: a text does not fit the text tower's positions.
    """
    rows = [[tok.bos_id, *tok.ids(t), tok.eos_id] for t in texts]
    longest = max(len(r) for r in rows)
    if longest > tok.max_len:
        worst = texts[max(range(len(rows)), key=lambda i: len(rows[i]))]
        raise InputError(f"prompt too long for the text tower ({longest} > {tok.max_len} tokens): {worst!r} "
                         "(shorten the class names, e.g. in data.class_names, or the prompt template)")
    ids = torch.full((len(rows), longest), tok.pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), longest), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
    return ids, mask


class ClipAdapter:
    """A frozen CLIP model with its tokenizer and image spec.

    ``image_features`` / ``text_features`` return L2-normalised embeddings; ``logit_scale`` is the
    model's learned temperature (``exp`` applied), so ``logit_scale * img @ txt.T`` are CLIP logits.
    """

    def __init__(self, model: CLIPModel, tokenizer: TextTokenizer, image_spec: ImageSpec, source: str = "<model>"):
        if not isinstance(model, CLIPModel):
            raise InputError(f"{source}: not a CLIP model ({type(model).__name__})")
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.image_spec = image_spec
        self.source = source
        self.precision = "fp32"  # adapt.precision (set by edges.load_clip_source): every forward runs under autocast()

    def autocast(self) -> contextlib.AbstractContextManager[None]:
        """The CLIP's forward passes in ``precision`` (bf16: bfloat16 autocast; fp32: as they are).
        Callers return float32 features, so methods compute logits and losses in float32."""
        return autocast(self.device, self.precision)

    @property
    def device(self) -> torch.device:
        return self.model.logit_scale.device

    @property
    def logit_scale(self) -> float:
        return float(self.model.logit_scale.detach().exp().clamp(max=100.0))

    @torch.no_grad()
    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        """Normalised image embeddings ``[B, P]`` of images in [0, 1]."""
        pixels = fit_pixels(images.to(self.device), self.image_spec)
        with self.autocast():
            out = self.model.get_image_features(pixel_values=pixels)
        return F.normalize(_pooled(out).float(), dim=-1)

    @torch.no_grad()
    def text_features(self, texts: list[str]) -> torch.Tensor:
        """Normalised text embeddings ``[T, P]`` of plain prompts (no learned context)."""
        ids, mask = encode_texts(self.tokenizer, texts)
        with self.autocast():
            out = self.model.get_text_features(input_ids=ids.to(self.device), attention_mask=mask.to(self.device))
        return F.normalize(_pooled(out).float(), dim=-1)


def _pooled(out: object) -> torch.Tensor:
    """transformers 5 returns an output object whose ``pooler_output`` is projected; 4.x a tensor."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output  # type: ignore[attr-defined]


def adapter_for_bundled(model: CLIPModel, source: str = "<bundled clip>") -> ClipAdapter:
    """A :class:`ClipAdapter` for a byte-tokenized CLIP built by the zoo (kind ``clip``)."""
    max_len = int(model.config.text_config.max_position_embeddings)
    # A zoo-built CLIP takes pixels in [0, 1] as they are; one loaded from a directory, as it says.
    return ClipAdapter(model, ByteTextTokenizer(max_len), model_image_spec(model), source)


def load_clip(path: str | os.PathLike[str], model_cfg: ModelConfig | None = None) -> ClipAdapter:
    """Load a CLIP model for adaptation from a local directory or a cloudedge checkpoint file.

    ``path`` is either a HF checkpoint directory (``config.json`` + ``model.safetensors``; a
    ``tokenizer_config.json`` / ``vocab.json`` there means a HF tokenizer, otherwise the bundled
    byte tokenizer), or a ``.safetensors`` file of CLIP weights (keys optionally prefixed
    ``model.``) whose architecture ``model_cfg`` (kind ``clip``) describes.

    Raises:
        InputError: the path is missing, is not a CLIP checkpoint, or does not fit ``model_cfg``.
    """
    path = Path(path)
    if path.is_dir():
        return _load_hf_dir(path)
    if path.suffix == ".safetensors":
        if model_cfg is None or model_cfg.kind != "clip":
            raise InputError(f"{path}: a weights file needs the model config (kind 'clip') it was trained with")
        return _load_weights_file(path, model_cfg)
    raise InputError(f"{path}: not a CLIP checkpoint directory or .safetensors file")


def _load_hf_dir(directory: Path) -> ClipAdapter:
    from cloudedge.models import build_model

    model = build_model(ModelConfig(kind="hf", path=str(directory)))
    if not isinstance(model, CLIPModel):
        raise InputError(f"{directory}: not a CLIP checkpoint (architecture {type(model).__name__})")
    has_tokenizer = any((directory / f).is_file() for f in ("tokenizer.json", "vocab.json", "tokenizer_config.json"))
    if not has_tokenizer:
        # A bundled model saved with save_local: its text is bytes.
        if int(model.config.text_config.vocab_size) != 259:
            raise InputError(f"{directory}: no tokenizer files and the vocabulary is not the byte tokenizer's")
        return adapter_for_bundled(model, str(directory))
    from transformers import AutoTokenizer

    try:
        hf_tok = AutoTokenizer.from_pretrained(directory, local_files_only=True)
    except (OSError, ValueError) as err:
        raise InputError(f"{directory}: unreadable tokenizer files ({str(err).splitlines()[0]})") from None
    max_len = int(model.config.text_config.max_position_embeddings)
    return ClipAdapter(model, HFTextTokenizer(hf_tok, max_len), model_image_spec(model), str(directory))


def _load_weights_file(path: Path, model_cfg: ModelConfig) -> ClipAdapter:
    from cloudedge.checkpoint import check_state_dict, load_tensors
    from cloudedge.models import build_model

    tensors = load_tensors(path)
    model = build_model(model_cfg, seed=0)
    prefix = "model." if any(k.startswith("model.") for k in tensors) else ""
    state = check_state_dict(tensors, model, str(path), prefix=prefix)
    model.load_state_dict(state)
    return adapter_for_bundled(model, str(path))
