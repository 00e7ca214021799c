"""The ``glyphs`` source: MNIST-scale character images rendered from the fonts matplotlib ships.

Each (face, character) is rasterized once with matplotlib's FreeType binding (``FT2Font``) into a
smoothed high-resolution master (``glyph_master``). An image is then a batched warp of its master:
affine pose (rotation, scale, shear, shift) plus a smooth elastic displacement field, sampled with
``grid_sample`` at twice the output side and box-filtered down; a soft threshold of the smoothed
master sets the stroke width; then a blend towards a blurred copy, colours, Gaussian noise and
quantization to 8 bits. Every step is per image and elementwise (no matmul or convolution whose
blocking could depend on the batch), and every random number comes from the image's own hash key
(``glyph_attrs``), so an image's pixels are the same whatever else is generated with it.

Generated splits are cached as safetensors under ``$XDG_CACHE_HOME/cloudedge/glyphs`` (default
``~/.cache``) by a hash of everything that determines the pixels, written to a temporary file and
``os.replace``-d into place so a concurrent reader sees the whole file or none.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
import warnings
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from cloudedge.config.glyphs import GlyphsConfig
from cloudedge.data.glyph_attrs import (
    BACKGROUNDS,
    CLASS_SETS,
    FACES,
    FOREGROUNDS,
    GLYPH_META_KEYS,
    STREAM_ELASTIC,
    STREAM_NOISE_PIXELS,
    PoseRanges,
    draw_attributes,
    hash_normal,
    image_keys,
    resolve_faces,
)
from cloudedge.data.sources import ImageDataset
from cloudedge.errors import InputError

# Bump whenever the pixels of a given spec change: older cache files are then never read.
GLYPHS_VERSION = 1
GLYPH_BOX = 0.7  # a glyph's longer side fills this fraction of the image at scale 1 (MNIST: 20/28)
ELASTIC_GRID = 4  # the elastic field is drawn on a 4x4 grid and upsampled bicubically
# Threshold shift of the smoothed master at stroke +1 (thicker) and -1 (thinner). Thinning is
# gentler: the hairlines of thin faces (Computer Modern) would otherwise vanish.
THICKEN_SWING, THIN_SWING = 0.22, 0.1
EDGE_WIDTH = 0.25  # soft-threshold ramp width: keeps edges anti-aliased
PIXELS_PER_CHUNK = 1 << 22  # supersampled pixels rendered at once (bounds memory)


@dataclass(frozen=True)
class GlyphSpec:
    """Everything that determines a split's pixels (and hence its cache key)."""

    classes: str
    channels: int
    image_size: int
    seed: int
    faces: tuple[int, ...]
    ranges: PoseRanges
    elastic: float


def master_side(image_size: int) -> int:
    """Side of the high-resolution masters: at least twice the supersampled output up to 32 px."""
    return 64 if image_size <= 32 else 128


def _gaussian_weights(sigma: float) -> torch.Tensor:
    half = max(1, math.ceil(3 * sigma))
    coords = torch.arange(-half, half + 1, dtype=torch.float64)
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    return (g / g.sum()).float()


