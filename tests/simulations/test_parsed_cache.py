"""ParsedCache: a repeated message content parses to an equal, independent RecordDict."""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from simulations.pool import ParsedCache, from_bytes, to_bytes


def _content(seed: int) -> bytes:
    rd = RecordDict(
        {
            "arrays": ArrayRecord({"a": Array(np.arange(seed, seed + 5, dtype=np.float32))}),
            "config": ConfigRecord({"server-round": seed, "ids": [1, 2, 3], "b": b"xy"}),
            "metrics": MetricRecord({"m": float(seed)}),
        }
    )
    return to_bytes(rd)


def test_hits_equal_a_fresh_parse_and_are_their_own_objects() -> None:
    cache = ParsedCache(size=2)
    a, b, c = _content(1), _content(2), _content(3)
    first = cache(a)
    first.config_records["config"]["ids"].append(4)  # type: ignore[union-attr]
    first.array_records["arrays"]["a"] = Array(np.zeros(2, dtype=np.float32))
    del first["metrics"]
    for data in (a, b, bytes(a), b, c, a):  # hits, a copy of the bytes, an eviction
        got = cache(data)
        assert to_bytes(got) == to_bytes(from_bytes(data)) == data
        assert got.config_records["config"]["ids"] == [1, 2, 3]
        assert got is not cache(data)
    assert len(cache._kept) == 2
