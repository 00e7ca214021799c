"""Label-preserving shifts of ``glyphs`` images: what a character looks like changes, never which it is.

Test-time adaptation needs shifts that move the image distribution but keep the class readable
(a corruption at severity 5 can erase the character; these cannot). Besides the corruptions of
:mod:`cloudedge.data.shifts` (used up to severity 3 for this purpose) and the held-out font
families (``data.glyphs.held_out_fonts``: the test split drawn only from fonts training never saw),
these shifts act on rendered images:

- ``inverted``: polarity inverted, ``1 - x`` (light ink on dark becomes dark on light, in
  complementary colours);
- ``palette``: ink and background recoloured with a palette training never draws from
  (:data:`UNSEEN_COLOURS`: pink, teal, olive, brown, ...), each pair at least as far apart in
  luma as the training pairs;
- ``texture``: the background replaced by a random grating (frequency, orientation, phase and
  colour drawn per image) under the unchanged ink;
- the named styles of :mod:`cloudedge.data.glyph_styles` (``upside_down``, ``mirrored``,
  ``sideways``): the picture turned or mirrored, a change a CLIP whose captions named it can read.

Recolouring needs the ink coverage of each pixel. A glyph image is ``bg + (fg - bg) * ink + noise``
with its colours in ``meta`` (``fg``/``bg`` palette indices), so the ink is recovered by projecting
each pixel onto ``fg - bg`` (the training pairs differ in luma by at least 0.3, so the projection
is well defined). Every shift is deterministic under its seed and returns pixels in [0, 1].
"""

from __future__ import annotations

import math

import torch

from cloudedge.data.glyph_attrs import BACKGROUNDS, FOREGROUNDS, MIN_LUMA_CONTRAST
from cloudedge.data.glyph_styles import STYLE_NAMES, apply_style
from cloudedge.data.sources import ImageDataset
from cloudedge.errors import InputError

# Colours neither palette of the training images contains (each differs from every training colour).
UNSEEN_COLOURS: tuple[tuple[str, tuple[float, float, float]], ...] = (
    ("pink", (1.0, 0.6, 0.75)), ("teal", (0.0, 0.45, 0.45)), ("olive", (0.45, 0.45, 0.0)),
    ("brown", (0.5, 0.27, 0.08)), ("lavender", (0.78, 0.7, 1.0)), ("gold", (0.85, 0.68, 0.1)),
    ("mint", (0.6, 1.0, 0.75)), ("plum", (0.35, 0.1, 0.3)),
)
HELD_OUT_FONT = "held_out_font"
IMAGE_SHIFTS: tuple[str, ...] = ("inverted", "palette", "texture", *STYLE_NAMES)
GLYPH_SHIFTS: tuple[str, ...] = (HELD_OUT_FONT, *IMAGE_SHIFTS)
TEXTURE_STRENGTH = (0.35, 0.6)  # the grating's amplitude, a fraction of the ink-background contrast
TEXTURE_CYCLES = (2.0, 6.0)  # grating periods across the image


def _luma(rgb: torch.Tensor) -> torch.Tensor:
    return 0.299 * rgb[..., 0] + 0.587 * rgb[..., 1] + 0.114 * rgb[..., 2]


def unseen_pairs() -> list[tuple[int, int]]:
    """(ink, background) indices into :data:`UNSEEN_COLOURS` that contrast as much as training pairs."""
    rgb = torch.tensor([c for _, c in UNSEEN_COLOURS])
    luma = _luma(rgb)
    return [(f, b) for f in range(len(rgb)) for b in range(len(rgb))
            if f != b and abs(float(luma[f] - luma[b])) >= MIN_LUMA_CONTRAST]


