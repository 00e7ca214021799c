"""Image corruptions: each changes the image, is seeded, clamps, and grows with severity."""

from __future__ import annotations

import pytest
import torch

from cloudedge.data import CORRUPTIONS, colored, corrupt, load_digits
from cloudedge.data.shifts import disk_kernel, gaussian_kernel
from cloudedge.errors import InputError

REQUIRED = {
    "gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur",
    "gaussian_blur", "contrast", "brightness", "pixelate",
}


@pytest.fixture(scope="module")
def images() -> dict[int, torch.Tensor]:
    gray = load_digits().x[:150]
    rgb = colored(load_digits(image_size=32), 0.1, seed=0).x[:60]
    return {8: gray, 32: rgb}


def test_required_corruptions_listed():
    assert REQUIRED <= set(CORRUPTIONS)


@pytest.mark.parametrize("name", CORRUPTIONS)
@pytest.mark.parametrize("size", [8, 32])
def test_corruption_changes_clamps_seeded_and_grows(images, name, size):
    x = images[size]
    distortion = []
    for severity in range(1, 6):
        out = corrupt(x, name, severity, seed=11)
        assert out.shape == x.shape and out.dtype == torch.float32
        assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0
        assert torch.equal(out, corrupt(x, name, severity, seed=11))  # deterministic
        distortion.append(float((out - x).abs().mean()))
    assert distortion[0] > 1e-3, f"{name} severity 1 leaves the images unchanged"
    # Monotone up to 2% of the top distortion (noise draws differ between severities).
    slack = 0.02 * distortion[-1]
    for lo, hi in zip(distortion, distortion[1:], strict=False):
        assert hi >= lo - slack, f"{name}: distortion by severity {distortion}"
    assert distortion[-1] > 1.5 * distortion[0], f"{name}: severity barely matters {distortion}"


@pytest.mark.parametrize("name", ["gaussian_noise", "shot_noise", "impulse_noise", "speckle_noise"])
def test_noise_depends_on_seed(images, name):
    x = images[8]
    assert not torch.equal(corrupt(x, name, 3, seed=1), corrupt(x, name, 3, seed=2))


def test_dataset_in_dataset_out():
    ds = colored(load_digits(), 0.2, 0)
    out = corrupt(ds, "contrast", 5, seed=0)
    assert torch.equal(out.y, ds.y) and torch.equal(out.domains, ds.domains) and out.classes == ds.classes
    # Contrast keeps each image's per-channel mean.
    assert torch.allclose(out.x.mean(dim=(2, 3)), ds.x.mean(dim=(2, 3)), atol=1e-5)


def test_blur_kernels_normalized_and_blur_keeps_mean_of_constant():
    for r in (0.5, 1.0, 2.0):
        assert abs(float(disk_kernel(r).sum()) - 1.0) < 1e-6
    assert abs(float(gaussian_kernel(0.8).sum()) - 1.0) < 1e-6
    flat = torch.full((2, 3, 8, 8), 0.4)
    for name in ("defocus_blur", "gaussian_blur", "pixelate"):
        assert torch.allclose(corrupt(flat, name, 5, seed=0), flat, atol=1e-6)


def test_brightness_hsv_rule():
    px = torch.tensor([0.2, 0.4, 0.0]).view(1, 3, 1, 1)
    out = corrupt(px, "brightness", 1, seed=0)  # V 0.4 -> 0.5: RGB scaled by 1.25, hue kept
    assert torch.allclose(out.view(3), torch.tensor([0.25, 0.5, 0.0]))
    black = corrupt(torch.zeros(1, 3, 1, 1), "brightness", 2, seed=0)
    assert torch.allclose(black, torch.full((1, 3, 1, 1), 0.2))


def test_unknown_corruption_and_bad_severity():
    x = load_digits().x[:2]
    with pytest.raises(InputError, match="unknown corruption 'fog'"):
        corrupt(x, "fog", 1, seed=0)
    with pytest.raises(InputError, match="severity"):
        corrupt(x, "contrast", 6, seed=0)
