"""The fine-tuning model: what is trainable, and merged base deltas equal the LoRA path."""

from __future__ import annotations

import pytest
import torch

from cloudedge.config.model import ModelConfig
from cloudedge.finetune.lora import A_SUFFIX, B_SUFFIX, aggregate_lora, lora_layers, with_base_deltas
from cloudedge.finetune.model import AdapterSlot, adapter_state, build_lora_classifier


def _spec(kind: str, mode: str = "fedavg") -> dict:
    cfg = ModelConfig(kind=kind, hidden=16, layers=1, heads=2, image_size=8, patch_size=4, channels=1, context=16)
    return {"model": cfg.model_dump(), "seed": 0, "n_classes": 4, "rank": 2, "alpha": 4.0, "mode": mode}


def _inputs(kind: str) -> dict:
    gen = torch.Generator().manual_seed(0)
    if kind == "gpt":
        mask = torch.ones(3, 16, dtype=torch.long)
        mask[0, 10:] = 0
        return {"input_ids": torch.randint(0, 256, (3, 16), generator=gen), "attention_mask": mask}
    return {"pixel_values": torch.rand(3, 1, 8, 8, generator=gen)}


@pytest.mark.parametrize("kind", ["vit", "clip", "gpt"])
def test_only_adapters_and_head_train_and_merge_matches_lora(kind):
    model = build_lora_classifier(_spec(kind))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n or n.startswith("head.") for n in trainable)
    state = adapter_state(model)
    gen = torch.Generator().manual_seed(1)
    for layer in lora_layers(state):  # give B a value so the adapters change the output
        state[layer + B_SUFFIX] = torch.randn(state[layer + B_SUFFIX].shape, generator=gen) * 0.1
    slot = AdapterSlot(model)
    slot.load(state)
    with torch.no_grad():
        lora_out = model(_inputs(kind))
    # Merge mode: the same state as base deltas + fresh adapters (B = 0) gives the same function.
    merged = aggregate_lora([with_base_deltas(state)], [1.0], "product", scaling=2.0, refactor="merge")
    assert all(torch.count_nonzero(merged[layer + B_SUFFIX]) == 0 for layer in lora_layers(merged))
    slot.load(merged)
    with torch.no_grad():
        merged_out = model(_inputs(kind))
    torch.testing.assert_close(merged_out, lora_out, rtol=1e-4, atol=1e-5)
    slot.load(merged)  # loading again does not accumulate the delta
    with torch.no_grad():
        torch.testing.assert_close(model(_inputs(kind)), lora_out, rtol=1e-4, atol=1e-5)


def test_ffa_freezes_a_and_same_spec_same_init():
    model = build_lora_classifier(_spec("vit", "ffa"))
    assert all(not p.requires_grad for n, p in model.named_parameters() if n.endswith(A_SUFFIX))
    again = adapter_state(build_lora_classifier(_spec("vit", "ffa")))
    assert all(torch.equal(v, again[k]) for k, v in adapter_state(model).items())


def test_a_pretrained_classifier_is_fine_tuned_on_the_feature_it_was_trained_on():
    from cloudedge.errors import InputError
    from cloudedge.finetune.stage import feature_pooling
    from cloudedge.pretrain.tasks import build_classifier

    cfg = ModelConfig(kind="vit", hidden=16, layers=1, heads=2, image_size=8, patch_size=4, channels=1)
    pre = build_classifier(cfg, n_classes=4, seed=3, kind="vit")
    base = {k: v.detach().clone() for k, v in pre.state_dict().items()}
    assert feature_pooling("auto", cfg, base) == "mean"  # a cloudedge Classifier: mean of tokens
    assert feature_pooling("auto", cfg, None) == "cls"  # fresh or HF ViT: its CLS token
    spec = {**_spec("vit"), "base_tensors": base, "pooling": "mean"}
    ft = build_lora_classifier(spec)
    x = _inputs("vit")["pixel_values"]
    with torch.no_grad():  # adapters start at B = 0: the feature is the pre-trained model's own
        torch.testing.assert_close(ft.features({"pixel_values": x}), pre.features(x), rtol=1e-5, atol=1e-6)
        cls = build_lora_classifier({**spec, "pooling": "cls"}).features({"pixel_values": x})
    assert not torch.allclose(cls, pre.features(x), atol=1e-3)
    with pytest.raises(InputError, match="finetune.pooling"):
        build_lora_classifier({**_spec("clip"), "pooling": "mean"})
    with pytest.raises(InputError, match="finetune.pooling"):
        feature_pooling("mean", ModelConfig(kind="gpt"), None)
