"""Image augmentations on tensors (no torchvision), batched and seeded by a ``torch.Generator``.

One affine resampling per image does the geometric part: a random resized crop (area fraction
``crop_scale``, aspect ratio ``ratio``, random position inside the image), a small rotation
(``degrees``) and an optional horizontal flip, all folded into one ``affine_grid`` /
``grid_sample`` call for the whole batch. Then brightness and contrast jitter.

Flip is **off by default**: on digits a mirror image is often another symbol (a mirrored 2 or 3 is
not a digit, a mirrored 6 is close to a 9 turned), so it would make views disagree with the label.
Turn it on (``flip_prob``) for natural images, where a mirrored object keeps its class.

TPT uses 63 augmented views plus the original (:func:`make_views`); SwapPrompt two views per image.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class AugmentSpec:
    """Ranges of the random transforms. Defaults suit 8x8 digits (no flip, mild crops).

    Chosen on clean *source* data, never on a test stream: a view must mostly keep its label. On
    the bundled CLIP, zero-shot accuracy on clean training digits is 0.90 unaugmented, 0.81 on
    these views, and 0.64 with ImageNet-style crops of half the area (``crop_scale=(0.5, 1)``).
    """

    crop_scale: tuple[float, float] = (0.8, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    degrees: float = 5.0
    flip_prob: float = 0.0
    brightness: float = 0.1  # additive shift drawn from [-b, b]
    contrast: float = 0.2  # contrast factor drawn from [1 - c, 1 + c]
    padding_mode: str = "zeros"  # what a rotation brings in at the corners ("zeros": digit background)


def augment(images: torch.Tensor, spec: AugmentSpec, generator: torch.Generator) -> torch.Tensor:
    """One random view of each image in ``images`` ``[B, C, H, W]`` (values in [0, 1])."""
    b = images.shape[0]

    def uniform(lo: float, hi: float) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(b, generator=generator)

    area = uniform(*spec.crop_scale)
    log_ratio = uniform(math.log(spec.ratio[0]), math.log(spec.ratio[1]))
    aspect = log_ratio.exp()
    # Fractions of the width/height the crop covers (<= 1: the crop stays inside the image).
    frac_w = (area * aspect).sqrt().clamp(max=1.0)
    frac_h = (area / aspect).sqrt().clamp(max=1.0)
    # Crop centre in normalised coordinates [-1, 1], anywhere the crop still fits.
    centre_x = (1 - frac_w) * (2 * torch.rand(b, generator=generator) - 1)
    centre_y = (1 - frac_h) * (2 * torch.rand(b, generator=generator) - 1)
    angle = uniform(-spec.degrees, spec.degrees) * (math.pi / 180)
    flip = torch.where(torch.rand(b, generator=generator) < spec.flip_prob, -1.0, 1.0)
    cos, sin = angle.cos(), angle.sin()
    # Output grid (x, y) -> input sample point: scale to the crop, rotate, then move to its centre.
    theta = torch.stack([
        torch.stack([frac_w * cos * flip, -frac_h * sin, centre_x], dim=-1),
        torch.stack([frac_w * sin * flip, frac_h * cos, centre_y], dim=-1),
    ], dim=1).to(images.dtype)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    out = F.grid_sample(images, grid, mode="bilinear", padding_mode=spec.padding_mode, align_corners=False)

    shift = uniform(-spec.brightness, spec.brightness).view(b, 1, 1, 1)
    factor = uniform(1 - spec.contrast, 1 + spec.contrast).view(b, 1, 1, 1)
    mean = out.mean(dim=(1, 2, 3), keepdim=True)
    return ((out - mean) * factor + mean + shift).clamp(0.0, 1.0)


def make_views(images: torch.Tensor, n_views: int, spec: AugmentSpec, generator: torch.Generator,
               include_original: bool = True) -> torch.Tensor:
    """``[B, V, C, H, W]``: for each image its original (first, if asked) and ``n_views`` random views."""
    b = images.shape[0]
    repeated = images.unsqueeze(1).expand(b, n_views, *images.shape[1:]).reshape(b * n_views, *images.shape[1:])
    views = augment(repeated, spec, generator).view(b, n_views, *images.shape[1:])
    if include_original:
        views = torch.cat([images.unsqueeze(1), views], dim=1)
    return views
