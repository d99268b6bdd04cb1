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
      mask data  per mask code (see `_read_mask`)
      values     the entries under the mask in row-major order, in the value code's dtype

The mask encoding is chosen per tensor as the smallest of bit-packed (ceil(n/8) bytes,
optimal near density 0.5), varint index deltas (good for clustered masks) and Rice-coded
gaps (Golomb 1966 / Rice 1979: within a few percent of the binary entropy n*H(d) for
i.i.d. random masks at any density), so mask bytes track the information bound.

Values under the mask are fp32 (exact), fp16 or int8 with one symmetric per-tensor fp32
scale s = max|v| / 127 (error <= s/2 per entry). Tensors that are not float32 (e.g.
BatchNorm's int64 ``num_batches_tracked``) are always written raw and exact.
"""

from __future__ import annotations

import struct
import zlib

import numpy as np
import torch
from flwr.app import Array, ArrayRecord

Mask = dict[str, torch.Tensor]  # same alias as strategies.sparse.masks.Mask

MAGIC = b"LFD1"
FORMAT_VERSION = 1
PAYLOAD_KEY = "leanfed.payload"
VALUE_DTYPES = ("fp32", "fp16", "int8")
# A decoder refuses to allocate tensors larger than this (a forged shape must not OOM us).
MAX_NUMEL = 1 << 30

_HEADER = struct.Struct("<4sBBIII")  # magic, version, flags, count, body_len, crc32
_FLAG_MASK_SENT = 1

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

MASK_NONE, MASK_SAME, MASK_BITPACK, MASK_DELTA, MASK_ALL, MASK_RICE = 0, 1, 2, 3, 4, 5
MASK_ENCODING_NAMES = {
    MASK_NONE: "none",
    MASK_SAME: "same",
    MASK_BITPACK: "bitpack",
    MASK_DELTA: "delta",
    MASK_ALL: "all",
    MASK_RICE: "rice",
}
_MAX_RICE_K = 30


class CodecError(ValueError):
    """A payload could not be encoded, or decoded bytes are truncated, corrupt or invalid."""


# --------------------------------------------------------------------------- varints
def _varint(n: int) -> bytes:
    if n < 0:
        raise CodecError(f"cannot varint-encode negative {n}")
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _varints(values: np.ndarray) -> bytes:
    """Vectorised LEB128 of a 1-D array of non-negative ints."""
    v = values.astype(np.uint64)
    nbytes = np.ones(len(v), dtype=np.int64)
    for k in range(1, 10):
        nbytes += (v >= np.uint64(1) << np.uint64(7 * k)).astype(np.int64)
    out = np.zeros(int(nbytes.sum()), dtype=np.uint8)
    starts = np.concatenate(([0], np.cumsum(nbytes)[:-1]))
    for k in range(int(nbytes.max(initial=0))):
        sel = nbytes > k
        chunk = ((v[sel] >> np.uint64(7 * k)) & np.uint64(0x7F)).astype(np.uint8)
        cont = (nbytes[sel] > k + 1).astype(np.uint8) << 7
        out[starts[sel] + k] = chunk | cont
    return out.tobytes()


class _Reader:
    """Bounds-checked cursor over the body; every read names what it was reading."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def take(self, n: int, what: str) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise CodecError(
                f"truncated payload: {what} needs {n} bytes at offset {self.pos}, "
                f"only {len(self.data) - self.pos} left"
            )
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def u8(self, what: str) -> int:
        return self.take(1, what)[0]

    def varint(self, what: str) -> int:
        shift, n = 0, 0
        while True:
            if shift > 63:
                raise CodecError(f"varint for {what} is longer than 64 bits")
            b = self.u8(what)
            n |= (b & 0x7F) << shift
            shift += 7
            if not b & 0x80:
                return n

    def varints(self, count: int, what: str) -> np.ndarray:
        """Decode `count` varints at once (vectorised)."""
        if count == 0:
            return np.zeros(0, dtype=np.int64)
        rest = np.frombuffer(self.data, dtype=np.uint8, offset=self.pos)
        ends = np.flatnonzero(rest < 0x80)  # the last byte of each varint
        if len(ends) < count:
            raise CodecError(f"truncated payload: {what} needs {count} varints")
        ends = ends[:count]
        starts = np.concatenate(([0], ends[:-1] + 1))
        lengths = ends - starts + 1
        if lengths.max() > 9:
            raise CodecError(f"varint in {what} is longer than 63 bits")
        out = np.zeros(count, dtype=np.int64)
        for k in range(int(lengths.max())):
            sel = lengths > k
            out[sel] |= (rest[starts[sel] + k].astype(np.int64) & 0x7F) << (7 * k)
        self.pos += int(ends[-1]) + 1
        return out


