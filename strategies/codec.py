"""Sparse wire format: masks and the values under them <-> versioned, CRC-checked bytes.

Layout (all integers little-endian; "varint" = unsigned LEB128)::

    header (18 bytes)
      magic      4  b"LFD1"
      version    1  FORMAT_VERSION
      flags      1  bit0: the mask was sent (send_mask=True)
      count      4  u32 number of tensors
      body_len   4  u32 bytes of body that follow the header
      crc32      4  u32 zlib.crc32 of header[4:14] + body (version .. body_len, and body)
    body: `count` tensor records, each
      name       varint length + utf-8 bytes
      ndim       1  then `ndim` varint dims
      value code 1  0 fp32 | 1 fp16 | 2 int8 (+ fp32 scale) | 16.. raw exact dtype (non-fp32)
      mask code  1  0 none (dense) | 1 same as previous mask | 2 bit-packed | 3 varint deltas
                    | 4 all ones | 5 Rice-coded gaps
      mask data  per mask code (see `strategies.codec_masks.read_mask`)
      values     the entries under the mask in row-major order, in the value code's dtype

The mask encoding is chosen per tensor as the smallest of bit-packed (ceil(n/8) bytes,
optimal near density 0.5), varint index deltas (good for clustered masks) and Rice-coded
gaps (Golomb 1966 / Rice 1979: within a few percent of the binary entropy n*H(d) for
i.i.d. random masks at any density), so mask bytes track the information bound.

Values under the mask are fp32 (exact), fp16 or int8 with one symmetric per-tensor fp32
scale s = max|v| / 127 (error <= s/2 per entry). Tensors that are not float32 (e.g.
BatchNorm's int64 ``num_batches_tracked``) are always written raw and exact.

Decoding is for hostile bytes. Given the receiver's `expected_spec` (the server passes its
global model's), the header's tensor count, then each record's name, shape, value dtype
and mask kind are checked against it BEFORE the tensor is allocated, so a payload can
only ever produce the model's own tensors. Every length is checked against the bytes
present before reading; decoding allocates the outputs (values, masks: about 1.25x the
model's fp32 size) plus O(chunk) transients, all in numpy (so tracemalloc sees it), and
takes time linear in payload and model size. Every malformed input raises `CodecError`.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
from flwr.app import Array, ArrayRecord
from flwr.common.constant import SType

from strategies.codec_masks import (
    MASK_ALL,
    MASK_BITPACK,
    MASK_DELTA,
    MASK_ENCODING_NAMES,
    MASK_NONE,
    MASK_RICE,
    MASK_SAME,
    CodecError,
    Reader,
    choose_mask_encoding,
    mask_encoding_sizes,
    read_mask,
    varint,
    write_mask,
)
from strategies.codec_npy import npy_u8_body, u8_array

__all__ = [
    "MASK_ALL",
    "MASK_BITPACK",
    "MASK_DELTA",
    "MASK_ENCODING_NAMES",
    "MASK_NONE",
    "MASK_RICE",
    "MASK_SAME",
    "CodecError",
    "TensorSpec",
    "choose_mask_encoding",
    "decode",
    "decode_with",
    "encode",
    "expected_spec",
    "from_arrayrecord",
    "mask_encoding_sizes",
    "max_payload_bytes",
    "payload_array",
    "payload_flags",
    "to_arrayrecord",
]

Mask = dict[str, torch.Tensor]  # same alias as strategies.sparse.masks.Mask

MAGIC = b"LFD1"
FORMAT_VERSION = 1
PAYLOAD_KEY = "leanfed.payload"
VALUE_DTYPES = ("fp32", "fp16", "int8")
# Without an expected spec, a decoder refuses payloads declaring more entries than this in
# total (a forged shape must not OOM us). With one, shapes must match the spec exactly.
MAX_NUMEL = 1 << 26

_HEADER = struct.Struct("<4sBBIII")  # magic, version, flags, count, body_len, crc32
_FLAG_MASK_SENT = 1
_MIN_RECORD = 4  # bytes of the smallest tensor record: name length, ndim, two codes

_VAL_FP32, _VAL_FP16, _VAL_INT8 = 0, 1, 2
_RAW_CODES: dict[torch.dtype, int] = {
    torch.float64: 16,
    torch.float16: 17,
    torch.bfloat16: 18,
    torch.int64: 19,
    torch.int32: 20,
    torch.int16: 21,
    torch.int8: 22,
    torch.uint8: 23,
    torch.bool: 24,
}
_RAW_DTYPES = {code: dtype for dtype, code in _RAW_CODES.items()}
_VALUE_CODE = {"fp32": _VAL_FP32, "fp16": _VAL_FP16, "int8": _VAL_INT8}


@dataclass(frozen=True)
class TensorSpec:
    """What one tensor of an acceptable payload must be: shape, dtype, masked or dense."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    # True: a sparsified key, must carry a mask; False: must be sent dense; None: either
    masked: bool | None

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


