"""The clip pre-training task: seeded digit captions and CLIP's symmetric contrastive loss."""

from __future__ import annotations

import torch

from cloudedge.config.model import ModelConfig
from cloudedge.data import DIGIT_CLASSES
from cloudedge.data.tokenizer import ByteTokenizer
from cloudedge.models import build_model
from cloudedge.pretrain.clip_task import DIGIT_TEMPLATES, clip_batch, clip_contrastive_loss, digit_captions


def _model():
    return build_model(ModelConfig(kind="clip", hidden=32, layers=1, heads=4, context=40, image_size=8,
                                   patch_size=4, channels=1, projection_dim=16), seed=0)


def test_captions_name_the_digit_and_are_seeded():
    labels = [7, 0, 7, 3]
    caps = digit_captions(labels, DIGIT_CLASSES, seed=1)
    assert caps == digit_captions(labels, DIGIT_CLASSES, seed=1)
    assert [c.split()[-1].rstrip(".") for c in caps] == ["seven", "zero", "seven", "three"]
    assert all(any(c == t.format(DIGIT_CLASSES[y]) for t in DIGIT_TEMPLATES) for c, y in zip(caps, labels, strict=True))
    many = digit_captions([1] * 200, DIGIT_CLASSES, seed=0)
    assert len(set(many)) == len(DIGIT_TEMPLATES)  # every template gets used
    assert many != digit_captions([1] * 200, DIGIT_CLASSES, seed=1)


def test_loss_matches_transformers_clip_loss():
    model = _model().eval()
    x = torch.rand(6, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    batch = clip_batch(x, torch.arange(6), DIGIT_CLASSES, seed=0, max_len=40)
    ours = clip_contrastive_loss(model, batch["pixel_values"], batch["input_ids"], batch["attention_mask"])
    with torch.no_grad():
        ref = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                    pixel_values=x, return_loss=True).loss  # scale exp(2.6592) < 100: no cap applies
    torch.testing.assert_close(ours.detach(), ref)
    ours.backward()
    assert model.logit_scale.grad is not None and model.text_model.embeddings.token_embedding.weight.grad is not None


def test_training_steps_lower_the_loss():
    model = _model()
    x = torch.rand(8, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    batch = clip_batch(x, torch.arange(8) % 10, DIGIT_CLASSES, seed=0, max_len=40)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(15):
        loss = clip_contrastive_loss(model, **batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.8 * losses[0]
    assert batch["input_ids"][0, 0] == ByteTokenizer.bos_id
