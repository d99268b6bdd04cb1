"""The sub-network index wire format: round trip, every malformed input a CodecError, fuzzed."""

from __future__ import annotations

import contextlib
import struct
import zlib

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from strategies.codec_masks import CodecError
from strategies.codec_units import decode_units, encode_units

UNITS = {"conv1.weight": 16, "fc1.weight": 200}
KEEP = {"conv1.weight": torch.tensor([0, 3, 15]), "fc1.weight": torch.tensor([1, 127, 128, 199])}


def _forge(records: list[tuple[bytes, list[int]]], count: int | None = None) -> bytes:
    body = bytearray()
    for name, idx in records:
        body += bytes([len(name)]) + name + _varint(len(idx))
        for i in idx:
            body += _varint(i)
    n = len(records) if count is None else count
    return struct.pack("<4sII", b"LFU1", n, zlib.crc32(bytes(body))) + bytes(body)


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b, n = n & 0x7F, n >> 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def test_round_trip_and_exact_size() -> None:
    data = encode_units(KEEP)
    # 12 header + (1 + 12 + 1 + 3) + (1 + 10 + 1 + 1 + 1 + 2 + 2): 128 and 199 take 2 bytes
    assert len(data) == 12 + 17 + 18
    out = decode_units(data, UNITS)
    assert {k: v.tolist() for k, v in out.items()} == {k: v.tolist() for k, v in KEEP.items()}


@pytest.mark.parametrize(
    ("records", "match"),
    [
        ([(b"conv1.weight", [0, 3]), (b"fc1.weight", [5, 5])], "strictly increasing"),
        ([(b"conv1.weight", [3, 0]), (b"fc1.weight", [5])], "strictly increasing"),
        ([(b"conv1.weight", [16]), (b"fc1.weight", [5])], "out of range"),
        ([(b"conv1.weight", []), (b"fc1.weight", [5])], "must be in"),
        ([(b"conv1.weight", list(range(17))), (b"fc1.weight", [5])], "must be in"),
        ([(b"conv9.weight", [0]), (b"fc1.weight", [5])], "does not have"),
        ([(b"conv1.weight", [0]), (b"conv1.weight", [1])], "twice"),
        ([(b"conv1.weight", [0])], "groups"),
    ],
)
def test_malformed_is_a_codec_error(records: list[tuple[bytes, list[int]]], match: str) -> None:
    with pytest.raises(CodecError, match=match):
        decode_units(_forge(records), UNITS)


def test_header_crc_trailing_and_size_bounds() -> None:
    good = encode_units(KEEP)
    with pytest.raises(CodecError, match="magic"):
        decode_units(b"XXXX" + good[4:], UNITS)
    with pytest.raises(CodecError, match="CRC"):
        decode_units(good[:-1] + bytes([good[-1] ^ 1]), UNITS)
    with pytest.raises(CodecError, match="header"):
        decode_units(good[:5], UNITS)
    with pytest.raises(CodecError, match="at most"):
        decode_units(good + bytes(10_000), UNITS)
    body = good[12:] + b"\x00"
    forged = struct.pack("<4sII", b"LFU1", 2, zlib.crc32(body)) + body
    with pytest.raises(CodecError, match="trailing"):
        decode_units(forged, UNITS)
    # a count claiming more units than the model has is refused before any allocation
    huge = _forge([(b"conv1.weight", [])], count=2)[:-1] + _varint(2**40)
    huge = struct.pack("<4sII", b"LFU1", 2, zlib.crc32(huge[12:])) + huge[12:]
    with pytest.raises(CodecError, match="must be in"):
        decode_units(huge, UNITS)
    with pytest.raises(CodecError, match="strictly increasing"):
        encode_units({"a": torch.tensor([2, 1])})


def _check(out: dict[str, torch.Tensor]) -> None:
    assert set(out) == set(UNITS)
    for k, v in out.items():
        assert 1 <= v.numel() <= UNITS[k]
        assert int(v.min()) >= 0 and int(v.max()) < UNITS[k]
        assert bool((v[1:] > v[:-1]).all())


@given(st.binary(max_size=300))
def test_fuzz_random_bytes(data: bytes) -> None:
    with contextlib.suppress(CodecError):
        _check(decode_units(data, UNITS))


@given(st.integers(0, 46), st.integers(0, 255), st.booleans())
def test_fuzz_mutated_payload(pos: int, byte: int, fix_crc: bool) -> None:
    data = bytearray(encode_units(KEEP))
    data[pos % len(data)] = byte
    if fix_crc:
        data[8:12] = struct.pack("<I", zlib.crc32(bytes(data[12:])))
    with contextlib.suppress(CodecError):
        _check(decode_units(bytes(data), UNITS))
