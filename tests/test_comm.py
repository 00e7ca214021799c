"""Payloads: deltas, flat buffers, compression error bounds, exact byte counts, decode validation."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save as st_save

from cloudedge import comm
from cloudedge.errors import InputError


def _state(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "layer.0.weight": torch.randn(16, 8, generator=g),
        "layer.0.bias": torch.randn(16, generator=g),
        "emb": torch.randn(10, 4, generator=g).to(torch.bfloat16),
        "scalar": torch.randn((), generator=g),
        "steps": torch.tensor(7, dtype=torch.int64),
    }


def test_delta_and_apply_delta_round_trip() -> None:
    old, new = _state(0), _state(1)
    d = comm.delta(new, old)
    assert d["layer.0.weight"].dtype == torch.float32 and d["emb"].dtype == torch.float32
    assert d["steps"].dtype == torch.int64 and int(d["steps"]) == 0
    back = comm.apply_delta(old, d)
    for k in old:
        assert back[k].dtype == old[k].dtype
        torch.testing.assert_close(back[k].float(), new[k].float(), rtol=0, atol=1e-6)
    half = comm.apply_delta(old, d, scale=0.5)
    torch.testing.assert_close(half["layer.0.bias"], (old["layer.0.bias"] + new["layer.0.bias"]) / 2)
    # Inputs are untouched and a partial delta leaves other keys as they were.
    partial = comm.apply_delta(old, {"layer.0.bias": d["layer.0.bias"]})
    assert torch.equal(partial["layer.0.weight"], old["layer.0.weight"])
    with pytest.raises(ValueError, match="missing"):
        comm.delta({"a": torch.zeros(1)}, {"a": torch.zeros(1), "b": torch.zeros(1)})


def test_flatten_unflatten_round_trip() -> None:
    state = _state(2)
    flat, spec = comm.flatten(state)
    assert flat.dim() == 1 and flat.numel() == sum(t.numel() for t in state.values()) == spec.numel
    assert flat.dtype == torch.float32
    # The layout is the key order, each tensor flattened row-major.
    np.testing.assert_array_equal(flat[: 128].numpy(), state["layer.0.weight"].reshape(-1).numpy())
    back = comm.unflatten(flat, spec)
    assert list(back) == list(state)
    for k in state:
        assert back[k].dtype == state[k].dtype and torch.equal(back[k], state[k])
    views = comm.unflatten(flat, spec, cast=False)
    views["layer.0.bias"].zero_()  # views write through to the flat buffer
    assert float(flat[128:144].abs().sum()) == 0.0
    with pytest.raises(ValueError):
        comm.unflatten(flat[:-1], spec)


@pytest.mark.parametrize("mode", comm.MODES)
def test_nbytes_equals_encoded_length(mode: str) -> None:
    payload = comm.compress(_state(3), mode, fraction=0.25 if mode == "topk" else None)
    blob = comm.encode(payload)
    assert payload.nbytes == len(blob)
    assert payload.raw_nbytes == sum(t.numel() * t.element_size() for t in payload.tensors.values())
    assert payload.nbytes > payload.raw_nbytes
    decoded = comm.decode(blob, expected_keys=list(_state()))
    assert decoded.nbytes == len(blob) and decoded.mode == mode
    assert decoded.keys == list(_state())


def test_raw_bytes_shrink_with_compression() -> None:
    state = {"w": torch.randn(64, 64, generator=torch.Generator().manual_seed(0))}
    raw = {m: comm.compress(state, m, fraction=0.1 if m == "topk" else None).raw_nbytes for m in comm.MODES}
    assert raw["none"] == 64 * 64 * 4
    assert raw["fp16"] == raw["bf16"] == 64 * 64 * 2
    assert raw["int8"] == 64 * 64 + 4
    assert raw["topk"] == 410 * (4 + 4)  # ceil(0.1 * 4096) values + int32 indices


_names = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), min_size=0, max_size=12)
_dtypes = st.sampled_from([torch.float32, torch.float16, torch.bfloat16, torch.int8, torch.int64,
                           torch.bool, torch.float64, torch.uint8, torch.int32])


@settings(max_examples=60, deadline=None)
@given(specs=st.dictionaries(_names, st.tuples(_dtypes, st.lists(st.integers(0, 30), max_size=3)), max_size=6),
       meta=st.dictionaries(_names, _names, max_size=3))
def test_safetensors_nbytes_matches_library(specs: dict, meta: dict) -> None:
    # Arbitrary names (quotes, backslashes, control chars, non-ASCII), dtypes and shapes, so the
    # ordering and JSON escaping rules of the header are exercised against the real serializer.
    tensors = {name: torch.zeros(shape, dtype=dtype) for name, (dtype, shape) in specs.items()}
    assert comm.safetensors_nbytes(tensors, meta) == len(st_save(tensors, metadata=meta))


def test_safetensors_nbytes_follows_layout_order() -> None:
    # Offsets in the header depend on the layout order (dtype rank descending, then name); these
    # cases give a different header length under any other order.
    by_dtype = {"a": torch.zeros(5, dtype=torch.int8), "b": torch.zeros(100, dtype=torch.float32)}
    by_name = {"b": torch.zeros(100), "a": torch.zeros(1)}
    for tensors in (by_dtype, by_name):
        assert comm.safetensors_nbytes(tensors, {"k": "v"}) == len(st_save(tensors, metadata={"k": "v"}))


def test_lossless_modes_round_trip_exactly() -> None:
    state = _state(4)
    out = comm.decode(comm.encode(comm.compress(state, "none"))).decompress()
    for k in state:
        assert out[k].dtype == state[k].dtype and torch.equal(out[k], state[k])
    # Integer tensors are never compressed.
    for mode in ("fp16", "int8", "topk"):
        p = comm.compress(state, mode, fraction=0.5 if mode == "topk" else None)
        assert torch.equal(p.decompress()["steps"], state["steps"])


def test_fp16_bf16_error_bounds() -> None:
    x = torch.randn(1000, generator=torch.Generator().manual_seed(5))
    for mode, eps in (("fp16", 2.0**-11), ("bf16", 2.0**-8)):
        y = comm.decode(comm.encode(comm.compress({"x": x}, mode))).decompress()["x"]
        assert y.dtype == torch.float32
        # Round to nearest: relative error at most half an ulp (unit roundoff).
        assert bool(((y - x).abs() <= x.abs() * eps + 1e-12).all())


def test_int8_error_at_most_half_scale() -> None:
    g = torch.Generator().manual_seed(6)
    state = {"a": torch.randn(50, 20, generator=g) * 3, "b": torch.rand(7, generator=g) - 2.0, "z": torch.zeros(4)}
    p = comm.compress(state, "int8")
    back = comm.decode(comm.encode(p)).decompress()
    for k, x in state.items():
        scale = float(p.tensors[k + "::scale"])
        assert scale == pytest.approx(float(x.abs().max()) / 127.0, rel=1e-6)
        assert p.tensors[k].dtype == torch.int8
        assert float((back[k] - x).abs().max()) <= scale / 2 + 1e-7
    assert torch.equal(back["z"], state["z"])  # all-zero tensor: scale 0, exact


def test_topk_keeps_largest_entries() -> None:
    x = torch.tensor([[0.1, -5.0, 0.2], [3.0, 0.0, -0.3]])
    p = comm.compress({"x": x}, "topk", fraction=0.34)  # ceil(0.34 * 6) = 3 entries
    assert p.tensors["x::indices"].dtype == torch.int32
    assert sorted(p.tensors["x::indices"].tolist()) == [1, 3, 5]
    y = comm.decode(comm.encode(p)).decompress()["x"]
    assert torch.equal(y, torch.tensor([[0.0, -5.0, 0.0], [3.0, 0.0, -0.3]]))
    assert comm.decode(comm.encode(p)).fraction == pytest.approx(0.34)
    with pytest.raises(ValueError):
        comm.compress({"x": x}, "topk")


def test_payload_owns_its_data() -> None:
    state = {"w": torch.ones(3)}
    p = comm.compress(state, "none")
    state["w"].add_(1.0)
    assert torch.equal(p.decompress()["w"], torch.ones(3))


def test_decompress_dtype_override() -> None:
    state = _state(7)
    out = comm.compress(state, "fp16").decompress(dtype=torch.float64)
    assert out["emb"].dtype == torch.float64 and out["steps"].dtype == torch.int64


# ---- decode errors --------------------------------------------------------------------------------


def _blob(state: dict[str, torch.Tensor] | None = None, mode: str = "none") -> bytes:
    return comm.encode(comm.compress(state if state is not None else _state(8), mode))


def test_decode_truncated_names_key() -> None:
    blob = _blob()
    # Cut inside the data section: the error names a tensor whose bytes are missing.
    with pytest.raises(InputError, match=r"payload: key '.*': data .* outside"):
        comm.decode(blob[:-3])
    with pytest.raises(InputError, match="payload: corrupt"):
        comm.decode(blob[:20])
    with pytest.raises(InputError, match="payload: corrupt"):
        comm.decode(b"")


def test_decode_garbage_and_foreign_files() -> None:
    with pytest.raises(InputError, match="corrupt"):
        comm.decode(struct.pack("<Q", 4) + b"{{{{")
    foreign = st_save({"w": torch.zeros(2)})
    with pytest.raises(InputError, match="not a cloudedge payload"):
        comm.decode(foreign)


def test_decode_wrong_keys_names_key() -> None:
    blob = _blob()
    expected = [*list(_state()), "new.key"]
    with pytest.raises(InputError, match="key 'new.key': missing"):
        comm.decode(blob, expected_keys=expected)
    with pytest.raises(InputError, match="key 'steps': unexpected"):
        comm.decode(blob, expected_keys=[k for k in _state() if k != "steps"])


def test_decode_wrong_shape_names_key() -> None:
    blob = _blob()
    with pytest.raises(InputError, match=r"key 'layer.0.bias': shape \[16\] != expected \[17\]"):
        comm.decode(blob, expected_shapes={"layer.0.bias": (17,)})


@pytest.mark.parametrize("mode", ["none", "fp16", "bf16"])
def test_decode_nan_names_key(mode: str) -> None:
    state = _state(9)
    state["layer.0.bias"][3] = float("nan")
    with pytest.raises(InputError, match="payload: key 'layer.0.bias': non-finite"):
        comm.decode(_blob(state, mode))
    state = _state(9)
    state["scalar"] = torch.tensor(float("inf"))
    with pytest.raises(InputError, match="key 'scalar': non-finite"):
        comm.decode(_blob(state, mode), source="edge0/dev1 update")


def test_decode_tampered_header_names_key() -> None:
    # A sender that lies about a shape in the metadata is caught against the tensor itself.
    blob = _blob({"w": torch.zeros(2, 3)})
    (n,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8:8 + n])
    header["__metadata__"]["shapes"] = json.dumps({"w": [3, 2]})
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    forged = struct.pack("<Q", len(text)) + text + blob[8 + n:]
    with pytest.raises(InputError, match=r"key 'w': shape \[2, 3\] != recorded \[3, 2\]"):
        comm.decode(forged)


def test_decode_topk_index_out_of_range() -> None:
    p = comm.compress({"w": torch.arange(10.0)}, "topk", fraction=0.2)
    p.tensors["w::indices"] = torch.tensor([1, 10], dtype=torch.int32)
    with pytest.raises(InputError, match="key 'w': topk index out of range"):
        comm.decode(comm.encode(p))
