"""The codec's mask sub-format: varints and the bit-packed, delta and Rice mask encodings.

Split out of `strategies.codec` (which owns the payload layout) because mask coding is a
job of its own. Decoders here are written for hostile input: every length is checked
against the bytes that are actually there BEFORE anything is allocated, and work and
memory per tensor are bounded by its element count n (never by a declared count):
a decoded mask is one bool array of n entries; the index streams are decoded in
fixed-size chunks, so transient arrays stay O(chunk) whatever the payload declares.
"""

from __future__ import annotations

import numpy as np
import torch


class CodecError(ValueError):
    """A payload could not be encoded, or decoded bytes are truncated, corrupt or invalid."""


MASK_NONE, MASK_SAME, MASK_BITPACK, MASK_DELTA, MASK_ALL, MASK_RICE = 0, 1, 2, 3, 4, 5
MASK_ENCODING_NAMES = {
    MASK_NONE: "none",
    MASK_SAME: "same",
    MASK_BITPACK: "bitpack",
    MASK_DELTA: "delta",
    MASK_ALL: "all",
    MASK_RICE: "rice",
}
MAX_RICE_K = 30
_VARINT_CHUNK = 2048  # varints decoded per vectorised step (transient arrays ~ 10 x this)
_RICE_CHUNK_BITS = 1 << 14  # Rice bits examined per vectorised step


# --------------------------------------------------------------------------- varints
def varint(n: int) -> bytes:
    """Unsigned LEB128 of one int."""
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


def _varint_lengths(v: np.ndarray) -> np.ndarray:
    """LEB128 byte count of each uint64 in ``v``: 1 + #{k >= 1 : v >= 2^(7k)}."""
    nbytes = np.ones(len(v), dtype=np.int64)
    top = int(v.max(initial=0))
    for k in range(1, 10):
        if top < 1 << (7 * k):
            break  # no value reaches this byte
        nbytes += (v >= np.uint64(1) << np.uint64(7 * k)).astype(np.int64)
    return nbytes


def varints(values: np.ndarray) -> bytes:
    """Vectorised LEB128 of a 1-D array of non-negative ints."""
    v = values.astype(np.uint64)
    nbytes = _varint_lengths(v)
    out = np.zeros(int(nbytes.sum()), dtype=np.uint8)
    starts = np.concatenate(([0], np.cumsum(nbytes)[:-1]))
    for k in range(int(nbytes.max(initial=0))):
        sel = nbytes > k
        chunk = ((v[sel] >> np.uint64(7 * k)) & np.uint64(0x7F)).astype(np.uint8)
        cont = (nbytes[sel] > k + 1).astype(np.uint8) << 7
        out[starts[sel] + k] = chunk | cont
    return out.tobytes()


class Reader:
    """Bounds-checked cursor over a memoryview; every read names what it was reading."""

    def __init__(self, data: memoryview) -> None:
        self.data = data
        self.pos = 0

    @property
    def left(self) -> int:
        return len(self.data) - self.pos

    def _truncated(self, n: int, what: str, pos: int) -> CodecError:
        return CodecError(
            f"truncated payload: {what} needs {n} bytes at offset {pos}, "
            f"only {len(self.data) - pos} left"
        )

    def take(self, n: int, what: str) -> memoryview:
        pos = self.pos
        if n < 0 or n > len(self.data) - pos:
            raise self._truncated(n, what, pos)
        self.pos = pos + n
        return self.data[pos : pos + n]

    # u8 and varint index the memoryview directly (no slice per byte): a server reads a
    # few dozen of them per reply, thousands of replies per round.
    def u8(self, what: str) -> int:
        pos = self.pos
        if pos >= len(self.data):
            raise self._truncated(1, what, pos)
        self.pos = pos + 1
        return int(self.data[pos])

    def varint(self, what: str) -> int:
        data, pos, end = self.data, self.pos, len(self.data)
        shift, n = 0, 0
        while True:
            if shift > 63:
                self.pos = pos
                raise CodecError(f"varint for {what} is longer than 64 bits")
            if pos >= end:
                raise self._truncated(1, what, pos)
            b = int(data[pos])
            pos += 1
            n |= (b & 0x7F) << shift
            shift += 7
            if not b & 0x80:
                self.pos = pos
                return n

    def varints(self, count: int, what: str) -> np.ndarray:
        """Decode `count` (<= a chunk) varints at once; each is at most 9 bytes (63 bits)."""
        if count == 0:
            return np.zeros(0, dtype=np.int64)
        window = np.frombuffer(
            self.data, dtype=np.uint8, count=min(self.left, 9 * count), offset=self.pos
        )
        ends = np.flatnonzero(window < 0x80)  # the last byte of each varint
        if len(ends) < count:
            raise CodecError(f"truncated or overlong varints in {what}")
        ends = ends[:count]
        starts = np.concatenate(([0], ends[:-1] + 1))
        lengths = ends - starts + 1
        if lengths.max() > 9:
            raise CodecError(f"varint in {what} is longer than 63 bits")
        out = np.zeros(count, dtype=np.int64)
        for k in range(int(lengths.max())):
            sel = lengths > k
            out[sel] |= (window[starts[sel] + k].astype(np.int64) & 0x7F) << (7 * k)
        self.pos += int(ends[-1]) + 1
        return out


