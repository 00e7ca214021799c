"""Named rendering styles of ``glyphs``: a picture changed in a way a caption can say.

A CLIP learns a style from captions that name it ("an upside-down photo of a digit seven."), the
way a web-trained CLIP has seen "a sketch of a dog". Test-time prompt adaptation needs exactly
this to have room: a style the model can read, shown to it under a prompt that does not name it.
The benchmark's zero-shot prompt says "a photo of a digit seven." and a stream of upside-down
glyphs loses most of its accuracy; a context that says what the stream looks like wins it back
(measured in docs/prompt-tuning.md). Styles that only add something the text tower composes
additively (noise, blur: "a noisy photo of ...") leave a shared context nothing to fix (measured
there too); these geometric ones change each character's shape in its own way.

Each style is label-preserving: the character is the same one, seen upside down, in a mirror or
on its side. ``data.glyphs.styles`` and ``style_fraction`` restyle a seeded share of the *train*
split, with ``meta["style"]`` saying which (``-1``: none), so the pre-training captions can name
it (:func:`cloudedge.data.glyph_attrs.glyph_captions`); the adaptation stage streams the same
styles as shifts (:mod:`cloudedge.data.glyph_shifts`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from cloudedge.data.sources import ImageDataset
from cloudedge.errors import InputError


@dataclass(frozen=True)
class Style:
    """A named style: how a caption says it (before "photo of a ...") and what it does to pixels."""

    phrase: str
    apply: Callable[[torch.Tensor], torch.Tensor]


STYLES: dict[str, Style] = {
    "upside_down": Style("an upside-down", lambda x: x.flip(-2).flip(-1)),  # rotated by 180 degrees
    "mirrored": Style("a mirrored", lambda x: x.flip(-1)),  # left and right swapped
    "sideways": Style("a sideways", lambda x: x.rot90(1, dims=(-2, -1))),  # a quarter turn anticlockwise
}
# meta["style"] indexes this tuple; -1 is the unstyled picture.
STYLE_NAMES: tuple[str, ...] = tuple(STYLES)
NO_STYLE = -1


def check_styles(names: Sequence[str], field: str = "data.glyphs.styles") -> None:
    """An :class:`InputError` naming ``field`` for an unknown style."""
    for name in names:
        if name not in STYLES:
            raise InputError(f"{field}: unknown style '{name}' (known: {', '.join(STYLE_NAMES)})")


def apply_style(x: torch.Tensor, name: str) -> torch.Tensor:
    """Images ``[N, C, H, W]`` in style ``name`` (square images keep their shape)."""
    check_styles([name], "style")
    return STYLES[name].apply(x).contiguous()


def style_template(name: str) -> str:
    """The caption template of style ``name``, ``{}`` the class: "an upside-down photo of a {}."."""
    return STYLES[name].phrase + " photo of a {}."


def style_caption(style: int, what: str) -> str:
    """The caption of a picture in style ``style`` (an index into :data:`STYLE_NAMES`) of ``what``."""
    return style_template(STYLE_NAMES[style]).format(what)


def stylize(ds: ImageDataset, styles: Sequence[str], fraction: float, seed: int) -> ImageDataset:
    """``ds`` with a seeded ``fraction`` of its images in one of ``styles`` each (drawn uniformly);
    ``meta["style"]`` records it. Labels and the other attributes are unchanged."""
    check_styles(styles)
    n = len(ds)
    style = torch.full((n,), NO_STYLE, dtype=torch.long)
    x = ds.x
    if styles and fraction > 0 and n:
        rng = np.random.default_rng([seed, 0x57E1])
        chosen = np.nonzero(rng.random(n) < fraction)[0]
        which = rng.integers(0, len(styles), size=len(chosen))
        x = x.clone()
        for k, name in enumerate(styles):
            idx = torch.as_tensor(chosen[which == k], dtype=torch.long)
            if len(idx):
                x[idx] = apply_style(x[idx], name)
                style[idx] = STYLE_NAMES.index(name)
    return ImageDataset(x=x, y=ds.y, classes=list(ds.classes), domains=ds.domains, meta={**ds.meta, "style": style})
