"""The payload Array's .npy framing without numpy's header parser: same bytes either way."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord
from flwr.common.constant import SType
from hypothesis import given, settings
from hypothesis import strategies as st

from strategies import codec
from strategies.codec import CodecError
from strategies.codec_npy import npy_header, npy_u8_body, u8_array


def _slow(array: Array) -> bytes | None:
    """What `from_arrayrecord` returned before the fast path (None: CodecError)."""
    try:
        arr = array.numpy()
    except Exception:
        return None
    if arr.dtype != np.uint8 or arr.ndim != 1:
        return None
    return arr.tobytes()


def _read(array: Array) -> bytes | None:
    try:
        return codec.from_arrayrecord(ArrayRecord({codec.PAYLOAD_KEY: array}))
    except CodecError:
        return None


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=3000))
def test_u8_array_is_what_np_save_writes(payload: bytes) -> None:
    fast, ref = u8_array(payload), Array(np.frombuffer(payload, dtype=np.uint8).copy())
    assert (fast.dtype, fast.shape, fast.stype, fast.data) == (
        ref.dtype,
        ref.shape,
        ref.stype,
        ref.data,
    )
    assert npy_u8_body(ref.data) == payload
    assert _read(fast) == payload == _slow(fast)


@settings(max_examples=400, deadline=None)
@given(
    st.binary(min_size=0, max_size=300),
    st.lists(st.tuples(st.integers(0, 200), st.integers(0, 255)), min_size=1, max_size=4),
    st.integers(-3, 3),
)
def test_a_forged_header_reads_as_numpy_reads_it(
    payload: bytes, edits: list[tuple[int, int]], cut: int
) -> None:
    # Hostile framing: bytes flipped in (mostly) the header, the data cut or extended.
    data = bytearray(Array(np.frombuffer(payload, dtype=np.uint8).copy()).data)
    for pos, value in edits:
        if pos < len(data):
            data[pos] = value
    data = data[: len(data) + cut] if cut < 0 else data + bytes(cut)
    forged = Array(dtype="uint8", shape=(len(payload),), stype=SType.NUMPY, data=bytes(data))
    assert _read(forged) == _slow(forged)


@pytest.mark.parametrize(
    "arr",
    [
        np.zeros(5, dtype=np.int8),
        np.zeros((2, 3), dtype=np.uint8),
        np.zeros(4, dtype=">u2"),
        np.asfortranarray(np.zeros((3, 2), dtype=np.uint8)),
    ],
)
def test_other_arrays_take_the_general_path(arr: np.ndarray) -> None:
    array = Array(arr)
    assert npy_u8_body(array.data) is None
    assert _read(array) is None  # refused, as before


def test_header_matches_numpy_for_every_length_class() -> None:
    for n in (0, 1, 9, 10, 99, 10**5, 10**12):
        ref = Array(np.zeros(min(n, 10), dtype=np.uint8)).data  # header lengths differ by n
        assert npy_header(n).startswith(b"\x93NUMPY\x01\x00")
        assert len(npy_header(n)) % 64 == 0
        if n <= 10:
            assert ref.startswith(npy_header(n))