def expected_spec(
    state: Mapping[str, torch.Tensor], mask: Mapping[str, object] | None
) -> dict[str, TensorSpec]:
    """The spec of payloads carrying `state`'s tensors, masked exactly on `mask`'s keys
    (`mask` None: any tensor may come masked or dense, e.g. a client before its first mask)."""
    return {
        k: TensorSpec(tuple(int(s) for s in v.shape), v.dtype, None if mask is None else k in mask)
        for k, v in state.items()
    }


def max_payload_bytes(spec: Mapping[str, TensorSpec]) -> int:
    """An upper bound on the size of any payload `decode` accepts for `spec` (see layout).

    Per tensor: name and dims varints, two codes, the largest mask (a delta stream is at
    most numel + 10 bytes), and the values (raw itemsize, or fp32 plus an int8 scale).
    """
    total = _HEADER.size
    for name, t in spec.items():
        item = t.dtype.itemsize if t.dtype != torch.float32 else 4
        total += 10 + len(name.encode("utf-8")) + 1 + 10 * len(t.shape) + 2
        total += (0 if t.masked is False else t.numel + 20) + 4 + item * t.numel
    return total


# --------------------------------------------------------------------------- values
def _write_values(flat: torch.Tensor, value_dtype: str, name: str) -> tuple[int, bytes]:
    """(value code, bytes) for a 1-D tensor of the entries to send."""
    if flat.dtype != torch.float32:
        code = _RAW_CODES.get(flat.dtype)
        if code is None:
            raise CodecError(f"tensor {name!r}: unsupported dtype {flat.dtype}")
        arr = flat.contiguous().view(torch.int16) if flat.dtype == torch.bfloat16 else flat
        np_arr = arr.cpu().numpy()
        return code, np_arr.astype(np_arr.dtype.newbyteorder("<")).tobytes()
    arr32 = flat.cpu().numpy().astype("<f4")
    if value_dtype == "fp32":
        return _VAL_FP32, arr32.tobytes()
    if value_dtype == "fp16":
        finite = arr32[np.isfinite(arr32)]
        if finite.size and np.abs(finite).max() > np.finfo(np.float16).max:
            raise CodecError(f"tensor {name!r}: values exceed the fp16 range (max 65504)")
        return _VAL_FP16, arr32.astype("<f2").tobytes()
    if value_dtype == "int8":
        if not np.isfinite(arr32).all():
            raise CodecError(f"tensor {name!r}: int8 quantisation needs finite values")
        amax = float(np.abs(arr32).max(initial=0.0))
        scale = np.float32(amax / 127.0)
        q = (
            np.zeros_like(arr32, dtype=np.int8)
            if scale == 0
            else np.clip(np.rint(arr32 / scale), -127, 127).astype(np.int8)
        )
        return _VAL_INT8, struct.pack("<f", scale) + q.tobytes()
    raise CodecError(f"value_dtype must be one of {VALUE_DTYPES}, got {value_dtype!r}")


_MAX_INT8_SCALE = float(np.finfo(np.float32).max) / 128.0
_LOSSY_WIRE: dict[int, np.dtype] = {
    _VAL_FP32: np.dtype("<f4"),
    _VAL_FP16: np.dtype("<f2"),
    _VAL_INT8: np.dtype(np.int8),
}


def _np_dtype(dtype: torch.dtype) -> np.dtype:
    """Little-endian numpy dtype of the raw wire form (bfloat16 travels as its int16 bits)."""
    if dtype == torch.bfloat16:
        return np.dtype("<i2")
    return torch.empty(0, dtype=dtype).numpy().dtype.newbyteorder("<")


