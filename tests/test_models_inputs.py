"""Images into models (cloudedge.models.inputs): channel conversion, up-front checks, every stage."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from cloudedge.config import config_from_dict
from cloudedge.errors import InputError
from cloudedge.fleet import Fleet
from cloudedge.models.inputs import ImageSpec, check_images, convert_channels, fit_pixels


def test_grey_is_replicated_over_rgb():
    grey = torch.rand(2, 1, 5, 5, generator=torch.Generator().manual_seed(0))
    rgb = convert_channels(grey, 3)
    assert rgb.shape == (2, 3, 5, 5) and all(torch.equal(rgb[:, c], grey[:, 0]) for c in range(3))


def test_rgb_becomes_bt601_luminance_as_pil_computes_it():
    pixels = np.random.default_rng(0).integers(0, 256, (6, 7, 3), dtype=np.uint8)
    rgb = torch.from_numpy(pixels).permute(2, 0, 1)[None].float() / 255
    grey = convert_channels(rgb, 1)
    expected = 0.299 * rgb[:, 0] + 0.587 * rgb[:, 1] + 0.114 * rgb[:, 2]
    assert grey.shape == (1, 1, 6, 7) and torch.allclose(grey[:, 0], expected)
    pil = torch.from_numpy(np.asarray(Image.fromarray(pixels).convert("L"), dtype=np.float32) / 255)
    assert float((grey[0, 0] - pil).abs().max()) <= 1 / 255  # PIL rounds to 8 bits
    # Weights sum to 1: a replicated grey image converts back to itself.
    assert torch.allclose(convert_channels(convert_channels(grey, 3), 1), grey)


def test_other_channel_counts_are_input_errors():
    x = torch.zeros(1, 3, 4, 4)
    assert convert_channels(x, 3) is x
    with pytest.raises(InputError, match="data.x: images have 4 channels and the model takes 3"):
        convert_channels(torch.zeros(1, 4, 4, 4), 3, "data.x")
    with pytest.raises(InputError, match="images have 3 channels and the model takes 2"):
        convert_channels(x, 2)


def test_check_images_before_dispatch():
    spec = ImageSpec(size=8, channels=1)
    check_images((10, 3, 8, 8), spec, "data")
    check_images((10, 1, 16, 16), spec, "data")  # resized by fit_pixels
    with pytest.raises(InputError, match=r"finetune.data: images are 16 x 16 px, the model takes 8 x 8 \(set data.image_size to 8\)"):
        check_images((10, 3, 16, 16), spec, "finetune.data", resize=False)
    with pytest.raises(InputError, match="4 channels"):
        check_images((10, 4, 8, 8), spec, "data")
    with pytest.raises(InputError, match=r"expected images \[N, C, H, W\]"):
        check_images((10, 8, 8), spec, "data")


def test_fit_pixels_converts_resizes_and_normalizes():
    spec = ImageSpec(size=4, channels=3, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    out = fit_pixels(torch.full((2, 1, 8, 8), 0.75), spec)
    assert out.shape == (2, 3, 4, 4) and torch.allclose(out, torch.ones_like(out))


def _folder(root, mode: str) -> None:
    rng = np.random.default_rng(1)
    for folder in ("a", "b"):
        (root / folder).mkdir(parents=True)
        for i in range(4):
            shape = (8, 8, 3) if mode == "RGB" else (8, 8)
            Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode=mode).save(root / folder / f"{i}.png")


@pytest.mark.parametrize(("mode", "channels"), [("RGB", 1), ("L", 3)])
def test_finetune_takes_an_image_folder_in_the_other_channels(tmp_path, mode, channels):
    from cloudedge.finetune.stage import prepare_task

    _folder(tmp_path / "pics", mode)
    cfg = config_from_dict({
        "fleet": {"edges": [{"count": 1, "devices": [{"count": 2, "profile": "phone-mid"}]}]},
        "data": {"source": "imagefolder", "path": "pics", "image_size": 8, "test_fraction": 0.25},
        "model": {"kind": "vit", "hidden": 16, "layers": 1, "heads": 2, "image_size": 8, "patch_size": 4,
                  "channels": channels},
        "finetune": {}}, base_dir=tmp_path)
    task = prepare_task(cfg, Fleet.from_config(cfg.fleet, cfg.seed))
    assert task.test_data["pixel_values"].shape[1] == channels
    assert all(d["pixel_values"].shape[1] == channels for d in task.device_data.values())


def test_pretrain_clip_batches_fit_the_vision_tower():
    from cloudedge.models import build_model
    from cloudedge.pretrain.clip_task import clip_batch, clip_contrastive_loss

    cfg = config_from_dict({"model": {"kind": "clip", "hidden": 16, "layers": 1, "heads": 2, "context": 32,
                                      "image_size": 8, "patch_size": 4, "channels": 1, "projection_dim": 8}})
    model = build_model(cfg.model, seed=0)
    batch = clip_batch(torch.rand(4, 3, 12, 12), torch.tensor([0, 1, 0, 1]), ["cat", "dog"], 0, 32)
    loss = clip_contrastive_loss(model, batch["pixel_values"], batch["input_ids"], batch["attention_mask"])
    assert torch.isfinite(loss)


def test_pretrain_classify_takes_an_rgb_folder_with_a_grey_model(tmp_path):
    from cloudedge.pretrain.shards import build_shards

    _folder(tmp_path / "pics", "RGB")
    cfg = config_from_dict({
        "data": {"source": "imagefolder", "path": "pics", "image_size": 8, "test_fraction": 0.25},
        "model": {"kind": "vit", "hidden": 16, "layers": 1, "heads": 2, "image_size": 8, "patch_size": 4,
                  "channels": 1},
        "pretrain": {"task": "classify", "workers": ["cloud"]}}, base_dir=tmp_path)
    fleet = Fleet.from_config(cfg.fleet, cfg.seed)
    shards = build_shards(cfg, cfg.pretrain, [fleet.cloud], seq_len=8)
    assert shards.train["cloud"]["x"].shape[1:] == (1, 8, 8) and shards.val["x"].shape[1] == 1
    wrong = config_from_dict({**cfg.model_dump(exclude={"base_dir"}), "model": {**cfg.model.model_dump(), "image_size": 4}},
                             base_dir=tmp_path)
    with pytest.raises(InputError, match="pretrain.data \\(imagefolder\\) for pretrain.model: images are 8 x 8 px"):
        build_shards(wrong, wrong.pretrain, [fleet.cloud], seq_len=8)


def _hf_vit_dir(path, mean=None):
    """A tiny ViT saved as a HF directory (16 px, RGB); ``mean``: rewrite its processor's mean / std
    to that value (None: delete the processor file)."""
    import json

    from cloudedge.config.model import ModelConfig
    from cloudedge.models import build_model, save_local

    cfg = ModelConfig(kind="vit", hidden=16, layers=1, heads=2, image_size=16, patch_size=4, channels=3)
    save_local(build_model(cfg, seed=0), path)
    pre = path / "preprocessor_config.json"
    if mean is None:
        pre.unlink()
    else:
        raw = json.loads(pre.read_text())
        raw.update(image_mean=[mean] * 3, image_std=[mean] * 3)
        pre.write_text(json.dumps(raw))
    return path


def test_a_hf_checkpoint_is_fed_as_its_processor_says_in_fine_tuning(tmp_path):
    """Pixels in [0, 1] at 8 px reach a HF ViT's encoder resized to its 16 px and normalized with
    its processor's mean / std; a model built from the config gets them untouched."""
    from cloudedge.finetune.model import build_lora_classifier

    x = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    seen = {}
    spec = {"model": {"kind": "hf", "path": str(_hf_vit_dir(tmp_path / "vit", 0.5))}, "seed": 0, "n_classes": 3,
            "rank": 2, "alpha": 4.0, "mode": "fedavg", "base_tensors": None}
    clf = build_lora_classifier(spec)
    clf.backbone.register_forward_pre_hook(lambda m, a, kw: seen.update(px=kw["pixel_values"]), with_kwargs=True)
    clf({"pixel_values": x})
    want = fit_pixels(x, ImageSpec(16, 3, (0.5,) * 3, (0.5,) * 3))
    assert seen["px"].shape == (2, 3, 16, 16) and torch.allclose(seen["px"], want)
    assert float(seen["px"].min()) < 0  # normalized: [0, 1] became [-1, 1]
    built = build_lora_classifier({**spec, "model": {"kind": "vit", "hidden": 16, "layers": 1, "heads": 2,
                                                      "image_size": 8, "patch_size": 4, "channels": 3}})
    built.backbone.register_forward_pre_hook(lambda m, a, kw: seen.update(px=kw["pixel_values"]), with_kwargs=True)
    built({"pixel_values": x})
    assert seen["px"] is x


