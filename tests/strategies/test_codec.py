"""Wire codec: exact round trips, corruption always detected, mask bytes near the entropy bound."""

from __future__ import annotations

import math
import struct
import zlib

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from strategies import codec, codec_masks
from strategies.codec import CodecError


def _model(seed: int = 0, density: float = 0.3) -> tuple[dict[str, torch.Tensor], dict]:
    g = torch.Generator().manual_seed(seed)
    values = {
        "conv.weight": torch.randn(4, 2, 3, 3, generator=g),
        "conv.bias": torch.randn(4, generator=g),
        "fc.weight": torch.randn(5, 36, generator=g),
        "bn.num_batches_tracked": torch.tensor(7),
    }
    mask = {
        "conv.weight": torch.rand(4, 2, 3, 3, generator=g) < density,
        "fc.weight": torch.rand(5, 36, generator=g) < density,
    }
    for k, m in mask.items():
        values[k] = values[k] * m
    return values, mask


def _binary_entropy(d: float) -> float:
    return -(d * math.log2(d) + (1 - d) * math.log2(1 - d))


def test_fp32_round_trip_is_exact() -> None:
    values, mask = _model()
    out, out_mask = codec.decode(codec.encode(values, mask))
    assert out_mask is not None and set(out_mask) == set(mask)
    for k in mask:
        assert torch.equal(out_mask[k], mask[k])
    for k, v in values.items():
        assert out[k].dtype == v.dtype and out[k].shape == v.shape
        assert torch.equal(out[k], v)


def test_dense_only_payload_returns_no_mask() -> None:
    values = {"b": torch.arange(5, dtype=torch.float32), "scalar": torch.tensor(2.5)}
    out, mask = codec.decode(codec.encode(values, None))
    assert mask is None
    assert torch.equal(out["b"], values["b"]) and torch.equal(out["scalar"], values["scalar"])


def test_raw_dtypes_round_trip_exactly() -> None:
    values = {
        "i64": torch.tensor([-(2**40), 3]),
        "b": torch.tensor([True, False, True]),
        "f64": torch.tensor([1e-300, -2.0], dtype=torch.float64),
        "bf16": torch.tensor([1.5, -3.0], dtype=torch.bfloat16),
        "u8": torch.tensor([0, 255], dtype=torch.uint8),
    }
    out, _ = codec.decode(codec.encode(values, None, value_dtype="int8"))
    for k, v in values.items():
        assert out[k].dtype == v.dtype and torch.equal(out[k], v)


def test_off_mask_entries_are_dropped_and_zero_on_decode() -> None:
    v = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    m = torch.tensor([[True, False], [False, True]])
    out, _ = codec.decode(codec.encode({"w": v}, {"w": m}))
    assert out["w"].tolist() == [[1.0, 0.0], [0.0, 4.0]]


@pytest.mark.parametrize("dtype,bound", [("fp16", 2.0**-11), ("int8", 0.5 / 127)])
def test_lossy_dtypes_within_error_bound(dtype: str, bound: float) -> None:
    values, mask = _model(1)
    out, _ = codec.decode(codec.encode(values, mask, value_dtype=dtype))
    for k, v in values.items():
        if not v.is_floating_point():
            assert torch.equal(out[k], v)
            continue
        amax = float(v.abs().max())
        # fp16: relative error 2^-11; int8: half a quantisation step, scale = amax / 127.
        tol = bound * (v.abs() if dtype == "fp16" else torch.full_like(v, amax)) + 1e-7
        assert bool(((out[k] - v).abs() <= tol).all()), k
        if k in mask:
            assert bool((out[k][~mask[k]] == 0).all())


def test_fp16_out_of_range_raises() -> None:
    with pytest.raises(CodecError, match="fp16 range"):
        codec.encode({"w": torch.tensor([1e6])}, None, value_dtype="fp16")


def test_send_mask_false_needs_previous_mask() -> None:
    values, mask = _model(2)
    full = codec.encode(values, mask, send_mask=True)
    same = codec.encode(values, mask, send_mask=False)
    assert len(same) < len(full)
    assert codec.payload_flags(same) == {"mask_sent": False}
    with pytest.raises(CodecError, match="previous mask"):
        codec.decode(same)
    # Exactly the full payload with every mask record cut to the one MASK_SAME byte.
    masks = sum(len(codec_masks.write_mask(m, k)[0]) for k, m in mask.items())
    assert len(full) - len(same) == masks - len(mask)
    out, out_mask = codec.decode_with(same, mask)
    for k in values:
        assert torch.equal(out[k], values[k])
    assert all(torch.equal(out_mask[k], mask[k]) for k in mask)
    wrong = {k: m.reshape(-1) for k, m in mask.items()}
    with pytest.raises(CodecError, match="shape"):
        codec.decode_with(same, wrong)


