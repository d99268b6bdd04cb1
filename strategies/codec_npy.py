"""The .npy framing of a payload Array, read and written without numpy's header parser.

A payload travels as a Flower ``Array`` holding what ``np.save`` writes for a 1-D uint8
array: a version 1.0 .npy header, then the bytes. ``Array.numpy`` parses that header
with ``ast.literal_eval`` (a ``compile`` per call), which costs more than decoding a
small model's payload, and a server reads two per reply. Here the header is compared,
byte for byte, with the one ``np.save`` writes for the length it claims: only that
exact header takes the fast path, so the bytes returned are exactly what
``Array.numpy().tobytes()`` returns; anything else (another dtype, shape, order or
version, any padding) returns None and the caller parses it the slow, general way.
"""

from __future__ import annotations

import io
from functools import lru_cache

import numpy as np
from flwr.app import Array
from flwr.common.constant import SType

_PREFIX = b"\x93NUMPY\x01\x00"  # magic and version 1.0
_HEAD = len(_PREFIX) + 2  # then a little-endian u16: the header dict's padded length


@lru_cache(maxsize=1024)
def npy_header(n: int) -> bytes:
    """The header ``np.save`` writes for a 1-D uint8 array of ``n`` entries."""
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        buf, {"descr": "|u1", "fortran_order": False, "shape": (n,)}
    )
    return buf.getvalue()


def npy_u8_body(data: bytes) -> memoryview | None:
    """The array bytes of ``data`` when it is exactly ``np.save``'s output for a 1-D uint8
    array (header and length), else None."""
    if len(data) < _HEAD or data[: len(_PREFIX)] != _PREFIX:
        return None
    start = _HEAD + int.from_bytes(data[len(_PREFIX) : _HEAD], "little")
    if start > len(data) or data[:start] != npy_header(len(data) - start):
        return None
    return memoryview(data)[start:]


def u8_array(payload: bytes) -> Array:
    """``Array(np.frombuffer(payload, np.uint8))``: the same fields and bytes, built
    without ``np.save``."""
    return Array(
        dtype="uint8",
        shape=(len(payload),),
        stype=SType.NUMPY,
        data=npy_header(len(payload)) + payload,
    )