def _read_values(
    r: Reader, code: int, mask: np.ndarray | None, numel: int, name: str
) -> np.ndarray:
    """The tensor's flat values [numel] in its own dtype, zeros off `mask` (None = dense).

    Only the output is allocated: fp32 entries are copied straight from the payload into
    it, fp16/int8 are cast on assignment (numpy's buffered casting), int8 scaled in place.
    """
    what = f"values of {name!r}"
    count = numel if mask is None else int(np.count_nonzero(mask))
    if code in (_VAL_FP32, _VAL_FP16, _VAL_INT8):
        scale = None
        if code == _VAL_INT8:
            (scale,) = struct.unpack("<f", r.take(4, f"int8 scale of {name!r}"))
            # scale * 127 must stay finite in fp32 (the largest value the tensor can hold)
            if not np.isfinite(scale) or not 0 <= scale <= _MAX_INT8_SCALE:
                raise CodecError(f"tensor {name!r}: invalid int8 scale {scale}")
        wire = _LOSSY_WIRE[code]
        native = np.dtype(np.float32)
    else:
        dtype = _RAW_DTYPES.get(code)
        if dtype is None:
            raise CodecError(f"tensor {name!r}: unknown value dtype code {code}")
        wire = _np_dtype(dtype)
        native = wire.newbyteorder("=")
        scale = None
    src = np.frombuffer(r.take(wire.itemsize * count, what), dtype=wire)  # checked, no copy
    out = np.zeros(numel, dtype=native)
    if mask is None:
        out[:] = src
    else:
        out[mask] = src
    if scale is not None:
        out *= np.float32(scale)
    return out


def _to_torch(flat: np.ndarray, code: int, shape: tuple[int, ...]) -> torch.Tensor:
    t = torch.from_numpy(flat)
    if _RAW_DTYPES.get(code) == torch.bfloat16:
        t = t.view(torch.bfloat16)
    return t.reshape(shape)


# --------------------------------------------------------------------------- payload
def encode(
    values: dict[str, torch.Tensor],
    mask: Mask | None,
    *,
    value_dtype: str = "fp32",
    send_mask: bool = True,
) -> bytes:
    """Encode full-shape `values`; entries off `mask` are dropped, unmasked tensors go dense.

    ``send_mask=False`` writes "same as previous mask" for every masked tensor: the
    receiver must decode with the mask it already holds (`decode_with`).
    """
    if value_dtype not in VALUE_DTYPES:
        raise CodecError(f"value_dtype must be one of {VALUE_DTYPES}, got {value_dtype!r}")
    mask = mask or {}
    unknown = sorted(set(mask) - set(values))
    if unknown:
        raise CodecError(f"mask has keys with no value tensor: {unknown}")
    body = bytearray()
    for name, tensor in values.items():
        if not isinstance(tensor, torch.Tensor):
            raise CodecError(f"value {name!r} is not a torch.Tensor")
        shape = tuple(int(s) for s in tensor.shape)
        if len(shape) > 255:
            raise CodecError(f"tensor {name!r} has {len(shape)} dims (max 255)")
        raw_name = name.encode("utf-8")
        body += varint(len(raw_name)) + raw_name + bytes([len(shape)])
        for s in shape:
            body += varint(s)
        flat = tensor.detach().reshape(-1)
        m = mask.get(name)
        if m is None:
            code, data = _write_values(flat, value_dtype, name)
            body += bytes([code, MASK_NONE]) + data
            continue
        if tuple(m.shape) != shape:
            raise CodecError(f"mask for {name!r} has shape {tuple(m.shape)}, value has {shape}")
        # "Same mask as before" needs only the indices, not every encoding's size.
        mask_bytes, idx = write_mask(m, name, same=not send_mask)
        code, data = _write_values(flat[torch.from_numpy(idx)], value_dtype, name)
        body += bytes([code]) + mask_bytes + data
    flags = _FLAG_MASK_SENT if send_mask else 0
    head = struct.pack("<BBII", FORMAT_VERSION, flags, len(values), len(body))
    crc = zlib.crc32(head + body) & 0xFFFFFFFF
    return _HEADER.pack(MAGIC, FORMAT_VERSION, flags, len(values), len(body), crc) + bytes(body)