def test_encode_rejects_bad_input() -> None:
    with pytest.raises(CodecError, match="value_dtype"):
        codec.encode({"w": torch.zeros(2)}, None, value_dtype="fp8")
    with pytest.raises(CodecError, match="no value tensor"):
        codec.encode({"w": torch.zeros(2)}, {"x": torch.ones(2, dtype=torch.bool)})
    with pytest.raises(CodecError, match="shape"):
        codec.encode({"w": torch.zeros(2)}, {"w": torch.ones(3, dtype=torch.bool)})
    with pytest.raises(CodecError, match="bool"):
        codec.encode({"w": torch.zeros(2)}, {"w": torch.ones(2)})
    with pytest.raises(CodecError, match="bool"):  # checked without the mask's encodings too
        codec.encode({"w": torch.zeros(2)}, {"w": torch.ones(2)}, send_mask=False)


def test_arrayrecord_round_trip() -> None:
    values, mask = _model(3)
    payload = codec.encode(values, mask)
    rec = codec.to_arrayrecord(payload)
    assert list(rec) == [codec.PAYLOAD_KEY]
    assert rec[codec.PAYLOAD_KEY].numpy().dtype == np.uint8
    assert codec.from_arrayrecord(rec) == payload
    from flwr.app import Array, ArrayRecord

    with pytest.raises(CodecError, match="no 'leanfed.payload'"):
        codec.from_arrayrecord(ArrayRecord({"w": Array(np.zeros(3, dtype=np.uint8))}))
    with pytest.raises(CodecError, match="uint8"):
        codec.from_arrayrecord(ArrayRecord({codec.PAYLOAD_KEY: Array(np.zeros(3, np.float32))}))


# ------------------------------------------------------------------ corruption
def _reseal(payload: bytes, body: bytes) -> bytes:
    """Rewrite header length + CRC around a (deliberately wrong) body: CRC can't save us."""
    _, version, flags, count, _, _ = struct.unpack_from("<4sBBIII", payload)
    head = struct.pack("<BBII", version, flags, count, len(body))
    crc = zlib.crc32(head + body) & 0xFFFFFFFF
    return payload[:4] + head + struct.pack("<I", crc) + body


def test_header_errors_are_named() -> None:
    payload = codec.encode(*_model(4))
    with pytest.raises(CodecError, match="bad magic"):
        codec.decode(b"XXXX" + payload[4:])
    with pytest.raises(CodecError, match="version"):
        codec.decode(payload[:4] + bytes([9]) + payload[5:])
    with pytest.raises(CodecError, match="CRC32"):
        codec.decode(payload[:-1] + bytes([payload[-1] ^ 1]))
    with pytest.raises(CodecError, match="header says"):
        codec.decode(payload[:-3])
    with pytest.raises(CodecError, match="header needs"):
        codec.decode(payload[:10])
    with pytest.raises(CodecError, match="bytes"):
        codec.decode("not bytes")  # type: ignore[arg-type]


def test_structural_errors_behind_a_valid_crc() -> None:
    # A well-formed CRC over a malformed body: the parser itself must refuse it.
    payload = codec.encode({"w": torch.tensor([1.0, 0.0, 2.0])}, None)
    body = payload[18:]
    with pytest.raises(CodecError, match="truncated"):
        codec.decode(_reseal(payload, body[:-2]))
    with pytest.raises(CodecError, match="trailing"):
        codec.decode(_reseal(payload, body + b"\x00"))


def _delta_payload(deltas: list[int], numel: int) -> bytes:
    """Hand-built one-tensor payload with a delta-coded mask (code 3)."""
    body = bytes([1]) + b"w" + bytes([1, numel]) + bytes([0, codec.MASK_DELTA])
    body += bytes([len(deltas)]) + bytes(deltas) + np.ones(len(deltas), "<f4").tobytes()
    head = struct.pack("<BBII", codec.FORMAT_VERSION, 1, 1, len(body))
    return b"LFD1" + head + struct.pack("<I", zlib.crc32(head + body) & 0xFFFFFFFF) + body


