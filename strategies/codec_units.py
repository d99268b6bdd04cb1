"""Wire format of a sub-network: the kept unit indices per unit group <-> bounded bytes.

Layout (little-endian; "varint" = unsigned LEB128, ``codec_masks.varint``)::

    magic  4  b"LFU1"
    count  4  u32 number of groups
    crc32  4  u32 zlib.crc32 of everything after this field
    count records: name (varint length + utf-8), n (varint), n varint indices

Decoding is for hostile bytes: given the receiver's ``{producer: units}`` (from its own
model), the group count, each name, and each n (1 <= n <= units) are checked BEFORE the
index array is allocated; the indices must be < units and strictly increasing (so sorted
and unique). Every malformed input raises the codec's ``CodecError``.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Mapping

import numpy as np
import torch

from strategies.codec_masks import CodecError, Reader, varint

__all__ = ["MAGIC", "decode_units", "encode_units", "max_units_bytes"]

MAGIC = b"LFU1"
_HEAD = struct.Struct("<4sII")
MAX_NAME = 1024


def encode_units(keep: Mapping[str, torch.Tensor]) -> bytes:
    """Bytes of ``{producer: sorted unique long indices}`` (checked: sorted, unique, >= 0)."""
    body = bytearray()
    for name, idx in keep.items():
        flat = idx.detach().cpu().to(torch.int64).reshape(-1)
        if flat.numel() == 0 or int(flat.min()) < 0 or bool((flat[1:] <= flat[:-1]).any()):
            raise CodecError(f"units of {name!r} must be non-empty, >= 0, strictly increasing")
        raw = name.encode("utf-8")
        body += varint(len(raw)) + raw + varint(flat.numel())
        for i in flat.tolist():
            body += varint(int(i))
    crc = zlib.crc32(bytes(body)) & 0xFFFFFFFF
    return _HEAD.pack(MAGIC, len(keep), crc) + bytes(body)


def max_units_bytes(units: Mapping[str, int]) -> int:
    """Upper bound on the size of any payload ``decode_units`` accepts for ``units``."""
    return _HEAD.size + sum(
        10 + len(k.encode("utf-8")) + 10 + 10 * max(1, n) for k, n in units.items()
    )


def decode_units(data: bytes, units: Mapping[str, int]) -> dict[str, torch.Tensor]:
    """``{producer: long indices}`` from hostile ``data``; every group of ``units`` exactly once."""
    if len(data) > max_units_bytes(units):
        raise CodecError(f"unit payload is {len(data)} bytes, at most {max_units_bytes(units)}")
    if len(data) < _HEAD.size:
        raise CodecError("unit payload shorter than its header")
    magic, count, crc = _HEAD.unpack_from(data)
    if magic != MAGIC:
        raise CodecError("not a leanfed unit payload (bad magic)")
    if count != len(units):
        raise CodecError(f"unit payload has {count} groups, expected {len(units)}")
    body = memoryview(data)[_HEAD.size :]
    if zlib.crc32(body) & 0xFFFFFFFF != crc:
        raise CodecError("unit payload CRC mismatch")
    r = Reader(body)
    out: dict[str, torch.Tensor] = {}
    for _ in range(count):
        length = r.varint("group name length")
        if length > MAX_NAME:
            raise CodecError(f"group name of {length} bytes (max {MAX_NAME})")
        try:
            name = bytes(r.take(length, "group name")).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise CodecError("group name is not utf-8") from exc
        if name not in units:
            raise CodecError("unit payload names a group the model does not have")
        if name in out:
            raise CodecError("unit payload names a group twice")
        n, total = r.varint("unit count"), units[name]
        if not 1 <= n <= total:
            raise CodecError(f"group {name!r}: {n} units, must be in [1, {total}]")
        idx = r.varints(n, f"units of {name!r}")  # n <= total: bounded by the model
        if int(idx.max()) >= total or (n > 1 and bool((np.diff(idx) <= 0).any())):
            raise CodecError(f"group {name!r}: indices out of range or not strictly increasing")
        out[name] = torch.from_numpy(idx.astype(np.int64))
    if r.left:
        raise CodecError(f"{r.left} trailing bytes after the unit records")
    return out