def _separable_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Gaussian blur of ``[N, C, H, W]`` as weighted sums of shifted copies (replicate border).

    Elementwise on purpose: a convolution's result may depend on the batch it runs in.
    """
    w = _gaussian_weights(sigma)
    half = len(w) // 2
    h, wd = x.shape[-2:]
    cols = torch.arange(-half, wd + half).clamp(0, wd - 1)  # replicate padding by indexing
    padded = x.index_select(-1, cols)
    rows = sum(w[k] * padded[..., :, k:k + wd] for k in range(len(w)))
    padded = rows.index_select(-2, torch.arange(-half, h + half).clamp(0, h - 1))
    return sum(w[k] * padded[..., k:k + h, :] for k in range(len(w)))


@lru_cache(maxsize=2048)
def glyph_master(face: int, char: str, side: int) -> torch.Tensor:
    """``[side, side]`` float32: ``char`` in ``FACES[face]``, its longer side ``GLYPH_BOX * side``,
    centred on its bounding box, smoothed with a Gaussian of ``side / 32`` px (the stroke field)."""
    import matplotlib
    from matplotlib.ft2font import FT2Font, LoadFlags

    path = Path(matplotlib.get_data_path()) / "fonts" / "ttf" / FACES[face].file
    if not path.is_file():
        raise InputError(f"data.glyphs.fonts: matplotlib has no font file {path.name} (face '{FACES[face].id}')")
    font = FT2Font(str(path))
    font.set_size(side * 1.5, 72)  # about 1.5 master sides per em: downscaled below, so sharp
    font.set_text(char, 0.0, flags=LoadFlags.NO_HINTING)
    font.draw_glyphs_to_bitmap(antialiased=True)
    ink = np.asarray(font.get_image(), dtype=np.float32) / 255.0
    rows, cols = np.nonzero(ink > 0)
    if len(rows) == 0:
        raise InputError(f"data.glyphs: face '{FACES[face].id}' has no glyph for '{char}'")
    crop = torch.from_numpy(ink[rows.min():rows.max() + 1, cols.min():cols.max() + 1].copy())
    box = GLYPH_BOX * side
    factor = box / max(crop.shape)
    h, w = max(1, round(crop.shape[0] * factor)), max(1, round(crop.shape[1] * factor))
    small = F.interpolate(crop[None, None], size=(h, w), mode="bilinear", antialias=True, align_corners=False)[0, 0]
    canvas = torch.zeros(side, side)
    top, left = (side - h) // 2, (side - w) // 2
    canvas[top:top + h, left:left + w] = small.clamp(0.0, 1.0)
    return _separable_blur(canvas[None, None], side / 32.0)[0, 0].contiguous()


def _sampling_grid(attrs: dict[str, torch.Tensor], keys: np.ndarray, side: int, elastic: float) -> torch.Tensor:
    """``[N, side, side, 2]`` glyph coordinates read by each output pixel: the inverse pose plus
    an elastic displacement (normalized coordinates, -1..1 across the image)."""
    n = len(keys)
    theta = torch.deg2rad(attrs["rotation"])
    cos, sin = torch.cos(theta), torch.sin(theta)
    inv_s, k = 1.0 / attrs["scale"], attrs["shear"]
    # Forward pose: rotate (counter-clockwise as displayed) . shear . scale, then shift. Its
    # inverse (scale^-1 . shear^-1 . rotation^-1) maps an output point to the glyph point it shows.
    a11, a12 = inv_s * (cos - k * sin), inv_s * (-sin - k * cos)
    a21, a22 = inv_s * sin, inv_s * cos
    coords = (torch.arange(side, dtype=torch.float32) + 0.5) / side * 2.0 - 1.0
    qx = coords[None, :] - 2.0 * attrs["shift_x"][:, None]  # [N, side]: x varies along columns
    qy = coords[None, :] - 2.0 * attrs["shift_y"][:, None]  # [N, side]: y varies along rows
    grid = torch.empty((n, side, side, 2), dtype=torch.float32)
    grid[..., 0] = (a11[:, None] * qx)[:, None, :] + (a12[:, None] * qy)[:, :, None]
    grid[..., 1] = (a21[:, None] * qx)[:, None, :] + (a22[:, None] * qy)[:, :, None]
    if elastic > 0:
        coarse = torch.from_numpy(hash_normal(keys, STREAM_ELASTIC, 2 * ELASTIC_GRID**2)).float()
        coarse = coarse.reshape(n, 2, ELASTIC_GRID, ELASTIC_GRID) * (2.0 * elastic)
        field = F.interpolate(coarse, size=(side, side), mode="bicubic", align_corners=True)
        grid += field.permute(0, 2, 3, 1)
    return grid


def _render_chunk(masters: torch.Tensor, attrs: dict[str, torch.Tensor], keys: np.ndarray,
                  spec: GlyphSpec) -> torch.Tensor:
    """uint8 ``[N, C, S, S]`` for one chunk; ``masters`` holds each image's own master ``[N, 1, M, M]``."""
    size, n = spec.image_size, len(keys)
    grid = _sampling_grid(attrs, keys, 2 * size, spec.elastic)
    field = F.grid_sample(masters, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    stroke = attrs["stroke"]
    threshold = (0.5 - torch.where(stroke > 0, THICKEN_SWING, THIN_SWING) * stroke)[:, None, None, None]
    ink = ((field - threshold) / EDGE_WIDTH + 0.5).clamp(0.0, 1.0)
    ink = F.avg_pool2d(ink, 2)  # box filter of the 2x supersampling
    blurred = _separable_blur(ink, max(0.5, size / 28.0))
    ink = ink + attrs["blur"][:, None, None, None] * (blurred - ink)
    if spec.channels == 3:
        fg = torch.tensor([c for _, c in FOREGROUNDS])[attrs["fg"]][:, :, None, None]
        bg = torch.tensor([c for _, c in BACKGROUNDS])[attrs["bg"]][:, :, None, None]
        img = bg + (fg - bg) * ink
    else:
        img = ink
    noise = torch.from_numpy(hash_normal(keys, STREAM_NOISE_PIXELS, spec.channels * size * size)).float()
    img = img + attrs["noise"][:, None, None, None] * noise.reshape(n, spec.channels, size, size)
    return (img.clamp(0.0, 1.0) * 255.0).round().to(torch.uint8)


def render_glyphs(spec: GlyphSpec, split: str, indices: np.ndarray) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Pixels (uint8 ``[N, C, S, S]``) and attributes of images ``indices`` of ``split``.

    Any subset in any order gives the same pixels per image as any other call.
    """
    _, chars = CLASS_SETS[spec.classes]
    idx = np.asarray(indices, dtype=np.int64).reshape(-1)
    attrs = draw_attributes(spec.seed, split, idx, len(chars), spec.faces, spec.ranges, spec.channels)
    keys = image_keys(spec.seed, split, idx)
    side = master_side(spec.image_size)
    table = torch.stack([glyph_master(f, c, side) for f in spec.faces for c in chars])[:, None]
    row_of_face = {f: i for i, f in enumerate(spec.faces)}
    rows = torch.tensor([row_of_face[int(f)] for f in attrs["face"]], dtype=torch.long) * len(chars) + attrs["label"]
    out = torch.empty((len(idx), spec.channels, spec.image_size, spec.image_size), dtype=torch.uint8)
    chunk = max(1, PIXELS_PER_CHUNK // (2 * spec.image_size) ** 2)
    for start in range(0, len(idx), chunk):
        part = slice(start, start + chunk)
        sub = {k: v[part] for k, v in attrs.items()}
        out[part] = _render_chunk(table[rows[part]], sub, keys[part], spec)
    return out, attrs


# ---------------------------------------------------------------------------------------- cache


def cache_dir() -> Path:
    """``$XDG_CACHE_HOME/cloudedge/glyphs`` (``~/.cache/cloudedge/glyphs`` when unset)."""
    root = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(root) / "cloudedge" / "glyphs"


def cache_params(spec: GlyphSpec, split: str, count: int) -> str:
    """The canonical JSON of what a cached split holds; its hash names the file."""
    return json.dumps({"version": GLYPHS_VERSION, "split": split, "count": count, **asdict(spec)}, sort_keys=True)


def write_atomically(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Save ``tensors`` as safetensors at ``path`` via a temporary file in the same folder and
    ``os.replace``: a reader sees the old file, no file, or the whole new one, never a part."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata=metadata)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _read_cache(path: Path, params: str) -> dict[str, torch.Tensor] | None:
    """The cached tensors when ``path`` holds exactly ``params``; None when absent or unreadable."""
    from safetensors import safe_open

    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            if (f.metadata() or {}).get("params") != params:
                return None
            return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
    except Exception:  # a damaged file (safetensors raises its own error type): render it again
        return None


def glyph_split(spec: GlyphSpec, split: str, count: int, use_cache: bool = True) -> ImageDataset:
    """Images ``0..count-1`` of ``split`` as a dataset: ``domains`` the font family (index into
    ``glyph_attrs.FAMILIES``), ``meta`` the attributes captions are made of."""
    params = cache_params(spec, split, count)
    path = cache_dir() / f"{hashlib.sha256(params.encode()).hexdigest()[:32]}.safetensors"
    tensors = _read_cache(path, params) if use_cache else None
    if tensors is None:
        pixels, attrs = render_glyphs(spec, split, np.arange(count))
        tensors = {"pixels": pixels, **attrs}
        if use_cache:
            try:
                write_atomically(path, tensors, {"params": params})
            except OSError as err:  # a read-only or full cache folder costs time, not the run
                warnings.warn(f"glyphs: could not cache the images in {path.parent}: {err}", stacklevel=2)
    classes, _ = CLASS_SETS[spec.classes]
    meta_keys = (*GLYPH_META_KEYS, "blur", "noise")
    return ImageDataset(
        x=tensors["pixels"].float().div_(255.0),
        y=tensors["label"].clone(),
        classes=list(classes),
        domains=tensors["family"].clone(),
        meta={k: tensors[k].clone() for k in meta_keys},
    )


def glyph_specs(cfg: GlyphsConfig, image_size: int) -> tuple[GlyphSpec, GlyphSpec]:
    """(train, test) specs: train draws from ``fonts`` less ``held_out_fonts``; test from
    ``held_out_fonts`` when given, else from the same faces as train."""
    chosen = resolve_faces(cfg.fonts)
    held = resolve_faces(cfg.held_out_fonts, "data.glyphs.held_out_fonts") if cfg.held_out_fonts else []
    train_faces = tuple(f for f in chosen if f not in held)
    if not train_faces:
        raise InputError("data.glyphs: no font is left for the train split once held_out_fonts are removed")
    ranges = PoseRanges(rotation=cfg.rotation, scale=cfg.scale, shear=cfg.shear, shift=cfg.shift,
                        stroke=cfg.stroke, blur=cfg.blur, noise=cfg.noise)

    def spec(faces: tuple[int, ...]) -> GlyphSpec:
        return GlyphSpec(cfg.classes, cfg.channels, image_size, cfg.seed, faces, ranges, cfg.elastic)

    return spec(train_faces), spec(tuple(held) if held else train_faces)


def load_glyphs(cfg: GlyphsConfig, image_size: int) -> tuple[ImageDataset, ImageDataset]:
    """``(train, test)`` of the ``glyphs`` source (cached; see the module docstring). With
    ``styles``, a ``style_fraction`` of the train images is restyled (``glyph_styles.stylize``)."""
    if image_size < 4:
        raise InputError(f"data.image_size: glyphs need at least 4 px, got {image_size}")
    from cloudedge.data.glyph_styles import stylize

    train_spec, test_spec = glyph_specs(cfg, image_size)
    train = glyph_split(train_spec, "train", cfg.train_size, cfg.cache)
    if cfg.style_fraction > 0:  # after the cache: the rendered pictures stay shared with unstyled runs
        train = stylize(train, cfg.styles, cfg.style_fraction, cfg.seed)
    return train, glyph_split(test_spec, "test", cfg.test_size, cfg.cache)