# --------------------------------------------------------------------------- masks
def _indices(m: torch.Tensor) -> np.ndarray:
    return np.flatnonzero(m.detach().reshape(-1).cpu().numpy())


def _rice_sizes(gaps: np.ndarray) -> tuple[int, int]:
    """Best Rice parameter k and the code length in bits: sum(g >> k) + count * (1 + k)."""
    best_k, best_bits = 0, -1
    for k in range(_MAX_RICE_K + 1):
        bits = int((gaps >> k).sum()) + len(gaps) * (1 + k)
        if best_bits < 0 or bits < best_bits:
            best_k, best_bits = k, bits
        if k and (gaps >> k).max(initial=0) == 0:
            break  # larger k only adds remainder bits
    return best_k, best_bits


def _rice_encode(gaps: np.ndarray, k: int) -> bytes:
    """Each gap g as unary(g >> k) zeros, a terminating 1, then the k low bits of g (MSB first)."""
    q = gaps >> k
    lengths = q + 1 + k
    starts = np.concatenate(([0], np.cumsum(lengths)[:-1])).astype(np.int64)
    bits = np.zeros(int(lengths.sum()), dtype=np.uint8)
    term = starts + q
    bits[term] = 1
    for j in range(k):
        bits[term + 1 + j] = (gaps >> (k - 1 - j)) & 1
    return np.packbits(bits, bitorder="little").tobytes()


def _rice_decode(data: bytes, count: int, k: int, numel: int, name: str) -> np.ndarray:
    bits = np.unpackbits(np.frombuffer(data, dtype=np.uint8), bitorder="little")
    nbits = len(bits)
    # next_one[p]: the first set bit at or after p (nbits if none), so finding each
    # codeword's terminating 1 is one lookup, not a scan over remainder bits.
    next_one = np.full(nbits + 1, nbits, dtype=np.int64)
    ones = np.flatnonzero(bits)
    next_one[ones] = ones
    next_one = np.minimum.accumulate(next_one[::-1])[::-1]
    nxt = next_one.tolist()
    terms = [0] * count
    pos = 0
    for i in range(count):  # sequential by nature: codeword i+1 starts after codeword i
        t = nxt[pos]
        if t >= nbits:
            raise CodecError(f"tensor {name!r}: Rice-coded mask ends after {i} of {count} gaps")
        if t + 1 + k > nbits:
            raise CodecError(f"tensor {name!r}: Rice-coded mask truncated in gap {i}")
        terms[i] = t
        pos = t + 1 + k
    term = np.asarray(terms, dtype=np.int64)
    starts = np.concatenate(([0], term[:-1] + 1 + k)).astype(np.int64)[:count]
    # remainder: the k bits after each terminator, MSB first  [count]
    rem = np.zeros(count, dtype=np.int64)
    for j in range(k):
        rem = (rem << 1) | bits[term + 1 + j].astype(np.int64)
    gaps = ((term - starts) << k) | rem
    idx = np.cumsum(gaps + 1) - 1
    if count and idx[-1] >= numel:
        raise CodecError(
            f"tensor {name!r}: mask index {int(idx[-1])} out of range for {numel} entries"
        )
    return idx