def test_hf_directories_without_a_processor_get_their_familys_defaults(tmp_path):
    from transformers import AutoConfig

    from cloudedge.config.model import ModelConfig
    from cloudedge.models import build_model, save_local
    from cloudedge.models.inputs import CLIP_MEAN, hf_dir_spec, model_image_spec

    vit = _hf_vit_dir(tmp_path / "vit", None)
    assert hf_dir_spec(vit, AutoConfig.from_pretrained(vit)).mean == (0.5, 0.5, 0.5)  # ViTImageProcessor's
    clip_cfg = ModelConfig(kind="clip", hidden=16, layers=1, heads=2, context=16, image_size=8, patch_size=4,
                           channels=3, projection_dim=8)
    ours = save_local(build_model(clip_cfg, seed=0), tmp_path / "ours")
    (ours / "processor_config.json").unlink()  # as saved before processor files were written
    assert hf_dir_spec(ours, AutoConfig.from_pretrained(ours)).mean == (0.0,)  # byte vocabulary: built here
    clip = save_local(build_model(clip_cfg, seed=0, vocab_size=300), tmp_path / "clip")
    (clip / "preprocessor_config.json").unlink()  # no tokenizer of its own: the image processor alone
    assert hf_dir_spec(clip, AutoConfig.from_pretrained(clip)).mean == CLIP_MEAN
    # A loaded checkpoint keeps its statistics when it is saved again.
    loaded = build_model(ModelConfig(kind="hf", path=str(clip)))
    assert model_image_spec(loaded).mean == CLIP_MEAN
    again = save_local(loaded, tmp_path / "again")
    assert hf_dir_spec(again, AutoConfig.from_pretrained(again)).mean == pytest.approx(CLIP_MEAN)
    (vit / "preprocessor_config.json").write_text('{"image_mean": [0.5, 0.5], "image_std": [0.5, 0.5]}')
    with pytest.raises(InputError, match="preprocessor_config.json: image_mean needs 1 or 3 values for a 3-channel"):
        hf_dir_spec(vit, AutoConfig.from_pretrained(vit))
    (vit / "preprocessor_config.json").write_text('{"image_mean": 0.25, "image_std": 0.5}')  # numbers, as transformers allows
    spec = hf_dir_spec(vit, AutoConfig.from_pretrained(vit))
    assert (spec.mean, spec.std) == ((0.25,), (0.5,))
    # A grey model with RGB statistics: their BT.601 mix, as RGB images are turned grey.
    grey = save_local(build_model(ModelConfig(kind="vit", hidden=16, layers=1, heads=2, image_size=8, patch_size=4,
                                              channels=1), seed=0), tmp_path / "grey")
    (grey / "preprocessor_config.json").write_text('{"image_mean": [1.0, 0.0, 0.0], "image_std": [0.5, 0.5, 0.5]}')
    spec = hf_dir_spec(grey, AutoConfig.from_pretrained(grey))
    assert spec.mean == pytest.approx((0.299,)) and spec.std == pytest.approx((0.5,))


def test_finetuning_a_hf_checkpoint_takes_data_of_another_size(tmp_path):
    from cloudedge.engine import LocalEngine
    from cloudedge.finetune import finetune

    _hf_vit_dir(tmp_path / "vit", 0.5)
    cfg = config_from_dict({
        "seed": 0, "fleet": {"edges": [{"count": 1, "devices": [{"count": 2, "profile": "phone-mid",
                                                                  "overrides": {"availability": 1.0}}]}]},
        "data": {"source": "digits"},  # 8 px; the checkpoint takes 16
        "model": {"kind": "hf", "path": "vit"},
        "finetune": {"lora": {"rank": 2}, "batch_size": 8, "time_budget_s": 1e9, "max_cloud_rounds": 1, "eval_max": 16},
    }, base_dir=tmp_path)
    res = finetune(cfg, None, LocalEngine())
    assert res.summary["final_acc"] is not None
