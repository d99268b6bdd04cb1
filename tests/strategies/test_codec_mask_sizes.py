"""Mask encoding choice: the early-stopping Rice search and the one-pass sizes match a full scan."""

from __future__ import annotations

import numpy as np
import torch
from hypothesis import given
from hypothesis import strategies as st

from strategies.codec_masks import (
    MAX_RICE_K,
    _rice_sizes,
    choose_mask_encoding,
    mask_encoding_sizes,
    varints,
    write_mask,
)


def _full_scan(gaps: np.ndarray) -> tuple[int, int]:
    costs = [int((gaps >> k).sum()) + len(gaps) * (1 + k) for k in range(MAX_RICE_K + 1)]
    best = min(costs)
    return costs.index(best), best


@given(st.lists(st.integers(0, 5000), max_size=300))
def test_rice_parameter_is_the_first_minimum_over_every_k(gaps: list[int]) -> None:
    g = np.array(gaps, dtype=np.int64)
    k, bits = _rice_sizes(g)
    full_k, full_bits = _full_scan(g)
    assert bits == full_bits
    # Past the largest gap every k costs more, so the first minimum is the same k.
    assert k == full_k


@given(st.lists(st.booleans(), min_size=1, max_size=400))
def test_written_mask_has_the_size_of_its_chosen_encoding(bits: list[bool]) -> None:
    m = torch.tensor(bits)
    data, idx = write_mask(m, "w")
    sizes = mask_encoding_sizes(m)
    choice = choose_mask_encoding(m)
    assert np.array_equal(idx, np.flatnonzero(np.array(bits)))
    assert len(data) - 1 == (0 if choice == "all" else sizes[choice])
    deltas = np.diff(idx, prepend=0)
    assert sizes["delta"] == len(varints(np.array([len(idx)]))) + len(varints(deltas))
