"""Property-based tests: bad input of every kind ends in an InputError naming the field or file
(or, for input that happens to be valid, in success) -- never in another exception.

Deterministic: every test runs hypothesis with ``derandomize=True`` and a small ``max_examples``.
They found real bugs, now fixed and kept fixed here: inf/nan config numbers, out-of-range seeds,
unbounded fleet sizes and huge sparse JSONL labels.
"""

from __future__ import annotations

import copy
import io
import json
import math
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from cloudedge import comm
from cloudedge.checkpoint import check_state_dict, load_checkpoint, load_tensors, save_checkpoint
from cloudedge.cli import main
from cloudedge.config import DataConfig, config_from_dict, load_config
from cloudedge.data import build_dataset, load_image_folder, load_jsonl, load_text
from cloudedge.errors import InputError

ROOT = Path(__file__).parents[1]
DEMO = yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text(encoding="utf-8"))


def fuzz(n: int = 25):
    return settings(derandomize=True, max_examples=n, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


def leaf_paths(node, prefix=()):
    """Every path into the demo config (dict keys and list indices), parents before children."""
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else []
    for key, value in items:
        yield (*prefix, key)
        yield from leaf_paths(value, (*prefix, key))


def get_at(raw: dict, path: tuple):
    node = raw
    for key in path:
        node = node[key]
    return node


PATHS = list(leaf_paths(DEMO))
DICT_PATHS = [()] + [p for p in PATHS if isinstance(get_at(DEMO, p), dict)]


def set_at(raw: dict, path: tuple, value) -> dict:
    out = copy.deepcopy(raw)
    node = out
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return out


def dotted(path: tuple) -> str:
    return ".".join(str(p) for p in path)


def assert_names_field(msg: str, path: tuple) -> None:
    """The message names the file and the mutated field or its parent (a model-level check, e.g.
    'give exactly one of profile or mix', names the parent)."""
    assert msg.startswith("demo.yaml: ") and "\n" not in msg
    candidates = [dotted(path[:i]) for i in range(len(path), 0, -1)]
    assert any(c in msg for c in candidates), (msg, path)


wrong_values = st.one_of(
    st.integers(-(10**20), 10**20), st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=6),
    st.none(), st.booleans(), st.lists(st.integers(-3, 3), max_size=2),
    st.dictionaries(st.text(max_size=4), st.integers(-3, 3), max_size=2),
)


# --------------------------------------------------------------------------------------------------
# Configs


@fuzz(60)
@given(path=st.sampled_from(PATHS), value=wrong_values)
def test_config_mutation_is_input_error_naming_field(path, value):
    raw = set_at(DEMO, path, value)
    try:
        config_from_dict(raw, source="demo.yaml")
    except InputError as err:
        assert_names_field(str(err), path)


@fuzz(30)
@given(where=st.sampled_from(DICT_PATHS), key=st.from_regex(r"[a-z_]{1,8}", fullmatch=True), value=wrong_values)
def test_config_unknown_key_is_named(where, key, value):
    node = get_at(DEMO, where)
    if key in node or key == "base_dir":
        return
    raw = set_at(DEMO, (*where, key), value) if where else {**copy.deepcopy(DEMO), key: value}
    with pytest.raises(InputError) as info:
        config_from_dict(raw, source="demo.yaml")
    if where and where[-1] == "mix":  # a free-form mapping: the new key is a profile name (or a bad fraction)
        assert_names_field(str(info.value), (*where, key))
    else:
        assert str(info.value).startswith("demo.yaml: ") and key in str(info.value)


@fuzz(20)
@given(path=st.sampled_from([p for p in PATHS if isinstance(p[-1], str)]),
       value=st.sampled_from([-1, -0.5, 0, -(10**9)]))
