"""A user's own data from disk: plain text, JSON Lines, and image folders.

Every problem with the files raises :class:`InputError` naming the file (and line, where there is
one), e.g. ``data/train.jsonl:7: bad JSON: Expecting ',' delimiter (column 12)``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cloudedge.data.sources import ImageDataset, TextDataset
from cloudedge.errors import InputError

TEXT_SUFFIXES = (".txt", ".md")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")
# PIL modes read as one grey channel; every other mode (palette, RGB, RGBA, CMYK, ...) as RGB.
GREY_MODES = frozenset({"1", "L", "LA", "I", "I;16", "I;16L", "I;16B", "I;16N", "F"})
# High-bit grey modes and the value read as white: 16-bit samples (and Pillow's 32-bit "I", which is
# how it has held 16-bit PNG and PGM data) span 0..65535; float ("F") samples are taken as [0, 1].
# convert("L") would clip them at 255 instead of scaling, turning nearly every pixel white.
HIGH_BIT_WHITE = {"I": 65535.0, "I;16": 65535.0, "I;16L": 65535.0, "I;16B": 65535.0, "I;16N": 65535.0, "F": 1.0}
_BLANK_LINES = re.compile(r"\n[ \t]*\n")

# Integer labels index classes 0..max: a bound keeps a stray huge label from building a huge class list.
MAX_INT_LABEL = 100_000


def _read_utf8(path: Path) -> str:
    """The file's text; InputError when it is missing, unreadable or not UTF-8 (names the line)."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise InputError(f"{path}: no such file") from None
    except OSError as err:
        raise InputError(f"{path}: cannot read ({err.strerror or err})") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise InputError(f"{path}:{line}: not UTF-8 text (byte 0x{raw[err.start]:02x} at offset {err.start})") from None
    # A UTF-8 byte-order mark is not part of the text; Windows line ends are normalized.
    return text.removeprefix("\ufeff").replace("\r\n", "\n").replace("\r", "\n")


def _paragraphs(text: str) -> list[tuple[int, str]]:
    """(first line number, paragraph) for each blank-line-separated paragraph with any text."""
    out: list[tuple[int, str]] = []
    pos = 0
    for match in [*_BLANK_LINES.finditer(text), None]:
        end = match.start() if match else len(text)
        chunk = text[pos:end]
        stripped = chunk.strip()
        if stripped:
            lead = chunk[: len(chunk) - len(chunk.lstrip())]
            out.append((text.count("\n", 0, pos) + lead.count("\n") + 1, stripped))
        pos = match.end() if match else len(text)
    return out


def load_text(path: str | Path) -> TextDataset:
    """Plain text: a ``.txt``/``.md`` file, or a folder of them (searched recursively, sorted).

    A single file gives one document per paragraph (paragraphs are separated by blank lines);
    its domain is the file's name without suffix. A folder gives one document per file; its
    domain is the first component of the file's path inside the folder (a subfolder name, or the
    file's name without suffix for files at the top), so subfolders can be partitioned by domain.
    Empty files are errors.
    """
    root = Path(path)
    if not root.exists():
        raise InputError(f"{root}: no such file or folder")
    if root.is_file():
        text = _read_utf8(root)
        paragraphs = _paragraphs(text)
        if not paragraphs:
            raise InputError(f"{root}: empty file (no text)")
        return TextDataset(
            texts=[p for _, p in paragraphs],
            labels=None,
            classes=[],
            domains=[root.stem] * len(paragraphs),
            ids=[f"{root.name}:{line}" for line, _ in paragraphs],
        )
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES)
    if not files:
        raise InputError(f"{root}: no {'/'.join(TEXT_SUFFIXES)} files in this folder")
    texts, domains, ids = [], [], []
    for file in files:
        text = _read_utf8(file).strip()
        if not text:
            raise InputError(f"{file}: empty file (no text)")
        rel = file.relative_to(root)
        texts.append(text)
        domains.append(rel.parts[0] if len(rel.parts) > 1 else rel.stem)
        ids.append(rel.as_posix())
    return TextDataset(texts=texts, labels=None, classes=[], domains=domains, ids=ids)


