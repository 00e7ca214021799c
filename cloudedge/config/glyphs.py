"""The ``data.glyphs`` section: how the procedural ``glyphs`` image source draws its images."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from cloudedge.config.base import StrictModel


class GlyphsConfig(StrictModel):
    """Characters rendered from matplotlib's fonts under random pose, stroke, blur and noise.

    Read only when ``data.source`` is ``glyphs`` (``docs/data.md``, "The glyph source"). The image
    side is ``data.image_size`` (28 unless set). Images are a pure function of ``seed``, the split
    and the image's number, so the run's seed changes splits of the fleet, not the pictures.
    """

    classes: Literal["digits", "letters", "alnum"] = Field(
        default="digits", description="digits (10: zero..nine), letters (26: A..Z) or alnum (36)")
    channels: Literal[1, 3] = Field(
        default=1, description="1: white on black; 3: drawn foreground/background colour pairs")
    train_size: int = Field(default=60000, ge=1, description="images in the train split")
    test_size: int = Field(default=10000, ge=1, description="images in the test split")
    seed: int = Field(default=0, ge=0, description="the images' seed (a fixed dataset by default)")
    fonts: list[str] | None = Field(
        default=None, description="font families or faces to draw from (None: all 21 faces); see docs/data.md")
    held_out_fonts: list[str] = Field(
        default_factory=list,
        description="families/faces only the test split draws from (train never sees them): a font shift")
    rotation: float = Field(default=12.0, ge=0, le=180, description="largest rotation, degrees either way")
    scale: float = Field(default=0.12, ge=0, lt=1, description="largest relative size change either way")
    shear: float = Field(default=0.15, ge=0, le=1, description="largest horizontal shear factor either way")
    shift: float = Field(default=0.08, ge=0, le=0.5, description="largest shift, fraction of the side")
    stroke: float = Field(default=0.6, ge=0, le=1, description="stroke width variation (0: the face's own)")
    elastic: float = Field(default=0.02, ge=0, le=0.2,
                           description="elastic warp: displacement std, fraction of the side")
    blur: float = Field(default=0.5, ge=0, le=1, description="largest blend towards a blurred copy")
    noise: float = Field(default=0.05, ge=0, le=0.5, description="largest Gaussian pixel noise std")
    plain_captions: float = Field(
        default=0.0, ge=0, le=1,
        description="CLIP captions: share of images whose caption names only the class ('a photo of a digit "
                    "seven.'), the rest name class and attributes (docs/prompt-tuning.md)")
    styles: list[str] = Field(
        default_factory=list,
        description="named styles (upside_down, mirrored, sideways) some train images are drawn in; their "
                    "CLIP captions name the style (docs/prompt-tuning.md)")
    style_fraction: float = Field(default=0.0, ge=0, le=1,
                                  description="share of train images drawn in one of styles (each drawn uniformly)")
    cache: bool = Field(default=True, description="keep generated images under $XDG_CACHE_HOME/cloudedge/glyphs")

    @field_validator("fonts", "held_out_fonts")
    @classmethod
    def _known_fonts(cls, names: list[str] | None, info: ValidationInfo) -> list[str] | None:
        if names:
            # Imported here: the face table lives with the renderer (cloudedge.data imports config).
            from cloudedge.data.glyph_attrs import resolve_faces

            _as_value_error(resolve_faces, names, info.field_name or "fonts")
        return names

    @field_validator("styles")
    @classmethod
    def _known_styles(cls, names: list[str]) -> list[str]:
        from cloudedge.data.glyph_styles import check_styles

        _as_value_error(check_styles, names)
        return names

    @model_validator(mode="after")
    def _styles_given(self) -> GlyphsConfig:
        if self.style_fraction > 0 and not self.styles:
            raise ValueError("style_fraction needs styles (the names to draw train images in)")
        return self


def _as_value_error(check: Any, *args: Any) -> None:
    """Run a data-side check; its InputError becomes the ValueError pydantic reports with the field
    path (the message without the InputError's own field prefix)."""
    from cloudedge.errors import InputError

    try:
        check(*args)
    except InputError as err:
        raise ValueError(str(err).split(": ", 1)[1]) from None