def test_delta_mask_index_errors() -> None:
    out, mask = codec.decode(_delta_payload([1, 2, 3], 10))
    assert mask is not None and mask["w"].nonzero().flatten().tolist() == [1, 3, 6]
    with pytest.raises(CodecError, match="strictly increasing"):
        codec.decode(_delta_payload([1, 0, 3], 10))
    with pytest.raises(CodecError, match="out of range"):
        codec.decode(_delta_payload([5, 5], 10))
    with pytest.raises(CodecError, match="indices for"):
        codec.decode(_delta_payload([0, 1, 1, 1], 3))


def test_unknown_codes_and_bad_names() -> None:
    payload = codec.encode({"w": torch.tensor([1.0])}, None)
    body = bytearray(payload[18:])
    # body: name length, "w", ndim, dim, value code (offset 4), mask code (offset 5), ...
    bad_mask = bytes(body[:5]) + bytes([7]) + bytes(body[6:])
    with pytest.raises(CodecError, match="mask encoding code 7"):
        codec.decode(_reseal(payload, bad_mask))
    bad_val = bytes(body[:4]) + bytes([99]) + bytes(body[5:])
    with pytest.raises(CodecError, match="dtype code 99"):
        codec.decode(_reseal(payload, bad_val))
    bad_name = bytes([1, 0xFF]) + bytes(body[2:])
    with pytest.raises(CodecError, match="utf-8"):
        codec.decode(_reseal(payload, bad_name))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 10_000),
    density=st.sampled_from([0.002, 0.05, 0.3, 0.7, 1.0]),
    cut=st.integers(0, 10_000),
    flips=st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 7)), min_size=1, max_size=4),
    dtype=st.sampled_from(codec.VALUE_DTYPES),
)
def test_truncation_and_bit_flips_never_decode_silently(
    seed: int, density: float, cut: int, flips: list[tuple[int, int]], dtype: str
) -> None:
    values, mask = _model(seed, density)
    payload = codec.encode(values, mask, value_dtype=dtype)
    truncated = payload[: cut % len(payload)]
    with pytest.raises(CodecError):
        codec.decode(truncated)
    corrupt = bytearray(payload)
    for pos, bit in flips:
        corrupt[pos % len(payload)] ^= 1 << bit
    if bytes(corrupt) == payload:  # flips cancelled out
        return
    with pytest.raises(CodecError):
        codec.decode(bytes(corrupt))


@settings(max_examples=40, deadline=None)
@given(
    numel=st.integers(1, 3000),
    density=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**16),
)
def test_any_mask_round_trips(numel: int, density: float, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    m = torch.rand(numel, generator=g) < density
    v = torch.randn(numel, generator=g) * m
    out, out_mask = codec.decode(codec.encode({"w": v}, {"w": m}))
    assert out_mask is not None
    assert torch.equal(out_mask["w"], m) and torch.equal(out["w"], v)


# ------------------------------------------------------------------ size and choice
def test_encoding_choice_by_density() -> None:
    g = torch.Generator().manual_seed(0)
    n = 20_000
    assert codec.choose_mask_encoding(torch.ones(n, dtype=torch.bool)) == "all"
    assert codec.choose_mask_encoding(torch.rand(n, generator=g) < 0.5) == "bitpack"
    sparse = codec.choose_mask_encoding(torch.rand(n, generator=g) < 0.01)
    assert sparse in ("rice", "delta")
    # A clustered mask (one contiguous run) is cheapest as varint deltas of 1.
    run = torch.zeros(n, dtype=torch.bool)
    run[5000:5300] = True
    assert codec.choose_mask_encoding(run) in ("delta", "rice")
    sizes = codec.mask_encoding_sizes(run)
    assert min(sizes["delta"], sizes["rice"]) < sizes["bitpack"]


@pytest.mark.parametrize("density", [0.5, 0.1, 0.01])
def test_mask_bytes_near_information_bound(density: float) -> None:
    n = 100_000
    g = torch.Generator().manual_seed(1)
    m = torch.rand(n, generator=g) < density
    bound = n * _binary_entropy(density) / 8
    sizes = codec.mask_encoding_sizes(m)
    chosen = sizes[codec.choose_mask_encoding(m)]
    assert chosen <= 1.3 * bound + 64, (sizes, bound)
    active = int(m.sum())
    payload = codec.encode({"w": torch.randn(n, generator=g) * m}, {"w": m})
    header = 18 + 1 + 1 + 1 + 3 + 2  # fixed header, name, ndim + dim, codes
    assert len(payload) <= 1.3 * bound + 64 + 4 * active + header