def jsonl_objects(lines: Iterable[str], source: str | Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) of each non-blank JSON line; anything else is an InputError naming
    ``source:line``."""
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{source}:{lineno}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise InputError(f"{where}: bad JSON: {err.msg} (column {err.colno})") from None
        if not isinstance(record, dict):
            raise InputError(f"{where}: expected a JSON object, got {type(record).__name__}")
        yield lineno, record


def load_jsonl(
    path: str | Path,
    text_field: str = "text",
    label_field: str | None = None,
    domain_field: str | None = None,
) -> TextDataset:
    """JSON Lines: one JSON object per line (blank lines skipped), text in ``text_field``.

    Labels (``label_field``) may be strings -- ``classes`` are then the sorted distinct strings --
    or non-negative integers -- ``classes`` are then ``"0" .. str(max)``; not a mix. Domains come
    from ``domain_field`` when given, else every record's domain is the file's name without suffix.
    """
    file = Path(path)
    if file.is_dir():
        raise InputError(f"{file}: is a folder, expected a .jsonl file")
    lines = _read_utf8(file).split("\n")
    texts: list[str] = []
    raw_labels: list[str | int] = []
    domains: list[str] = []
    ids: list[str] = []
    for lineno, record in jsonl_objects(lines, file):
        where = f"{file}:{lineno}"
        texts.append(_str_field(record, text_field, where))
        if label_field is not None:
            if label_field not in record:
                raise InputError(f"{where}: missing field '{label_field}'")
            label = record[label_field]
            if isinstance(label, bool) or not isinstance(label, (str, int)):
                raise InputError(f"{where}: field '{label_field}' must be a string or an integer, got {label!r}")
            if isinstance(label, int) and not 0 <= label <= MAX_INT_LABEL:
                raise InputError(f"{where}: field '{label_field}' must be in 0..{MAX_INT_LABEL}, got {label}")
            if raw_labels and isinstance(label, str) != isinstance(raw_labels[0], str):
                raise InputError(f"{where}: field '{label_field}' mixes strings and integers across lines")
            raw_labels.append(label)
        domains.append(_str_field(record, domain_field, where) if domain_field else file.stem)
        ids.append(f"{file.name}:{lineno}")
    if not texts:
        raise InputError(f"{file}: empty file (no records)")
    labels: list[int] | None = None
    classes: list[str] = []
    if label_field is not None:
        if isinstance(raw_labels[0], str):
            classes = sorted({str(v) for v in raw_labels})
            index = {c: i for i, c in enumerate(classes)}
            labels = [index[str(v)] for v in raw_labels]
        else:
            labels = [int(v) for v in raw_labels]
            classes = [str(i) for i in range(max(labels) + 1)]
    return TextDataset(texts=texts, labels=labels, classes=classes, domains=domains, ids=ids)


def _str_field(record: dict, name: str, where: str) -> str:
    if name not in record:
        raise InputError(f"{where}: missing field '{name}'")
    value = record[name]
    if not isinstance(value, str):
        raise InputError(f"{where}: field '{name}' must be a string, got {type(value).__name__}")
    return value


def _folder_first(line: str, folders: set[str]) -> str | None:
    """The class folder a line starts with (the whole line, or its first word with one trailing
    ``:`` dropped), or None."""
    words = line.split(None, 1)
    head = words[0].removesuffix(":") if words[0] not in folders else words[0]
    return head if head in folders else None


def read_class_names(file: Path, folders: list[str]) -> list[tuple[str, str]]:
    """(folder, class name) per class, in label order, from a class-names file (three forms).

    - **tab mapping**, when any line holds a tab: every line is ``folder<TAB>class name``;
    - **folder-first mapping**, else when the first line starts with a class folder's name (the
      whole line, or followed by a space or ``": "``): every line is ``folder class name``
      (ImageNet's ``n01440764 tench``), ``folder: class name`` or a bare ``folder``;
    - **order-only**, otherwise: one class name a line, line i naming the i-th folder in sorted
      order, exactly one line per folder.

    A mapping gives labels in the file's order and must list every folder once. Blank lines are
    skipped. Errors name the file and line: a folder that does not exist, one listed twice or not
    at all, a line count that does not match, or an order-only line that starts with a folder name
    (a mapping whose first line is mistyped) or is a folder's name at another folder's position.
    """
    entries = [(n, line.strip()) for n, line in enumerate(_read_utf8(file).split("\n"), start=1) if line.strip()]
    if not entries:
        raise InputError(f"{file}: empty file (no class names)")
    known = set(folders)
    if any("\t" in line for _, line in entries):
        pairs = []
        for lineno, line in entries:
            folder, sep, name = line.partition("\t")
            folder, name = folder.strip(), name.strip()
            if not sep or not folder or not name:
                raise InputError(f"{file}:{lineno}: expected 'folder<TAB>class name' (the file has tabs), got {line!r}")
            pairs.append((lineno, folder, name))
        return _checked_mapping(file, pairs, folders, "tab-separated")
    first = _folder_first(entries[0][1], known)
    if first is not None:
        pairs = []
        for lineno, line in entries:
            folder = _folder_first(line, known) or line.split(None, 1)[0].removesuffix(":")
            rest = line[len(folder):].strip().removeprefix(":").strip() if line.startswith(folder) else ""
            pairs.append((lineno, folder, rest or folder))
        return _checked_mapping(file, pairs, folders, f"line {entries[0][0]} starts with class folder '{first}'")
    return _checked_order(file, entries, folders)


def _checked_mapping(file: Path, pairs: list[tuple[int, str, str]], folders: list[str], why: str) -> list[tuple[str, str]]:
    known, seen = set(folders), set()
    for lineno, folder, _ in pairs:
        if folder not in known:
            raise InputError(f"{file}:{lineno}: no class folder '{folder}' (a folder-to-name mapping: {why})")
        if folder in seen:
            raise InputError(f"{file}:{lineno}: folder '{folder}' listed twice")
        seen.add(folder)
    unlisted = [f for f in folders if f not in seen]
    if unlisted:
        raise InputError(f"{file}:{pairs[-1][0]}: class folders not listed: {', '.join(unlisted)} "
                         f"(a folder-to-name mapping lists every folder: {why})")
    return [(folder, name) for _, folder, name in pairs]


def _checked_order(file: Path, entries: list[tuple[int, str]], folders: list[str]) -> list[tuple[str, str]]:
    known = set(folders)
    for i, (lineno, line) in enumerate(entries):
        if line in known and i < len(folders) and folders[i] != line:
            raise InputError(f"{file}:{lineno}: '{line}' is a class folder, but line {entries[0][0]} does not start "
                             f"with one, so this line names folder '{folders[i]}' (order-only form); start line "
                             f"{entries[0][0]} with its folder to map folders to names")
        head = _folder_first(line, known)
        if head is not None and line != head:
            raise InputError(f"{file}:{lineno}: starts with class folder '{head}', but line {entries[0][0]} does not "
                             "start with a folder: every line of a mapping starts with its folder (or use tabs)")
    if len(entries) != len(folders):
        where = f"{file}:{entries[len(folders)][0]}" if len(entries) > len(folders) else f"{file}"
        raise InputError(f"{where}: {len(entries)} class names for {len(folders)} class folders (order-only form: "
                         "one name a line, in sorted folder order)")
    return [(folder, line) for folder, (_, line) in zip(folders, entries, strict=True)]


def _load_image(file: Path, image_size: int) -> torch.Tensor:
    """``[C, S, S]`` in [0, 1], C = 1 for a greyscale image (PIL modes 1, L, LA, I, I;16, F), else
    3 (RGB): shorter side resized to S (bicubic), then a centre crop. 16-bit grey is scaled by
    1/65535 (so is 32-bit ``I``), float grey taken as [0, 1]; both clipped to [0, 1]."""
    from PIL import Image

    try:
        with Image.open(file) as img:
            img.load()
            if img.mode in HIGH_BIT_WHITE:
                pic = _grey_as_float(img)
            else:
                pic = img.convert("L" if img.mode in GREY_MODES else "RGB")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise InputError(f"{file}: cannot decode image ({type(err).__name__}: {err})") from None
    return pil_to_tensor(pic, image_size)


def _grey_as_float(img: Any) -> Any:
    """A high-bit grey PIL image as mode ``F`` in [0, 1], keeping its precision through the resize."""
    from PIL import Image

    values = np.asarray(img, dtype=np.float64)
    white = HIGH_BIT_WHITE[img.mode]
    if img.mode == "F" and np.nanmax(values, initial=0.0) > 1.0:
        white = 255.0  # a float image in 0..255, as Pillow's own conversion to 8 bits reads it
    values = values / white
    # A float image may hold NaN or inf, which no later step would remove: black and white.
    values = np.clip(np.nan_to_num(values, nan=0.0), 0.0, 1.0)
    return Image.fromarray(values.astype(np.float32))  # float32: mode F


def pil_to_tensor(pic: Any, image_size: int) -> torch.Tensor:
    """A PIL image (mode ``L`` or ``RGB`` in 0..255, or ``F`` in [0, 1]) as ``[C, S, S]`` in [0, 1]:
    shorter side resized to S (bicubic), centre crop."""
    from PIL import Image

    w, h = pic.size
    scale = image_size / min(w, h)
    new_w, new_h = max(image_size, round(w * scale)), max(image_size, round(h * scale))
    pic = pic.resize((new_w, new_h), Image.Resampling.BICUBIC)
    left, top = (new_w - image_size) // 2, (new_h - image_size) // 2
    pic = pic.crop((left, top, left + image_size, top + image_size))
    if pic.mode == "F":
        # Bicubic overshoots at edges; 8-bit modes clip that in PIL, a float image must be clipped here.
        arr = np.clip(np.asarray(pic, dtype=np.float32), 0.0, 1.0)
    else:
        arr = np.asarray(pic, dtype=np.float32) / 255.0
    return torch.from_numpy(arr).reshape(image_size, image_size, -1).permute(2, 0, 1).contiguous()


def load_image_folder(
    path: str | Path, image_size: int, class_names_file: str | Path | None = None
) -> ImageDataset:
    """Images in class subfolders (``root/<class>/<image>``), like torchvision's ImageFolder.

    Classes are the subfolder names in sorted order, or, with ``class_names_file``, the names (and,
    for a mapping, the order) given there: see :func:`read_class_names` for its three forms. Images
    (PNG, JPEG, BMP, GIF, WebP; other files and hidden files are ignored) have their shorter side
    resized to ``image_size`` and are centre-cropped to ``image_size`` x ``image_size``. ``x`` has
    one channel when every image is greyscale, else three (greyscale images replicated); a model
    with other channels converts them (``cloudedge.models.inputs``).
    """
    root = Path(path)
    if not root.is_dir():
        raise InputError(f"{root}: no such folder" if not root.exists() else f"{root}: expected a folder of class folders")
    if image_size < 1:
        raise InputError(f"data.image_size: must be >= 1, got {image_size}")
    folders = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise InputError(f"{root}: no class subfolders")
    if class_names_file is not None:
        listed = read_class_names(Path(class_names_file), folders)
    else:
        listed = [(f, f) for f in folders]
    images: list[torch.Tensor] = []
    labels: list[int] = []
    for label, (folder, _) in enumerate(listed):
        files = sorted(
            p
            for p in (root / folder).rglob("*")
            if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")
        )
        if not files:
            raise InputError(f"{root / folder}: empty class folder (no images)")
        for file in files:
            images.append(_load_image(file, image_size))
            labels.append(label)
    if any(img.shape[0] == 3 for img in images):
        images = [img.expand(3, -1, -1) for img in images]
    return ImageDataset(
        x=torch.stack(images),
        y=torch.tensor(labels, dtype=torch.long),
        classes=[name for _, name in listed],
    )