def _check_header(
    payload: object, expected: Mapping[str, TensorSpec] | None
) -> tuple[memoryview, int]:
    """(body, tensor count) after checking magic, version, length, CRC and count."""
    if not isinstance(payload, bytes | bytearray | memoryview):
        raise CodecError(f"payload must be bytes, got {type(payload).__name__}")
    view = memoryview(payload).cast("B")
    if len(view) < _HEADER.size:
        raise CodecError(f"truncated payload: {len(view)} bytes, header needs {_HEADER.size}")
    magic, version, _, count, body_len, crc = _HEADER.unpack_from(view)
    if magic != MAGIC:
        raise CodecError(f"bad magic {magic!r}: not a leanfed payload (expected {MAGIC!r})")
    if version != FORMAT_VERSION:
        raise CodecError(
            f"unsupported payload version {version} (this decoder reads {FORMAT_VERSION})"
        )
    body = view[_HEADER.size :]
    if len(body) != body_len:
        raise CodecError(f"payload body is {len(body)} bytes, header says {body_len} (truncated?)")
    if expected is not None and count != len(expected):
        raise CodecError(f"payload holds {count} tensors, the model has {len(expected)}")
    if count * _MIN_RECORD > body_len:
        raise CodecError(f"payload declares {count} tensors in only {body_len} body bytes")
    if zlib.crc32(body, zlib.crc32(view[4:14])) & 0xFFFFFFFF != crc:
        raise CodecError("CRC32 mismatch: payload is corrupt")
    return body, count


def _check_record(
    name: str, shape: tuple[int, ...], vcode: int, mcode: int, spec: TensorSpec
) -> None:
    """Refuse a tensor record that does not match the expected spec (before allocating)."""
    if shape != spec.shape:
        raise CodecError(f"tensor {name!r}: shape {shape}, expected {spec.shape}")
    if spec.dtype == torch.float32:
        if vcode not in (_VAL_FP32, _VAL_FP16, _VAL_INT8):
            raise CodecError(f"tensor {name!r}: value code {vcode}, expected an fp32 encoding")
    elif vcode != _RAW_CODES.get(spec.dtype):
        raise CodecError(f"tensor {name!r}: value code {vcode}, expected raw {spec.dtype}")
    if spec.masked is True and mcode == MASK_NONE:
        raise CodecError(f"tensor {name!r} is sparsified but was sent without a mask")
    if spec.masked is False and mcode != MASK_NONE:
        raise CodecError(f"tensor {name!r} is dense but was sent with mask code {mcode}")


def _read_shape(
    r: Reader, name: str, ndim: int, budget: int, want: tuple[int, ...] | None
) -> tuple[tuple[int, ...], int]:
    """(shape, numel); refuses a dim other than `want`'s, or a product above `budget`, as
    soon as it is read."""
    shape: list[int] = []
    numel = 1  # product of the dims, zeros counted as 1 (no stride may overflow either)
    for i in range(ndim):
        s = r.varint(f"shape of {name!r}")
        if want is not None and s != want[i]:
            raise CodecError(f"tensor {name!r}: dim {i} is {s}, expected shape {want}")
        shape.append(s)
        numel *= max(s, 1)
        if numel > budget:
            raise CodecError(f"tensor {name!r}: shape exceeds {budget} entries")
    return tuple(shape), (0 if 0 in shape else numel)


