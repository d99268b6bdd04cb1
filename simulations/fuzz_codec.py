"""Hostile codec payloads (random, mutated, forged headers) and the decode cost campaign.

Used by `simulations.fuzz_campaign` (the codec half of ``leanfed bench robustness``) and
by the fuzz tests. Every generator is seeded; mutated payloads are mostly re-sealed
(header length and CRC rewritten), so the mutation reaches the body parser instead of
stopping at the CRC check.
"""

from __future__ import annotations

import random
import struct
import time
import tracemalloc
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from strategies import codec
from strategies.codec import CodecError, TensorSpec
from strategies.sparse.density import layer_density_rule
from strategies.sparse.masks import Mask, random_mask, sparsifiable_shapes
from tasks.models import build_model

HEADER = struct.Struct("<4sBBIII")


@dataclass
class CodecTarget:
    """A model the decoder expects: its state, mask and spec, and valid payloads of it."""

    state: dict[str, torch.Tensor]
    mask: Mask
    spec: dict[str, TensorSpec]
    payloads: list[bytes]

    @property
    def model_bytes(self) -> int:
        return sum(v.numel() * v.element_size() for v in self.state.values())


def cnn_target(seed: int = 0) -> CodecTarget:
    """leanfed's MNIST CNN (206,922 parameters), ERK masks, valid payloads to mutate."""
    model = build_model("cnn", (1, 28, 28), 10, seed=seed)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    shapes = sparsifiable_shapes(model)
    gen = torch.Generator().manual_seed(seed)
    payloads: list[bytes] = []
    mask: Mask = {}
    for density in (0.02, 0.1, 0.3, 0.5, 1.0):
        mask = random_mask(shapes, layer_density_rule("erk")(shapes, density), generator=gen)
        values = {k: v * mask[k] if k in mask else v for k, v in state.items()}
        for dtype in codec.VALUE_DTYPES:
            for send_mask in (True, False):
                payloads.append(codec.encode(values, mask, value_dtype=dtype, send_mask=send_mask))
    # The decoder's view: the last (density 0.1 ... 1.0) mask is the one it holds.
    mask = random_mask(shapes, layer_density_rule("erk")(shapes, 0.1), generator=gen)
    return CodecTarget(state, mask, codec.expected_spec(state, mask), payloads)


def reseal(payload: bytes, body: bytes, count: int | None = None) -> bytes:
    """`body` under a correct header (length, CRC) taken from `payload`'s header."""
    _, version, flags, old_count, _, _ = HEADER.unpack_from(payload)
    head = struct.pack("<BBII", version, flags, old_count if count is None else count, len(body))
    crc = zlib.crc32(head + body) & 0xFFFFFFFF
    return b"LFD1" + head + struct.pack("<I", crc) + body


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b, n = n & 0x7F, n >> 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _record(name: str, shape: tuple[int, ...], vcode: int, mcode: int, rest: bytes) -> bytes:
    raw = name.encode()
    dims = b"".join(_varint(s) for s in shape)
    return _varint(len(raw)) + raw + bytes([len(shape)]) + dims + bytes([vcode, mcode]) + rest