def test_config_out_of_range_numbers(path, value):
    # Every numeric field of the demo config must be positive (seed excepted, see below).
    old = get_at(DEMO, path)
    if isinstance(old, bool) or not isinstance(old, int | float) or path == ("seed",):
        return
    with pytest.raises(InputError) as info:
        config_from_dict(set_at(DEMO, path, value), source="demo.yaml")
    assert_names_field(str(info.value), path)


# Non-finite numbers that validation accepts today (a NaN fails a `gt`/`ge` bound, an inf does not;
# fields without a bound take both).
NON_FINITE_ACCEPTED = [
    (("data", "partition", "alpha"), math.inf),
    (("fleet", "edges", 2, "devices", 0, "data_share"), math.inf),
    (("fleet", "edges", 1, "devices", 1, "mix", "phone-low"), math.inf),
    (("fleet", "edges", 1, "devices", 1, "mix", "phone-low"), math.nan),
    (("data", "degrees"), math.nan),
]


@pytest.mark.parametrize("path, value", NON_FINITE_ACCEPTED, ids=lambda x: dotted(x) if isinstance(x, tuple) else str(x))
def test_config_non_finite_numbers_rejected(path, value):
    with pytest.raises(InputError) as info:
        config_from_dict(set_at(DEMO, path, value), source="demo.yaml")
    assert_names_field(str(info.value), path)


@pytest.mark.parametrize("seed", [-1, 10**30])
def test_config_seed_out_of_range(seed):
    with pytest.raises(InputError, match="seed"):
        config_from_dict(set_at(DEMO, ("seed",), seed), source="demo.yaml")


def test_config_absurd_fleet_size_rejected():
    with pytest.raises(InputError, match="count"):
        config_from_dict(set_at(DEMO, ("fleet", "edges", 0, "devices", 0, "count"), 10**12), source="demo.yaml")


# --------------------------------------------------------------------------------------------------
# YAML text

YAML_ALPHABET = st.sampled_from(list("abcdefgxyz019 :-[]{},'\"#&*!|>%@`\n\t.") + ["seed", "fleet", "data", "name"])


@fuzz(40)
@given(data=st.one_of(st.binary(max_size=120), st.lists(YAML_ALPHABET, max_size=40).map(lambda x: "".join(x).encode())))
def test_yaml_bytes_input_error_naming_file(data):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "cfg.yaml"
        path.write_bytes(data)
        try:
            load_config(path)
        except InputError as err:
            assert str(err).startswith(str(path)) and "\n" not in str(err)


@fuzz(15)
@given(data=st.binary(max_size=60), bad=st.sampled_from([b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"\x80"]))
def test_yaml_non_utf8(data, bad):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "cfg.yaml"
        path.write_bytes(b"name: x\n" + bad + data)
        with pytest.raises(InputError, match="not UTF-8"):
            load_config(path)


# --------------------------------------------------------------------------------------------------
# Data files


@fuzz(30)
@given(data=st.binary(max_size=200))
def test_text_file_bytes(data):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "notes.txt"
        path.write_bytes(data)
        try:
            ds = load_text(path)
        except InputError as err:
            assert str(path) in str(err)
        else:
            assert len(ds.texts) >= 1 and all(t.strip() for t in ds.texts)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 50) | st.floats(allow_nan=False, width=32) | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.sampled_from(["text", "label", "dom", "x"]), inner,
                                                               max_size=3),
    max_leaves=6,
)
jsonl_lines = st.lists(st.one_of(json_values.map(json.dumps), st.text(max_size=10), st.just("")), max_size=6)


@fuzz(40)
@given(lines=jsonl_lines, label_field=st.sampled_from([None, "label"]), domain_field=st.sampled_from([None, "dom"]))
def test_jsonl_lines(lines, label_field, domain_field):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "records.jsonl"
        path.write_text("\n".join(lines), encoding="utf-8")
        try:
            ds = load_jsonl(path, "text", label_field, domain_field)
        except InputError as err:
            assert str(path) in str(err) and "\n" not in str(err)
        else:
            assert len(ds.texts) == len(ds.domains) >= 1
            if label_field:
                assert ds.labels is not None and all(0 <= y < len(ds.classes) for y in ds.labels)


