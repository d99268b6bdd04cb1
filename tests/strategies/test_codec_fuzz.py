"""Hostile bytes against the codec: only CodecError, specs enforced before allocating."""

from __future__ import annotations

import random
import struct
import tracemalloc

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from simulations.fuzz_codec import CodecTarget, forged, mutated, reseal
from strategies import codec
from strategies.codec import CodecError
from strategies.codec_masks import varint


def _target() -> CodecTarget:
    g = torch.Generator().manual_seed(0)
    state = {
        "conv.weight": torch.randn(4, 2, 3, 3, generator=g),
        "fc.weight": torch.randn(5, 36, generator=g),
        "fc.bias": torch.randn(5, generator=g),
        "bn.num_batches_tracked": torch.tensor(7),
    }
    payloads = []
    for density in (0.05, 0.3, 0.6, 1.0):
        mask = {
            k: torch.rand(state[k].shape, generator=g) < density
            for k in ("conv.weight", "fc.weight")
        }
        vals = {k: v * mask[k] if k in mask else v for k, v in state.items()}
        for dtype in codec.VALUE_DTYPES:
            payloads.append(codec.encode(vals, mask, value_dtype=dtype))
    return CodecTarget(state, mask, codec.expected_spec(state, mask), payloads)


TARGET = _target()


def _only_codec_errors(payload: bytes) -> None:
    for expected in (TARGET.spec, None):
        try:
            values, _ = codec.decode_with(payload, TARGET.mask, expected)
        except CodecError:
            continue
        if expected is not None:  # what decodes is exactly the model's tensors
            assert {k: (v.shape, v.dtype) for k, v in values.items()} == {
                k: (torch.Size(s.shape), s.dtype) for k, s in TARGET.spec.items()
            }


@settings(max_examples=150, deadline=None)
@given(data=st.binary(max_size=600), sealed=st.booleans(), count=st.integers(0, 2**32 - 1))
def test_random_bytes_raise_only_codec_error(data: bytes, sealed: bool, count: int) -> None:
    _only_codec_errors(reseal(TARGET.payloads[0], data, count=count) if sealed else data)


@settings(max_examples=150, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), forge=st.booleans())
def test_mutated_and_forged_payloads_raise_only_codec_error(seed: int, forge: bool) -> None:
    rng = random.Random(seed)
    _only_codec_errors((forged if forge else mutated)(TARGET, rng))


def test_spec_is_enforced_before_anything_is_allocated() -> None:
    state, mask, spec = TARGET.state, TARGET.mask, TARGET.spec
    vals = {k: v * mask[k] if k in mask else v for k, v in state.items()}
    ok, _ = codec.decode_with(codec.encode(vals, mask), None, spec)
    assert set(ok) == set(spec)
    cases = {
        "the model has 4": {**vals, "extra": torch.zeros(2)},
        "not in the model": {
            **{k: v for k, v in vals.items() if k != "fc.bias"},
            "zz": torch.zeros(5),
        },
        "dim 1 is 37, expected shape": {**vals, "fc.weight": torch.zeros(5, 37)},
        "expected raw torch.int64": {**vals, "bn.num_batches_tracked": torch.tensor(7.0)},
    }
    for match, bad in cases.items():
        m = {k: v for k, v in mask.items() if k in bad and bad[k].shape == v.shape}
        with pytest.raises(CodecError, match=match):
            codec.decode_with(codec.encode(bad, m), None, spec)
    with pytest.raises(CodecError, match="without a mask"):
        codec.decode_with(codec.encode(vals, {"conv.weight": mask["conv.weight"]}), None, spec)
    with pytest.raises(CodecError, match="dense but was sent with mask"):
        codec.decode_with(
            codec.encode(vals, {**mask, "fc.bias": torch.ones(5, dtype=torch.bool)}), None, spec
        )


def _record(shape: tuple[int, ...], mcode: int, rest: bytes) -> bytes:
    dims = b"".join(varint(s) for s in shape)
    return bytes([1]) + b"w" + bytes([len(shape)]) + dims + bytes([0, mcode]) + rest


def test_forged_sizes_cost_nothing_without_a_spec() -> None:
    base = TARGET.payloads[0]
    huge = (1 << 28, 1 << 28)  # 2^56 entries declared in a few bytes
    tracemalloc.start()
    try:
        for payload, match in (
            (reseal(base, _record(huge, codec.MASK_DELTA, b"\x01\x00"), count=1), "exceeds"),
            (reseal(base, _record((1 << 25,), codec.MASK_ALL, b""), count=1), "truncated"),
            (reseal(base, _record((1 << 25,), codec.MASK_NONE, b""), count=1), "truncated"),
            (reseal(base, b"\x00" * 8, count=2**32 - 1), "declares"),
        ):
            with pytest.raises(CodecError, match=match):
                codec.decode(payload)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    # (1 << 25) fp32 values alone would be 134 MB: nothing near that was allocated.
    assert peak < 2_000_000


def test_rice_stream_bounds() -> None:
    n = 64
    rec = lambda count, k, nbytes, body: reseal(  # noqa: E731
        TARGET.payloads[0],
        bytes([1]) + b"w" + bytes([1, n, 0, codec.MASK_RICE, count, k, nbytes]) + body,
        count=1,
    )
    with pytest.raises(CodecError, match="cannot fit"):
        codec.decode(rec(40, 1, 1, b"\xff"))
    with pytest.raises(CodecError, match="Rice stream of 9 bytes"):
        codec.decode(rec(4, 0, 9, bytes(9)))
    with pytest.raises(CodecError, match="ends after 0 of 4"):
        codec.decode(rec(4, 0, 2, bytes(2)))
    # A valid stream: gaps 0, 1, 2 with k = 1 -> indices 0, 2, 5.
    bits = "10" + "11" + "010"  # q=0 r=0 | q=0 r=1 | q=1 r=0
    stream = int(bits[::-1], 2).to_bytes(1, "little")
    values = struct.pack("<3f", 1, 2, 3)
    out, mask = codec.decode(rec(3, 1, 1, stream + values))
    assert mask is not None and mask["w"].nonzero().flatten().tolist() == [0, 2, 5]
    assert out["w"][[0, 2, 5]].tolist() == [1.0, 2.0, 3.0]