def mask_encoding_sizes(m: torch.Tensor) -> dict[str, int]:
    """Bytes each mask encoding would take for bool tensor `m` (excluding the 1-byte code)."""
    idx = _indices(m)
    n, c = m.numel(), len(idx)
    deltas = np.diff(idx, prepend=0)
    gaps = np.diff(idx, prepend=-1) - 1
    k, bits = _rice_sizes(gaps)
    return {
        "bitpack": (n + 7) // 8,
        "delta": len(_varint(c)) + len(_varints(deltas)),
        "rice": len(_varint(c)) + 1 + len(_varint((bits + 7) // 8)) + (bits + 7) // 8,
        "all": 0 if c == n else -1,
    }


def choose_mask_encoding(m: torch.Tensor) -> str:
    """The encoding `encode` writes for this mask: "all", "bitpack", "delta" or "rice"."""
    sizes = mask_encoding_sizes(m)
    if sizes.pop("all") == 0:
        return "all"
    return min(sizes, key=lambda key: (sizes[key], key))


def _write_mask(m: torch.Tensor, name: str) -> tuple[bytes, np.ndarray]:
    """(code byte + mask bytes, flat active indices)."""
    if m.dtype != torch.bool:
        raise CodecError(f"mask for {name!r} must be a bool tensor, got {m.dtype}")
    idx = _indices(m)
    choice = choose_mask_encoding(m)
    if choice == "all":
        return bytes([MASK_ALL]), idx
    if choice == "bitpack":
        flat = m.detach().reshape(-1).cpu().numpy().astype(np.uint8)
        return bytes([MASK_BITPACK]) + np.packbits(flat, bitorder="little").tobytes(), idx
    if choice == "delta":
        # First delta is the absolute index, later ones are >= 1 (strictly increasing).
        deltas = np.diff(idx, prepend=0)
        return bytes([MASK_DELTA]) + _varint(len(idx)) + _varints(deltas), idx
    gaps = np.diff(idx, prepend=-1) - 1  # g_i = idx_i - idx_{i-1} - 1 >= 0
    k, _ = _rice_sizes(gaps)
    body = _rice_encode(gaps, k)
    return bytes([MASK_RICE]) + _varint(len(idx)) + bytes([k]) + _varint(len(body)) + body, idx


def _read_mask(
    r: _Reader,
    code: int,
    numel: int,
    name: str,
    previous: torch.Tensor | None,
    shape: tuple[int, ...],
) -> np.ndarray | None:
    """Flat active indices (sorted), or None for a dense tensor."""
    if code == MASK_NONE:
        return None
    if code == MASK_ALL:
        return np.arange(numel)
    if code == MASK_SAME:
        if previous is None:
            raise CodecError(
                f"tensor {name!r} reuses the previous mask but no previous mask was given "
                "(use decode_with(payload, previous_mask))"
            )
        if tuple(previous.shape) != shape:
            raise CodecError(
                f"previous mask for {name!r} has shape {tuple(previous.shape)}, "
                f"payload says {shape}"
            )
        return _indices(previous.bool())
    if code == MASK_BITPACK:
        raw = r.take((numel + 7) // 8, f"bit-packed mask of {name!r}")
        bits = np.unpackbits(np.frombuffer(raw, dtype=np.uint8), bitorder="little")
        if bits[numel:].any():
            raise CodecError(f"tensor {name!r}: bit-packed mask has bits set past {numel} entries")
        return np.flatnonzero(bits[:numel])
    if code == MASK_DELTA:
        count = r.varint(f"index count of {name!r}")
        if count > numel:
            raise CodecError(f"tensor {name!r}: {count} mask indices for {numel} entries")
        deltas = r.varints(count, f"mask deltas of {name!r}")
        if count > 1 and (deltas[1:] <= 0).any():
            raise CodecError(f"tensor {name!r}: mask index deltas are not strictly increasing")
        idx = np.cumsum(deltas)
        if count and (idx[-1] >= numel or idx[-1] < 0):
            raise CodecError(f"tensor {name!r}: mask index out of range for {numel} entries")
        return idx
    if code == MASK_RICE:
        count = r.varint(f"index count of {name!r}")
        if count > numel:
            raise CodecError(f"tensor {name!r}: {count} mask indices for {numel} entries")
        k = r.u8(f"Rice parameter of {name!r}")
        if k > _MAX_RICE_K:
            raise CodecError(f"tensor {name!r}: Rice parameter {k} > {_MAX_RICE_K}")
        nbytes = r.varint(f"Rice stream length of {name!r}")
        idx = _rice_decode(r.take(nbytes, f"Rice-coded mask of {name!r}"), count, k, numel, name)
        used_bits = int(((np.diff(idx, prepend=-1) - 1) >> k).sum()) + count * (1 + k)
        if (used_bits + 7) // 8 != nbytes:
            raise CodecError(
                f"tensor {name!r}: Rice stream is {nbytes} bytes, codes use {used_bits} bits"
            )
        return idx
    raise CodecError(f"tensor {name!r}: unknown mask encoding code {code}")


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


def _read_values(r: _Reader, code: int, count: int, name: str) -> torch.Tensor:
    what = f"values of {name!r}"
    if code == _VAL_FP32:
        return torch.from_numpy(np.frombuffer(r.take(4 * count, what), dtype="<f4").copy())
    if code == _VAL_FP16:
        arr = np.frombuffer(r.take(2 * count, what), dtype="<f2").astype(np.float32)
        return torch.from_numpy(arr)
    if code == _VAL_INT8:
        (scale,) = struct.unpack("<f", r.take(4, f"int8 scale of {name!r}"))
        if not np.isfinite(scale) or scale < 0:
            raise CodecError(f"tensor {name!r}: invalid int8 scale {scale}")
        q = np.frombuffer(r.take(count, what), dtype=np.int8).astype(np.float32)
        return torch.from_numpy(q * np.float32(scale))
    dtype = _RAW_DTYPES.get(code)
    if dtype is None:
        raise CodecError(f"tensor {name!r}: unknown value dtype code {code}")
    if dtype == torch.bfloat16:
        raw = np.frombuffer(r.take(2 * count, what), dtype="<i2").copy()
        return torch.from_numpy(raw).view(torch.bfloat16)
    np_dtype = torch.empty(0, dtype=dtype).numpy().dtype.newbyteorder("<")
    raw = np.frombuffer(r.take(np_dtype.itemsize * count, what), dtype=np_dtype)
    return torch.from_numpy(raw.astype(np_dtype.newbyteorder("=")))


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
        body += _varint(len(raw_name)) + raw_name + bytes([len(shape)])
        for s in shape:
            body += _varint(s)
        flat = tensor.detach().reshape(-1)
        m = mask.get(name)
        if m is None:
            code, data = _write_values(flat, value_dtype, name)
            body += bytes([code, MASK_NONE]) + data
            continue
        if tuple(m.shape) != shape:
            raise CodecError(f"mask for {name!r} has shape {tuple(m.shape)}, value has {shape}")
        mask_bytes, idx = _write_mask(m, name)
        if not send_mask:
            mask_bytes = bytes([MASK_SAME])
        code, data = _write_values(flat[torch.from_numpy(idx)], value_dtype, name)
        body += bytes([code]) + mask_bytes + data
    flags = _FLAG_MASK_SENT if send_mask else 0
    head = struct.pack("<BBII", FORMAT_VERSION, flags, len(values), len(body))
    crc = zlib.crc32(head + body) & 0xFFFFFFFF
    return _HEADER.pack(MAGIC, FORMAT_VERSION, flags, len(values), len(body), crc) + bytes(body)


def _decode(payload: bytes, previous_mask: Mask | None) -> tuple[dict[str, torch.Tensor], Mask]:
    if not isinstance(payload, bytes | bytearray | memoryview):
        raise CodecError(f"payload must be bytes, got {type(payload).__name__}")
    payload = bytes(payload)
    if len(payload) < _HEADER.size:
        raise CodecError(f"truncated payload: {len(payload)} bytes, header needs {_HEADER.size}")
    magic, version, flags, count, body_len, crc = _HEADER.unpack_from(payload)
    if magic != MAGIC:
        raise CodecError(f"bad magic {magic!r}: not a leanfed payload (expected {MAGIC!r})")
    if version != FORMAT_VERSION:
        raise CodecError(
            f"unsupported payload version {version} (this decoder reads {FORMAT_VERSION})"
        )
    body = payload[_HEADER.size :]
    if len(body) != body_len:
        raise CodecError(f"payload body is {len(body)} bytes, header says {body_len} (truncated?)")
    if zlib.crc32(payload[4:14] + body) & 0xFFFFFFFF != crc:
        raise CodecError("CRC32 mismatch: payload is corrupt")
    r = _Reader(body)
    values: dict[str, torch.Tensor] = {}
    mask: Mask = {}
    for _ in range(count):
        name_len = r.varint("tensor name length")
        try:
            name = r.take(name_len, "tensor name").decode("utf-8")
        except UnicodeDecodeError as exc:
            raise CodecError(f"tensor name is not valid utf-8: {exc}") from exc
        if name in values:
            raise CodecError(f"duplicate tensor name {name!r}")
        ndim = r.u8(f"ndim of {name!r}")
        shape = tuple(r.varint(f"shape of {name!r}") for _ in range(ndim))
        numel = int(np.prod(shape, dtype=np.float64)) if shape else 1
        if numel > MAX_NUMEL:
            raise CodecError(f"tensor {name!r}: shape {shape} exceeds {MAX_NUMEL} entries")
        vcode = r.u8(f"value dtype of {name!r}")
        mcode = r.u8(f"mask encoding of {name!r}")
        prev = None if previous_mask is None else previous_mask.get(name)
        idx = _read_mask(r, mcode, numel, name, prev, shape)
        if idx is None:
            vals = _read_values(r, vcode, numel, name)
            values[name] = vals.reshape(shape)
            continue
        vals = _read_values(r, vcode, len(idx), name)
        full = torch.zeros(numel, dtype=vals.dtype)
        t_idx = torch.from_numpy(np.ascontiguousarray(idx, dtype=np.int64))
        full[t_idx] = vals
        m = torch.zeros(numel, dtype=torch.bool)
        m[t_idx] = True
        values[name] = full.reshape(shape)
        mask[name] = m.reshape(shape)
    if r.pos != len(body):
        raise CodecError(f"{len(body) - r.pos} trailing bytes after {count} tensors")
    return values, mask


def decode(payload: bytes) -> tuple[dict[str, torch.Tensor], Mask | None]:
    """Decode a payload that carries its own mask: (full-shape values, mask or None if dense)."""
    values, mask = _decode(payload, None)
    return values, (mask or None)


def decode_with(payload: bytes, previous_mask: Mask | None) -> tuple[dict[str, torch.Tensor], Mask]:
    """Decode; tensors sent as "same mask as before" take their mask from `previous_mask`."""
    return _decode(payload, previous_mask)


def payload_flags(payload: bytes) -> dict[str, bool]:
    """Header flags of a payload (after checking magic and version only)."""
    if len(payload) < _HEADER.size or payload[:4] != MAGIC:
        raise CodecError("not a leanfed payload")
    return {"mask_sent": bool(payload[5] & _FLAG_MASK_SENT)}


def to_arrayrecord(payload: bytes) -> ArrayRecord:
    """Wrap a payload as a Flower ArrayRecord: key PAYLOAD_KEY, one 1-D uint8 Array."""
    arr = np.frombuffer(bytes(payload), dtype=np.uint8).copy()
    return ArrayRecord({PAYLOAD_KEY: Array(arr)})


def from_arrayrecord(rec: ArrayRecord) -> bytes:
    """The payload bytes inside an ArrayRecord made by `to_arrayrecord`."""
    if PAYLOAD_KEY not in rec:
        raise CodecError(f"ArrayRecord has no {PAYLOAD_KEY!r} entry (keys: {sorted(rec)})")
    if len(rec) != 1:
        raise CodecError(f"ArrayRecord must hold only {PAYLOAD_KEY!r}, got keys {sorted(rec)}")
    try:
        arr = rec[PAYLOAD_KEY].numpy()
    except Exception as exc:  # a forged Array can fail to deserialize in many ways
        raise CodecError(f"payload Array could not be read: {exc}") from exc
    if arr.dtype != np.uint8 or arr.ndim != 1:
        raise CodecError(f"payload Array must be 1-D uint8, got {arr.dtype} {arr.shape}")
    return arr.tobytes()