def test_jsonl_sparse_huge_label_rejected():
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "r.jsonl"
        path.write_text('{"text": "a", "label": 0}\n{"text": "b", "label": 1000000}\n', encoding="utf-8")
        with pytest.raises(InputError, match="r.jsonl"):
            load_jsonl(path, "text", "label")


def png_bytes(seed: int, size: int = 6) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")
    return buf.getvalue()


@fuzz(25)
@given(cut=st.floats(0.0, 1.0), junk=st.binary(max_size=40), kind=st.sampled_from(["truncated", "junk", "empty"]))
def test_image_folder_broken_png(cut, junk, kind):
    good = png_bytes(0)
    bad = {"truncated": good[: int(cut * (len(good) - 21))], "junk": junk, "empty": b""}[kind]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "imgs"
        (root / "cat").mkdir(parents=True)
        (root / "dog").mkdir()
        (root / "cat" / "a.png").write_bytes(good)
        (root / "dog" / "b.png").write_bytes(png_bytes(1))
        (root / "dog" / "c.png").write_bytes(bad)
        # Cut before the image data ends (PNG's last 21 bytes are the IDAT CRC and IEND), so it is broken.
        with pytest.raises(InputError) as info:
            build_dataset(DataConfig(source="imagefolder", path=str(root), image_size=8, test_fraction=0.3), ".")
        assert str(root / "dog" / "c.png") in str(info.value)
        with pytest.raises(InputError, match="c.png"):
            load_image_folder(root, 8)


@pytest.mark.parametrize("source, name", [("text", "empty.txt"), ("jsonl", "empty.jsonl")])
@pytest.mark.parametrize("content", [b"", b"\n\n  \n", b"abc\xff\xfe"], ids=["empty", "blank", "non-utf8"])
def test_empty_and_non_utf8_data_files(tmp_path, source, name, content):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(InputError) as info:
        build_dataset(DataConfig(source=source, path=name), tmp_path)
    msg = str(info.value)
    assert str(tmp_path / name) in msg and ("not UTF-8" in msg if b"\xff" in content else "empty" in msg)


def test_missing_data_file_named(tmp_path):
    for source in ("text", "jsonl", "imagefolder"):
        with pytest.raises(InputError, match="nowhere"):
            build_dataset(DataConfig(source=source, path="nowhere"), tmp_path)


# --------------------------------------------------------------------------------------------------
# Checkpoints and payloads


def small_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))


@pytest.fixture(scope="module")
def checkpoint_bytes(tmp_path_factory) -> bytes:
    ckpt = tmp_path_factory.mktemp("ckpt")
    path = save_checkpoint(ckpt, 1, small_model().state_dict(), {"round": 1})
    return path.read_bytes()


@fuzz(30)
@given(cut=st.integers(0, 10_000), flip=st.lists(st.tuples(st.integers(0, 10_000), st.integers(1, 255)), max_size=3))
def test_truncated_or_corrupt_checkpoint(checkpoint_bytes, cut, flip):
    data = bytearray(checkpoint_bytes[: cut % (len(checkpoint_bytes) + 1)])
    for pos, x in flip:
        if data:
            data[pos % len(data)] ^= x
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "step-000001.safetensors"
        path.write_bytes(bytes(data))
        try:
            tensors = load_tensors(path)
        except InputError as err:
            assert str(path) in str(err) and "\n" not in str(err)
            return
        # Bytes that still parse must then fit the model or be refused by name.
        try:
            check_state_dict(tensors, small_model(), source=str(path))
        except InputError as err:
            assert str(path) in str(err)


