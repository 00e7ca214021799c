"""How images become a model's input: channels, size and normalization, in one place.

Every stage feeds images through here: pre-training (``classify`` converts the data once at the
coordinator; ``clip`` fits each batch), fine-tuning (converts the data once at the coordinator) and
prompt adaptation (fits each batch on the edge). Data is float ``[N, C, H, W]`` in [0, 1].

Channels: a grey image for an RGB model is replicated over the three channels; an RGB image for a
1-channel model becomes its luminance with the ITU-R BT.601 weights (0.299 R + 0.587 G + 0.114 B,
what PIL's ``convert("L")`` uses). Any other pair of channel counts is an :class:`InputError`,
raised by :func:`check_images` at the coordinator before any work is dispatched.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from cloudedge.errors import InputError

# ITU-R BT.601 luma weights (sum to 1, so a replicated grey image converts back to itself).
LUMA_601: tuple[float, float, float] = (0.299, 0.587, 0.114)

# OpenAI CLIP's preprocessing statistics: what a HF CLIP directory without preprocessor_config.json uses.
CLIP_MEAN: tuple[float, ...] = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD: tuple[float, ...] = (0.26862954, 0.26130258, 0.27577711)
# transformers' ViTImageProcessor defaults (IMAGENET_STANDARD_*): any other HF vision checkpoint without one.
STANDARD_MEAN, STANDARD_STD = 0.5, 0.5
# The byte tokenizer's vocabulary (cloudedge.data.tokenizer.ByteTokenizer.vocab_size): a CLIP with this
# text vocabulary was built by this project, which feeds pixels in [0, 1] as they are.
BYTE_VOCAB = 259
# The attribute a model loaded from a HF directory carries its ImageSpec in (:func:`model_image_spec`).
IMAGE_SPEC_ATTR = "cloudedge_image_spec"


@dataclass(frozen=True)
class ImageSpec:
    """What a vision model takes: ``size`` x ``size`` pixels, ``channels``, ``(x - mean) / std``."""

    size: int
    channels: int
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)


def channels_convertible(have: int, want: int) -> bool:
    """Whether :func:`convert_channels` turns ``have`` channels into ``want``."""
    return have == want or have == 1 or (have == 3 and want == 1)


def convert_channels(images: torch.Tensor, channels: int, where: str = "images") -> torch.Tensor:
    """``images`` ``[N, C, H, W]`` with ``channels`` channels: grey replicated, RGB to BT.601 luminance.

    Raises:
        InputError: no conversion between the two channel counts (``where`` names the data).
    """
    have = int(images.shape[1])
    if have == channels:
        return images
    if not channels_convertible(have, channels):
        raise InputError(f"{where}: images have {have} channels and the model takes {channels}; "
                         "only grey (1) to any, and RGB (3) to grey, convert")
    if have == 1:
        return images.expand(-1, channels, -1, -1)
    weights = torch.tensor(LUMA_601, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
    return (images * weights).sum(dim=1, keepdim=True)


def check_images(shape: Sequence[int], spec: ImageSpec, where: str, resize: bool = True) -> None:
    """At the coordinator, before dispatch: can images of ``shape`` ``[N, C, H, W]`` feed ``spec``?

    ``resize=False`` (models built from the config, whose data has ``data.image_size``) also needs
    the sizes to match.

    Raises:
        InputError: not 4-dimensional, a channel count that does not convert, or (``resize=False``)
            a size that differs from the model's.
    """
    if len(shape) != 4:
        raise InputError(f"{where}: expected images [N, C, H, W], got shape {list(shape)}")
    convert_channels(torch.empty(0, int(shape[1]), 1, 1), spec.channels, where)
    if not resize and tuple(shape[-2:]) != (spec.size, spec.size):
        raise InputError(f"{where}: images are {shape[-2]} x {shape[-1]} px, the model takes "
                         f"{spec.size} x {spec.size} (set data.image_size to {spec.size})")


def fit_pixels(images: torch.Tensor, spec: ImageSpec) -> torch.Tensor:
    """Images ``[B, C, H, W]`` in [0, 1] -> the model's ``pixel_values``: channels converted,
    resized to ``spec.size`` (bilinear, anti-aliased when shrinking), then normalized."""
    x = convert_channels(images, spec.channels)
    if x.shape[-2:] != (spec.size, spec.size):
        shrinking = spec.size < max(x.shape[-2:])
        x = F.interpolate(x, size=(spec.size, spec.size), mode="bilinear", align_corners=False, antialias=shrinking)
    mean = torch.tensor(spec.mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    std = torch.tensor(spec.std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return (x - mean) / std


def vision_spec(config: Any, mean: tuple[float, ...] = (0.0,), std: tuple[float, ...] = (1.0,)) -> ImageSpec:
    """The spec of a transformers vision config (a ViT's, or a CLIP's ``vision_config``)."""
    vc = getattr(config, "vision_config", config)
    return ImageSpec(size=int(vc.image_size), channels=int(vc.num_channels), mean=mean, std=std)


def hf_dir_spec(directory: str | Path, config: Any) -> ImageSpec:
    """A HF checkpoint directory's spec: sizes from ``config``, mean / std from its
    ``preprocessor_config.json`` or ``processor_config.json``. Without either, what transformers'
    processor of that family defaults to: CLIP's statistics for a CLIP, 0.5 / 0.5 for the others
    (ViT's); per channel of the model. A byte-vocabulary CLIP (one this project built) takes pixels
    in [0, 1] as they are."""
    channels = int(getattr(config, "vision_config", config).num_channels)
    byte_text = int(getattr(getattr(config, "text_config", None), "vocab_size", 0)) == BYTE_VOCAB
    if byte_text:  # a CLIP this project built (byte tokenizer), saved before it wrote processor files
        mean, std = (0.0,), (1.0,)
    elif getattr(config, "model_type", "") in ("clip", "clip_vision_model") and channels == 3:
        mean, std = CLIP_MEAN, CLIP_STD
    else:
        mean, std = (STANDARD_MEAN,) * channels, (STANDARD_STD,) * channels
    pre = Path(directory) / "preprocessor_config.json"
    combined = Path(directory) / "processor_config.json"  # transformers 5 keeps image settings here
    if not pre.is_file() and combined.is_file():
        pre = combined
    if pre.is_file():
        try:
            raw = json.loads(pre.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise InputError(f"{pre}: not valid JSON ({err})") from None
        raw = raw.get("image_processor", raw) if isinstance(raw, dict) else {}
        if raw.get("do_normalize", True) is False:
            mean, std = (0.0,) * channels, (1.0,) * channels
        else:
            mean, std = (_stats(raw.get(key, default), channels, pre, key)
                         for key, default in (("image_mean", mean), ("image_std", std)))
        if min(std) <= 0:
            raise InputError(f"{pre}: image_std must be > 0, got {list(std)}")
    return vision_spec(config, mean, std)


def _stats(value: Any, channels: int, source: Path, key: str) -> tuple[float, ...]:
    """A processor's ``image_mean`` / ``image_std`` for a model of ``channels``: one number or one per
    channel, as transformers takes them. RGB statistics for a 1-channel model become their BT.601
    luminance mix, the same weights :func:`convert_channels` turns RGB images grey with."""
    try:
        values = (float(value),) if isinstance(value, int | float) else tuple(float(v) for v in value)
    except (TypeError, ValueError):
        raise InputError(f"{source}: {key} must be a number or a list of numbers, got {value!r}") from None
    if channels == 1 and len(values) == 3:
        return (sum(w * v for w, v in zip(LUMA_601, values, strict=True)),)
    if len(values) not in (1, channels):
        raise InputError(f"{source}: {key} needs 1 or {channels} values for a {channels}-channel model, "
                         f"got {list(values)}")
    return values


def attach_image_spec(model: Any, spec: ImageSpec) -> None:
    """Remember on a loaded model how pixels must be fed to it (its directory's processor settings)."""
    setattr(model, IMAGE_SPEC_ATTR, spec)


def model_image_spec(model: Any) -> ImageSpec:
    """How to feed ``model`` pixels: the spec it was loaded with (:func:`attach_image_spec`), else
    its vision config's size and channels with pixels in [0, 1] as they are (models built here)."""
    spec = getattr(model, IMAGE_SPEC_ATTR, None)
    return spec if spec is not None else vision_spec(model.config)


def config_image_spec(model_cfg: Any, base_dir: str | Path = ".") -> ImageSpec | None:
    """The size and channels of the vision model a ``ModelConfig`` describes, read without building
    it (``kind: hf``: the directory's ``config.json``); None for a text model."""
    if model_cfg.kind in ("vit", "clip"):
        return ImageSpec(size=int(model_cfg.image_size), channels=int(model_cfg.channels))
    if model_cfg.kind != "hf":
        return None
    from transformers import AutoConfig

    from cloudedge.models.zoo import resolve_path

    directory = resolve_path(model_cfg.path, base_dir)
    try:
        config = AutoConfig.from_pretrained(directory, local_files_only=True, trust_remote_code=False)
    except (OSError, ValueError, KeyError):
        return None  # building the model reports an unreadable checkpoint, naming the directory
    vc = getattr(config, "vision_config", config)
    return hf_dir_spec(directory, config) if hasattr(vc, "num_channels") and hasattr(vc, "image_size") else None
