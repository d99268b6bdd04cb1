"""Quantization of float vectors to the ring Z_{2^L}, signed decoding, and L-bit packing.

Quantization (deterministic round-to-nearest, after clipping):
    z = round(clamp(x, -c, c) * s),  s = (2^(q-1) - 1) / c,  z in [-(2^(q-1)-1), 2^(q-1)-1]
so for |x| <= c the error is |z/s - x| <= 1/(2s) = c / (2 (2^(q-1) - 1)); a value beyond
the clip range c is clipped first (error |x| - c, counted by the caller). A weighted sum
sum_i w_i z_i of n clients with integer weights w_i <= W_max has |sum| <= n W_max (2^(q-1)-1),
so it decodes exactly from Z_{2^L} with L = q + ceil(log2(n W_max)) (two's complement).
The weighted mean sum w z / (s sum w) then errs by at most c / (2 (2^(q-1) - 1)).

Ring elements live in uint64 arrays; addition wraps mod 2^64, and since 2^L divides 2^64
the reduction mod 2^L can wait until packing. Each segment of a `Layout` has its own L.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from strategies.secure.crypto import SecAggError

MAX_RING_BITS = 62


def scale(clip: float, quant_bits: int) -> float:
    """s = (2^(q-1) - 1) / c: quantized units per unit of value."""
    if clip <= 0 or not 2 <= quant_bits <= 32:
        raise SecAggError(f"need clip > 0 and 2 <= quant bits <= 32, got {clip}, {quant_bits}")
    return (2 ** (quant_bits - 1) - 1) / clip


def error_bound(clip: float, quant_bits: int) -> float:
    """Max |error| of a dequantized (weighted mean of) value(s) within the clip range."""
    return 1.0 / (2.0 * scale(clip, quant_bits))


def quantize(x: np.ndarray, clip: float, quant_bits: int) -> tuple[np.ndarray, int]:
    """(int64 z of the same shape, number of entries that were clipped)."""
    xf = np.asarray(x, dtype=np.float64)
    if not np.all(np.isfinite(xf)):
        raise SecAggError("cannot quantize non-finite values")
    clipped = int(np.count_nonzero(np.abs(xf) > clip))
    z = np.rint(np.clip(xf, -clip, clip) * scale(clip, quant_bits)).astype(np.int64)
    return z, clipped


def to_ring(z: np.ndarray) -> np.ndarray:
    """Signed int64 -> uint64 two's complement (mod 2^64)."""
    return np.asarray(z, dtype=np.int64).view(np.uint64)


def signed(v: np.ndarray, bits: int) -> np.ndarray:
    """Decode uint64 ring elements mod 2^bits as signed int64 in [-2^(bits-1), 2^(bits-1))."""
    r = reduce(v, bits).astype(np.int64)
    return np.where(r >= 2 ** (bits - 1), r - 2**bits, r)


def reduce(v: np.ndarray, bits: int) -> np.ndarray:
    return np.asarray(v, dtype=np.uint64) & np.uint64(2**bits - 1)


def bits_for(max_abs_sum: int, signed_values: bool) -> int:
    """Smallest ring size L holding every sum in [-m, m] (signed) or [0, m]."""
    need = 2 * max_abs_sum + 1 if signed_values else max_abs_sum + 1
    bits = max(1, math.ceil(math.log2(need)))
    if bits > MAX_RING_BITS:
        raise SecAggError(
            f"the sums need a {bits}-bit ring (max {MAX_RING_BITS}): lower the bounds"
        )
    return bits


@dataclass(frozen=True)
class Segment:
    """`length` ring elements of `bits` bits each, named for decoding."""

    name: str
    length: int
    bits: int


@dataclass(frozen=True)
class Layout:
    """The public shape of one client's masked vector: its segments, in order."""

    segments: tuple[Segment, ...]

    @property
    def length(self) -> int:
        return sum(s.length for s in self.segments)

    @property
    def packed_bytes(self) -> int:
        return sum((s.length * s.bits + 7) // 8 for s in self.segments)

    def split(self, v: np.ndarray) -> dict[str, np.ndarray]:
        """Cut a full-length uint64 vector into named, reduced segments."""
        if v.shape != (self.length,):
            raise SecAggError(f"vector has shape {v.shape}, layout needs ({self.length},)")
        out, at = {}, 0
        for s in self.segments:
            out[s.name] = reduce(v[at : at + s.length], s.bits)
            at += s.length
        return out

    def pack(self, v: np.ndarray) -> bytes:
        """Each segment's elements, reduced mod 2^bits, as a little-endian bit stream."""
        segs = self.split(v)
        return b"".join(pack_bits(segs[s.name], s.bits) for s in self.segments)

    def unpack(self, data: bytes) -> np.ndarray:
        """Inverse of `pack`; the byte length must match exactly (hostile input)."""
        if len(data) != self.packed_bytes:
            raise SecAggError(f"masked vector has {len(data)} bytes, expected {self.packed_bytes}")
        parts, at = [], 0
        for s in self.segments:
            n = (s.length * s.bits + 7) // 8
            parts.append(unpack_bits(data[at : at + n], s.length, s.bits))
            at += n
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.uint64)


def pack_bits(v: np.ndarray, bits: int) -> bytes:
    """Pack uint64 values < 2^bits into ceil(len * bits / 8) bytes (little-endian bits)."""
    v = reduce(v, bits)
    if bits % 8 == 0:  # whole bytes: take the low bytes of each little-endian word
        return v.astype("<u8").view(np.uint8).reshape(-1, 8)[:, : bits // 8].tobytes()
    shifts = np.arange(bits, dtype=np.uint64)
    matrix = ((v[:, None] >> shifts) & np.uint64(1)).astype(np.uint8)  # [n, bits]
    return np.packbits(matrix.reshape(-1), bitorder="little").tobytes()


def unpack_bits(data: bytes, n: int, bits: int) -> np.ndarray:
    """Inverse of `pack_bits` for n values."""
    raw = np.frombuffer(data, dtype=np.uint8)
    if bits % 8 == 0:
        full = np.zeros((n, 8), dtype=np.uint8)
        full[:, : bits // 8] = raw.reshape(n, bits // 8)
        return full.reshape(-1).view("<u8").astype(np.uint64)
    flat = np.unpackbits(raw, bitorder="little")[: n * bits].reshape(n, bits)
    weights = np.uint64(1) << np.arange(bits, dtype=np.uint64)
    return (flat.astype(np.uint64) * weights).sum(axis=1, dtype=np.uint64)
