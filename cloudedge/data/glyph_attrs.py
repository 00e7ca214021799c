"""What each image of the ``glyphs`` source shows: its class, face, colours and pose, and its caption.

Every attribute of image ``index`` of a split is drawn from a counter-based hash of
``(seed, split, index, stream)`` (splitmix64), never from a shared random stream, so an image's
attributes (and pixels, ``glyphs.py``) are the same whatever else is generated, in whatever order.
Drawing attributes costs microseconds per image and renders nothing: captions come from here.

Classes are dealt round-robin (``label = index % n_classes``) and font families round-robin over
the blocks of ``n_classes`` images, so every class and every (class, family) pair is equally
frequent; the face within a family, the pose, stroke, blur, noise and colours are random.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from cloudedge.data.sources import DIGIT_CLASSES
from cloudedge.errors import InputError

LETTER_CLASSES = [chr(c) for c in range(ord("A"), ord("Z") + 1)]
CLASS_SETS: dict[str, tuple[list[str], str]] = {
    # name -> (class names, the characters rendered, one per class)
    "digits": (list(DIGIT_CLASSES), "0123456789"),
    "letters": (list(LETTER_CLASSES), "ABCDEFGHIJKLMNOPQRSTUVWXYZ"),
    "alnum": (list(DIGIT_CLASSES) + list(LETTER_CLASSES), "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ"),
}


@dataclass(frozen=True)
class Face:
    """One TrueType face matplotlib ships (``mpl-data/fonts/ttf/<file>``)."""

    id: str
    file: str
    family: str  # family id: the image's domain
    phrase: str  # how a caption names it


FAMILIES: tuple[tuple[str, str], ...] = (
    ("dejavu-sans", "DejaVu Sans"),
    ("dejavu-sans-mono", "DejaVu Sans Mono"),
    ("dejavu-serif", "DejaVu Serif"),
    ("stix", "STIX"),
    ("computer-modern", "Computer Modern"),
)
FAMILY_IDS: tuple[str, ...] = tuple(f for f, _ in FAMILIES)


def _styled(family: str, name: str, stem: str, styles: Sequence[tuple[str, str, str]]) -> list[Face]:
    return [Face(f"{family}-{sid}", f"{stem}{suffix}.ttf", family, f"{words}{name}") for sid, suffix, words in styles]


FACES: tuple[Face, ...] = (
    *_styled("dejavu-sans", "DejaVu Sans", "DejaVuSans", [
        ("regular", "", ""), ("bold", "-Bold", "bold "), ("oblique", "-Oblique", "oblique "),
        ("bold-oblique", "-BoldOblique", "bold oblique ")]),
    *_styled("dejavu-sans-mono", "DejaVu Sans Mono", "DejaVuSansMono", [
        ("regular", "", ""), ("bold", "-Bold", "bold "), ("oblique", "-Oblique", "oblique "),
        ("bold-oblique", "-BoldOblique", "bold oblique ")]),
    *_styled("dejavu-serif", "DejaVu Serif", "DejaVuSerif", [
        ("regular", "", ""), ("bold", "-Bold", "bold "), ("italic", "-Italic", "italic "),
        ("bold-italic", "-BoldItalic", "bold italic ")]),
    *_styled("stix", "STIX", "STIXGeneral", [
        ("regular", "", ""), ("bold", "Bol", "bold "), ("italic", "Italic", "italic "),
        ("bold-italic", "BolIta", "bold italic ")]),
    Face("computer-modern-roman", "cmr10.ttf", "computer-modern", "Computer Modern roman"),
    Face("computer-modern-bold", "cmb10.ttf", "computer-modern", "bold Computer Modern"),
    Face("computer-modern-italic", "cmti10.ttf", "computer-modern", "italic Computer Modern"),
    Face("computer-modern-sans", "cmss10.ttf", "computer-modern", "Computer Modern sans-serif"),
    Face("computer-modern-typewriter", "cmtt10.ttf", "computer-modern", "Computer Modern typewriter"),
)
FACE_IDS: tuple[str, ...] = tuple(f.id for f in FACES)

# Colour palettes of 3-channel glyphs: (caption word, RGB). Only pairs that contrast are drawn.
FOREGROUNDS: tuple[tuple[str, tuple[float, float, float]], ...] = (
    ("white", (1.0, 1.0, 1.0)), ("black", (0.0, 0.0, 0.0)), ("red", (0.9, 0.1, 0.1)),
    ("green", (0.1, 0.75, 0.2)), ("blue", (0.15, 0.3, 0.95)), ("yellow", (0.95, 0.9, 0.1)),
    ("cyan", (0.1, 0.85, 0.9)), ("magenta", (0.9, 0.2, 0.85)), ("orange", (1.0, 0.55, 0.05)),
    ("purple", (0.55, 0.2, 0.8)),
)
BACKGROUNDS: tuple[tuple[str, tuple[float, float, float]], ...] = (
    ("black", (0.0, 0.0, 0.0)), ("white", (1.0, 1.0, 1.0)), ("gray", (0.5, 0.5, 0.5)),
    ("navy", (0.05, 0.05, 0.3)), ("dark green", (0.05, 0.25, 0.1)), ("maroon", (0.35, 0.05, 0.05)),
    ("beige", (0.93, 0.88, 0.75)), ("light blue", (0.7, 0.85, 1.0)),
)
MIN_LUMA_CONTRAST = 0.3


def _luma(rgb: tuple[float, float, float]) -> float:
    return 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]


COLOR_PAIRS: tuple[tuple[int, int], ...] = tuple(
    (f, b) for f, (_, fg) in enumerate(FOREGROUNDS) for b, (_, bg) in enumerate(BACKGROUNDS)
    if abs(_luma(fg) - _luma(bg)) >= MIN_LUMA_CONTRAST
)

# Hash streams: one per attribute, so adding an attribute never changes the others.
STREAM_FACE, STREAM_POSE, STREAM_STROKE, STREAM_BLUR, STREAM_NOISE_LEVEL, STREAM_COLOR = 1, 2, 3, 4, 5, 6
STREAM_ELASTIC, STREAM_NOISE_PIXELS = 7, 8
SPLITS = {"train": 0, "test": 1}

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer: a bijective avalanche of uint64 values (wrapping arithmetic)."""
    x = x ^ (x >> np.uint64(30))
    x = x * np.uint64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> np.uint64(27))
    x = x * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def image_keys(seed: int, split: str, indices: np.ndarray) -> np.ndarray:
    """One uint64 key per image from ``(seed, split, index)``; all of its randomness derives from it."""
    base = _mix64(np.asarray([(seed & 0xFFFFFFFF) * 4 + SPLITS[split]], dtype=np.uint64) + _GOLDEN)
    return _mix64(base ^ (np.asarray(indices, dtype=np.uint64) * _GOLDEN + _GOLDEN))


