"""SparseFedAvg's pure round maths: initial mask counts, zeroing off the mask, output checks."""

from __future__ import annotations

import pytest
import torch

from strategies.aggregation.sparse_round import check_mask, check_merged, initial_mask, masked
from strategies.sparse.density import uniform_densities

STATE = {"a.weight": torch.ones(4, 4), "a.bias": torch.ones(4), "b.weight": torch.ones(2, 5)}


def test_initial_mask_covers_the_given_keys_with_exact_counts() -> None:
    mask = initial_mask(STATE, ["a.weight", "b.weight"], 0.5, uniform_densities, 0, {}, {})
    assert set(mask) == {"a.weight", "b.weight"}
    assert int(mask["a.weight"].sum()) == 8 and int(mask["b.weight"].sum()) == 5
    again = initial_mask(STATE, ["a.weight", "b.weight"], 0.5, uniform_densities, 0, {}, {})
    assert all(torch.equal(mask[k], again[k]) for k in mask)  # seeded
    dense = initial_mask(STATE, ["a.weight"], 1.0, uniform_densities, 0, {}, {})
    assert bool(dense["a.weight"].all())


def test_initial_mask_refuses_missing_selection_or_keys() -> None:
    with pytest.raises(ValueError, match="sparse_keys or an initial_mask"):
        initial_mask(STATE, None, 0.5, uniform_densities, 0, {}, {})
    with pytest.raises(ValueError, match="not in the model"):
        initial_mask(STATE, ["c.weight"], 0.5, uniform_densities, 0, {}, {})


def test_masked_zeros_off_the_mask_only() -> None:
    mask = {"a.bias": torch.tensor([True, False, True, False])}
    out = masked(STATE, mask)
    assert out["a.bias"].tolist() == [1.0, 0.0, 1.0, 0.0]
    assert torch.equal(out["a.weight"], STATE["a.weight"])


def test_rule_output_checks() -> None:
    mask = {"a.bias": torch.ones(4, dtype=torch.bool)}
    assert set(check_mask({"a.bias": torch.zeros(4, dtype=torch.bool)}, mask, "r")) == {"a.bias"}
    with pytest.raises(ValueError, match="not a bool"):
        check_mask({"a.bias": torch.zeros(4)}, mask, "r")
    with pytest.raises(ValueError, match="keys differ"):
        check_mask({"a.bias": mask["a.bias"], "x": mask["a.bias"]}, mask, "r")
    check_merged(dict(STATE), STATE, "r")
    with pytest.raises(ValueError, match="bad keys/shapes"):
        check_merged({**STATE, "a.bias": torch.ones(5)}, STATE, "r")