def test_checkpoint_of_another_model_or_shape(tmp_path):
    model = small_model()
    other = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.ReLU(), torch.nn.Linear(5, 2))
    with pytest.raises(InputError, match=r"ck: .*'0.weight' has shape \(5, 4\)"):
        check_state_dict(other.state_dict(), model, source="ck")
    with pytest.raises(InputError, match="ck: .*missing key 'model.2.bias'"):
        check_state_dict({f"model.{k}": v for k, v in model.state_dict().items() if k != "2.bias"}, model, "ck", "model.")
    save_checkpoint(tmp_path, 3, model.state_dict(), {"round": 3})
    (tmp_path / "step-000003.json").write_bytes(b"{\"round\": 3,")
    with pytest.raises(InputError, match="step-000003.json: not valid JSON"):
        load_checkpoint(tmp_path, "step-000003")


def payload_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"w": torch.randn(6, 5, generator=g), "b": torch.randn(5, generator=g),
            "n": torch.tensor([3, 4], dtype=torch.int64)}


@fuzz(50)
@given(mode=st.sampled_from(["none", "fp16", "int8", "topk"]), cut=st.integers(0, 4000),
       flip=st.lists(st.tuples(st.integers(0, 4000), st.integers(1, 255)), max_size=3))
def test_payload_bytes(mode, cut, flip):
    tensors = payload_tensors()
    payload = comm.compress(tensors, mode, fraction=0.3 if mode == "topk" else None)
    data = bytearray(comm.encode(payload))
    if cut < len(data):
        data = data[:cut]
    for pos, x in flip:
        if data:
            data[pos % len(data)] ^= x
    try:
        decoded = comm.decode(bytes(data), expected_keys=list(tensors),
                              expected_shapes={k: v.shape for k, v in tensors.items()}, source="edge0/dev1")
    except InputError as err:
        assert str(err).startswith("edge0/dev1: ") and "\n" not in str(err)
        return
    out = decoded.decompress()  # what decode accepts must decompress to the expected structure
    assert {k: tuple(v.shape) for k, v in out.items()} == {k: tuple(v.shape) for k, v in tensors.items()}
    assert all(torch.isfinite(v).all() for v in out.values() if v.is_floating_point())


# --------------------------------------------------------------------------------------------------
# CLI arguments

CLI_TOKENS = ["fleet", "pretrain", "finetune", "adapt", "report", "bench", "--out", "--resume", "--overwrite",
              "--engine", "spark", "local", "--limit", "abc", "--bogus", "no-such.yaml", "no-such-bench",
              "--devices", "1,x", "--quick", "-", "--address"]


@fuzz(40)
@given(args=st.lists(st.sampled_from(CLI_TOKENS), min_size=1, max_size=5))
def test_cli_arguments_exit_2_one_line(args, capsys):
    # No token names a real benchmark, a real config or an existing directory, so nothing runs.
    capsys.readouterr()
    rc = main(args)
    err = capsys.readouterr().err
    if rc == 0:  # e.g. `bench --quick` lists the benchmarks
        return
    assert rc == 2, (args, rc, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, (args, err)


@pytest.mark.parametrize("stage", ["pretrain", "finetune", "adapt"])
def test_cli_stage_without_section(stage, tmp_path, capsys):
    raw = copy.deepcopy(DEMO)
    raw.pop(stage, None)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    assert main([stage, str(cfg), "--out", str(tmp_path / "run")]) == 2
    assert not (tmp_path / "run").exists()  # nothing was started
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"needs a '{stage}' section" in err


def test_cli_bad_config_value(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(set_at(DEMO, ("data", "partition", "alpha"), -2.0)))
    assert main(["fleet", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "data.partition.alpha" in err and str(cfg) in err


@pytest.mark.parametrize("value", [math.inf, math.nan], ids=["inf", "nan"])
def test_cli_fleet_non_finite_mix(tmp_path, capsys, value):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(set_at(DEMO, ("fleet", "edges", 1, "devices", 1, "mix", "phone-low"), value)))
    assert main(["fleet", str(cfg)]) == 2
    assert "mix" in capsys.readouterr().err
