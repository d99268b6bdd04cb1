"""The per-process broadcast cache returns exactly what a fresh decode returns, and no more."""

from __future__ import annotations

import struct
import zlib
from collections.abc import Callable

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord
from hypothesis import given, settings
from hypothesis import strategies as st

from client import received
from strategies import codec
from strategies.codec import CodecError
from strategies.sparse.masks import pack_mask

SHAPES = {"w": (4, 6), "b": (6,)}


def _state(seed: int, density: float = 0.4) -> tuple[dict[str, torch.Tensor], dict]:
    g = torch.Generator().manual_seed(seed)
    values = {k: torch.randn(s, generator=g) for k, s in SHAPES.items()}
    mask = {"w": torch.rand(SHAPES["w"], generator=g) < density}
    values["w"] = values["w"] * mask["w"]
    return values, mask


def _held(mask: dict[str, torch.Tensor]) -> received.Held:
    return tuple((n, tuple(m.shape), pack_mask(m)) for n, m in mask.items())


def _rec(payload: bytes) -> ArrayRecord:
    return codec.to_arrayrecord(payload)


def _spec() -> dict[str, codec.TensorSpec]:
    return codec.expected_spec(_state(0)[0], None)


@pytest.fixture(autouse=True)
def _empty_cache() -> None:
    received.clear()


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _giver(mask: dict[str, torch.Tensor] | None) -> Callable[[], dict | None]:
    return lambda: mask


