"""The ``clip`` pre-training task: digit images paired with captions, and CLIP's contrastive loss.

A caption names the digit through one of several templates ("a photo of the digit seven.",
"a handwritten seven.", ...), the template drawn per sample from a seeded generator, so the text
tower learns the class words rather than one fixed sentence. Images that carry attributes (the
``glyphs`` source's ``meta``: face, weight, slant, colours, size, pose) get captions naming those
too (``glyph_attrs.glyph_captions``), so the text tower sees many thousands of distinct captions. The loss is CLIP's symmetric InfoNCE:
cross-entropy of image->text and text->image similarities (cosine times the model's learned
``logit_scale``, capped at 100 as in CLIP) against the diagonal, averaged.

The pre-training loop (``cloudedge.pretrain``) trains the model across the fleet; the prompt-tuning
stage (``cloudedge.adapt``) then adapts the frozen result at test time.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cloudedge.models.inputs import fit_pixels, model_image_spec

DIGIT_TEMPLATES: tuple[str, ...] = (
    "a photo of a {}.",
    "a photo of the digit {}.",
    "a handwritten {}.",
    "a drawing of the number {}.",
    "the digit {}.",
    "a picture of a {}.",
    "a small image of the digit {}.",
    "a scan of a handwritten {}.",
)

# ln(100): CLIP caps its temperature so the logits cannot blow up.
MAX_LOGIT_SCALE = 100.0


def digit_captions(labels: Sequence[int] | torch.Tensor | np.ndarray, classes: Sequence[str], seed: int,
                   templates: Sequence[str] = DIGIT_TEMPLATES) -> list[str]:
    """One caption per label, ``templates[k].format(classes[label])`` with ``k`` drawn under ``seed``."""
    labels_list = [int(v) for v in np.asarray(labels).reshape(-1)]
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(templates), size=len(labels_list))
    return [templates[int(k)].format(classes[y]) for k, y in zip(picks, labels_list, strict=True)]


def captions_for(labels: Sequence[int] | torch.Tensor | np.ndarray, classes: Sequence[str], seed: int,
                 meta: dict[str, torch.Tensor] | None = None, plain_fraction: float = 0.0) -> list[str]:
    """One caption per image: from its attributes when ``meta`` has the glyph attributes (class-only
    for ``plain_fraction`` of them), else :func:`digit_captions`."""
    from cloudedge.data.glyph_attrs import glyph_captions, has_glyph_attributes

    if meta and has_glyph_attributes(meta):
        return glyph_captions(labels, classes, meta, seed, plain_fraction=plain_fraction)
    return digit_captions(labels, classes, seed)


def fit_pixels_to_model(model: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    """Images in [0, 1] fitted to the vision tower (channels, size, and the mean / std of a
    checkpoint loaded from a HF directory; ``cloudedge.models.inputs.model_image_spec``).

    The bundled CLIP sees pixels in [0, 1] as they are (no mean/std normalisation); the
    prompt-tuning stage feeds it the same way.
    """
    return fit_pixels(pixel_values, model_image_spec(model))


def clip_logits(model: nn.Module, pixel_values: torch.Tensor, input_ids: torch.Tensor,
                attention_mask: torch.Tensor) -> torch.Tensor:
    """Image-to-text logits ``[B, B]``: capped ``logit_scale`` times cosine similarity."""
    image = model.get_image_features(pixel_values=fit_pixels_to_model(model, pixel_values))
    text = model.get_text_features(input_ids=input_ids, attention_mask=attention_mask)
    image = F.normalize(_pooled(image), dim=-1)
    text = F.normalize(_pooled(text), dim=-1)
    scale = model.logit_scale.exp().clamp(max=MAX_LOGIT_SCALE)
    return scale * image @ text.T


def clip_contrastive_loss(model: nn.Module, pixel_values: torch.Tensor, input_ids: torch.Tensor,
                          attention_mask: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE of a batch of (image, caption) pairs: mean of both directions' CE."""
    logits = clip_logits(model, pixel_values, input_ids, attention_mask)
    target = torch.arange(logits.shape[0], device=logits.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))


def clip_batch(images: torch.Tensor, labels: torch.Tensor, classes: Sequence[str], seed: int,
               max_len: int, meta: dict[str, torch.Tensor] | None = None,
               plain_fraction: float = 0.0) -> dict[str, torch.Tensor]:
    """A ready batch for :func:`clip_contrastive_loss`: pixels and byte-tokenized captions
    (:func:`captions_for`: ``meta`` is the dataset's per-image attributes, if any)."""
    from cloudedge.data.tokenizer import ByteTokenizer

    captions = captions_for(labels, classes, seed, meta, plain_fraction)
    input_ids, attention_mask = ByteTokenizer().batch_encode(captions, max_len=max_len, pad_to="longest")
    return {"pixel_values": images, "input_ids": input_ids, "attention_mask": attention_mask}


def _pooled(out: object) -> torch.Tensor:
    # transformers 5: an output object whose pooler_output is the projected feature; 4.x: a tensor.
    return out if isinstance(out, torch.Tensor) else out.pooler_output  # type: ignore[attr-defined]