def _decode(
    payload: bytes,
    previous_mask: Mask | None,
    expected: Mapping[str, TensorSpec] | None,
) -> tuple[dict[str, torch.Tensor], Mask]:
    body, count = _check_header(payload, expected)
    r = Reader(body)
    values: dict[str, torch.Tensor] = {}
    mask: Mask = {}
    budget = MAX_NUMEL  # entries left to allocate without a spec
    for _ in range(count):
        name_len = r.varint("tensor name length")
        try:
            name = bytes(r.take(name_len, "tensor name")).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise CodecError("tensor name is not valid utf-8") from exc
        spec = None if expected is None else expected.get(name)
        if expected is not None and spec is None:  # never echo a name the model lacks
            raise CodecError(f"tensor record {len(values)}: name not in the model")
        if name in values:
            raise CodecError(f"duplicate tensor name {name!r}")
        ndim = r.u8(f"ndim of {name!r}")
        if spec is not None and ndim != len(spec.shape):
            raise CodecError(f"tensor {name!r}: {ndim} dims, expected {len(spec.shape)}")
        if spec is None:
            shape, numel = _read_shape(r, name, ndim, budget, None)
        else:
            shape, numel = _read_shape(r, name, ndim, spec.numel, spec.shape)
        vcode = r.u8(f"value dtype of {name!r}")
        mcode = r.u8(f"mask encoding of {name!r}")
        if spec is not None:
            _check_record(name, shape, vcode, mcode, spec)
        else:
            budget -= numel
        prev = None if previous_mask is None else previous_mask.get(name)
        m = read_mask(r, mcode, numel, name, prev, shape)
        values[name] = _to_torch(_read_values(r, vcode, m, numel, name), vcode, shape)
        if m is not None:
            mask[name] = torch.from_numpy(m).reshape(shape)
    if r.pos != len(body):
        raise CodecError(f"{len(body) - r.pos} trailing bytes after {count} tensors")
    return values, mask


def decode(
    payload: bytes, expected: Mapping[str, TensorSpec] | None = None
) -> tuple[dict[str, torch.Tensor], Mask | None]:
    """Decode a payload that carries its own mask: (full-shape values, mask or None if dense).

    `expected` (see `expected_spec`): refuse anything but exactly these tensors.
    """
    values, mask = _decode(payload, None, expected)
    return values, (mask or None)


def decode_with(
    payload: bytes,
    previous_mask: Mask | None,
    expected: Mapping[str, TensorSpec] | None = None,
) -> tuple[dict[str, torch.Tensor], Mask]:
    """Decode; tensors sent as "same mask as before" take their mask from `previous_mask`."""
    return _decode(payload, previous_mask, expected)


def payload_flags(payload: bytes) -> dict[str, bool]:
    """Header flags of a payload (after checking magic and version only)."""
    if len(payload) < _HEADER.size or payload[:4] != MAGIC:
        raise CodecError("not a leanfed payload")
    return {"mask_sent": bool(payload[5] & _FLAG_MASK_SENT)}


def to_arrayrecord(payload: bytes) -> ArrayRecord:
    """Wrap a payload as a Flower ArrayRecord: key PAYLOAD_KEY, one 1-D uint8 Array."""
    return ArrayRecord({PAYLOAD_KEY: u8_array(bytes(payload))})


def payload_array(rec: ArrayRecord, max_bytes: int | None = None) -> Array:
    """The one Array of a payload ArrayRecord, its size checked before anything is read."""
    if PAYLOAD_KEY not in rec:
        raise CodecError(f"ArrayRecord has no {PAYLOAD_KEY!r} entry (keys: {sorted(rec)})")
    if len(rec) != 1:
        raise CodecError(f"ArrayRecord must hold only {PAYLOAD_KEY!r}, got keys {sorted(rec)}")
    array = rec[PAYLOAD_KEY]
    if max_bytes is not None and len(array.data) > max_bytes + 1024:  # + .npy header
        raise CodecError(f"payload Array is {len(array.data)} bytes, at most {max_bytes} expected")
    return array


def from_arrayrecord(rec: ArrayRecord, max_bytes: int | None = None) -> bytes:
    """The payload bytes inside an ArrayRecord made by `to_arrayrecord`.

    `max_bytes` (e.g. `max_payload_bytes(spec)`): refuse a larger Array before reading it.
    """
    array = payload_array(rec, max_bytes)
    if array.stype == SType.NUMPY and isinstance(array.data, bytes):
        body = npy_u8_body(array.data)  # np.save's exact framing: no header parse
        if body is not None:
            return bytes(body)
    try:
        arr = array.numpy()
    except Exception as exc:  # a forged Array can fail to deserialize in many ways
        raise CodecError(f"payload Array could not be read: {exc}") from exc
    if arr.dtype != np.uint8 or arr.ndim != 1:
        raise CodecError(f"payload Array must be 1-D uint8, got {arr.dtype} {arr.shape}")
    return arr.tobytes()
