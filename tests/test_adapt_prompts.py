"""Prompt learner: a context equal to "a photo of a" reproduces CLIP's own text features."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

from cloudedge.adapt.clip_model import adapter_for_bundled, encode_texts, load_clip
from cloudedge.adapt.prompts import PromptLearner
from cloudedge.config.model import ModelConfig
from cloudedge.models import build_model, save_local

CLASSES = ["zero", "seven", "photo"]


def _byte_to_unicode() -> list[str]:
    """GPT-2 / CLIP byte -> printable character table (the base alphabet of byte-level BPE)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = dict.fromkeys(range(256)), 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


def tiny_clip_tokenizer() -> CLIPTokenizer:
    """A CLIP BPE tokenizer with a tiny vocabulary: every byte, and whole words for a few words."""
    chars = _byte_to_unicode()
    vocab = [*chars, *(c + "</w>" for c in chars)]
    merges: list[tuple[str, str]] = []
    for word in ["photo", "of", "seven", "zero"]:
        parts = [*word[:-1], word[-1] + "</w>"]
        while len(parts) > 1:
            merges.append((parts[0], parts[1]))
            merged = parts[0] + parts[1]
            if merged not in vocab:
                vocab.append(merged)
            parts = [merged, *parts[2:]]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    return CLIPTokenizer(vocab={t: i for i, t in enumerate(vocab)}, merges=merges)


def save_tiny_hf_clip(directory: Path, seed: int = 0, context: int = 24) -> Path:
    """A tiny CLIP with a BPE tokenizer and a preprocessor config, saved like a hub download
    (``context``: the text tower's positions; most words here are one token per letter)."""
    tok = tiny_clip_tokenizer()
    tower = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4}
    cfg = CLIPConfig(
        text_config={**tower, "vocab_size": len(tok), "max_position_embeddings": context,
                     "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id,
                     "pad_token_id": tok.pad_token_id},
        vision_config={**tower, "image_size": 16, "patch_size": 4, "num_channels": 3},
        projection_dim=16,
    )
    torch.manual_seed(seed)
    model = CLIPModel(cfg)
    save_local(model, directory)
    tok.save_pretrained(directory)
    (directory / "preprocessor_config.json").write_text(json.dumps(
        {"image_mean": [0.5, 0.4, 0.3], "image_std": [0.2, 0.25, 0.3], "crop_size": {"height": 16, "width": 16}}))
    return directory


@pytest.fixture(scope="module")
def bundled():
    model = build_model(ModelConfig(kind="clip", hidden=32, layers=2, heads=4, context=32, image_size=8,
                                    patch_size=2, projection_dim=16), seed=1)
    with torch.no_grad():  # a non-trivial position table so a misplaced token would show
        model.text_model.embeddings.position_embedding.weight.normal_(0, 0.5)
    return adapter_for_bundled(model)


@pytest.fixture(scope="module")
def hf_clip(tmp_path_factory):
    return load_clip(save_tiny_hf_clip(tmp_path_factory.mktemp("hfclip")))


def _reference(clip, texts):
    ids, mask = encode_texts(clip.tokenizer, texts)
    with torch.no_grad():
        return clip.model.get_text_features(input_ids=ids, attention_mask=mask).pooler_output


@pytest.mark.parametrize("which", ["bundled", "hf_clip"])
def test_init_context_reproduces_get_text_features(which, request):
    clip = request.getfixturevalue(which)
    learner = PromptLearner(clip, CLASSES, ctx_init="a photo of a")
    expected_n_ctx = 12 if which == "bundled" else 4  # bytes vs BPE words
    assert learner.n_ctx == expected_n_ctx
    with torch.no_grad():
        got = learner.text_features()
    want = _reference(clip, [f"a photo of a {c}." for c in CLASSES])
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    # and a different context gives different features (the context is really used)
    with torch.no_grad():
        bump = torch.randn(learner.ctx.shape, generator=torch.Generator().manual_seed(0))
        other = learner.text_features(learner.ctx + bump)
    assert (other - want).abs().max() > 1e-3


def test_gradient_reaches_only_the_context(bundled):
    learner = PromptLearner(bundled, CLASSES, ctx_init=None, n_ctx=4, seed=3)
    assert learner.ctx.shape == (4, 32)
    assert [n for n, p in learner.named_parameters()] == ["ctx"]
    feats = learner.normalized_text_features()
    feats.sum().backward()
    assert learner.ctx.grad is not None and learner.ctx.grad.abs().sum() > 0
    assert all(p.grad is None for p in bundled.model.parameters())


def test_hf_dir_uses_its_tokenizer_and_preprocessor(hf_clip):
    assert hf_clip.tokenizer.ids("a photo of a seven.") == hf_clip.tokenizer.ids("a photo of a") + \
        hf_clip.tokenizer.ids(" seven.")
    assert hf_clip.image_spec.mean == (0.5, 0.4, 0.3) and hf_clip.image_spec.size == 16
    grey = torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    feats = hf_clip.image_features(grey)
    assert feats.shape == (2, 16)
    torch.testing.assert_close(feats.norm(dim=-1), torch.ones(2))
    # the same images preprocessed by hand give the same features
    x = F.interpolate(grey.expand(-1, 3, -1, -1), size=(16, 16), mode="bilinear", align_corners=False)
    x = (x - torch.tensor([0.5, 0.4, 0.3]).view(1, 3, 1, 1)) / torch.tensor([0.2, 0.25, 0.3]).view(1, 3, 1, 1)
    with torch.no_grad():
        ref = F.normalize(hf_clip.model.get_image_features(pixel_values=x).pooler_output, dim=-1)
    torch.testing.assert_close(feats, ref)