def _count_decodes(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []
    real = codec.decode_with

    def counted(*args: object, **kwargs: object) -> object:
        calls.append(1)
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(codec, "decode_with", counted)
    return calls


def test_a_hit_equals_a_fresh_decode_and_the_mask_is_the_callers_own(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    values, mask = _state(1)
    payload = codec.encode(values, mask)
    calls = _count_decodes(monkeypatch)

    def previous() -> None:
        return None

    first = received.decode_broadcast(_rec(payload), None, previous, _spec())
    second = received.decode_broadcast(_rec(payload), None, previous, _spec())
    monkeypatch.undo()
    want_values, want_mask = codec.decode_with(payload, None, _spec())
    assert len(calls) == 1 and received.cached() == 1  # decoded once
    for got in (first, second):
        assert _same(got[0], want_values) and _same(got[1], want_mask)
        assert got[2] == _held(want_mask)
    second[1]["w"].fill_(True)  # a caller changing its mask must not change the next hit
    assert _same(received.decode_broadcast(_rec(payload), None, previous, _spec())[1], want_mask)


def test_a_changed_broadcast_is_decoded_again() -> None:
    a = codec.encode(*_state(1))
    b = codec.encode(*_state(2))
    got_a = received.decode_broadcast(_rec(a), None, lambda: None, _spec())
    got_b = received.decode_broadcast(_rec(b), None, lambda: None, _spec())
    assert _same(got_b[0], codec.decode_with(b, None, _spec())[0])
    assert not _same(got_a[0], got_b[0])


def test_the_held_mask_is_part_of_the_key() -> None:
    """A "same mask as before" payload decodes differently under different held masks."""
    values, _ = _state(3)
    m1 = _state(4)[1]
    m2 = {"w": m1["w"].reshape(-1).roll(1).reshape(SHAPES["w"])}  # same count, moved
    assert not _same(m1, m2)
    payload = codec.encode(values, m1, send_mask=False)
    got1 = received.decode_broadcast(_rec(payload), _held(m1), lambda: m1, _spec())
    got2 = received.decode_broadcast(_rec(payload), _held(m2), lambda: m2, _spec())
    assert _same(got1[1], m1) and _same(got2[1], m2)
    assert _same(got2[0], codec.decode_with(payload, m2, _spec())[0])
    assert received.cached() == 2


def test_a_payload_that_sends_its_mask_is_decoded_once_for_every_held_mask(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Nodes holding different (stale) masks, or none, share one decode of a mask-sent payload."""
    values, mask = _state(5)
    payload = codec.encode(values, mask)  # every mask sent: no "same mask" record
    calls = _count_decodes(monkeypatch)
    held_masks = [None, _state(6)[1], _state(7)[1], None, _state(6)[1]]
    got = [
        received.decode_broadcast(
            _rec(payload), None if h is None else _held(h), _giver(h), _spec()
        )
        for h in held_masks
    ]
    monkeypatch.undo()
    assert len(calls) == 1 and received.cached() == 1
    want = codec.decode_with(payload, None, _spec())
    for h, (v, m, packed) in zip(held_masks, got, strict=True):
        assert _same(v, want[0]) and _same(m, want[1]) and packed == _held(want[1])
        assert _same(v, codec.decode_with(payload, h, _spec())[0])


def test_a_forged_mask_sent_flag_still_decodes_under_the_held_mask() -> None:
    """A payload flagged "mask sent" that has a "same mask" record anyway: as without a cache."""
    values, _ = _state(3)
    m1 = _state(4)[1]
    payload = bytearray(codec.encode(values, m1, send_mask=False))
    payload[5] |= 1  # the mask-sent flag (header byte 5), CRC recomputed below
    # The CRC covers version, flags, count and body length (bytes 4-13), then the body.
    crc = zlib.crc32(bytes(payload[4:14]) + bytes(payload[18:])) & 0xFFFFFFFF
    payload[14:18] = struct.pack("<I", crc)
    forged = bytes(payload)
    assert codec.payload_flags(forged)["mask_sent"]
    got = received.decode_broadcast(_rec(forged), _held(m1), lambda: m1, _spec())
    want = codec.decode_with(forged, m1, _spec())
    assert _same(got[0], want[0]) and _same(got[1], m1)
    with pytest.raises(CodecError, match="no previous mask"):
        received.decode_broadcast(_rec(forged), None, lambda: None, _spec())


def test_a_malformed_payload_is_refused_every_time_and_never_cached() -> None:
    payload = bytearray(codec.encode(*_state(1)))
    payload[-1] ^= 0xFF  # the CRC no longer matches
    for _ in range(2):
        with pytest.raises(CodecError, match="CRC"):
            received.decode_broadcast(_rec(bytes(payload)), None, lambda: None, _spec())
    assert received.cached() == 0


def test_the_record_is_checked_before_the_cache_is_asked() -> None:
    payload = codec.encode(*_state(1))
    received.decode_broadcast(_rec(payload), None, lambda: None, _spec())  # now cached
    extra = ArrayRecord({codec.PAYLOAD_KEY: _rec(payload)[codec.PAYLOAD_KEY]})
    extra["more"] = Array(np.zeros(1, dtype=np.uint8))
    with pytest.raises(CodecError, match="must hold only"):
        received.decode_broadcast(extra, None, lambda: None, _spec())
    big = _rec(codec.encode({"w": torch.zeros(40, 40)}, None))  # 6.4 kB for a 6-value model
    small = {"b": codec.TensorSpec((6,), torch.float32, None)}
    for _ in range(2):
        with pytest.raises(CodecError, match="at most"):
            received.decode_broadcast(big, None, lambda: None, small)
    assert received.cached() == 1


def test_the_cache_holds_at_most_max_entries() -> None:
    for seed in range(received.MAX_ENTRIES + 3):
        received.decode_broadcast(_rec(codec.encode(*_state(seed))), None, lambda: None, _spec())
    assert received.cached() == received.MAX_ENTRIES


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 5), st.booleans(), st.integers(0, 3)), max_size=12))
def test_any_sequence_of_broadcasts_decodes_as_without_a_cache(
    calls: list[tuple[int, bool, int]],
) -> None:
    """Interleaved payloads (mask sent or not) and held masks: never a stale answer."""
    received.clear()
    for seed, send_mask, shift in calls:
        values, mask = _state(seed)
        payload = codec.encode(values, mask, send_mask=send_mask)
        # A held mask with the same active count: "same mask" records decode under it.
        held = {"w": mask["w"].reshape(-1).roll(shift).reshape(SHAPES["w"])}
        got = received.decode_broadcast(_rec(payload), _held(held), lambda h=held: h, _spec())
        want = codec.decode_with(payload, held, _spec())
        assert _same(got[0], want[0]) and _same(got[1], want[1])


def test_each_node_gets_its_own_copy_of_the_stored_mask_record() -> None:
    """The memoized state record: same items as a fresh build, a separate record per node."""
    from flwr.app import ConfigRecord, Context, RecordDict

    from client import app
    from simulations.pool import to_bytes

    packed = _held(_state(8)[1])
    contexts = [Context(1, node, {}, RecordDict(), {}) for node in (1, 2)]
    for ctx in contexts:
        app._save_packed(ctx, packed)
    a, b = (ctx.state.config_records[app.STATE_KEY] for ctx in contexts)
    assert a is not b and a == b
    a["extra"] = 1  # one node's record changing leaves the other's, and the next one's, alone
    assert "extra" not in b
    app._save_packed(contexts[1], packed)
    fresh = ConfigRecord({"names": [n for n, _, _ in packed]})
    for name, shape, bits in packed:
        fresh[f"shape:{name}"] = list(shape)
        fresh[f"bits:{name}"] = bits
    want = RecordDict()
    want.config_records[app.STATE_KEY] = fresh
    assert to_bytes(contexts[1].state) == to_bytes(want)