def forged(target: CodecTarget, rng: random.Random) -> bytes:
    """A payload whose header or first record lies: sizes, counts, codes, names, streams."""
    name, spec = rng.choice(list(target.spec.items()))
    base = target.payloads[0]
    big = 1 << rng.choice([20, 30, 31, 40, 62])
    choice = rng.randrange(11)
    if choice == 0:  # a tensor count far beyond the body
        return reseal(base, base[HEADER.size :], count=rng.choice([2**31, 2**32 - 1, 10**6]))
    if choice == 1:  # a 2^k-entry tensor declared in a few bytes
        rec = _record(name, (big, big), 0, codec.MASK_DELTA, _varint(1) + _varint(0))
        return reseal(base, rec + b"\0\0\0\0", count=1)
    if choice == 2:  # the model's shape, but a Rice stream with a huge count / k
        k = rng.randrange(0, 40)
        rest = _varint(rng.choice([big, spec.numel, spec.numel // 2])) + bytes([k % 256])
        rest += _varint(rng.choice([8, 1 << 20, big])) + rng.randbytes(rng.randrange(64))
        return reseal(base, _record(name, spec.shape, 0, codec.MASK_RICE, rest), count=1)
    if choice == 3:  # delta stream: count beyond numel or deltas out of range
        rest = _varint(rng.choice([spec.numel + 1, big, 3])) + bytes(rng.randrange(1, 40))
        return reseal(base, _record(name, spec.shape, 0, codec.MASK_DELTA, rest), count=1)
    if choice == 4:  # a name the model lacks
        rec = _record("x" * rng.randrange(1, 300), spec.shape, 0, codec.MASK_ALL, b"")
        return reseal(base, rec, count=len(target.spec))
    if choice == 5:  # many dims whose product overflows
        shape = tuple(rng.choice([2**63 - 1, 2**40, 0, 1]) for _ in range(rng.randrange(1, 255)))
        return reseal(base, _record(name, shape, 0, codec.MASK_NONE, b""), count=1)
    if choice == 6:  # value code against the model's dtype, unknown mask codes
        rec = _record(name, spec.shape, rng.randrange(256), rng.randrange(256), bytes(16))
        return reseal(base, rec, count=len(target.spec))
    if choice == 7:  # body length in the header differs from the body
        head = bytearray(base[: HEADER.size])
        struct.pack_into("<I", head, 10, rng.choice([0, 2**32 - 1, len(base)]))
        return bytes(head) + base[HEADER.size :]
    if choice == 8:  # a varint that never ends
        return reseal(base, b"\xff" * rng.randrange(1, 5000), count=1)
    if choice == 9:  # bit-packed mask with bits past the end, then no values
        nbytes = (spec.numel + 7) // 8
        rest = b"\xff" * rng.choice([nbytes, nbytes - 1, 1])
        return reseal(base, _record(name, spec.shape, 0, codec.MASK_BITPACK, rest), count=1)
    # an int8 tensor with a NaN/negative scale
    rest = struct.pack("<f", rng.choice([float("nan"), -1.0, float("inf")])) + bytes(8)
    return reseal(base, _record(name, spec.shape, 2, codec.MASK_ALL, rest), count=1)


def mutated(target: CodecTarget, rng: random.Random) -> bytes:
    """A valid payload with random flips, inserts, deletes or a cut; usually re-sealed."""
    data = bytearray(rng.choice(target.payloads))
    for _ in range(rng.randrange(1, 6)):
        op = rng.randrange(4)
        pos = rng.randrange(HEADER.size, len(data)) if len(data) > HEADER.size else 0
        if op == 0:
            data[pos] ^= 1 << rng.randrange(8)
        elif op == 1:
            data[pos] = rng.randrange(256)
        elif op == 2:
            data[pos:pos] = rng.randbytes(rng.randrange(1, 16))
        else:
            del data[pos : pos + rng.randrange(1, 64)]
    if rng.random() < 0.1:
        return bytes(data[: rng.randrange(len(data) + 1)])  # cut, not re-sealed
    return reseal(bytes(data), bytes(data[HEADER.size :]))


def random_bytes(target: CodecTarget, rng: random.Random) -> bytes:
    """Noise, sometimes behind a valid header so the body parser sees it."""
    body = rng.randbytes(rng.choice([0, 1, 7, 18, 100, 4096]))
    if rng.random() < 0.5:
        return body
    return reseal(target.payloads[0], body, count=rng.choice([1, 2, len(target.spec)]))


MAKERS: tuple[Callable[[CodecTarget, random.Random], bytes], ...] = (
    forged,
    mutated,
    random_bytes,
)


def hostile_payloads(target: CodecTarget, seed: int, n: int) -> Iterator[bytes]:
    """`n` hostile payloads, cycling through the makers (and a valid one now and then)."""
    rng = random.Random(seed)
    for i in range(n):
        if i % 50 == 0:
            yield rng.choice(target.payloads)
        else:
            yield MAKERS[i % len(MAKERS)](target, rng)


def decode_once(target: CodecTarget, payload: bytes) -> str | None:
    """Decode like the server does; the name of a foreign exception, else None."""
    try:
        codec.decode_with(payload, target.mask, target.spec)
    except CodecError:
        return None
    except Exception as exc:  # the finding this campaign exists for
        return type(exc).__name__
    return None


def codec_campaign(seed: int, n: int) -> dict[str, float | int]:
    """Decode `n` hostile payloads as the server does, each timed and memory-traced.

    Returns tried, foreign_exceptions (anything but CodecError), max_decode_ms (thread
    CPU ms of the slowest decode: its cost, not its wait on a shared machine; measured
    with tracemalloc on, so an upper bound) and max_decode_mb (the largest tracemalloc
    peak above what was allocated before the decode; the decoder allocates through numpy,
    which tracemalloc sees).
    """
    target = cnn_target(seed)
    foreign, worst_s, worst_bytes = 0, 0.0, 0
    tracemalloc.start()
    try:
        for payload in hostile_payloads(target, seed, n):
            before = tracemalloc.get_traced_memory()[0]
            tracemalloc.reset_peak()
            t0 = time.thread_time()
            bad = decode_once(target, payload)
            worst_s = max(worst_s, time.thread_time() - t0)
            worst_bytes = max(worst_bytes, tracemalloc.get_traced_memory()[1] - before)
            foreign += bad is not None
    finally:
        tracemalloc.stop()
    return {
        "tried": n,
        "foreign_exceptions": foreign,
        "max_decode_ms": round(worst_s * 1000, 3),
        "max_decode_mb": round(worst_bytes / 1e6, 4),
    }


def model_mb(seed: int = 0) -> float:
    """The campaign model's size in MB (fp32 values): the yardstick of max_decode_mb."""
    return cnn_target(seed).model_bytes / 1e6


__all__ = [
    "CodecTarget",
    "cnn_target",
    "codec_campaign",
    "forged",
    "hostile_payloads",
    "model_mb",
    "mutated",
    "random_bytes",
    "reseal",
]