def ink_and_colours(ds: ImageDataset) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(ink [N, 1, H, W] in [0, 1], fg [N, 3], bg [N, 3])`` of glyph images (1 channel: white on black)."""
    x = ds.x
    n = x.shape[0]
    fg_idx, bg_idx = ds.meta.get("fg"), ds.meta.get("bg")
    if x.shape[1] == 1 or fg_idx is None or bg_idx is None or int(fg_idx.min()) < 0:
        if x.shape[1] != 1:
            raise InputError("adapt.streams.shift: recolouring needs glyph images with their colours in meta")
        return x.clamp(0, 1), torch.ones(n, 3), torch.zeros(n, 3)
    fg = torch.tensor([c for _, c in FOREGROUNDS])[fg_idx]
    bg = torch.tensor([c for _, c in BACKGROUNDS])[bg_idx]
    d = (fg - bg)[:, :, None, None]
    ink = ((x - bg[:, :, None, None]) * d).sum(1, keepdim=True) / (d * d).sum(1, keepdim=True)
    return ink.clamp(0.0, 1.0), fg, bg


def inverted(x: torch.Tensor) -> torch.Tensor:
    """Polarity inversion."""
    return 1.0 - x


def palette(ds: ImageDataset, seed: int) -> torch.Tensor:
    """Ink and background recoloured with a pair of :data:`UNSEEN_COLOURS` drawn per image."""
    ink, _, _ = ink_and_colours(ds)
    pairs = torch.tensor(unseen_pairs())
    pick = torch.randint(len(pairs), (ink.shape[0],), generator=torch.Generator().manual_seed(seed))
    rgb = torch.tensor([c for _, c in UNSEEN_COLOURS])
    fg, bg = rgb[pairs[pick, 0]][:, :, None, None], rgb[pairs[pick, 1]][:, :, None, None]
    return bg + (fg - bg) * ink


def texture(ds: ImageDataset, seed: int) -> torch.Tensor:
    """The background replaced by a grating towards a random training colour; the ink kept.

    ``background = bg + a * g(x, y) * (c - bg)``, ``g`` a raised sinusoid with
    :data:`TEXTURE_CYCLES` periods across the image at a random angle and phase, ``a`` drawn from
    :data:`TEXTURE_STRENGTH`, ``c`` a training background colour unlike ``bg``.
    """
    ink, fg, bg = ink_and_colours(ds)
    n, _, h, w = ink.shape
    gen = torch.Generator().manual_seed(seed)

    def uniform(lo: float, hi: float) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(n, generator=gen)

    cycles, angle, phase = uniform(*TEXTURE_CYCLES), uniform(0, math.pi), uniform(0, 2 * math.pi)
    strength = uniform(*TEXTURE_STRENGTH)
    ys, xs = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, w), indexing="ij")
    proj = xs[None] * angle.cos()[:, None, None] + ys[None] * angle.sin()[:, None, None]
    grating = 0.5 + 0.5 * torch.sin(2 * math.pi * cycles[:, None, None] * proj + phase[:, None, None])
    # The grating's colour: the ink's colour pulled halfway to the background, so it never reads as ink.
    tint = 0.5 * (fg + bg) if ds.x.shape[1] == 3 else torch.full((n, 3), 0.5)
    amp = (strength[:, None, None, None] * grating[:, None])
    channels = ds.x.shape[1]
    bgc, tintc, fgc = (t[:, :channels, None, None] for t in (bg, tint, fg))
    background = bgc + amp * (tintc - bgc)
    return background + (fgc - background) * ink


def shift_glyphs(ds: ImageDataset, name: str, seed: int) -> ImageDataset:
    """``ds`` under image shift ``name`` (one of :data:`IMAGE_SHIFTS`); labels and meta unchanged."""
    if name == "inverted":
        x = inverted(ds.x)
    elif name == "palette":
        if ds.x.shape[1] != 3:
            raise InputError("adapt.streams.shift: 'palette' needs 3-channel glyphs (data.glyphs.channels: 3)")
        x = palette(ds, seed)
    elif name == "texture":
        x = texture(ds, seed)
    elif name in STYLE_NAMES:
        x = apply_style(ds.x, name)
    else:
        raise InputError(f"adapt.streams.shift: unknown shift '{name}' (known: {', '.join(GLYPH_SHIFTS)})")
    return ImageDataset(x=x.clamp(0.0, 1.0).contiguous(), y=ds.y.clone(), classes=list(ds.classes),
                        domains=None if ds.domains is None else ds.domains.clone(), meta=dict(ds.meta))
