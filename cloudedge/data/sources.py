"""Bundled, offline data sources: digits and their variants, and the stdlib-docstring corpus.

Nothing here downloads anything. The digits are scikit-learn's 1,797 8x8 handwritten digits (a
file shipped inside the scikit-learn wheel); the text corpus is extracted from the docstrings of
the CPython standard library installed here (and the Python documentation topics that ship with
it in ``pydoc_data``).
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from cloudedge.data.pydocs_walk import PYDOC_TOPICS_DOMAIN
from cloudedge.errors import InputError

DIGIT_CLASSES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]

# A fixed 10-color RGB palette for the colored digits: color i is keyed to label i. The colors are
# far apart so a model can pick the shortcut up easily (which is the point of the benchmark).
PALETTE = torch.tensor(
    [
        [1.00, 0.00, 0.00],  # red
        [0.00, 1.00, 0.00],  # green
        [0.00, 0.00, 1.00],  # blue
        [1.00, 1.00, 0.00],  # yellow
        [1.00, 0.00, 1.00],  # magenta
        [0.00, 1.00, 1.00],  # cyan
        [1.00, 0.50, 0.00],  # orange
        [0.50, 0.00, 1.00],  # violet
        [0.50, 1.00, 0.50],  # light green
        [1.00, 1.00, 1.00],  # white
    ],
    dtype=torch.float32,
)

IndexLike = Sequence[int] | np.ndarray | torch.Tensor


def _as_index_tensor(indices: IndexLike) -> torch.Tensor:
    return torch.as_tensor(np.asarray(indices, dtype=np.int64).reshape(-1))


@dataclass
class ImageDataset:
    """Images ``x`` float32 ``[N, C, H, W]`` in [0, 1], labels ``y`` int64 ``[N]``.

    ``domains`` is an optional int64 ``[N]`` tensor (e.g. the color index of a colored digit);
    ``meta`` holds further per-sample tensors (first dimension ``N``) that travel with ``subset``.
    """

    x: torch.Tensor
    y: torch.Tensor
    classes: list[str]
    domains: torch.Tensor | None = None
    meta: dict[str, torch.Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # These are programming errors (our own code builds datasets), hence asserts, not InputError.
        assert self.x.ndim == 4, f"x must be [N, C, H, W], got {tuple(self.x.shape)}"
        assert self.y.shape == (self.x.shape[0],), "y must be [N]"
        assert self.domains is None or self.domains.shape[0] == self.x.shape[0]

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def subset(self, indices: IndexLike) -> ImageDataset:
        """A new dataset holding the given samples, in the given order."""
        idx = _as_index_tensor(indices)
        return ImageDataset(
            x=self.x[idx],
            y=self.y[idx],
            classes=list(self.classes),
            domains=None if self.domains is None else self.domains[idx],
            meta={k: v[idx] for k, v in self.meta.items()},
        )


@dataclass
class TextDataset:
    """Documents ``texts`` with optional integer ``labels`` (indices into ``classes``).

    ``domains`` names where each text comes from (a module, a file); ``ids`` optionally names each
    text more precisely (a qualified name, ``file:line``).
    """

    texts: list[str]
    labels: list[int] | None
    classes: list[str]
    domains: list[str]
    ids: list[str] | None = None

    def __post_init__(self) -> None:
        assert len(self.domains) == len(self.texts), "one domain per text"
        assert self.labels is None or len(self.labels) == len(self.texts), "one label per text"
        assert self.ids is None or len(self.ids) == len(self.texts), "one id per text"

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, indices: IndexLike) -> TextDataset:
        """A new dataset holding the given documents, in the given order."""
        idx = [int(i) for i in np.asarray(indices, dtype=np.int64).reshape(-1)]
        return TextDataset(
            texts=[self.texts[i] for i in idx],
            labels=None if self.labels is None else [self.labels[i] for i in idx],
            classes=list(self.classes),
            domains=[self.domains[i] for i in idx],
            ids=None if self.ids is None else [self.ids[i] for i in idx],
        )


# --------------------------------------------------------------------------------------- digits


def resize_images(x: torch.Tensor, image_size: int) -> torch.Tensor:
    """Bilinear resize of ``[N, C, H, W]`` to ``image_size`` x ``image_size`` (anti-aliased when shrinking)."""
    if x.shape[-1] == image_size and x.shape[-2] == image_size:
        return x
    shrinking = image_size < max(x.shape[-2], x.shape[-1])
    out = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False, antialias=shrinking)
    return out.clamp_(0.0, 1.0)


@lru_cache(maxsize=1)
def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits as sk_load_digits

    bunch = sk_load_digits()
    return bunch.images.astype(np.float32), bunch.target.astype(np.int64)


def load_digits(image_size: int = 8) -> ImageDataset:
    """scikit-learn's 1,797 handwritten digits: ``[1797, 1, S, S]`` in [0, 1], classes "zero".."nine".

    Pixel values 0..16 are divided by 16. ``image_size`` other than 8 resizes bilinearly.
    """
    if image_size < 1:
        raise InputError(f"data.image_size: must be >= 1, got {image_size}")
    images, target = _digits_arrays()
    x = torch.from_numpy(images / 16.0).float().unsqueeze(1)
    x = resize_images(x, image_size)
    return ImageDataset(x=x.contiguous(), y=torch.from_numpy(target.copy()), classes=list(DIGIT_CLASSES))


def colored(ds: ImageDataset, flip_prob: float, seed: int) -> ImageDataset:
    """Colored digits after the IRM Colored-MNIST protocol, with a 10-color label-keyed palette.

    The (grayscale) strokes are multiplied by an RGB color: ``PALETTE[label]``, or, with probability
    ``flip_prob``, the color of a uniformly drawn *other* label. Color thus predicts the label with
    accuracy ``1 - flip_prob``: a spurious shortcut. The color index used is stored in ``domains``
    and ``meta["color"]``; ``meta["flipped"]`` marks the samples whose color lies.
    """
    if not 0.0 <= flip_prob <= 1.0:
        raise InputError(f"data.flip_prob: must be in [0, 1], got {flip_prob}")
    n_colors = PALETTE.shape[0]
    if int(ds.y.max()) >= n_colors:
        raise InputError(f"data: colored supports at most {n_colors} classes, got label {int(ds.y.max())}")
    gen = torch.Generator().manual_seed(seed)
    flipped = torch.rand(len(ds), generator=gen) < flip_prob
    # A uniformly drawn other label: label + offset (mod 10), offset in 1..9.
    offset = torch.randint(1, n_colors, (len(ds),), generator=gen)
    color = torch.where(flipped, (ds.y + offset) % n_colors, ds.y)
    gray = ds.x.mean(dim=1, keepdim=True)  # already-colored input is reduced to its strokes first
    x = gray * PALETTE[color][:, :, None, None]
    meta = dict(ds.meta)
    meta.update(color=color, flipped=flipped)
    return ImageDataset(x=x.contiguous(), y=ds.y.clone(), classes=list(ds.classes), domains=color.clone(), meta=meta)


def rotate_images(x: torch.Tensor, degrees: float) -> torch.Tensor:
    """Rotate ``[N, C, H, W]`` counter-clockwise (as displayed, row 0 at the top) by ``degrees``.

    Bilinear sampling of the exact rotation (``affine_grid``/``grid_sample``, zeros outside), so a
    multiple of 90 degrees on a square image equals ``torch.rot90`` up to float rounding.
    """
    theta_rad = math.radians(degrees)
    cos, sin = math.cos(theta_rad), math.sin(theta_rad)
    # affine_grid maps output coords (x right, y down, in [-1, 1]) to input coords. Displayed CCW
    # rotation with y pointing down: the output pixel at (x, y) reads the input at R(-theta)(x, y)
    # expressed in y-down coordinates, which is [[cos, -sin], [sin, cos]].
    theta = torch.tensor([[cos, -sin, 0.0], [sin, cos, 0.0]], dtype=x.dtype).expand(x.shape[0], 2, 3)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    out = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return out.clamp_(0.0, 1.0)


def rotated(ds: ImageDataset, degrees: float) -> ImageDataset:
    """The dataset with every image rotated counter-clockwise by ``degrees`` (see :func:`rotate_images`)."""
    return ImageDataset(
        x=rotate_images(ds.x, degrees).contiguous(),
        y=ds.y.clone(),
        classes=list(ds.classes),
        domains=None if ds.domains is None else ds.domains.clone(),
        meta=dict(ds.meta),
    )


# ----------------------------------------------------------------------------------- pydocs text


@lru_cache(maxsize=1)
def _pydocs_corpus() -> tuple[tuple[str, str, str], ...]:
    """All (domain, qualified name, text) docs in corpus order, walked in a clean interpreter
    (``pydocs_walk.py``: the corpus must not depend on what this process imported or patched)."""
    walker = Path(__file__).with_name("pydocs_walk.py")
    proc = subprocess.run([sys.executable, "-I", "-S", str(walker)], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"pydocs: walking the standard library failed: {proc.stderr.strip()[-500:]}")
    return tuple((str(d), str(q), str(t)) for d, q, t in json.loads(proc.stdout))


def even_pick(n: int, k: int) -> np.ndarray:
    """``k`` indices spread evenly over ``range(n)`` (all when ``k >= n``)."""
    if k >= n:
        return np.arange(n)
    return np.unique(np.linspace(0, n - 1, k).round().astype(np.int64))


def load_pydocs(max_docs: int | None = None, min_chars: int = 40) -> TextDataset:
    """The CPython standard library's docstrings (and Python doc topics) as an English+code corpus.

    Walks the standard-library modules importable here in sorted order (public submodules after
    their package), taking the docstrings of each module, its public classes (and their public
    methods and properties) and functions defined in it. Each document's domain is its top-level
    module (``"json"`` for ``json.decoder.JSONDecoder.decode``); the Python documentation topics
    of ``pydoc_data.topics`` form the domain ``"pydoc_data"``. Documents shorter than
    ``min_chars`` characters are dropped; ``max_docs`` keeps that many spread evenly over the
    corpus order (so every part of the library stays represented). Deterministic for a given
    Python installation; built once per process (a second or two) and cached.
    """
    if max_docs is not None and max_docs < 1:
        raise InputError(f"data.max_docs: must be >= 1, got {max_docs}")
    rows = [r for r in _pydocs_corpus() if len(r[2]) >= min_chars]
    if max_docs is not None:
        rows = [rows[i] for i in even_pick(len(rows), max_docs)]
    return TextDataset(
        texts=[r[2] for r in rows],
        labels=None,
        classes=[],
        domains=[r[0] for r in rows],
        ids=[r[1] for r in rows],
    )


def pydocs_classification(
    n_classes: int = 10,
    min_chars: int = 40,
    max_per_class: int | None = None,
    exclude: Sequence[str] = (PYDOC_TOPICS_DOMAIN,),
) -> TextDataset:
    """Text classification on the stdlib docstrings: which module does a docstring come from?

    Picks the ``n_classes`` top-level modules with the most documents (ties broken by name;
    ``exclude`` domains are not candidates). ``classes`` are those module names in alphabetical
    order and each label indexes them. ``max_per_class`` keeps that many documents per class,
    spread evenly over the class's documents. Documents keep corpus order.
    """
    corpus = load_pydocs(min_chars=min_chars)
    counts = Counter(d for d in corpus.domains if d not in set(exclude))
    if n_classes < 2 or n_classes > len(counts):
        raise InputError(f"data.n_classes: must be in 2..{len(counts)} for pydocs, got {n_classes}")
    top = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:n_classes]
    classes = sorted(name for name, _ in top)
    label_of = {name: i for i, name in enumerate(classes)}
    keep = [i for i, d in enumerate(corpus.domains) if d in label_of]
    if max_per_class is not None:
        by_class: dict[str, list[int]] = {c: [] for c in classes}
        for i in keep:
            by_class[corpus.domains[i]].append(i)
        keep = sorted(j for c in classes for j in np.asarray(by_class[c])[even_pick(len(by_class[c]), max_per_class)])
    view = corpus.subset(keep)
    view.classes = classes
    view.labels = [label_of[d] for d in view.domains]
    return view
