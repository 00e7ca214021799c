"""Payloads: state deltas, compression, exact wire byte counts, safetensors encoding.

Everything that crosses a link in the simulation is a :class:`Payload`: the tensors exactly as sent
(possibly compressed), plus a little metadata (mode, the original dtype and shape of every logical
tensor). ``payload.nbytes`` is the exact length of its safetensors encoding, header included, which
is what the virtual clock charges to the link; it is computed from the safetensors header rules
without copying tensor data, and equals ``len(encode(payload))`` (tested).

Compression modes (``compress(tensors, mode)``), applied to floating tensors only; integer and
bool tensors are always sent as they are:

- ``none``: the tensors in their own dtype.
- ``fp16`` / ``bf16``: cast to float16 / bfloat16.
- ``int8``: per-tensor symmetric absmax quantization, ``scale = max|x| / 127``,
  ``q = round(x / scale)`` in int8, the scale sent as an extra float32 scalar ``<key>::scale``;
  the round trip error is at most ``scale / 2`` per element.
- ``topk``: keep the ``fraction`` of entries of largest magnitude per tensor:
  ``<key>::values`` (the tensor's dtype) and ``<key>::indices`` (int32, into the flattened tensor).

See docs/aggregation.md for the exact formats and byte accounting.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from cloudedge.errors import InputError

MODES = ("none", "fp16", "bf16", "int8", "topk")
FORMAT = "cloudedge.payload.v1"
SEP = "::"  # separates a logical key from the part name of a compressed tensor; never in state keys

# safetensors dtype names, listed in the order of its Rust ``Dtype`` enum (increasing alignment).
# The serializer lays tensors out sorted by this order descending, then by name, which fixes the
# data offsets written in the header and therefore the header's exact length.
_ST_DTYPES: dict[torch.dtype, str] = {
    torch.bool: "BOOL",
    torch.uint8: "U8",
    torch.int8: "I8",
    torch.float8_e5m2: "F8_E5M2",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.int16: "I16",
    torch.uint16: "U16",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int32: "I32",
    torch.uint32: "U32",
    torch.float32: "F32",
    torch.complex64: "C64",
    torch.float64: "F64",
    torch.int64: "I64",
    torch.uint64: "U64",
}
_ST_RANK = {name: rank for rank, name in enumerate(_ST_DTYPES.values())}
_DTYPE_BY_NAME: dict[str, torch.dtype] = {str(dt).removeprefix("torch."): dt for dt in _ST_DTYPES}

Tensors = dict[str, torch.Tensor]


# --------------------------------------------------------------------------------------------------
# Deltas


def delta(new: Mapping[str, torch.Tensor], old: Mapping[str, torch.Tensor]) -> Tensors:
    """``new - old`` per key. Floating tensors give a float32 delta (float64 stays float64), so a
    bf16/fp16 model's small updates are not rounded away; integer/bool tensors give an int64 delta.
    Keys must match exactly."""
    if new.keys() != old.keys():
        missing, extra = sorted(old.keys() - new.keys()), sorted(new.keys() - old.keys())
        raise ValueError(f"delta: key mismatch (missing {missing}, extra {extra})")
    out: Tensors = {}
    for key, new_t in new.items():
        old_t = old[key]
        if new_t.shape != old_t.shape:
            raise ValueError(f"delta: key '{key}': shape {tuple(new_t.shape)} != {tuple(old_t.shape)}")
        work = _work_dtype(new_t.dtype)
        out[key] = new_t.detach().to(work) - old_t.detach().to(work)
    return out


def apply_delta(state: Mapping[str, torch.Tensor], delta: Mapping[str, torch.Tensor],
                scale: float = 1.0) -> Tensors:
    """``state + scale * delta`` per key, returned in each state tensor's dtype (inputs untouched).

    Integer/bool state tensors get the rounded scaled delta. Keys of ``delta`` must be a subset of
    ``state``'s; keys absent from ``delta`` are copied unchanged (e.g. a frozen base model).
    """
    extra = sorted(delta.keys() - state.keys())
    if extra:
        raise ValueError(f"apply_delta: delta has keys not in state: {extra}")
    out: Tensors = {}
    for key, base in state.items():
        if key not in delta:
            out[key] = base.detach().clone()
            continue
        d = delta[key]
        if d.shape != base.shape:
            raise ValueError(f"apply_delta: key '{key}': shape {tuple(d.shape)} != {tuple(base.shape)}")
        work = _work_dtype(base.dtype)
        if work == torch.int64:
            step = d.to(torch.float64) * scale
            out[key] = (base.to(torch.int64) + step.round().to(torch.int64)).to(base.dtype)
        else:
            out[key] = base.detach().to(work).add(d.to(work), alpha=scale).to(base.dtype)
    return out


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    if dtype == torch.float64:
        return torch.float64
    if dtype.is_floating_point:
        return torch.float32
    return torch.int64


# --------------------------------------------------------------------------------------------------
# Flat buffers


@dataclass(frozen=True)
class FlatSpec:
    """How a flat buffer splits back into named tensors (see :func:`flatten`)."""

    keys: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    dtypes: tuple[torch.dtype, ...]
    offsets: tuple[int, ...]  # start of each tensor in the flat buffer; offsets[-1] == total size

    @property
    def numel(self) -> int:
        return self.offsets[-1]


def flatten(tensors: Mapping[str, torch.Tensor], dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, FlatSpec]:
    """Concatenate the tensors (in key order) into one 1-D ``dtype`` buffer, plus its spec."""
    keys = tuple(tensors)
    shapes = tuple(tuple(tensors[k].shape) for k in keys)
    offsets = [0]
    for k in keys:
        offsets.append(offsets[-1] + tensors[k].numel())
    spec = FlatSpec(keys, shapes, tuple(tensors[k].dtype for k in keys), tuple(offsets))
    if not keys:
        return torch.zeros(0, dtype=dtype), spec
    flat = torch.cat([tensors[k].detach().reshape(-1).to(dtype) for k in keys])
    return flat, spec


def unflatten(flat: torch.Tensor, spec: FlatSpec, cast: bool = True) -> Tensors:
    """Split a flat buffer back into named tensors. With ``cast`` (default) each gets its original
    dtype (a copy where the dtype differs); without, they are views of ``flat``."""
    if flat.dim() != 1 or flat.numel() != spec.numel:
        raise ValueError(f"unflatten: buffer of shape {tuple(flat.shape)} does not match spec of {spec.numel} elements")
    out: Tensors = {}
    for i, key in enumerate(spec.keys):
        part = flat[spec.offsets[i]:spec.offsets[i + 1]].view(spec.shapes[i])
        if cast and part.dtype != spec.dtypes[i]:
            part = part.round().to(spec.dtypes[i]) if not spec.dtypes[i].is_floating_point else part.to(spec.dtypes[i])
        out[key] = part
    return out


# --------------------------------------------------------------------------------------------------
# Payloads


@dataclass
class Payload:
    """Tensors as sent over a link, plus what is needed to rebuild the logical tensors.

    ``tensors``: the wire tensors (for ``int8``/``topk`` several per logical key, named
    ``<key>::<part>``). ``dtypes``/``shapes``: original dtype name (``"float32"``) and shape of each
    logical key, in the sender's key order. ``fraction``: the top-k fraction (``topk`` only).
    """

    tensors: Tensors
    mode: str
    dtypes: dict[str, str]
    shapes: dict[str, tuple[int, ...]]
    fraction: float | None = None
    _nbytes: int | None = field(default=None, repr=False, compare=False)

    @property
    def keys(self) -> list[str]:
        """The logical keys (those of the tensors that were compressed)."""
        return list(self.dtypes)

    def metadata(self) -> dict[str, str]:
        """The safetensors ``__metadata__`` (str -> str) that travels with the tensors."""
        meta = {
            "format": FORMAT,
            "mode": self.mode,
            "dtypes": json.dumps(self.dtypes, separators=(",", ":")),
            "shapes": json.dumps({k: list(v) for k, v in self.shapes.items()}, separators=(",", ":")),
        }
        if self.fraction is not None:
            meta["fraction"] = repr(float(self.fraction))
        return meta

    @property
    def raw_nbytes(self) -> int:
        """Bytes of tensor data only (no header)."""
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    @property
    def nbytes(self) -> int:
        """Exact length of ``encode(self)``: 8-byte length prefix + padded JSON header + data."""
        if self._nbytes is None:
            self._nbytes = safetensors_nbytes(self.tensors, self.metadata())
        return self._nbytes

    def decompress(self, dtype: torch.dtype | None = None) -> Tensors:
        """The logical tensors, each in its original dtype (or all floating ones in ``dtype``)."""
        out: Tensors = {}
        for key, dtype_name in self.dtypes.items():
            orig = _DTYPE_BY_NAME[dtype_name]
            shape = self.shapes[key]
            codec = _codec(self.mode, orig)
            if codec == "raw":
                value = self.tensors[key].clone()
            elif codec in ("fp16", "bf16"):
                value = self.tensors[key].to(torch.float32)
            elif codec == "int8":
                scale = self.tensors[key + SEP + "scale"].to(torch.float32)
                value = self.tensors[key].to(torch.float32) * scale
            else:  # topk
                numel = math.prod(shape)
                flat = torch.zeros(numel, dtype=torch.float32)
                flat[self.tensors[key + SEP + "indices"].long()] = self.tensors[key + SEP + "values"].to(torch.float32)
                value = flat.view(shape)
            target = dtype if (dtype is not None and orig.is_floating_point) else orig
            out[key] = value.to(target)
        return out


def _codec(mode: str, orig: torch.dtype) -> str:
    """How one logical tensor is carried: compression applies to floating tensors only."""
    if mode == "none" or not orig.is_floating_point:
        return "raw"
    return mode


def _parts(key: str, codec: str) -> tuple[str, ...]:
    """Wire tensor names that carry one logical key."""
    if codec == "int8":
        return (key, key + SEP + "scale")
    if codec == "topk":
        return (key + SEP + "values", key + SEP + "indices")
    return (key,)


def compress(tensors: Mapping[str, torch.Tensor], mode: str = "none", fraction: float | None = None) -> Payload:
    """Build the payload that sends ``tensors`` in ``mode`` (see the module docstring).

    The payload owns copies of the data (later changes to ``tensors`` do not change what was sent).
    ``fraction`` (0 < f <= 1) is required for ``topk`` and refused otherwise; each tensor keeps
    ``max(1, ceil(fraction * numel))`` entries.
    """
    if mode not in MODES:
        raise ValueError(f"compress: unknown mode '{mode}' (known: {', '.join(MODES)})")
    if mode == "topk":
        if fraction is None or not 0.0 < fraction <= 1.0:
            raise ValueError(f"compress: topk needs 0 < fraction <= 1, got {fraction}")
    elif fraction is not None:
        raise ValueError(f"compress: fraction is only for mode 'topk', not '{mode}'")
    sent: Tensors = {}
    dtypes: dict[str, str] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    for key, tensor in tensors.items():
        if SEP in key:
            raise ValueError(f"compress: key '{key}' contains the reserved separator '{SEP}'")
        if tensor.dtype not in _ST_DTYPES:
            raise ValueError(f"compress: key '{key}': dtype {tensor.dtype} cannot be sent")
        t = tensor.detach().to("cpu")
        dtypes[key] = str(t.dtype).removeprefix("torch.")
        shapes[key] = tuple(t.shape)
        codec = _codec(mode, t.dtype)
        if codec == "raw":
            sent[key] = t.contiguous().clone()
        elif codec == "fp16":
            sent[key] = t.to(torch.float16, copy=True).contiguous()
        elif codec == "bf16":
            sent[key] = t.to(torch.bfloat16, copy=True).contiguous()
        elif codec == "int8":
            q, scale = _quantize_int8(t)
            sent[key], sent[key + SEP + "scale"] = q, scale
        else:
            values, indices = _topk(t, fraction)  # type: ignore[arg-type]
            sent[key + SEP + "values"], sent[key + SEP + "indices"] = values, indices
    return Payload(tensors=sent, mode=mode, dtypes=dtypes, shapes=shapes, fraction=fraction)


def wire_nbytes(tensors: Mapping[str, torch.Tensor], mode: str = "none", fraction: float | None = None) -> int:
    """Exactly ``compress(tensors, mode, fraction).nbytes``, from names, shapes and dtypes alone.

    The tensors may live on the ``meta`` device (no data): this is how the clock prices a message of
    a model it never builds (``clock.charge_as``, docs/profiles.md "Charged costs").
    """
    if mode not in MODES:
        raise ValueError(f"wire_nbytes: unknown mode '{mode}' (known: {', '.join(MODES)})")
    if mode == "topk" and (fraction is None or not 0.0 < fraction <= 1.0):
        raise ValueError(f"wire_nbytes: topk needs 0 < fraction <= 1, got {fraction}")

    def meta(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        return torch.empty(shape, dtype=dtype, device="meta")

    sent: Tensors = {}
    dtypes: dict[str, str] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    for key, tensor in tensors.items():
        shape = tuple(tensor.shape)
        dtypes[key] = str(tensor.dtype).removeprefix("torch.")
        shapes[key] = shape
        codec = _codec(mode, tensor.dtype)
        if codec == "raw":
            sent[key] = meta(shape, tensor.dtype)
        elif codec in ("fp16", "bf16"):
            sent[key] = meta(shape, torch.float16 if codec == "fp16" else torch.bfloat16)
        elif codec == "int8":
            sent[key], sent[key + SEP + "scale"] = meta(shape, torch.int8), meta((), torch.float32)
        else:
            numel = math.prod(shape)
            k = max(1, math.ceil(fraction * numel)) if numel else 0  # type: ignore[operator]
            sent[key + SEP + "values"], sent[key + SEP + "indices"] = meta((k,), tensor.dtype), meta((k,), torch.int32)
    return Payload(tensors=sent, mode=mode, dtypes=dtypes, shapes=shapes,
                   fraction=fraction if mode == "topk" else None).nbytes


def _quantize_int8(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = t.to(torch.float32)
    absmax = x.abs().max() if x.numel() else torch.tensor(0.0)
    # An all-zero tensor gets scale 0 and q = 0; dividing by a stand-in of 1 avoids 0/0.
    scale = (absmax / 127.0).to(torch.float32)
    divisor = scale if float(scale) > 0 else torch.tensor(1.0)
    q = torch.clamp(torch.round(x / divisor), -127, 127).to(torch.int8).contiguous()
    return q, scale.reshape(()).clone()


def _topk(t: torch.Tensor, fraction: float) -> tuple[torch.Tensor, torch.Tensor]:
    flat = t.reshape(-1)
    if flat.numel() >= 2**31:
        raise ValueError("compress: topk indices are int32; tensor too large")
    k = max(1, math.ceil(fraction * flat.numel())) if flat.numel() else 0
    # Sort the kept indices so the wire form does not depend on topk's internal tie order.
    idx = torch.topk(flat.abs().to(torch.float32), k, sorted=False).indices.sort().values
    return flat[idx].contiguous().clone(), idx.to(torch.int32).contiguous()


# --------------------------------------------------------------------------------------------------
# Exact byte count


def _json_str(s: str) -> str:
    # serde_json and Python's json escape the same set (", \, control chars) when not forcing ASCII.
    return json.dumps(s, ensure_ascii=False)


def safetensors_nbytes(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None) -> int:
    """Exact ``len(safetensors.torch.save(tensors, metadata))`` without serializing any data.

    Format: 8-byte little-endian header length, JSON header padded with spaces to a multiple of 8,
    then the tensors' bytes laid out by descending dtype rank then name (which sets the offsets
    written in the header).
    """
    order = sorted(tensors, key=lambda k: (-_ST_RANK[_ST_DTYPES[tensors[k].dtype]], k.encode("utf-8")))
    entries: list[str] = []
    if metadata is not None:
        body = ",".join(f"{_json_str(k)}:{_json_str(v)}" for k, v in metadata.items())
        entries.append(f'"__metadata__":{{{body}}}')
    offset = 0
    for key in order:
        t = tensors[key]
        n = t.numel() * t.element_size()
        shape = ",".join(str(d) for d in t.shape)
        entries.append(f'{_json_str(key)}:{{"dtype":"{_ST_DTYPES[t.dtype]}","shape":[{shape}],'
                       f'"data_offsets":[{offset},{offset + n}]}}')
        offset += n
    header_len = len(("{" + ",".join(entries) + "}").encode("utf-8"))
    return 8 + (header_len + 7) // 8 * 8 + offset


# --------------------------------------------------------------------------------------------------
# Encoding


def encode(payload: Payload) -> bytes:
    """The payload as safetensors bytes (metadata: format, mode, dtypes, shapes[, fraction])."""
    return st_save(payload.tensors, metadata=payload.metadata())


def decode(data: bytes, expected_keys: Iterable[str] | None = None,
           expected_shapes: Mapping[str, Iterable[int]] | None = None, source: str = "payload") -> Payload:
    """Parse and validate bytes from :func:`encode`.

    Raises ``InputError("<source>: ...")`` naming the offending key when the buffer is corrupt or
    truncated, the logical keys differ from ``expected_keys``, a shape differs from
    ``expected_shapes`` (or from the recorded one), indices are out of range, or a value is NaN/inf.
    """
    header = _read_header(data, source)
    meta = header.pop("__metadata__", None)
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise InputError(f"{source}: not a cloudedge payload (missing or wrong '__metadata__.format')")
    mode = meta.get("mode")
    if mode not in MODES:
        raise InputError(f"{source}: unknown compression mode {mode!r} (known: {', '.join(MODES)})")
    try:
        dtypes = json.loads(meta["dtypes"])
        shapes = {k: tuple(int(d) for d in v) for k, v in json.loads(meta["shapes"]).items()}
        fraction = float(meta["fraction"]) if "fraction" in meta else None
    except (KeyError, ValueError, TypeError, AttributeError) as err:
        raise InputError(f"{source}: bad payload metadata ({err})") from None
    if not isinstance(dtypes, dict) or dtypes.keys() != shapes.keys():
        raise InputError(f"{source}: bad payload metadata (dtypes and shapes name different keys)")
    for key, name in dtypes.items():
        if name not in _DTYPE_BY_NAME:
            raise InputError(f"{source}: key '{key}': unknown dtype {name!r}")

    if expected_keys is not None:
        expected = list(expected_keys)
        missing = [k for k in expected if k not in dtypes]
        extra = [k for k in dtypes if k not in set(expected)]
        if missing:
            raise InputError(f"{source}: key '{missing[0]}': missing (missing keys: {missing})")
        if extra:
            raise InputError(f"{source}: key '{extra[0]}': unexpected (unexpected keys: {extra})")
    if expected_shapes is not None:
        for key, shape in expected_shapes.items():
            if key in shapes and shapes[key] != tuple(shape):
                raise InputError(f"{source}: key '{key}': shape {list(shapes[key])} != expected {list(shape)}")

    # The wire tensors must be exactly those the metadata implies, with consistent shapes.
    wanted = {part: key for key, name in dtypes.items() for part in _parts(key, _codec(mode, _DTYPE_BY_NAME[name]))}
    for name in header:
        if name not in wanted:
            raise InputError(f"{source}: key '{name}': unexpected tensor in payload")
    for part, key in wanted.items():
        if part not in header:
            raise InputError(f"{source}: key '{key}': missing tensor '{part}'")

    try:
        tensors = st_load(data)
    except Exception as err:  # safetensors raises its own error types for any malformed buffer
        raise InputError(f"{source}: corrupt payload ({' '.join(str(err).split())})") from None

    payload = Payload(tensors=tensors, mode=mode, dtypes=dtypes, shapes=shapes, fraction=fraction,
                      _nbytes=len(data))
    for key in dtypes:
        _check_key(payload, key, source)
    return payload


def _read_header(data: bytes, source: str) -> dict:
    """Parse the safetensors header and check every tensor's byte range lies inside ``data``."""
    if len(data) < 8:
        raise InputError(f"{source}: corrupt payload (only {len(data)} bytes)")
    (n,) = struct.unpack("<Q", data[:8])
    if 8 + n > len(data):
        raise InputError(f"{source}: corrupt payload (header of {n} bytes does not fit in {len(data)})")
    try:
        header = json.loads(data[8:8 + n].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise InputError(f"{source}: corrupt payload (header is not JSON: {err})") from None
    if not isinstance(header, dict):
        raise InputError(f"{source}: corrupt payload (header is not a JSON object)")
    body = len(data) - 8 - n
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            start, end = (int(x) for x in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise InputError(f"{source}: key '{name}': corrupt tensor entry") from None
        if not 0 <= start <= end <= body:
            raise InputError(f"{source}: key '{name}': data [{start}, {end}) lies outside the "
                             f"{body}-byte buffer (truncated?)")
    return header


def _check_key(p: Payload, key: str, source: str) -> None:
    """Consistency and finiteness of one logical key's wire tensors."""
    orig = _DTYPE_BY_NAME[p.dtypes[key]]
    shape = p.shapes[key]
    codec = _codec(p.mode, orig)
    if codec in ("raw", "fp16", "bf16", "int8"):
        t = p.tensors[key]
        want_dtype = {"raw": orig, "fp16": torch.float16, "bf16": torch.bfloat16, "int8": torch.int8}[codec]
        if t.dtype != want_dtype:
            raise InputError(f"{source}: key '{key}': dtype {t.dtype} != expected {want_dtype}")
        if tuple(t.shape) != shape:
            raise InputError(f"{source}: key '{key}': shape {list(t.shape)} != recorded {list(shape)}")
        values = t
        if codec == "int8":
            scale = p.tensors[key + SEP + "scale"]
            if scale.dtype != torch.float32 or scale.numel() != 1:
                raise InputError(f"{source}: key '{key}': int8 scale must be one float32 value")
            if not bool(torch.isfinite(scale).all()) or float(scale) < 0:
                raise InputError(f"{source}: key '{key}': non-finite or negative int8 scale")
            if bool((t == -128).any()):
                raise InputError(f"{source}: key '{key}': int8 value -128 outside the symmetric range")
    else:  # topk
        values, indices = p.tensors[key + SEP + "values"], p.tensors[key + SEP + "indices"]
        numel = math.prod(shape)
        if indices.dtype != torch.int32 or values.dtype != orig:
            raise InputError(f"{source}: key '{key}': topk values/indices have dtypes {values.dtype}/{indices.dtype}")
        if values.dim() != 1 or indices.shape != values.shape or values.numel() > numel:
            raise InputError(f"{source}: key '{key}': topk values {list(values.shape)} and indices "
                             f"{list(indices.shape)} do not fit a tensor of {numel} elements")
        if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= numel):
            raise InputError(f"{source}: key '{key}': topk index out of range [0, {numel})")
        if indices.numel() != torch.unique(indices).numel():
            raise InputError(f"{source}: key '{key}': repeated topk index")
    if values.dtype.is_floating_point and not bool(torch.isfinite(values).all()):
        raise InputError(f"{source}: key '{key}': non-finite values (NaN or inf)")