def hash_uniform(keys: np.ndarray, stream: int, k: int) -> np.ndarray:
    """``[len(keys), k]`` float64 uniforms in [0, 1), a pure function of (key, stream, position)."""
    with np.errstate(over="ignore"):
        salt = _mix64(np.asarray([stream], dtype=np.uint64) * _GOLDEN + np.uint64(0xD1B54A32D192ED03))
        counters = np.arange(k, dtype=np.uint64) * np.uint64(0xD6E8FEB86659FD93) + salt
        bits = _mix64(keys[:, None] ^ counters[None, :])
    return (bits >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def hash_normal(keys: np.ndarray, stream: int, k: int) -> np.ndarray:
    """``[len(keys), k]`` standard normals (Box-Muller on two hashed uniforms)."""
    u = hash_uniform(keys, stream, 2 * k)
    u1, u2 = 1.0 - u[:, :k], u[:, k:]  # 1 - u is in (0, 1]: log is finite
    return np.sqrt(-2.0 * np.log(u1)) * np.cos(2.0 * np.pi * u2)


@dataclass(frozen=True)
class PoseRanges:
    """Maximum strengths of the random augmentations (each drawn uniformly up to its maximum)."""

    rotation: float  # degrees either way
    scale: float  # relative size change either way
    shear: float  # horizontal shear factor either way
    shift: float  # fraction of the image side either way
    stroke: float  # 0..1: how far stroke width varies around the face's own
    blur: float  # 0..1: largest blend towards a blurred copy
    noise: float  # largest Gaussian noise std


def resolve_faces(names: Sequence[str] | None, field: str = "data.glyphs.fonts") -> list[int]:
    """Indices into :data:`FACES` of the faces ``names`` select (a family id selects all its faces).

    ``None`` selects every face. Names are case-insensitive; spaces count as hyphens
    ("DejaVu Serif" is ``dejavu-serif``). An unknown name raises :class:`InputError`.
    """
    if names is None:
        return list(range(len(FACES)))
    picked: set[int] = set()
    for raw in names:
        name = "-".join(str(raw).strip().lower().split())
        if name in FAMILY_IDS:
            picked.update(i for i, f in enumerate(FACES) if f.family == name)
        elif name in FACE_IDS:
            picked.add(FACE_IDS.index(name))
        else:
            raise InputError(f"{field}: unknown font '{raw}' (families: {', '.join(FAMILY_IDS)}; "
                             f"faces: {', '.join(FACE_IDS)})")
    return sorted(picked)


def draw_attributes(seed: int, split: str, indices: np.ndarray, n_classes: int, faces: Sequence[int],
                    ranges: PoseRanges, channels: int) -> dict[str, torch.Tensor]:
    """Per-image attributes of ``indices`` (a split's image numbers), as ``[N]`` tensors.

    ``label`` (``index % n_classes``), ``family`` (index into :data:`FAMILIES`: the domain),
    ``face`` (index into :data:`FACES`), ``rotation`` (degrees, counter-clockwise), ``scale``,
    ``shear``, ``shift_x``/``shift_y`` (fractions of the side, right/down), ``stroke`` (-1 thin ..
    1 thick), ``blur``, ``noise`` (std), ``fg``/``bg`` (palette indices; -1 for 1-channel images).
    """
    if not faces:
        raise InputError("data.glyphs.fonts: no font is left to draw from")
    idx = np.asarray(indices, dtype=np.int64).reshape(-1)
    keys = image_keys(seed, split, idx)
    families = sorted({FAMILY_IDS.index(FACES[f].family) for f in faces})
    family = np.asarray(families)[(idx // n_classes) % len(families)]
    members = [np.asarray([f for f in faces if FAMILY_IDS.index(FACES[f].family) == fam]) for fam in families]
    pick = hash_uniform(keys, STREAM_FACE, 1)[:, 0]
    face = np.empty(len(idx), dtype=np.int64)
    for fam, faces_of in zip(families, members, strict=True):
        hit = family == fam
        face[hit] = faces_of[np.minimum((pick[hit] * len(faces_of)).astype(np.int64), len(faces_of) - 1)]
    pose = hash_uniform(keys, STREAM_POSE, 5) * 2.0 - 1.0  # each in [-1, 1)
    out = {
        "label": idx % n_classes,
        "family": family.astype(np.int64),
        "face": face,
        "rotation": pose[:, 0] * ranges.rotation,
        "scale": 1.0 + pose[:, 1] * ranges.scale,
        "shear": pose[:, 2] * ranges.shear,
        "shift_x": pose[:, 3] * ranges.shift,
        "shift_y": pose[:, 4] * ranges.shift,
        "stroke": (hash_uniform(keys, STREAM_STROKE, 1)[:, 0] * 2.0 - 1.0) * ranges.stroke,
        "blur": hash_uniform(keys, STREAM_BLUR, 1)[:, 0] * ranges.blur,
        "noise": hash_uniform(keys, STREAM_NOISE_LEVEL, 1)[:, 0] * ranges.noise,
    }
    if channels == 3:
        pair = np.minimum((hash_uniform(keys, STREAM_COLOR, 1)[:, 0] * len(COLOR_PAIRS)).astype(np.int64),
                          len(COLOR_PAIRS) - 1)
        out["fg"] = np.asarray([COLOR_PAIRS[p][0] for p in pair], dtype=np.int64)
        out["bg"] = np.asarray([COLOR_PAIRS[p][1] for p in pair], dtype=np.int64)
    else:
        out["fg"], out["bg"] = np.full(len(idx), -1, dtype=np.int64), np.full(len(idx), -1, dtype=np.int64)
    return {k: torch.from_numpy(np.ascontiguousarray(v)) if v.dtype == np.int64
            else torch.from_numpy(v.astype(np.float32)) for k, v in out.items()}


GLYPH_META_KEYS = ("family", "face", "rotation", "scale", "shear", "shift_x", "shift_y", "stroke", "fg", "bg")

CAPTION_TEMPLATES: tuple[str, ...] = (
    "a {look}{what} in {face}{pose}{color}.",
    "the {look}{what} set in {face}{pose}{color}.",
    "a photo of a {look}{what} in {face}{pose}{color}.",
    "a {look}{what}, {face}{pose}{color}.",
    "a {look}{what} typeset in {face}{pose}{color}.",
    "a picture of a {look}{what} in {face}{pose}{color}.",
)
# Class-only captions (``plain_fraction`` of the images): the same openings without the attributes.
PLAIN_TEMPLATES: tuple[str, ...] = ("a {what}.", "the {what}.", "a photo of a {what}.", "a picture of a {what}.")


def has_glyph_attributes(meta: dict[str, torch.Tensor]) -> bool:
    """Whether a dataset's ``meta`` carries the glyph attributes :func:`glyph_captions` reads."""
    return all(k in meta for k in GLYPH_META_KEYS)


def class_phrase(name: str) -> str:
    """How a caption names class ``name``: "digit seven", "letter A" (prompts name classes the same way)."""
    return f"letter {name}" if len(name) == 1 else f"digit {name}"


_class_phrase = class_phrase


def _look(scale: float, stroke: float) -> str:
    size = "small " if scale < 0.94 else "large " if scale > 1.06 else ""
    weight = "thin " if stroke < -0.15 else "thick " if stroke > 0.15 else ""
    return size + weight


def _pose(rotation: float, shift_x: float, shift_y: float) -> str:
    words = []
    if abs(rotation) >= 5.0:
        words.append("tilted left" if rotation > 0 else "tilted right")
    horiz = "left" if shift_x < -0.05 else "right" if shift_x > 0.05 else ""
    vert = "top" if shift_y < -0.05 else "bottom" if shift_y > 0.05 else ""
    if horiz or vert:
        words.append("near the " + " ".join(w for w in (vert, horiz) if w))
    return "".join(", " + w for w in words)


def glyph_captions(labels: Sequence[int] | torch.Tensor | np.ndarray, classes: Sequence[str],
                   meta: dict[str, torch.Tensor], seed: int,
                   templates: Sequence[str] = CAPTION_TEMPLATES, plain_fraction: float = 0.0) -> list[str]:
    """One caption per image naming its class and attributes (face, weight, slant, colour, size,
    stroke, pose), ``templates[k]`` with ``k`` drawn under ``seed`` as in ``digit_captions``.

    e.g. "a small thick digit seven in bold italic DejaVu Serif, tilted left, red on navy."
    The class comes early, so a caption cut to a short text context still names it.

    ``plain_fraction`` of the images (drawn under ``seed``) get a class-only caption instead
    (:data:`PLAIN_TEMPLATES`, "a photo of a digit seven."). Why: with attributes alone a small CLIP
    matches captions by the easy attributes (colours, position) and learns the class last or never
    (docs/prompt-tuning.md, "A CLIP worth adapting"); the class-only captions make the class word
    the only thing to match in most pairs.

    A picture in a named style (``meta["style"]`` >= 0, ``data.glyphs.styles``) gets the class-only
    caption that names the style instead ("an upside-down photo of a digit seven.").
    """
    labels_list = [int(v) for v in np.asarray(labels).reshape(-1)]
    cols = {k: meta[k].tolist() for k in GLYPH_META_KEYS}
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(templates), size=len(labels_list))
    plain = rng.random(len(labels_list)) < plain_fraction if plain_fraction > 0 else np.zeros(len(labels_list), bool)
    plain_picks = rng.integers(0, len(PLAIN_TEMPLATES), size=len(labels_list))
    from cloudedge.data.glyph_styles import style_caption  # here: glyph_styles imports the data package

    styles = meta["style"].tolist() if "style" in meta else None
    out = []
    for i, y in enumerate(labels_list):
        if styles is not None and styles[i] >= 0:  # a styled picture: its caption says how it is drawn
            out.append(style_caption(styles[i], _class_phrase(classes[y])))
            continue
        if plain[i]:
            out.append(PLAIN_TEMPLATES[int(plain_picks[i])].format(what=_class_phrase(classes[y])))
            continue
        fg, bg = cols["fg"][i], cols["bg"][i]
        color = f", {FOREGROUNDS[fg][0]} on {BACKGROUNDS[bg][0]}" if fg >= 0 else ""
        out.append(templates[int(picks[i])].format(
            look=_look(cols["scale"][i], cols["stroke"][i]),
            what=_class_phrase(classes[y]),
            face=FACES[cols["face"][i]].phrase,
            pose=_pose(cols["rotation"][i], cols["shift_x"][i], cols["shift_y"][i]),
            color=color,
        ))
    return out