# --------------------------------------------------------------------------- encoding
def active_indices(m: torch.Tensor) -> np.ndarray:
    return np.flatnonzero(m.detach().reshape(-1).cpu().numpy())


def _rice_sizes(gaps: np.ndarray) -> tuple[int, int]:
    """Best Rice parameter k and the code length in bits: sum(g >> k) + count * (1 + k)."""
    best_k, best_bits = 0, -1
    for k in range(MAX_RICE_K + 1):
        bits = int((gaps >> k).sum()) + len(gaps) * (1 + k)
        if best_bits < 0 or bits < best_bits:
            best_k, best_bits = k, bits
        else:
            # bits(k) is convex in k: bits(k+1) - bits(k) = count - sum(ceil((g >> k) / 2))
            # never decreases, so no later k is shorter than the first minimum.
            break
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


def _sizes(idx: np.ndarray, n: int) -> tuple[dict[str, int], int]:
    """(bytes per encoding, best Rice k) for a mask of ``n`` entries active at ``idx``."""
    c = len(idx)
    deltas = np.diff(idx, prepend=0)
    gaps = np.diff(idx, prepend=-1) - 1
    k, bits = _rice_sizes(gaps)
    sizes = {
        "bitpack": (n + 7) // 8,
        "delta": len(varint(c)) + int(_varint_lengths(deltas.astype(np.uint64)).sum()),
        "rice": len(varint(c)) + 1 + len(varint((bits + 7) // 8)) + (bits + 7) // 8,
        "all": 0 if c == n else -1,
    }
    return sizes, k


def mask_encoding_sizes(m: torch.Tensor) -> dict[str, int]:
    """Bytes each mask encoding would take for bool tensor `m` (excluding the 1-byte code)."""
    return _sizes(active_indices(m), m.numel())[0]


def _choose(sizes: dict[str, int]) -> str:
    if sizes["all"] == 0:
        return "all"
    return min(("bitpack", "delta", "rice"), key=lambda key: (sizes[key], key))


def choose_mask_encoding(m: torch.Tensor) -> str:
    """The encoding `encode` writes for this mask: "all", "bitpack", "delta" or "rice"."""
    return _choose(mask_encoding_sizes(m))


def write_mask(m: torch.Tensor, name: str, same: bool = False) -> tuple[bytes, np.ndarray]:
    """(code byte + mask bytes, flat active indices); ``same``: the MASK_SAME code alone."""
    if m.dtype != torch.bool:
        raise CodecError(f"mask for {name!r} must be a bool tensor, got {m.dtype}")
    idx = active_indices(m)
    if same:
        return bytes([MASK_SAME]), idx
    sizes, k = _sizes(idx, m.numel())  # one pass: the indices and sizes serve the write too
    choice = _choose(sizes)
    if choice == "all":
        return bytes([MASK_ALL]), idx
    if choice == "bitpack":
        flat = m.detach().reshape(-1).cpu().numpy().astype(np.uint8)
        return bytes([MASK_BITPACK]) + np.packbits(flat, bitorder="little").tobytes(), idx
    if choice == "delta":
        # First delta is the absolute index, later ones are >= 1 (strictly increasing).
        deltas = np.diff(idx, prepend=0)
        return bytes([MASK_DELTA]) + varint(len(idx)) + varints(deltas), idx
    gaps = np.diff(idx, prepend=-1) - 1  # g_i = idx_i - idx_{i-1} - 1 >= 0
    body = _rice_encode(gaps, k)
    return bytes([MASK_RICE]) + varint(len(idx)) + bytes([k]) + varint(len(body)) + body, idx


# --------------------------------------------------------------------------- decoding
def _unpack(data: memoryview, lo: int, hi: int) -> np.ndarray:
    """Bits [lo, hi) of a little-endian bit stream, one uint8 (0/1) per bit."""
    raw = np.frombuffer(data, dtype=np.uint8, count=(hi + 7) // 8 - lo // 8, offset=lo // 8)
    bits = np.unpackbits(raw, bitorder="little")
    return bits[lo % 8 : lo % 8 + hi - lo]


def _succ_power(succ: np.ndarray, steps: int) -> np.ndarray:
    """[succ^0(0), succ^1(0), ...] up to `steps` entries, by pointer doubling.

    `succ` maps a position index to the next one; its last entry is an absorbing
    sentinel. After pass p, `chain` holds the first 2^p entries and `jump` = succ^(2^p),
    so the work is O(steps + len(succ) * log steps) in vectorised passes.
    """
    sentinel = len(succ) - 1
    chain = np.zeros(1, dtype=np.int32)
    jump = succ
    while len(chain) < steps and chain[-1] != sentinel:
        chain = np.concatenate((chain, jump[chain]))
        jump = jump[jump]
    return chain[:steps]


def rice_decode_into(data: memoryview, count: int, k: int, out: np.ndarray, name: str) -> int:
    """Decode `count` Rice-coded gaps from `data`, setting their indices in bool `out`.

    Codeword i is q_i zeros, a terminating 1, and k remainder bits r_i (MSB first);
    gap g_i = q_i * 2^k + r_i and index_i = index_{i-1} + g_i + 1. Codewords are found
    a window of bits at a time: in a window, the terminator after one at bit t is the
    first set bit at or after t + 1 + k, so the chain of terminators is followed for
    all of them at once by binary lifting (pointer doubling). Returns the bits used.
    """
    nbits = 8 * len(data)
    numel = len(out)
    pos, found, last = 0, 0, -1  # next codeword start (bit), gaps decoded, last index
    while found < count:
        # First terminator at or after pos: skip whole windows of zeros (a long unary part).
        t0 = -1
        scan = pos
        while scan < nbits:
            hit = np.flatnonzero(_unpack(data, scan, min(nbits, scan + _RICE_CHUNK_BITS)))
            if len(hit):
                t0 = scan + int(hit[0])
                break
            scan += _RICE_CHUNK_BITS
        if t0 < 0:
            raise CodecError(f"tensor {name!r}: Rice-coded mask ends after {found} of {count} gaps")
        end = min(nbits, t0 + _RICE_CHUNK_BITS)
        if t0 + 1 + k > end:
            raise CodecError(f"tensor {name!r}: Rice-coded mask truncated in gap {found}")
        window = _unpack(data, t0, end)  # [end - t0] bits, window[0] == 1
        ones = np.flatnonzero(window).astype(np.int32)  # [m] local positions of set bits
        m = len(ones)
        succ = np.empty(m + 1, dtype=np.int32)
        succ[:m] = np.searchsorted(ones, ones + (1 + k))  # m where none in the window
        succ[m] = m
        chain = _succ_power(succ, min(count - found, m))  # candidate terminators, in order
        # A terminator counts only if its remainder lies inside the window; the chain
        # stops at the sentinel (the next terminator lies beyond this window).
        ok = chain < m
        ok[ok] = ones[chain[ok]] + 1 + k <= end - t0
        stop = int(np.argmin(ok)) if not ok.all() else len(ok)
        terms = ones[chain[:stop]].astype(np.int64)  # [c] local terminator positions
        starts = np.empty(stop, dtype=np.int64)
        starts[0] = pos - t0  # may be < 0: the unary zeros before the window
        starts[1:] = terms[:-1] + 1 + k
        rem = np.zeros(stop, dtype=np.int64)
        for j in range(k):
            rem = (rem << 1) | window[terms + 1 + j]
        gaps = ((terms - starts) << k) | rem
        if int(gaps.max()) >= numel:  # also keeps the cumsum below far from overflow
            raise CodecError(f"tensor {name!r}: Rice gap out of range for {numel} entries")
        idx = last + np.cumsum(gaps + 1)
        if idx[-1] >= numel:
            raise CodecError(
                f"tensor {name!r}: mask index {int(idx[-1])} out of range for {numel} entries"
            )
        out[idx] = True
        last = int(idx[-1])
        found += stop
        pos = t0 + int(terms[-1]) + 1 + k
    return pos


def read_mask(
    r: Reader,
    code: int,
    numel: int,
    name: str,
    previous: torch.Tensor | None,
    shape: tuple[int, ...],
) -> np.ndarray | None:
    """The flat bool mask [numel] of one tensor, or None for a dense (unmasked) tensor."""
    if code == MASK_NONE:
        return None
    if code == MASK_ALL:
        if r.left < numel:  # every entry's value takes at least one byte: check first
            raise CodecError(f"truncated payload: {numel} values of {name!r} cannot fit")
        return np.ones(numel, dtype=bool)
    if code == MASK_SAME:
        if previous is None:
            raise CodecError(
                f"tensor {name!r} reuses the previous mask but no previous mask was given "
                "(use decode_with(payload, previous_mask))"
            )
        if tuple(previous.shape) != shape or previous.dtype != torch.bool:
            raise CodecError(
                f"previous mask for {name!r} has shape {tuple(previous.shape)} "
                f"({previous.dtype}), payload says bool {shape}"
            )
        return previous.detach().reshape(-1).cpu().numpy().copy()
    if code == MASK_BITPACK:
        raw = r.take((numel + 7) // 8, f"bit-packed mask of {name!r}")
        bits = np.unpackbits(np.frombuffer(raw, dtype=np.uint8), bitorder="little")
        if bits[numel:].any():
            raise CodecError(f"tensor {name!r}: bit-packed mask has bits set past {numel} entries")
        return bits[:numel].view(bool)
    if code == MASK_DELTA:
        count = r.varint(f"index count of {name!r}")
        if count > numel or count > r.left:  # each index takes at least one byte
            raise CodecError(f"tensor {name!r}: {count} mask indices for {numel} entries")
        out = np.zeros(numel, dtype=bool)
        last = -1
        for lo in range(0, count, _VARINT_CHUNK):
            deltas = r.varints(min(_VARINT_CHUNK, count - lo), f"mask deltas of {name!r}")
            if (deltas[1:] <= 0).any() or (lo > 0 and deltas[0] <= 0):
                raise CodecError(f"tensor {name!r}: mask index deltas are not strictly increasing")
            # Each delta < numel first, so the chunk's sum (<= 2048 * numel) cannot overflow.
            if int(deltas.max()) >= numel or max(last, 0) + int(deltas.sum()) >= numel:
                raise CodecError(f"tensor {name!r}: mask index out of range for {numel} entries")
            idx = max(last, 0) + np.cumsum(deltas)
            out[idx] = True
            last = int(idx[-1])
        return out
    if code == MASK_RICE:
        count = r.varint(f"index count of {name!r}")
        k = r.u8(f"Rice parameter of {name!r}")
        if k > MAX_RICE_K:
            raise CodecError(f"tensor {name!r}: Rice parameter {k} > {MAX_RICE_K}")
        # The encoder's k never costs more bits than k = 0, which costs at most numel bits:
        # so count * (1 + k) <= numel and the stream is at most ceil(numel / 8) bytes.
        if count * (1 + k) > numel:
            raise CodecError(
                f"tensor {name!r}: {count} Rice codes with k={k} cannot fit {numel} entries"
            )
        nbytes = r.varint(f"Rice stream length of {name!r}")
        if nbytes > (numel + 7) // 8:
            raise CodecError(f"tensor {name!r}: Rice stream of {nbytes} bytes for {numel} entries")
        out = np.zeros(numel, dtype=bool)
        used = rice_decode_into(r.take(nbytes, f"Rice-coded mask of {name!r}"), count, k, out, name)
        if (used + 7) // 8 != nbytes:
            raise CodecError(
                f"tensor {name!r}: Rice stream is {nbytes} bytes, codes use {used} bits"
            )
        return out
    raise CodecError(f"tensor {name!r}: unknown mask encoding code {code}")
