"""Per-process cache of decoded broadcasts: a worker decodes a round's global model once.

Every node sampled in a round receives the same payload bytes, and decoding them (CRC,
mask codes, values) plus bit-packing the mask for ``context.state`` is a pure function
of three things: those bytes, the mask the node already holds (read by "same mask as
before" records) and the model's spec. The cache key is exactly these three (the payload
by the SHA-256 and length of the serialized Array that carries it, so a hit does not even
parse its .npy header), so a hit returns what a fresh decode would return. A payload that
decodes without any held mask has no "same mask" record (``codec_masks.read_mask`` reads
the held mask for that code alone and refuses it missing), so its decode is the same
under every held mask: it is keyed without one, and nodes holding different (stale)
masks share it instead of decoding it once each. The bytes a
node receives, their size cap (checked before reading) and the byte counts are unchanged.
Only successful decodes are kept: a malformed payload is decoded, and refused, every time.
Entries are shared between calls: callers copy the values (``load_state_dict``) and get
their own mask tensors.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from flwr.app import ArrayRecord

from strategies import codec
from strategies.sparse.masks import Mask, pack_mask

# The held mask as ``context.state`` stores it: (name, shape, packed bits) per tensor.
Held = tuple[tuple[str, tuple[int, ...], bytes], ...]
# (payload SHA-256, its length, Array stype, the held mask or None, model spec); the held
# slot is FREE for a payload that decodes the same under any held mask.
Key = tuple[bytes, int, str, Held | None | str, tuple[tuple[str, codec.TensorSpec], ...]]
FREE = "any held mask"
# A round has one broadcast (two when the mask is sent to some nodes and not to others);
# a small bound keeps a large model's decoded copies from piling up.
MAX_ENTRIES = 2


@dataclass(frozen=True)
class Decoded:
    """A decoded broadcast: full-shape values, the mask, and the mask as ``Held`` packs."""

    values: dict[str, torch.Tensor]
    mask: Mask
    packed: Held


_CACHE: OrderedDict[Key, Decoded] = OrderedDict()


def clear() -> None:
    """Forget every cached broadcast (tests; a process that switches runs needs nothing)."""
    _CACHE.clear()


def cached() -> int:
    """How many broadcasts are cached now."""
    return len(_CACHE)


def decode_broadcast(
    record: ArrayRecord,
    held: Held | None,
    previous: Callable[[], Mask | None],
    expected: Mapping[str, codec.TensorSpec],
) -> tuple[dict[str, torch.Tensor], Mask, Held]:
    """``codec.decode_with`` of the payload in ``record`` with ``previous()``'s mask, under
    ``expected``, and the mask packed, via the cache (sizes checked first, as without it).

    ``held`` identifies the mask ``previous()`` would return (None: the node holds none);
    ``previous`` is called only on a miss that needs it. Returns (values to copy, a mask
    of fresh tensors the caller may keep, the mask packed for ``context.state``).
    """
    limit = codec.max_payload_bytes(expected)
    array = codec.payload_array(record, limit)
    data = array.data
    base = (hashlib.sha256(data).digest(), len(data), str(array.stype))
    spec = tuple(expected.items())
    free: Key = (*base, FREE, spec)
    key: Key = (*base, held, spec)
    hit_key = free if free in _CACHE else key
    hit = _CACHE.get(hit_key)
    if hit is None:
        payload = codec.from_arrayrecord(record, limit)
        decoded = None
        # Try without the held mask where that can succeed: the node holds none, or the
        # server says the mask was sent (then it has no "same mask" record unless forged,
        # and a forged one falls back to the held mask below, as a fresh decode would).
        if held is None or codec.payload_flags(payload)["mask_sent"]:
            try:
                decoded = codec.decode_with(payload, None, expected)
                key = free
            except codec.CodecError:
                if held is None:
                    raise
        if decoded is None:
            decoded = codec.decode_with(payload, previous(), expected)
        values, mask = decoded
        packed = tuple((n, tuple(int(s) for s in m.shape), pack_mask(m)) for n, m in mask.items())
        hit = Decoded(values, mask, packed)
        _CACHE[key] = hit
        while len(_CACHE) > MAX_ENTRIES:
            _CACHE.popitem(last=False)
    else:
        _CACHE.move_to_end(hit_key)
    return hit.values, {n: m.clone() for n, m in hit.mask.items()}, hit.packed
