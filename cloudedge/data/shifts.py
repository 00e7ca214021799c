"""Image corruptions (covariate shift) on ``[N, C, H, W]`` tensors in [0, 1], without torchvision.

Parameters follow Hendrycks & Dietterich's ImageNet-C (ICLR 2019) per severity 1..5; the
spatial ones (blur radii) are given in pixels for images up to 32 pixels and grow linearly with the
image side above that (``scale = max(1, side / 32)``), so 8x8 digits, 32x32 and 224x224 images all
get comparable relative distortion. The full table is in ``docs/data.md``. Every corruption is
deterministic under ``seed`` and its output is clamped to [0, 1].
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from cloudedge.data.sources import ImageDataset
from cloudedge.errors import InputError

# Severity 1..5 parameters (index 0 = severity 1).
GAUSSIAN_NOISE_SIGMA = (0.08, 0.12, 0.18, 0.26, 0.38)  # ImageNet-C
SHOT_NOISE_RATE = (60.0, 25.0, 12.0, 5.0, 3.0)  # ImageNet-C: Poisson(x * rate) / rate
IMPULSE_NOISE_AMOUNT = (0.03, 0.06, 0.09, 0.17, 0.27)  # ImageNet-C: salt-and-pepper fraction
SPECKLE_NOISE_SIGMA = (0.15, 0.20, 0.35, 0.45, 0.60)  # ImageNet-C: x + x * N(0, sigma)
DEFOCUS_RADIUS_PX = (0.5, 0.75, 1.0, 1.5, 2.0)  # disk radius at <= 32 px (ImageNet-C: 3..10 at 224)
GAUSSIAN_BLUR_SIGMA_PX = (0.5, 0.7, 0.9, 1.1, 1.5)  # at <= 32 px (CIFAR-10-C: 0.4..1.0)
CONTRAST_FACTOR = (0.4, 0.3, 0.2, 0.1, 0.05)  # ImageNet-C: (x - mean) * c + mean
BRIGHTNESS_DELTA = (0.1, 0.2, 0.3, 0.4, 0.5)  # ImageNet-C: HSV value + c
PIXELATE_FACTOR = (0.6, 0.5, 0.4, 0.3, 0.25)  # ImageNet-C: downsample to c * side, box filter


def _spatial_scale(x: torch.Tensor) -> float:
    return max(1.0, max(x.shape[-2], x.shape[-1]) / 32.0)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _depthwise_conv(x: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """Same-size convolution of every channel with a 2-D ``kernel``, reflecting at the border."""
    n, c, h, w = x.shape
    kh, kw = kernel.shape
    pad = (kw // 2, kw // 2, kh // 2, kh // 2)
    # Reflect padding needs pad < side; fall back to replicate for kernels larger than the image.
    mode = "reflect" if kh // 2 < h and kw // 2 < w else "replicate"
    padded = F.pad(x.reshape(n * c, 1, h, w), pad, mode=mode)
    out = F.conv2d(padded, kernel.to(x.dtype)[None, None])
    return out.reshape(n, c, h, w)


def gaussian_noise(x: torch.Tensor, severity: int, seed: int) -> torch.Tensor:
    """Additive Gaussian noise, sigma per severity ``GAUSSIAN_NOISE_SIGMA``."""
    sigma = GAUSSIAN_NOISE_SIGMA[severity - 1]
    return x + sigma * torch.randn(x.shape, generator=_gen(seed), dtype=x.dtype)


def shot_noise(x: torch.Tensor, severity: int, seed: int) -> torch.Tensor:
    """Poisson (photon) noise: ``Poisson(x * rate) / rate``, rate per severity ``SHOT_NOISE_RATE``."""
    rate = SHOT_NOISE_RATE[severity - 1]
    return torch.poisson(x.clamp(0, 1) * rate, generator=_gen(seed)) / rate


def impulse_noise(x: torch.Tensor, severity: int, seed: int) -> torch.Tensor:
    """Salt-and-pepper noise: a fraction ``IMPULSE_NOISE_AMOUNT`` of values set to 0 or 1 (half each).

    As in ImageNet-C (skimage's ``s&p`` on the whole array), each channel value is hit on its own.
    """
    amount = IMPULSE_NOISE_AMOUNT[severity - 1]
    gen = _gen(seed)
    hit = torch.rand(x.shape, generator=gen) < amount
    salt = torch.rand(x.shape, generator=gen) < 0.5
    return torch.where(hit, salt.to(x.dtype), x)


def speckle_noise(x: torch.Tensor, severity: int, seed: int) -> torch.Tensor:
    """Multiplicative noise ``x + x * N(0, sigma)``, sigma per severity ``SPECKLE_NOISE_SIGMA``."""
    sigma = SPECKLE_NOISE_SIGMA[severity - 1]
    return x + x * sigma * torch.randn(x.shape, generator=_gen(seed), dtype=x.dtype)


def disk_kernel(radius: float) -> torch.Tensor:
    """A normalized, anti-aliased disk: weight ``clamp(radius + 1 - distance, 0, 1)`` per pixel.

    The one-pixel soft edge makes sub-pixel radii meaningful on small images (radius 0.5 gives
    the 4 neighbours weight 0.5 and the diagonals about 0.09, before normalization).
    """
    half = math.ceil(radius + 1)
    coords = torch.arange(-half, half + 1, dtype=torch.float64)
    dist = torch.sqrt(coords[:, None] ** 2 + coords[None, :] ** 2)
    kernel = (radius + 1 - dist).clamp(0.0, 1.0)
    return (kernel / kernel.sum()).float()


def gaussian_kernel(sigma: float) -> torch.Tensor:
    """A normalized 2-D Gaussian kernel of std ``sigma`` pixels, truncated at 3 sigma (>= 3x3)."""
    half = max(1, math.ceil(3 * sigma))
    coords = torch.arange(-half, half + 1, dtype=torch.float64)
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    kernel = g[:, None] * g[None, :]
    return (kernel / kernel.sum()).float()


def defocus_blur(x: torch.Tensor, severity: int, seed: int) -> torch.Tensor:
    """Convolution with an anti-aliased disk (:func:`disk_kernel`) of radius ``DEFOCUS_RADIUS_PX * scale``."""
    del seed  # deterministic by construction
    radius = DEFOCUS_RADIUS_PX[severity - 1] * _spatial_scale(x)
    return _depthwise_conv(x, disk_kernel(radius))


def gaussian_blur(x: torch.Tensor, severity: int, seed: int) -> torch.Tensor:
    """Convolution with a Gaussian of std ``GAUSSIAN_BLUR_SIGMA_PX * scale`` pixels."""
    del seed
    sigma = GAUSSIAN_BLUR_SIGMA_PX[severity - 1] * _spatial_scale(x)
    return _depthwise_conv(x, gaussian_kernel(sigma))


def contrast(x: torch.Tensor, severity: int, seed: int) -> torch.Tensor:
    """Contrast reduction towards each image's per-channel mean: ``(x - mean) * c + mean``."""
    del seed
    c = CONTRAST_FACTOR[severity - 1]
    mean = x.mean(dim=(-2, -1), keepdim=True)
    return (x - mean) * c + mean


def brightness(x: torch.Tensor, severity: int, seed: int) -> torch.Tensor:
    """HSV brightness: add ``BRIGHTNESS_DELTA`` to the value channel V = max over channels, clipped at 1.

    With hue and saturation fixed, RGB scales with V, so this is ``x * min(V + c, 1) / V``
    computed without an HSV round trip; black pixels (V = 0, no hue) become gray ``min(c, 1)``.
    For one channel it is ``min(x + c, 1)``.
    """
    del seed
    c = BRIGHTNESS_DELTA[severity - 1]
    value = x.amax(dim=1, keepdim=True)
    new_value = (value + c).clamp(max=1.0)
    scale = torch.where(value > 0, new_value / value.clamp(min=1e-12), torch.zeros_like(value))
    return torch.where(value > 0, x * scale, new_value.expand_as(x))


def _pixelate_side(side: int, severity: int) -> int:
    """Side of the low-resolution image: ``round(side * factor)``, and at least one pixel smaller
    than at the previous severity (so tiny images still get 5 distinct levels), never below 1."""
    small = side
    for level in range(severity):
        small = max(1, min(round(side * PIXELATE_FACTOR[level]), small - 1))
    return small


def pixelate(x: torch.Tensor, severity: int, seed: int) -> torch.Tensor:
    """Downsample to a ``PIXELATE_FACTOR`` fraction of the side, then blow up with nearest pixels.

    The downsampling is anti-aliased bilinear (a triangle filter) and the upsampling
    ``nearest-exact`` (pixel centres aligned): with ImageNet-C's box/box pair, non-integer ratios
    misalign the blocks and make severity 1 look worse than severity 2 on small images.
    """
    del seed
    h, w = x.shape[-2:]
    small = (_pixelate_side(h, severity), _pixelate_side(w, severity))
    down = F.interpolate(x, size=small, mode="bilinear", antialias=True, align_corners=False)
    return F.interpolate(down, size=(h, w), mode="nearest-exact")


_CORRUPTION_FNS: dict[str, Callable[[torch.Tensor, int, int], torch.Tensor]] = {
    "gaussian_noise": gaussian_noise,
    "shot_noise": shot_noise,
    "impulse_noise": impulse_noise,
    "speckle_noise": speckle_noise,
    "defocus_blur": defocus_blur,
    "gaussian_blur": gaussian_blur,
    "contrast": contrast,
    "brightness": brightness,
    "pixelate": pixelate,
}
CORRUPTIONS: tuple[str, ...] = tuple(_CORRUPTION_FNS)
SEVERITIES: tuple[int, ...] = (1, 2, 3, 4, 5)


def check_corruption(name: str, severity: int, field: str = "data.corruption") -> None:
    """Raise :class:`InputError` unless ``name`` is a known corruption and ``severity`` is 1..5."""
    if name not in _CORRUPTION_FNS:
        raise InputError(f"{field}: unknown corruption '{name}' (known: {', '.join(CORRUPTIONS)})")
    if severity not in SEVERITIES:
        raise InputError(f"data.severity: must be 1..5, got {severity}")


def corrupt(data: ImageDataset | torch.Tensor, name: str, severity: int, seed: int = 0) -> ImageDataset | torch.Tensor:
    """Apply corruption ``name`` at ``severity`` (1..5) to a dataset or an ``[N, C, H, W]`` tensor.

    Returns the same kind of object (a dataset keeps labels, classes, domains and meta). Values
    are clamped to [0, 1]. The same ``seed`` gives the same result.
    """
    check_corruption(name, severity)
    x = data.x if isinstance(data, ImageDataset) else data
    if x.ndim != 4:
        raise InputError(f"corrupt: expected images [N, C, H, W], got shape {tuple(x.shape)}")
    out = _CORRUPTION_FNS[name](x.float(), severity, seed).clamp(0.0, 1.0).contiguous()
    if isinstance(data, ImageDataset):
        return ImageDataset(
            x=out,
            y=data.y.clone(),
            classes=list(data.classes),
            domains=None if data.domains is None else data.domains.clone(),
            meta=dict(data.meta),
        )
    return out
