"""User data loaders on real files written into tmp_path, including every error case."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from cloudedge.data import load_image_folder, load_jsonl, load_text
from cloudedge.errors import InputError


def test_text_file_paragraphs(tmp_path):
    f = tmp_path / "notes.txt"
    f.write_text("First para\nstill first.\n\n\nSecond ünïcode.\r\n  \r\nThird.\n", encoding="utf-8")
    ds = load_text(f)
    assert ds.texts == ["First para\nstill first.", "Second ünïcode.", "Third."]
    assert ds.domains == ["notes"] * 3 and ds.labels is None
    assert ds.ids == ["notes.txt:1", "notes.txt:5", "notes.txt:7"]


def test_text_folder_one_doc_per_file(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "b.txt").write_text("bee\n\nmore bee")
    (tmp_path / "a.md").write_text("# title\ntext")
    (tmp_path / "sub" / "c.txt").write_text("sea")
    (tmp_path / "ignored.csv").write_text("x,y")
    ds = load_text(tmp_path)
    assert ds.texts == ["# title\ntext", "bee\n\nmore bee", "sea"]
    assert ds.domains == ["a", "b", "sub"]
    assert ds.ids == ["a.md", "b.txt", "sub/c.txt"]


def test_text_errors(tmp_path):
    with pytest.raises(InputError, match="nothere.txt: no such"):
        load_text(tmp_path / "nothere.txt")
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n\n ")
    with pytest.raises(InputError, match="empty.txt: empty file"):
        load_text(empty)
    latin = tmp_path / "latin.txt"
    latin.write_bytes("line one\nline two caf\xe9\n".encode("latin-1"))
    with pytest.raises(InputError, match=r"latin.txt:2: not UTF-8"):
        load_text(latin)
    folder = tmp_path / "docs"
    folder.mkdir()
    with pytest.raises(InputError, match="no .txt/.md files"):
        load_text(folder)
    (folder / "ok.txt").write_text("fine")
    (folder / "blank.md").write_text("")
    with pytest.raises(InputError, match="blank.md: empty file"):
        load_text(folder)


def _write_jsonl(path, rows):
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n", encoding="utf-8")


def test_jsonl_string_and_int_labels(tmp_path):
    f = tmp_path / "train.jsonl"
    _write_jsonl(f, [{"text": "good film", "y": "pos", "src": "imdb"}, "", {"text": "bad", "y": "neg", "src": "yelp"},
                     {"text": "ok", "y": "pos", "src": "imdb"}])
    ds = load_jsonl(f, "text", "y", domain_field="src")
    assert ds.texts == ["good film", "bad", "ok"]
    assert ds.classes == ["neg", "pos"] and ds.labels == [1, 0, 1]
    assert ds.domains == ["imdb", "yelp", "imdb"] and ds.ids == ["train.jsonl:1", "train.jsonl:3", "train.jsonl:4"]
    g = tmp_path / "ints.jsonl"
    _write_jsonl(g, [{"body": "a", "label": 2}, {"body": "b", "label": 0}])
    ints = load_jsonl(g, "body", "label")
    assert ints.labels == [2, 0] and ints.classes == ["0", "1", "2"] and ints.domains == ["ints", "ints"]
    unlabeled = load_jsonl(g, "body")
    assert unlabeled.labels is None and unlabeled.classes == []


@pytest.mark.parametrize(
    ("rows", "fields", "message"),
    [
        ([{"text": "a"}, '{"text": "b",'], ("text", None), r"data.jsonl:2: bad JSON"),
        ([{"text": "a"}, {"txt": "b"}], ("text", None), r"data.jsonl:2: missing field 'text'"),
        ([{"text": 5}], ("text", None), r"data.jsonl:1: field 'text' must be a string"),
        ([{"text": "a"}], ("text", "label"), r"data.jsonl:1: missing field 'label'"),
        ([{"text": "a", "label": "x"}, {"text": "b", "label": 1}], ("text", "label"), r"data.jsonl:2: .*mixes"),
        ([{"text": "a", "label": -1}], ("text", "label"), r"data.jsonl:1: .*must be in 0\.\.100000"),
        ([{"text": "a", "label": 1.5}], ("text", "label"), r"data.jsonl:1: .*string or an integer"),
        (["[1, 2]"], ("text", None), r"data.jsonl:1: expected a JSON object"),
        (["", "  "], ("text", None), r"data.jsonl: empty file"),
    ],
)
def test_jsonl_errors_name_file_and_line(tmp_path, rows, fields, message):
    f = tmp_path / "data.jsonl"
    _write_jsonl(f, rows)
    with pytest.raises(InputError, match=message):
        load_jsonl(f, *fields)


def test_jsonl_missing_file(tmp_path):
    with pytest.raises(InputError, match="missing.jsonl: no such file"):
        load_jsonl(tmp_path / "missing.jsonl")


def _save_image(path, color, size=(12, 8), fmt=None):
    arr = np.zeros((size[1], size[0], 3), dtype=np.uint8)
    arr[...] = color
    Image.fromarray(arr).save(path, format=fmt)


def _make_folder(root):
    (root / "cat").mkdir(parents=True)
    (root / "dog").mkdir()
    _save_image(root / "cat" / "1.png", (255, 0, 0))
    _save_image(root / "cat" / "2.jpg", (250, 0, 0), fmt="JPEG")
    Image.fromarray(np.full((6, 6), 128, dtype=np.uint8), mode="L").save(root / "dog" / "gray.png")
    (root / "dog" / "notes.txt").write_text("not an image, ignored")
    (root / "dog" / ".hidden.png").write_bytes(b"junk")


def test_image_folder_loads_classes(tmp_path):
    _make_folder(tmp_path)
    ds = load_image_folder(tmp_path, image_size=4)
    assert ds.x.shape == (3, 3, 4, 4) and ds.x.dtype == torch.float32
    assert ds.classes == ["cat", "dog"] and ds.y.tolist() == [0, 0, 1]
    assert torch.allclose(ds.x[0, 0], torch.ones(4, 4)) and float(ds.x[0, 1].max()) == 0.0
    assert float((ds.x[1, 0] - 250 / 255).abs().max()) < 0.05  # JPEG is lossy
    assert torch.allclose(ds.x[2], torch.full((3, 4, 4), 128 / 255))  # grayscale -> RGB


def _names(tmp_path, text):
    root = tmp_path / "imgs"
    if not root.exists():
        _make_folder(root)
    names = tmp_path / "classes.txt"
    names.write_text(text)
    return root, names


@pytest.mark.parametrize(("text", "classes", "labels"), [
    ("Felis catus\nCanis familiaris\n", ["Felis catus", "Canis familiaris"], [0, 0, 1]),  # order-only
    ("dog a good dog\n\ncat\n", ["a good dog", "cat"], [0, 1, 1]),  # folder-first, ImageNet-style
    ("dog: a dog\ncat: a cat\n", ["a dog", "a cat"], [0, 1, 1]),  # folder-first with a colon; file order
    ("dog\tthe dog\ncat\tcat: with a colon\n", ["the dog", "cat: with a colon"], [0, 1, 1]),  # tab mapping
    ("cat\ndog\n", ["cat", "dog"], [0, 0, 1]),  # the folder names themselves
])
def test_image_folder_class_names_forms(tmp_path, text, classes, labels):
    root, names = _names(tmp_path, text)
    ds = load_image_folder(root, image_size=4, class_names_file=names)
    assert ds.classes == classes and ds.y.tolist() == labels


def test_tab_mapping_takes_folder_names_with_spaces(tmp_path):
    root = tmp_path / "imgs"
    for folder, red in (("snow leopard", 0), ("tabby cat", 255)):
        (root / folder).mkdir(parents=True)
        _save_image(root / folder / "1.png", (red, 20, 30))
    names = tmp_path / "classes.txt"
    names.write_text("tabby cat\ta tabby\nsnow leopard\tan ounce\n")
    ds = load_image_folder(root, 4, names)
    assert ds.classes == ["a tabby", "an ounce"]
    assert float(ds.x[ds.y == 0][:, 0].mean()) == 1.0 and float(ds.x[ds.y == 1][:, 0].mean()) == 0.0


@pytest.mark.parametrize(("text", "message"), [
    ("cat kitty\nbird a bird\n", r"classes.txt:2: no class folder 'bird' \(a folder-to-name mapping: line 1 starts"),
    ("dog\n", "classes.txt:1: class folders not listed: cat"),
    ("cat\ncat: again\ndog\n", "classes.txt:2: folder 'cat' listed twice"),
    ("cat\tkitty\ndog\n", r"classes.txt:2: expected 'folder<TAB>class name'"),
    ("only one\n", "classes.txt: 1 class names for 2 class folders"),
    ("a\nb\nc\n", "classes.txt:3: 3 class names for 2 class folders"),
    ("kitty\ndog a dog\n", "classes.txt:2: starts with class folder 'dog', but line 1 does not"),
    ("dgo\ncat\n", "classes.txt:2: 'cat' is a class folder, but line 1 does not start with one"),
    ("\n  \n", "classes.txt: empty file"),
])
def test_image_folder_class_names_errors(tmp_path, text, message):
    root, names = _names(tmp_path, text)
    with pytest.raises(InputError, match=message):
        load_image_folder(root, 4, names)


def test_greyscale_folder_has_one_channel(tmp_path):
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        Image.fromarray(np.full((6, 6), 51, dtype=np.uint8), mode="L").save(tmp_path / folder / "1.png")
    ds = load_image_folder(tmp_path, image_size=4)
    assert ds.x.shape == (2, 1, 4, 4) and torch.allclose(ds.x, torch.full_like(ds.x, 0.2))


# An 8 x 8 gradient over the whole range of each high-bit grey kind, stored as the file format that
# holds it (PNG for 16 bits; Pillow reads a TIFF by its content whatever the suffix says).
HIGH_BIT = {
    "I;16": (np.linspace(0, 65535, 64).round().astype(np.uint16), 65535.0, "PNG"),
    "I": (np.linspace(0, 65535, 64).round().astype(np.int32), 65535.0, "TIFF"),
    "F": (np.linspace(0, 1, 64).astype(np.float32), 1.0, "TIFF"),
    "F 0..255": (np.linspace(0, 255, 64).astype(np.float32), 255.0, "TIFF"),  # as Pillow's convert reads it
}


@pytest.mark.parametrize("mode", list(HIGH_BIT))
def test_high_bit_greyscale_is_scaled_not_clipped(tmp_path, mode):
    values, white, fmt = HIGH_BIT[mode]
    (tmp_path / "a").mkdir()
    Image.fromarray(values.reshape(8, 8)).save(tmp_path / "a" / "g.png", format=fmt)
    with Image.open(tmp_path / "a" / "g.png") as img:
        assert img.mode == mode.split()[0]  # the mode the test means to cover
    ds = load_image_folder(tmp_path, image_size=8)
    expected = torch.from_numpy(values.reshape(1, 1, 8, 8).astype(np.float64) / white).float()
    assert ds.x.shape == (1, 1, 8, 8)
    torch.testing.assert_close(ds.x, expected, atol=1e-6, rtol=0)
    # Resized, it stays a gradient in [0, 1] (bicubic overshoot clipped), darker at the top.
    small = load_image_folder(tmp_path, image_size=4).x[0, 0]
    assert 0.0 <= float(small.min()) and float(small.max()) <= 1.0
    assert small[0].mean() < 0.25 and small[-1].mean() > 0.75


def test_image_folder_errors(tmp_path):
    with pytest.raises(InputError, match="no such folder"):
        load_image_folder(tmp_path / "nope", 8)
    with pytest.raises(InputError, match="no class subfolders"):
        load_image_folder(tmp_path, 8)
    _make_folder(tmp_path)
    (tmp_path / "bird").mkdir()
    with pytest.raises(InputError, match="bird: empty class folder"):
        load_image_folder(tmp_path, 8)
    (tmp_path / "bird" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.raises(InputError, match="broken.png: cannot decode image"):
        load_image_folder(tmp_path, 8)
